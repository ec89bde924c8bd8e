"""Training: strategies, the loop, EMA (Polyak averaging), checkpoints and summaries.

A run directory holds everything needed to resume or to use the model later:

    run_dir/
      config.gin             the parsed gin config (written at start-up)
      operative_config.gin   the values the run actually used (start-up, after building)
      model.json             the model's constructor arguments
      checkpoints/           tf.train.Checkpoint: model, ema, optimizer, step, epoch
      train/, eval/          TensorBoard summaries
      samples/               PNG sample grids
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import gin
import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from pixelcnn import data, likelihood
from pixelcnn.model import PixelCNNPP

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


# ---------------------------------------------------------------------------- devices
def split_cpu(num_devices: int) -> None:
    """Splits the CPU into ``num_devices`` logical devices (call before TF starts).

    Lets ``multigpu`` run several replicas on a machine without GPUs.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        if len(tf.config.list_logical_devices("CPU")) != num_devices:
            raise RuntimeError(
                "the CPU can only be split before TensorFlow has started; call split_cpu first"
            ) from e


def local_devices() -> list[str]:
    """The local GPUs, or the logical CPU devices when there is no GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(kind: str, device: str | None = None) -> tf.distribute.Strategy:
    """'single' (one device), 'multigpu' (MirroredStrategy) or 'multiworker'.

    single: ``device`` if given, else the first GPU, else the CPU.
    multigpu: all local GPUs; without GPUs, all logical CPU devices (see split_cpu).
    multiworker: MultiWorkerMirroredStrategy across the workers named in TF_CONFIG.
    """
    if kind == "single":
        if device is None:
            device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if kind == "multigpu":
        return tf.distribute.MirroredStrategy(local_devices())
    if kind == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "multiworker needs TF_CONFIG describing the cluster, e.g. "
                '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {kind!r}: use single, multigpu or multiworker")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


# ---------------------------------------------------------------------------- run dirs
def new_run_dir(root: str = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unconfigured_model(config: dict) -> PixelCNNPP:
    """PixelCNNPP(**config) with every argument explicit, so gin bindings cannot interfere."""
    return PixelCNNPP(**config)


def latest_checkpoint(run_dir: str | os.PathLike, checkpoint: str | None = None) -> str:
    ckpt_dir = Path(run_dir) / "checkpoints"
    if checkpoint is not None:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        return checkpoint
    path = tf.train.latest_checkpoint(str(ckpt_dir))
    if path is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: train first (a run saves every epoch), or pass "
            "--checkpoint"
        )
    return path


def load_for_inference(
    run_dir: str | os.PathLike,
    checkpoint: str | None = None,
    use_ema: bool = True,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[PixelCNNPP, str]:
    """The run's model with its EMA (or raw) weights from the latest/given checkpoint.

    With a strategy the variables are created in its scope (mirrored over its devices).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = _model_config(run_dir)
    path = latest_checkpoint(run_dir, checkpoint)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = _unconfigured_model(config)
        _build(model)
        ckpt = tf.train.Checkpoint(**{"ema" if use_ema else "model": model})
        ckpt.restore(path).expect_partial().assert_existing_objects_matched()
    return model, path


def distributed_log_prob(strategy: tf.distribute.Strategy, model: PixelCNNPP):
    """fn(images int [B, H, W, C], labels [B] or None) -> log p [B], the batch split
    over the strategy's replicas (in order) and the results gathered."""
    compiled = _compile(lambda x, y: model.log_prob(x, y))
    k = strategy.num_replicas_in_sync
    if k == 1:
        return lambda images, labels=None: compiled(tf.constant(images), labels)

    def fn(images, labels=None):
        chunk = -(-len(images) // k)

        def part(ctx):
            i = ctx.replica_id_in_sync_group
            y = None if labels is None else tf.constant(labels[i * chunk : (i + 1) * chunk])
            return tf.constant(images[i * chunk : (i + 1) * chunk]), y

        values = strategy.experimental_distribute_values_from_function(part)
        out = strategy.run(lambda v: compiled(v[0], v[1]), args=(values,))
        return tf.concat(strategy.experimental_local_results(out), axis=0)

    return fn


def _model_config(run_dir: Path) -> dict:
    path = run_dir / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a pixelcnn run directory")
    config = json.loads(path.read_text())
    config["image_shape"] = tuple(config["image_shape"])
    config.pop("precision", None)  # how it was trained; inference runs in float32
    return config


def _build(model: PixelCNNPP) -> None:
    labels = tf.zeros([1], tf.int32) if model.num_classes else None
    model(tf.zeros([1, *model.image_shape]), labels)


# ---------------------------------------------------------------------------- steps
def broadcast_from_first_replica(strategy: tf.distribute.Strategy, variables) -> None:
    """Makes every replica (and worker) hold replica 0's values of ``variables``."""

    def fn():
        ctx = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(ctx.replica_id_in_sync_group, 0), tf.float32)
        return [ctx.all_reduce(tf.distribute.ReduceOp.SUM, v * first) for v in variables]

    values = strategy.run(tf.function(fn, autograph=False))
    for v, value in zip(variables, values, strict=True):
        v.assign(strategy.experimental_local_results(value)[0])


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


class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam with each variable's update done by TensorFlow's fused kernel.

    ``ResourceApplyAdam`` computes Keras' update (the "epsilon hat" form:
    ``var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``) in one in-place
    op, where Keras' generic update runs about a dozen ops per variable and allocates
    a temporary the size of the variable for most of them (on the paper's CIFAR model
    this kept 0.18 GB less at peak). The kernel forms ``1 - beta`` from the float32
    beta (1 - 0.9995f = 0.0005 * (1 - 7e-5)) where Keras uses the Python float, the
    only difference. The slots (m, v) and the checkpoint layout are Keras' own.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not isinstance(variable, tf.Variable):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index].value, self._velocities[index].value
        step = tf.cast(self.iterations + 1, variable.dtype)
        beta_1 = tf.cast(self.beta_1, variable.dtype)
        beta_2 = tf.cast(self.beta_2, variable.dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=m.handle,
            v=v.handle,
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, variable.dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
        )


def _compile(fn, spec=None):
    """``fn`` as a tf.function: for one argument of ``spec``, or for the shapes it meets.

    No autograph: the model, the likelihood and the steps have no Python control flow
    on tensors (the traced graph is the same), and converting them cost 0.4-1.4 s of
    each trace of a tiny model's training step (3.5-4.5 s without it, 3.1 s with it).
    """
    if spec is None:
        return tf.function(fn, reduce_retracing=True, autograph=False)
    return tf.function(fn, input_signature=[spec], autograph=False)


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
    ):
        self.strategy = strategy
        self.ema_decay = ema_decay
        with strategy.scope():
            self.model = model_fn(dtype=PRECISIONS[precision])
            self.ema = model_fn(dtype="float32")
            _build(self.model)
            _build(self.ema)
            draw_initial_weights(self.model, seed)
            # The authors multiply the rate by learning_rate_decay every step (the seed
            # decayed it per epoch by mistake).
            schedule = keras.optimizers.schedules.ExponentialDecay(
                learning_rate, decay_steps=1, decay_rate=learning_rate_decay
            )
            self.optimizer = FusedAdam(schedule, beta_1=beta_1, beta_2=beta_2)
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step_in_epoch = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="step_in_epoch"
            )
        self.schedule = schedule
        self.dims = float(np.prod(self.model.image_shape))
        self.num_bits = self.model.num_bits
        self.train_step = _compile(self._train_step)
        self.eval_step = _compile(self._eval_step)
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
        for name, step, spec in (
            ("train_step", self._train_step, train_spec),
            ("eval_step", self._eval_step, eval_spec),
        ):
            if spec is not None and self._specs.get(name) != spec:
                setattr(self, name, _compile(step, spec))
                self._specs[name] = spec

    @property
    def step(self) -> tf.Variable:
        return self.optimizer.iterations

    def initialize(self, images, labels=None) -> None:
        """Data-dependent init on one batch, then EMA = weights (never on resume)."""
        with self.strategy.scope():
            self.model.initialize(images, labels)
            broadcast_from_first_replica(self.strategy, self.model.trainable_variables)
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
        with tf.GradientTape() as tape:
            params = self.model(images, labels, training=True)
            nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
            loss = tf.reduce_sum(nll) / tf.maximum(global_n, 1.0)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return tf.reduce_sum(nll), local_n

    def _train_step(self, batch):
        """One optimizer step on a distributed batch.

        Returns (mean NLL per image in nats, number of images) of the global batch.
        """
        nll_sum, n = self.strategy.run(self._replica_train, args=(batch,))
        nll_sum = self.strategy.reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None)
        n = self.strategy.reduce(tf.distribute.ReduceOp.SUM, n, axis=None)
        # Polyak averaging, in cross-replica context: every copy gets the same update.
        d = self.ema_decay
        for e, w in zip(self.ema.trainable_variables, self.model.trainable_variables, strict=True):
            e.assign_sub((1.0 - d) * (e - w))
        self.step_in_epoch.assign_add(1)
        return nll_sum / n, n

    def _replica_eval(self, batch):
        images, labels = batch["images"], batch.get("labels")
        params = self.ema(images, labels, training=False)
        nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
        return tf.reduce_sum(nll), tf.cast(tf.shape(images)[0], tf.float32)

    def _eval_step(self, batch):
        nll_sum, n = self.strategy.run(self._replica_eval, args=(batch,))
        reduce = self.strategy.reduce
        return (
            reduce(tf.distribute.ReduceOp.SUM, nll_sum, axis=None),
            reduce(tf.distribute.ReduceOp.SUM, n, axis=None),
        )

    def evaluate(self, dist_dataset) -> float:
        """Mean test NLL per image (nats) with the EMA weights over a whole dataset."""
        total, count = 0.0, 0.0
        for batch in dist_dataset:
            s, n = self.eval_step(batch)
            total += float(s)
            count += float(n)
        if count == 0:
            raise ValueError("the test dataset is empty")
        return total / count

    def bits_per_dim(self, nll: float) -> float:
        return nll / (self.dims * math.log(2.0))


# ---------------------------------------------------------------------------- the loop
class _StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class TrainingInterrupted(Exception):
    """Raised after a SIGINT/SIGTERM, once the checkpoint is saved."""


def _write_config(run_dir: Path, model: PixelCNNPP, precision: str) -> None:
    write_text_atomic(run_dir / "config.gin", gin.config_str())
    write_text_atomic(run_dir / "operative_config.gin", gin.operative_config_str())
    summary = model.config_summary() | {"precision": precision}
    write_text_atomic(run_dir / "model.json", json.dumps(summary, indent=2) + "\n")


@gin.configurable(denylist=["log_dir", "strategy"])
def train(
    log_dir: str | os.PathLike,
    strategy: tf.distribute.Strategy,
    dataset_fn=gin.REQUIRED,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    learning_rate_decay: float = 0.999995,
    beta_1: float = 0.95,
    beta_2: float = 0.9995,
    ema_decay: float = 0.9995,
    max_epoch: int = 100,
    max_steps: int | None = None,
    chkpt_to_keep: int = 5,
    checkpoint_every_minutes: float = 30.0,
    eval_every_steps: int | None = None,
    images_to_log: int = 16,
    log_images_every: int = 1,
    init_batch_size: int = 16,
    precision: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Trains a PixelCNNPP (built from the gin bindings of PixelCNNPP) and returns metrics.

    Args:
      log_dir: the run directory; an existing one with checkpoints resumes.
      strategy: from make_strategy.
      dataset_fn: fn(batch_size) -> (train, test) tf.data datasets; see pixelcnn.data.
      batch_size: global batch size (split over replicas).
      learning_rate, beta_1, beta_2: Adam; the defaults are the authors'.
      learning_rate_decay: factor applied to the rate every step.
      ema_decay: Polyak averaging of the weights, used for evaluation and sampling.
      max_epoch: epochs to train; max_steps, if set, stops earlier.
      chkpt_to_keep: checkpoints kept; one is written every epoch, every
        ``checkpoint_every_minutes``, at the end and on SIGINT/SIGTERM.
      eval_every_steps: evaluate every N steps too (always at the end of each epoch).
      images_to_log: samples drawn every ``log_images_every`` epochs (0: none).
      init_batch_size: images of the first batch used for data-dependent init.
      precision: "float32" or "bfloat16" (mixed: weights, likelihood, EMA and optimizer
        state stay float32).
      seed: seeds TensorFlow's random ops and the logged samples.
    Returns:
      {"step", "epoch", "train_bits_per_dim", "test_bits_per_dim", "samples"}
    """
    if dataset_fn is gin.REQUIRED or dataset_fn is None:
        raise ValueError("bind train.dataset_fn, e.g. `train.dataset_fn = @embedded_mnist`")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    keras.utils.set_random_seed(seed)
    log_dir = Path(log_dir)
    chief = is_chief(strategy)
    log_dir.mkdir(parents=True, exist_ok=True)

    train_ds, test_ds = dataset_fn(batch_size)
    trainer = Trainer(
        strategy,
        PixelCNNPP,
        learning_rate,
        learning_rate_decay,
        beta_1,
        beta_2,
        ema_decay,
        precision,
        seed,
    )
    model = trainer.model
    # Validate the data before any work: one clear error instead of a wasted run.
    first = next(iter(train_ds))
    data.check_batch(first, model.image_shape, model.num_bits, model.num_classes, "train")
    data.check_batch(
        next(iter(test_ds)), model.image_shape, model.num_bits, model.num_classes, "test"
    )

    def prepare(ds):
        return ds.map(
            lambda *e: _as_dict(data.to_model_input(e[0] if len(e) == 1 else e, model.num_bits)),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).prefetch(tf.data.AUTOTUNE)

    train_ds, test_ds = prepare(train_ds), prepare(test_ds)
    if chief:
        _write_config(log_dir, model, precision)

    ckpt = tf.train.Checkpoint(
        model=model,
        ema=trainer.ema,
        optimizer=trainer.optimizer,
        epoch=trainer.epoch,
        step_in_epoch=trainer.step_in_epoch,
    )
    # Non-chief workers of a multi-worker run write to a scratch directory they delete.
    ckpt_dir = log_dir / "checkpoints" if chief else log_dir / f"tmp_worker_{_task_id(strategy)}"
    manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir), max_to_keep=chkpt_to_keep)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"resumed from {manager.latest_checkpoint} at step {_value(trainer.step)}")
    else:
        init = _as_dict(data.to_model_input(first, model.num_bits))
        trainer.initialize(
            init["images"][:init_batch_size],
            init["labels"][:init_batch_size] if "labels" in init else None,
        )

    writers = (
        {k: tf.summary.create_file_writer(str(log_dir / k)) for k in ("train", "eval")}
        if chief
        else {k: tf.summary.create_noop_writer() for k in ("train", "eval")}
    )
    with writers["train"].as_default():
        tf.summary.text("operative_config", _markdown(gin.operative_config_str()), step=0)

    def save(reason: str) -> str:
        path = manager.save(checkpoint_number=trainer.step)
        if not chief:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return f"{reason}: saved {path}"

    def run_eval() -> float:
        dist_test = strategy.experimental_distribute_dataset(test_ds)
        trainer.trace_for(eval_spec=dist_test.element_spec)
        nll = trainer.evaluate(dist_test)
        bpd = trainer.bits_per_dim(nll)
        with writers["eval"].as_default():
            tf.summary.scalar("nll", nll, step=trainer.step)
            tf.summary.scalar("bits_per_dim", bpd, step=trainer.step)
        return bpd

    result = {"test_bits_per_dim": None, "train_bits_per_dim": None, "samples": []}

    def samples(step: int) -> None:
        if chief and images_to_log:
            path = log_samples(trainer.ema, log_dir, images_to_log, seed, step, writers["train"])
            result["samples"].append(str(path))

    last_save = time.monotonic()
    with _StopRequested() as stop:
        while _value(trainer.epoch) < max_epoch:
            if max_steps is not None and _value(trainer.step) >= max_steps:
                break
            epoch = _value(trainer.epoch)
            # Resume mid-epoch where the checkpoint stopped: with a deterministic dataset
            # order this continues the same curve exactly.
            skip = _value(trainer.step_in_epoch)
            dist_train = strategy.experimental_distribute_dataset(train_ds.skip(skip))
            trainer.trace_for(train_spec=dist_train.element_spec)
            bar = tqdm(
                desc=f"epoch {epoch + 1}/{max_epoch}",
                unit="img",
                disable=not (progress and chief),
            )
            running, tick = None, time.monotonic()
            stopped_early = False
            for batch in dist_train:
                loss, count = trainer.train_step(batch)
                nll, count = float(loss), int(count)
                step = _value(trainer.step)
                if not math.isfinite(nll):
                    raise FloatingPointError(
                        f"the training loss became {nll} at step {step}; the last good "
                        f"checkpoint is kept in {ckpt_dir}. Lower train.learning_rate or check "
                        "the data."
                    )
                now = time.monotonic()
                rate = count / max(now - tick, 1e-9)
                tick = now
                running = nll if running is None else 0.98 * running + 0.02 * nll
                bar.update(count)
                bar.set_postfix(bpd=f"{trainer.bits_per_dim(running):.3f}", img_s=f"{rate:.1f}")
                with writers["train"].as_default():
                    tf.summary.scalar("nll", nll, step=step)
                    tf.summary.scalar("bits_per_dim", trainer.bits_per_dim(nll), step=step)
                    tf.summary.scalar("learning_rate", trainer.schedule(step - 1), step=step)
                    tf.summary.scalar("images_per_sec", rate, step=step)
                result["train_bits_per_dim"] = trainer.bits_per_dim(running)
                if eval_every_steps and step % eval_every_steps == 0:
                    result["test_bits_per_dim"] = run_eval()
                if stop.signal is not None:
                    bar.close()
                    print(save(f"signal {stop.signal} at step {step}"))
                    raise TrainingInterrupted(
                        f"stopped by signal {stop.signal} at step {step}; rerun with the same "
                        "--log-dir to resume"
                    )
                if now - last_save > 60.0 * checkpoint_every_minutes:
                    save("timer")
                    last_save = now
                if max_steps is not None and step >= max_steps:
                    stopped_early = True
                    break
            bar.close()
            if not stopped_early:
                trainer.epoch.assign_add(1)
                trainer.step_in_epoch.assign(0)
            result["test_bits_per_dim"] = run_eval()
            print(
                f"epoch {_value(trainer.epoch)} step {_value(trainer.step)}: test bits/dim "
                f"{result['test_bits_per_dim']:.4f} (EMA weights)"
            )
            if not stopped_early and _value(trainer.epoch) % log_images_every == 0:
                samples(_value(trainer.step))
            save(f"epoch {_value(trainer.epoch)}")
            last_save = time.monotonic()
    if result["test_bits_per_dim"] is None:
        result["test_bits_per_dim"] = run_eval()
    if not result["samples"]:
        samples(_value(trainer.step))
    save("end")
    for w in writers.values():
        w.flush()
    result.update(step=_value(trainer.step), epoch=_value(trainer.epoch))
    if chief:
        write_text_atomic(log_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _value(variable) -> int:
    """An integer variable's value, also for mirrored variables (cross-replica read)."""
    return int(tf.convert_to_tensor(variable).numpy())


def _task_id(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id) if resolver is not None and resolver.task_id is not None else 0


def _as_dict(pair) -> dict:
    images, labels = pair
    return {"images": images} if labels is None else {"images": images, "labels": labels}


def _markdown(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def log_samples(model, log_dir: Path, count: int, seed: int, step: int, writer) -> Path:
    """Draws ``count`` samples with the (EMA) model; writes a PNG grid and a summary."""
    from pixelcnn import sampling  # local: sampling imports this module's helpers

    labels = None
    if model.num_classes:
        labels = tf.range(count) % model.num_classes
    images = sampling.sample_fast(model, count, labels=labels, seed=(seed, step))
    grid = make_grid(images.numpy(), model.num_bits)
    path = log_dir / "samples" / f"step_{step:08d}.png"
    save_png(grid, path)
    with writer.as_default():
        tf.summary.image("samples", grid[None].astype(np.float32) / 255.0, step=step)
    return path


def make_grid(
    images: np.ndarray, num_bits: int, columns: int | None = None, pad: int = 1
) -> np.ndarray:
    """int [N, H, W, C] in [0, 2**b) -> uint8 [rows*(H+pad), cols*(W+pad), 1 or 3] grid."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    scaled = np.round(images.astype(np.float64) * 255.0 / (2**num_bits - 1)).astype(np.uint8)
    if c not in (1, 3):  # show the first channel of other channel counts
        scaled = scaled[..., :1]
    grid = np.full(
        (rows * (h + pad) + pad, columns * (w + pad) + pad, scaled.shape[-1]), 128, np.uint8
    )
    for k in range(n):
        r, col = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = scaled[k]
    return grid


def save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)
