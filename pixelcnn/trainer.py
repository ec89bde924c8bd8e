"""The Trainer: the model, its EMA copy, the optimizer and the compiled training and
evaluation steps, under a tf.distribute strategy. ``pixelcnn.train`` runs it."""

from __future__ import annotations

import keras
import tensorflow as tf

from pixelcnn import distribute, faults, likelihood
from pixelcnn.model import PixelCNNPP

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
WEIGHTS = ("ema", "raw")  # the two sets of weights every evaluation reports


def draw_initial_weights(model: PixelCNNPP, seed: int) -> None:
    """Draws every kernel from N(0, 0.05) (the authors' init) with a fixed seed.

    Keras' unseeded initializers draw their seeds from process-global state, so two
    runs in one process would start differently; this makes ``train.seed`` decide.
    g = 1 and b = 0 are left as built (data-dependent init sets them).
    """
    rng = tf.random.Generator.from_seed(seed)
    for v in model.trainable_variables:
        if v.name in ("v", "kernel"):
            v.assign(rng.normal(v.shape, 0.0, 0.05, dtype=v.dtype))


def ema_decay_at(decay: float, updates) -> tf.Tensor:
    """The EMA's decay for its update after ``updates`` earlier ones (a tensor).

    min(decay, (1 + t) / (10 + t)), the rule of tf.train.ExponentialMovingAverage with
    ``num_updates``: the average covers the steps actually taken instead of keeping the
    initial weights at decay^t of its weight (the authors' EMA has no warm-up, which
    only stops mattering after ~10,000 steps). t is the optimizer's step count, which
    the checkpoint holds, so a resumed run continues the same average, and a
    checkpoint written before this rule continues from its own step.
    """
    t = tf.cast(updates, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + t) / (10.0 + t))


class Trainer:
    """Owns the model, its EMA copy, the optimizer and the compiled steps."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model_fn,
        learning_rate: float,
        learning_rate_decay: float,
        beta_1: float,
        beta_2: float,
        ema_decay: float,
        precision: str,
        seed: int = 0,
        l2_weight: float = 0.0,
    ):
        """l2_weight: adds l2_weight * the squared norm of every effective (weight-
        normalised) kernel to the loss, i.e. the sum of every g squared (the background
        model of a likelihood ratio, ``pixelcnn.ood``)."""
        self.strategy = strategy
        self.ema_decay = ema_decay
        self.l2_weight = float(l2_weight)
        self.seed = int(seed)
        self.precision = precision
        with strategy.scope():
            self.model = model_fn(dtype=PRECISIONS[precision])
            self.ema = model_fn(dtype="float32")
            # The raw weights are evaluated in float32 too (as `evaluate --raw-weights`
            # does): a bfloat16 model gets a float32 copy, refreshed before each use.
            self.raw = self.model if precision == "float32" else model_fn(dtype="float32")
            for model in {id(m): m for m in (self.model, self.ema, self.raw)}.values():
                model.build_variables()
            draw_initial_weights(self.model, seed)
            # The authors multiply the rate by learning_rate_decay every step (the
            # original TF2 code decayed it per epoch by mistake).
            schedule = keras.optimizers.schedules.ExponentialDecay(
                learning_rate, decay_steps=1, decay_rate=learning_rate_decay
            )
            self.optimizer = keras.optimizers.Adam(schedule, beta_1=beta_1, beta_2=beta_2)
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step_in_epoch = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="step_in_epoch"
            )
        self.schedule = schedule
        self.num_bits = self.model.num_bits
        self.train_step = distribute.compile_fn(self._train_step)
        self.eval_steps = self._compile_eval_steps()
        self._specs = {}

    def trace_for(self, train_spec=None, eval_spec=None) -> None:
        """Compiles the steps once for batches of these specs: the ``element_spec`` of
        the distributed datasets they will read.

        Without a spec a step traces for the shapes of its first batch, and traces
        again (for tens of seconds) when an epoch ends on a partial batch. A dataset
        batched without ``drop_remainder`` leaves the batch dimension unknown in its
        spec, so one graph serves every batch. Giving the spec already compiled for
        keeps the compiled step.
        """
        if train_spec is not None and self._specs.get("train") != train_spec:
            self.train_step = distribute.compile_fn(self._train_step, train_spec)
            self._specs["train"] = train_spec
        if eval_spec is not None and self._specs.get("eval") != eval_spec:
            self.eval_steps = self._compile_eval_steps(eval_spec)
            self._specs["eval"] = eval_spec

    @property
    def step(self) -> tf.Variable:
        return self.optimizer.iterations

    def initialize(self, images, labels=None) -> None:
        """Data-dependent init on one batch, then EMA = weights (never on resume)."""
        with self.strategy.scope():
            self.model.initialize(images, labels)
            distribute.broadcast_from_first_replica(self.strategy, self.model.trainable_variables)
            for e, w in zip(
                self.ema.trainable_variables, self.model.trainable_variables, strict=True
            ):
                e.assign(w)

    def _replica_train(self, batch):
        images, labels = batch["images"], batch.get("labels")
        ctx = tf.distribute.get_replica_context()
        local_n = tf.cast(tf.shape(images)[0], tf.float32)
        # Mean over the images of the global batch, whatever its size (the last batch
        # of an epoch may be partial) and however it is split over replicas.
        global_n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_n)
        # Every dropout mask of this step is a function of (train.seed, step, replica):
        # a resumed run draws the masks of the uninterrupted one.
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.step, tf.int64)])
        seed = tf.random.experimental.stateless_fold_in(seed, ctx.replica_id_in_sync_group)
        with tf.GradientTape() as tape:
            params = self.model(images, labels, training=True, dropout_seed=seed)
            nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
            loss = tf.reduce_sum(nll) / tf.maximum(global_n, 1.0)
            if self.l2_weight:  # summed over the replicas by apply_gradients
                loss += self.l2_weight * self.l2_norm() / ctx.num_replicas_in_sync
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return tf.reduce_sum(nll), local_n

    def l2_norm(self) -> tf.Tensor:
        """The squared norm of every effective kernel of the training model: g v / |v|
        has norm |g| per output unit, so this is the sum of every g squared."""
        return tf.add_n([tf.reduce_sum(tf.square(conv.g)) for conv in self.model.convolutions()])

    def _train_step(self, batch):
        """One optimizer step on a distributed batch.

        Returns (mean NLL per image in nats, number of images) of the global batch.
        """
        nll_sum, n = self.strategy.run(self._replica_train, args=(batch,))
        nll_sum = self.strategy.reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None)
        n = self.strategy.reduce(tf.distribute.ReduceOp.SUM, n, axis=None)
        # Polyak averaging, in cross-replica context: every copy gets the same update.
        d = ema_decay_at(self.ema_decay, self.step - 1)
        for e, w in zip(self.ema.trainable_variables, self.model.trainable_variables, strict=True):
            e.assign_sub((1.0 - d) * (e - w))
        self.step_in_epoch.assign_add(1)
        return nll_sum / n, n

    def _compile_eval_steps(self, spec=None) -> dict:
        return {w: distribute.compile_fn(self._eval_step_for(w), spec) for w in WEIGHTS}

    def _eval_step_for(self, weights: str):
        """The step that sums the NLL of a distributed batch under the EMA or raw model."""
        model = self.ema if weights == "ema" else self.raw

        def replica_eval(batch):
            images, labels = batch["images"], batch.get("labels")
            nll = -model.unit_log_prob(images, labels)  # as evaluate and scoring compute it
            return tf.reduce_sum(nll), tf.cast(tf.shape(images)[0], tf.float32)

        def eval_step(batch):
            nll_sum, n = self.strategy.run(replica_eval, args=(batch,))
            reduce = self.strategy.reduce
            return (
                reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None),
                reduce(tf.distribute.ReduceOp.SUM, n, axis=None),
            )

        return eval_step

    def evaluate(self, dist_dataset, weights: str = "ema", should_stop=None) -> float:
        """Mean test NLL per image (nats) over a whole dataset.

        weights: "ema" (the average) or "raw" (the training weights, in float32).
        should_stop: a function checked before every batch; when it returns True the
        evaluation is abandoned with ``SignalReceived``.
        """
        if weights == "raw" and self.raw is not self.model:
            with self.strategy.scope():
                for r, w in zip(
                    self.raw.trainable_variables, self.model.trainable_variables, strict=True
                ):
                    r.assign(w)
        step = self.eval_steps[weights]
        total, count = 0.0, 0.0
        for batch in dist_dataset:
            if should_stop is not None and should_stop():
                raise faults.SignalReceived("evaluation")
            s, n = step(batch)
            total += float(s)
            count += float(n)
        if count == 0:
            raise ValueError("the test dataset is empty")
        return total / count

    def bits_per_dim(self, nll: float) -> float:
        """A mean NLL per image in nats -> bits per sub-pixel of this model's images."""
        return float(likelihood.bits_per_dim(-nll, self.model.image_shape))
