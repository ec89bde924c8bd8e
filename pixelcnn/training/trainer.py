"""The Trainer: the model, its EMA copy, the optimizer and the compiled training and
evaluation steps, under a tf.distribute strategy, configured by ``TrainerOptions``.
``training.loop`` runs it."""

from __future__ import annotations

import dataclasses
import math

import keras
import tensorflow as tf

from pixelcnn import checks, distribute, internals, likelihood
from pixelcnn.model import PixelCNNPP
from pixelcnn.training import faults, passes

# train.precision -> the Keras dtype policy of the training model. Mixed precisions keep
# the weights, EMA, optimizer state, output layer and likelihood in float32; float16
# adds dynamic loss scaling (``keras.optimizers.LossScaleOptimizer``).
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
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


SCHEDULES = ("exponential", "cosine", "linear")  # train.schedule


def check_schedule(kind: str) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {kind!r}")


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The rate of the step after ``step`` earlier ones, ramped up linearly over the
    first ``warmup_steps`` steps ((step + 1) / warmup_steps), times the schedule's
    factor:

    - "exponential": ``decay**step`` (the authors' per-step decay; the original TF2
      code decayed per epoch by mistake), whatever the run's length;
    - "cosine", "linear": from 1 down to ``floor`` at the run's end, by half a cosine
      or a straight line in the run's progress p (0 at its start, 1 at its end), read
      from the ``progress`` variable, which the loop sets before every step from the
      run's known end (``loop.Progress``: max_steps, max_epoch or the time budget).
    """

    def __init__(
        self,
        rate: float,
        decay: float,
        warmup_steps: int = 0,
        kind: str = "exponential",
        floor: float = 0.0,
        progress: tf.Variable | None = None,
    ):
        check_schedule(kind)
        if kind != "exponential" and progress is None:
            raise ValueError(f"the {kind} schedule needs the run's progress variable")
        self.rate, self.decay, self.warmup_steps = float(rate), float(decay), int(warmup_steps)
        self.kind, self.floor, self.progress = kind, float(floor), progress

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.kind == "exponential":
            rate = self.rate * tf.pow(self.decay, step)
        else:
            p = tf.clip_by_value(tf.cast(self.progress, tf.float32), 0.0, 1.0)
            if self.kind == "cosine":
                factor = 0.5 * (1.0 + tf.cos(math.pi * p))
            else:
                factor = 1.0 - p
            rate = self.rate * (self.floor + (1.0 - self.floor) * factor)
        if self.warmup_steps:
            rate *= tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return rate

    def get_config(self) -> dict:
        return {
            "rate": self.rate,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
            "floor": self.floor,
        }


def ema_decay_at(decay: float, updates, warmup: float = 10.0) -> tf.Tensor:
    """The EMA's decay for its update after ``updates`` earlier ones (a tensor).

    min(decay, (1 + t) / (warmup + t)); warmup 10 is the rule of
    tf.train.ExponentialMovingAverage with ``num_updates``: the average covers the steps
    actually taken instead of keeping the initial weights at decay^t of its weight (the
    authors' EMA has no warm-up). Until the cap, step u's weights count about as
    u^(warmup - 2): warmup 10 averages about the last tenth of the steps, 3 weights them
    linearly, 2 is the plain mean of all (Polyak-Ruppert). The cap 0.9995 is reached
    only after 2,000 x (warmup - 1) steps. t is the optimizer's step count, which the
    checkpoint holds, so a resumed run continues the same average, and a checkpoint
    written before this rule continues from its own step.
    """
    t = tf.cast(updates, tf.float32)
    return tf.minimum(tf.constant(decay, tf.float32), (1.0 + t) / (warmup + t))


def ema_cap_step(decay: float, warmup: float) -> float:
    """The update from which ``ema_decay_at`` is the cap ``decay``: (1 + t) / (warmup
    + t) reaches decay at t = (warmup decay - 1) / (1 - decay); inf for decay 1."""
    return math.inf if decay >= 1.0 else max(0.0, (warmup * decay - 1.0) / (1.0 - decay))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerOptions:
    """How a Trainer optimises and averages the weights; the fields are train()'s
    bindings of the same names (``pixelcnn.training.train`` says what each does), with
    the same defaults (the authors')."""

    # Adam and its schedule (``LearningRate``)
    learning_rate: float = 1e-3
    schedule: str = "exponential"  # or "cosine", "linear": to the floor at the run's end
    learning_rate_decay: float = 0.999995  # a factor every step ("exponential")
    learning_rate_floor: float = 0.0  # the end's rate over learning_rate ("cosine", "linear")
    beta_1: float = 0.95
    beta_2: float = 0.9995
    warmup_steps: int = 0
    clip_norm: float | None = None  # the whole batch's global gradient norm; None: not clipped
    # Polyak averaging (``ema_decay_at``)
    ema_decay: float = 0.9995
    ema_warmup: float = 10.0
    # the squared norm of every effective kernel, weighted into the loss (a background model)
    l2_weight: float = 0.0
    # "float32", "bfloat16", "float16" (``PRECISIONS``); train() resolves "auto" first
    precision: str = "float32"
    jit_compile: bool = False  # the model's passes compiled by XLA
    seed: int = 0  # initial weights and dropout masks

    def check(self) -> None:
        """ValueError naming the binding that is wrong ("auto" is a valid precision)."""
        if self.precision not in (*PRECISIONS, "auto"):
            raise ValueError(
                f"train.precision must be one of {[*PRECISIONS, 'auto']}, got {self.precision!r}"
            )
        checks.check_positive(self.learning_rate, "train.learning_rate")
        check_schedule(self.schedule)
        checks.check_fraction(self.learning_rate_decay, "train.learning_rate_decay", one=True)
        checks.check_fraction(
            self.learning_rate_floor, "train.learning_rate_floor", zero=True, one=True
        )
        checks.check_fraction(self.beta_1, "train.beta_1", zero=True)
        checks.check_fraction(self.beta_2, "train.beta_2", zero=True)
        checks.check_fraction(self.ema_decay, "train.ema_decay", zero=True, one=True)  # 1: no cap
        checks.check_positive(self.clip_norm, "train.clip_norm", optional=True)
        checks.check_int(self.warmup_steps, "train.warmup_steps", minimum=0)
        checks.check_above(
            self.ema_warmup, "train.ema_warmup", 1, " (at 1 the average never moves)"
        )


class Trainer:
    """Owns the model, its EMA copy, the optimizer and the compiled steps."""

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        model_fn,
        options: TrainerOptions = TrainerOptions(),  # noqa: B008 (frozen, so shared safely)
    ):
        """model_fn(dtype=...) -> a PixelCNNPP. options.l2_weight adds l2_weight * the
        squared norm of every effective (weight-normalised) kernel to the loss, i.e. the
        sum of every g squared (the background model of a likelihood ratio,
        ``pixelcnn.inference.ood``)."""
        if options.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {list(PRECISIONS)}, got {options.precision!r} "
                '(resolve "auto" with distribute.resolve_precision first)'
            )
        # Every step's activations come from the heap, not fresh mappings (also where
        # no tf.distribute iterator has changed malloc's thresholds yet).
        internals.undo_malloc_trim_patch()
        self.strategy = strategy
        self.ema_decay, self.ema_warmup = options.ema_decay, float(options.ema_warmup)
        self.l2_weight = float(options.l2_weight)
        self.seed = int(options.seed)
        self.precision = precision = options.precision
        self.clip_norm = None if options.clip_norm is None else float(options.clip_norm)
        self.jit_compile = bool(options.jit_compile)
        with strategy.scope():
            self.model = model_fn(dtype=PRECISIONS[precision])
            self.ema = model_fn(dtype="float32")
            # The raw weights are evaluated in float32 too (as `evaluate --raw-weights`
            # does): a mixed-precision model gets a float32 copy, refreshed before use.
            self.raw = self.model if precision == "float32" else model_fn(dtype="float32")
            for model in {id(m): m for m in (self.model, self.ema, self.raw)}.values():
                model.build_variables()
            draw_initial_weights(self.model, self.seed)
            # The run's progress in [0, 1], set by the loop before every step and kept
            # in the checkpoint, so that a resumed run continues the same schedule.
            self.progress = tf.Variable(0.0, trainable=False, name="schedule_progress")
            self.schedule = LearningRate(
                options.learning_rate,
                options.learning_rate_decay,
                options.warmup_steps,
                kind=options.schedule,
                floor=options.learning_rate_floor,
                progress=self.progress,
            )
            self.optimizer = keras.optimizers.Adam(
                self.schedule, beta_1=options.beta_1, beta_2=options.beta_2
            )
            if precision == "float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step_in_epoch = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="step_in_epoch"
            )
        self.num_bits = self.model.num_bits
        self._gradients = tf.function(self._gradients_of, jit_compile=True, autograph=False)
        self.train_step = distribute.compile_fn(self._train_step)
        self.eval_steps = self._compile_eval_steps()
        self._specs = {}

    @property
    def loss_scale(self) -> tf.Variable | None:
        """float16's dynamic loss scale (checkpointed with the optimizer), else None."""
        return getattr(self.optimizer, "dynamic_scale", None)

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

    def progress_value(self) -> float:
        """The schedule's progress in [0, 1] (restored with a checkpoint)."""
        return float(tf.convert_to_tensor(self.progress).numpy())

    def set_progress(self, value: float) -> None:
        with self.strategy.scope():
            self.progress.assign(value)

    def initialize(self, images, labels=None) -> None:
        """Data-dependent init on one batch, then EMA = weights (never on resume)."""
        with self.strategy.scope():
            self.model.initialize(images, labels)
            distribute.broadcast_from_first_replica(self.strategy, self.model.trainable_variables)
            for e, w in zip(
                self.ema.trainable_variables, self.model.trainable_variables, strict=True
            ):
                e.assign(w)

    def _gradients_of(self, images, labels, global_n, seed, num_replicas):
        """(summed NLL of these images, gradient of the replica's share of the loss,
        loss-scaled for float16): the model's passes, what ``jit_compile`` gives XLA."""
        with tf.GradientTape() as tape:
            params = self.model(images, labels, training=True, dropout_seed=seed)
            nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
            loss = tf.reduce_sum(nll) / tf.maximum(global_n, 1.0)
            if self.l2_weight:  # summed over the replicas with the gradients
                loss += self.l2_weight * self.l2_norm() / num_replicas
            if self.loss_scale is not None:
                loss = self.optimizer.scale_loss(loss)
        return tf.reduce_sum(nll), tape.gradient(loss, self.model.trainable_variables)

    def _replica_train(self, batch):
        images, labels = batch["images"], batch.get("labels")
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync
        local_n = tf.cast(tf.shape(images)[0], tf.float32)
        # Mean over the images of the global batch, whatever its size (the last batch
        # of an epoch may be partial) and however it is split over replicas.
        global_n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_n)
        # Every dropout mask of this step is a function of (train.seed, step, replica):
        # a resumed run draws the masks of the uninterrupted one.
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.step, tf.int64)])
        seed = tf.random.experimental.stateless_fold_in(seed, ctx.replica_id_in_sync_group)
        gradients_of = self._gradients if self.jit_compile else self._gradients_of
        nll_sum, grads = gradients_of(images, labels, global_n, seed, float(replicas))
        finite = tf.constant(True)
        if self.clip_norm is not None or self.loss_scale is not None:
            # Clipping and the overflow check need the whole batch's gradient, and Keras
            # clips and checks each replica's share: sum it here (every replica then
            # holds the same), and hand each replica 1/replicas of it, as the optimizer
            # sums the replicas' gradients again.
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            if self.clip_norm is not None:
                scale = 1.0 if self.loss_scale is None else self.loss_scale
                grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * scale)
            grads = [g / replicas for g in grads]
        # float16: a step whose gradient overflowed is skipped and the scale halved.
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return nll_sum, local_n, finite

    def l2_norm(self) -> tf.Tensor:
        """The squared norm of every effective kernel of the training model: g v / |v|
        has norm |g| per output unit, so this is the sum of every g squared."""
        return tf.add_n([tf.reduce_sum(tf.square(conv.g)) for conv in self.model.convolutions()])

    def _train_step(self, batch):
        """One optimizer step on a distributed batch.

        Returns (mean NLL per image in nats, number of images, whether the step was
        taken) of the global batch: float16 skips a step whose gradient overflowed.
        """
        nll_sum, n, finite = self.strategy.run(self._replica_train, args=(batch,))
        nll_sum = self.strategy.reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None)
        n = self.strategy.reduce(tf.distribute.ReduceOp.SUM, n, axis=None)
        taken = self.strategy.experimental_local_results(finite)[0]  # the same on all
        # Polyak averaging, in cross-replica context: every copy gets the same update;
        # none for a skipped step.
        d = ema_decay_at(self.ema_decay, self.step - 1, self.ema_warmup)
        rate = (1.0 - d) * tf.cast(taken, tf.float32)
        for e, w in zip(self.ema.trainable_variables, self.model.trainable_variables, strict=True):
            e.assign_sub(rate * (e - w))
        self.step_in_epoch.assign_add(1)
        return nll_sum / n, n, taken

    def _compile_eval_steps(self, spec=None) -> dict:
        return {w: distribute.compile_fn(self._eval_step_for(w), spec) for w in WEIGHTS}

    def _eval_step_for(self, weights: str):
        """The step that sums the NLL of a distributed batch under the EMA or raw model."""
        model = self.ema if weights == "ema" else self.raw

        def nll_sum(images, labels):
            return -tf.reduce_sum(model.unit_log_prob(images, labels))  # as `evaluate`

        if self.jit_compile:
            nll_sum = tf.function(nll_sum, jit_compile=True, autograph=False)

        def replica_eval(batch):
            images, labels = batch["images"], batch.get("labels")
            return nll_sum(images, labels), tf.cast(tf.shape(images)[0], tf.float32)

        def eval_step(batch):
            nll_sum, n = self.strategy.run(replica_eval, args=(batch,))
            reduce = self.strategy.reduce
            return (
                reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None),
                reduce(tf.distribute.ReduceOp.SUM, n, axis=None),
            )

        return eval_step

    def evaluate(self, batches, weights: str = "ema", should_stop=None) -> float:
        """Mean test NLL per image (nats) over ``batches`` (distributed: one pass of
        ``passes.Passes`` or a distributed dataset).

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
        for batch in passes.iterate(batches):
            if should_stop is not None and should_stop():
                raise faults.SignalReceived("evaluation")
            s, n = step(batch)
            total += float(s)
            count += float(n)
        if count == 0:
            raise checks.empty("test dataset")
        return total / count

    def bits_per_dim(self, nll: float) -> float:
        """A mean NLL per image in nats -> bits per sub-pixel of this model's images."""
        return float(likelihood.bits_per_dim(-nll, self.model.image_shape))
