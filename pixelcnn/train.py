"""Training: the Trainer (model, EMA, optimizer, compiled steps) and the loop.

``train`` is the gin-configurable entry point behind ``pixelcnn single | multigpu |
multiworker``: it builds the model for the data, restores or initialises it, then runs
epochs of steps with evaluations (EMA and raw weights), checkpoints, summaries and
sample grids. What it writes is laid out in ``pixelcnn.rundir``; devices and
strategies are in ``pixelcnn.distribute``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import gin
import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from pixelcnn import contract, distribute, internals, likelihood, rundir, sampling
from pixelcnn.images import make_grid, save_png
from pixelcnn.model import PixelCNNPP

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


# ---------------------------------------------------------------------------- steps
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


WEIGHTS = ("ema", "raw")  # the two sets of weights every evaluation reports


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
    ):
        self.strategy = strategy
        self.ema_decay = ema_decay
        self.seed = int(seed)
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
            params = model(images, labels, training=False)
            nll = -likelihood.mixture_log_prob(images, params, self.num_bits, validate=False)
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
                raise SignalReceived("evaluation")
            s, n = step(batch)
            total += float(s)
            count += float(n)
        if count == 0:
            raise ValueError("the test dataset is empty")
        return total / count

    def bits_per_dim(self, nll: float) -> float:
        """A mean NLL per image in nats -> bits per sub-pixel of this model's images."""
        return float(likelihood.bits_per_dim(-nll, self.model.image_shape))


# ---------------------------------------------------------------------------- the loop
class _StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step.

    In a multi-worker run ``forward_sigint()`` hands SIGINT to TF's preemption handler
    as a SIGTERM instead (``_Preemption``), which owns SIGTERM there.
    """

    def __init__(self):
        self.signal = None
        self._old = {}
        self._forward = False

    def forward_sigint(self) -> None:
        self._forward = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self._forward and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class SignalReceived(Exception):
    """A SIGINT/SIGTERM arrived; raised where the loop can stop (between steps or
    evaluation batches), caught by ``train``, which saves and exits."""


class _Stop(Exception):
    """An exception whose message the CLI prints as it is (``str`` of one raised through
    a gin configurable gains gin's "In call to configurable" line)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TrainingInterrupted(_Stop):
    """Raised after a SIGINT/SIGTERM, once the checkpoint is saved."""


class _Preempted(Exception):
    """Raised by the preemption handler's exit_fn once every worker has saved."""


class WorkerLost(_Stop):
    """A multi-worker run lost a worker (killed, crashed, unreachable)."""


class _Preemption:
    """A multi-worker run's answer to SIGTERM (or SIGINT) sent to any one worker.

    TF's ``PreemptionCheckpointHandler`` owns SIGTERM: the worker that receives it
    announces a step through the coordination service, every worker stops after that
    step, saves (the chief into the run's checkpoints, the others into scratch
    directories) and raises ``_Preempted``. It counts its calls (one per training step
    of this invocation), so it is given an empty checkpoint of its own in a directory
    nothing is written to: the run's checkpoints are read and written by
    ``_Checkpoints`` alone. Single-process runs keep ``_StopRequested``'s handling.

    An evaluation is one collective computation, so it is abandoned by every worker at
    once or not at all: a flag set by a SIGTERM handler chained in front of TF's is
    summed over the workers before every evaluation batch (``any_worker_signalled``).
    """

    def __init__(self, strategy, checkpoints: _Checkpoints, run_dir: Path, stop):
        self.handler = None
        self.step = None
        self.signalled = False
        if not distribute.is_multi_worker(strategy):
            return
        resolver = strategy.cluster_resolver
        self.checkpoints = checkpoints
        self.scratch = run_dir / f"workertemp_{distribute.task_id(strategy)}"
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save
        )
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            resolver, tf.train.Checkpoint(), str(run_dir / "preemption"), config
        )
        stop.forward_sigint()
        tf_handler = signal.getsignal(signal.SIGTERM)

        def note_and_pass_on(signum, frame):
            self.signalled = True
            tf_handler(signum, frame)

        signal.signal(signal.SIGTERM, note_and_pass_on)

        # This worker's flag as a variable (a reduce of a host constant has no device to
        # reduce to), summed over the workers as distribute.broadcast_from_first_replica
        # reduces its variables.
        with strategy.scope():
            self._flag = tf.Variable(0.0, trainable=False)

        def total():
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, self._flag * 1.0)

        self._total = tf.function(total, autograph=False)
        self._strategy = strategy

    def any_worker_signalled(self) -> bool:
        """Whether any worker has received the signal (a collective: every worker must
        call it at the same point)."""
        self._flag.assign(1.0 if self.signalled else 0.0)
        summed = self._strategy.run(self._total)
        return float(self._strategy.experimental_local_results(summed)[0]) > 0

    def _save(self, *args, **kwargs) -> None:
        self.step = _value(self.checkpoints.trainer.step)
        print(self.checkpoints.save(f"preemption at step {self.step}"), flush=True)

    def _exit(self) -> None:
        raise _Preempted()

    def after_step(self) -> None:
        """Saves and raises _Preempted at the step the cluster agreed on."""
        if self.handler is not None:
            self.handler.save_checkpoint_if_preempted()

    def close(self) -> None:
        """Stops the handler's thread that watches the cluster while every worker is
        still up (``internals.stop_termination_watcher``)."""
        if self.handler is not None:
            internals.stop_termination_watcher(self.handler)

    def remove_scratch(self) -> None:
        """Deletes the folder the handler creates on non-chief workers (it deletes it
        itself only after a preemption)."""
        if self.handler is not None and not self.checkpoints.chief:
            shutil.rmtree(self.scratch, ignore_errors=True)


@gin.configurable(denylist=["run_dir", "strategy"])
def train(
    run_dir: str | os.PathLike,
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
    max_minutes: float | None = None,
    chkpt_to_keep: int = 5,
    checkpoint_every_minutes: float = 10.0,
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
      run_dir: the run directory; an existing one with checkpoints resumes.
      strategy: from make_strategy.
      dataset_fn: fn(batch_size) -> (train, test) tf.data datasets; see pixelcnn.data.
        The images' (H, W, C) decide the model's image_shape unless
        ``PixelCNNPP.image_shape`` is bound (then the data must match it).
      batch_size: global batch size (split over replicas).
      learning_rate, beta_1, beta_2: Adam; the defaults are the authors'.
      learning_rate_decay: factor applied to the rate every step.
      ema_decay: Polyak averaging of the weights, used for sampling; the decay warms up
        as min(ema_decay, (1 + t) / (10 + t)) at step t (see ``ema_decay_at``).
      max_epoch: epochs to train; max_steps, if set, stops earlier.
      max_minutes: wall-clock budget of this invocation, evaluation included: training
        stops early enough for the final evaluation and checkpoint to fit (None: none).
      chkpt_to_keep: checkpoints kept; one is written every epoch, every
        ``checkpoint_every_minutes``, at the end and on SIGINT/SIGTERM.
      eval_every_steps: evaluate every N steps too (always at the end of each epoch).
        Every evaluation reports the EMA and the raw (training) weights.
      images_to_log: samples drawn every ``log_images_every`` epochs (0: none).
      init_batch_size: images of the first batch used for data-dependent init.
      precision: "float32" or "bfloat16" (mixed: weights, likelihood, EMA and optimizer
        state stay float32).
      seed: seeds TensorFlow's random ops and the logged samples.
    Returns:
      {"step", "epoch", "train_bits_per_dim", "test_bits_per_dim" (EMA),
      "test_bits_per_dim_raw", "evaluations", "samples", "stopped"}
    """
    start = time.monotonic()
    _check_arguments(strategy, dataset_fn, batch_size, precision, max_minutes)
    keras.utils.set_random_seed(seed)
    run_dir = Path(run_dir)
    chief = distribute.is_chief(strategy)
    run_dir.mkdir(parents=True, exist_ok=True)

    train_ds, test_ds = dataset_fn(batch_size)
    first = contract.first_batch(train_ds, "train")
    image_shape = _image_shape(first)
    model_fn = functools.partial(PixelCNNPP, image_shape=image_shape)
    trainer = Trainer(
        strategy,
        model_fn,
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
    contract.check_batch(first, model.image_shape, model.num_bits, model.num_classes, "train")
    contract.check_batch(test_ds, model.image_shape, model.num_bits, model.num_classes, "test")
    train_ds = _prepare(train_ds, model.image_shape, model.num_bits)
    test_ds = _prepare(test_ds, model.image_shape, model.num_bits)
    if chief:
        rundir.write_config(run_dir, model, precision)

    checkpoints = _Checkpoints(trainer, run_dir, strategy, chkpt_to_keep, checkpoint_every_minutes)
    if not checkpoints.restore():
        init = _as_dict(contract.to_model_input(first, model.num_bits))
        trainer.initialize(
            init["images"][:init_batch_size],
            init["labels"][:init_batch_size] if "labels" in init else None,
        )
    summaries = _Summaries(run_dir, chief)
    deadline = _Deadline(start, max_minutes, test_ds)

    stopped = None
    with _StopRequested() as stop:
        run = _Run(trainer, test_ds, summaries, checkpoints, run_dir, start, batch_size, stop)
        try:
            # inside the try: its variable is made by a collective, which a worker lost
            # while the others start up makes fail
            run.preemption = _Preemption(strategy, checkpoints, run_dir, stop)
            while stopped is None and _value(trainer.epoch) < max_epoch:
                if max_steps is not None and _value(trainer.step) >= max_steps:
                    break
                stopped = _train_epoch(
                    run, train_ds, max_epoch, max_steps, eval_every_steps, deadline, progress
                )
                if stopped == "max_minutes":  # only the final evaluation and save are left
                    break
                if stopped is None:
                    trainer.epoch.assign_add(1)
                    trainer.step_in_epoch.assign(0)
                run.evaluate()
                if stopped is None and _value(trainer.epoch) % log_images_every == 0 and chief:
                    run.log_samples(images_to_log, seed)
                checkpoints.save(f"epoch {_value(trainer.epoch)}")
                if stop.signal is not None:  # arrived while sampling or saving
                    raise SignalReceived("the end of an epoch")
            run.preemption.close()
            if not run.evaluations or run.evaluations[-1]["step"] != _value(trainer.step):
                run.evaluate()
            # A budget stop draws no final grid: its time is not in the estimate.
            if not run.samples and chief and stopped != "max_minutes":
                run.log_samples(images_to_log, seed)
        except SignalReceived as during:
            step = _value(trainer.step)
            what = f"signal {stop.signal}" if stop.signal else "a signal to one of the workers"
            if checkpoints.saved_step != step:
                print(checkpoints.save(f"{what} during {during} at step {step}"), flush=True)
            again = "commands on every worker" if stop.signal is None else "command"
            raise TrainingInterrupted(
                f"stopped by {what} during {during} at step {step} (checkpoint saved); "
                f"rerun the same {again} with the same --log-dir to resume"
            ) from None
        except _Preempted:
            raise TrainingInterrupted(
                f"stopped at step {run.preemption.step}, where every worker stopped after a "
                "signal to one of them (the chief saved a checkpoint there); rerun the same "
                "commands on every worker, with the same --log-dir, to resume"
            ) from None
        except tf.errors.OpError as e:
            if not distribute.is_multi_worker(strategy) or not _lost_worker(e):
                raise
            raise WorkerLost(_lost_worker_message(e, run_dir)) from None
        finally:
            if run.preemption is not None:
                run.preemption.remove_scratch()
        # The run is complete: a signal now only waits for this last save.
        if checkpoints.saved_step != _value(trainer.step):
            checkpoints.save("end")
    summaries.flush()
    result = run.result() | {"stopped": stopped or "finished"}
    if stopped == "max_minutes":
        print(f"stopped at step {result['step']} to fit train.max_minutes = {max_minutes}")
    if chief:
        rundir.write_text_atomic(run_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result


def _lost_worker(error: tf.errors.OpError) -> bool:
    """Whether a failed op in a multi-worker run means that a worker went away (not,
    say, an out-of-memory error or bad data, which are raised as they are)."""
    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
    text = error.message or ""
    return isinstance(error, lost) or "heartbeat" in text or "unhealthy" in text


def _lost_worker_message(error: tf.errors.OpError, run_dir: Path) -> str:
    """What a worker says when a collective failed because another one went away."""
    text = error.message or str(error)
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", text)))
    who = ", ".join(tasks) if tasks else "another worker"
    if "stopped sending heartbeats" in text:
        why = "it stopped sending heartbeats: killed, crashed or unreachable"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        why = f"{type(error).__name__}: {(lines[-1] if lines else '')[:300]}"
    candidates = rundir.checkpoint_candidates(run_dir)
    resume = (
        f"the newest checkpoint is {candidates[0]}"
        if candidates
        else "the run has no checkpoint yet"
    )
    return (
        f"lost contact with {who} ({why}). {resume}; start every worker again with the "
        "same command and --log-dir to resume"
    )


def _check_arguments(strategy, dataset_fn, batch_size, precision, max_minutes) -> None:
    if dataset_fn is gin.REQUIRED or dataset_fn is None:
        raise ValueError("bind train.dataset_fn, e.g. `train.dataset_fn = @embedded_mnist`")
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"train.max_minutes must be positive (or None), got {max_minutes!r}")


def _image_shape(batch) -> tuple[int, int, int]:
    """PixelCNNPP.image_shape as bound in gin, else the (H, W, C) of the data's images."""
    try:
        bound = gin.query_parameter("PixelCNNPP.image_shape")
    except ValueError:  # not bound
        bound = None
    if bound is not None:
        return tuple(bound)
    return contract.infer_image_shape(batch)


def _prepare(ds: tf.data.Dataset, image_shape, num_bits: int) -> tf.data.Dataset:
    """Any accepted element format -> {"images": float [B, H, W, C], "labels"?}.

    The image shape is set statically (the first batch was checked to have it), so the
    steps compile for it even when the user's pipeline lost it (e.g. a py_function).
    """

    def convert(*element):
        images, labels = contract.to_model_input(
            element[0] if len(element) == 1 else element, num_bits
        )
        return _as_dict((tf.ensure_shape(images, [None, *image_shape]), labels))

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class _Checkpoints:
    """The run's tf.train.Checkpoint, its manager and the save timer.

    Non-chief workers of a multi-worker run write to a scratch directory they delete.
    """

    def __init__(self, trainer, run_dir: Path, strategy, keep: int, every_minutes: float):
        self.trainer = trainer
        self.run_dir = run_dir
        self.chief = distribute.is_chief(strategy)
        self.directory = (
            run_dir / "checkpoints"
            if self.chief
            else run_dir / f"tmp_worker_{distribute.task_id(strategy)}"
        )
        self.checkpoint = tf.train.Checkpoint(
            model=trainer.model.checkpointable(),
            ema=trainer.ema.checkpointable(),
            optimizer=trainer.optimizer,
            epoch=trainer.epoch,
            step_in_epoch=trainer.step_in_epoch,
        )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, str(self.directory), max_to_keep=keep
        )
        self.every_seconds = 60.0 * every_minutes
        self.last = time.monotonic()
        self.seconds = None  # how long the last save took
        self.saved_step = None  # the step of the last save

    def restore(self) -> bool:
        """Restores the newest checkpoint that reads back whole, damaged ones reported
        and skipped; False when the run has none (a new run). Every worker reads the
        chief's directory, so all resume from the same checkpoint."""
        candidates = rundir.checkpoint_candidates(self.run_dir)
        if not candidates:
            return False
        path = rundir.restore_newest_good(self.checkpoint, candidates, partial=False)
        print(f"resumed from {path} at step {_value(self.trainer.step)}")
        return True

    def save(self, reason: str) -> str:
        began = time.monotonic()
        path = self.manager.save(checkpoint_number=self.trainer.step)
        if self.chief:
            rundir.write_checksums(path)
            rundir.remove_stale_checksums(self.directory)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.last = time.monotonic()
        self.seconds = self.last - began
        self.saved_step = _value(self.trainer.step)
        return f"{reason}: saved {path}"

    def save_if_due(self) -> bool:
        """Saves when train.checkpoint_every_minutes have passed since the last save."""
        if time.monotonic() - self.last > self.every_seconds:
            self.save("timer")
            return True
        return False


class _Summaries:
    """TensorBoard writers: train/, eval/ (EMA weights) and eval_raw/ (raw weights)."""

    def __init__(self, run_dir: Path, chief: bool):
        names = ("train", *(_eval_run_name(w) for w in WEIGHTS))
        self.writers = {
            k: tf.summary.create_file_writer(str(run_dir / k))
            if chief
            else tf.summary.create_noop_writer()
            for k in names
        }
        with self.writers["train"].as_default():
            tf.summary.text("operative_config", _markdown(gin.operative_config_str()), step=0)

    def scalars(self, run: str, step: int, **values) -> None:
        with self.writers[run].as_default():
            for tag, value in values.items():
                tf.summary.scalar(tag, value, step=step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        with self.writers["train"].as_default():
            tf.summary.image(tag, grid[None].astype(np.float32) / 255.0, step=step)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()


def _eval_run_name(weights: str) -> str:
    return "eval" if weights == "ema" else f"eval_{weights}"


class _Run:
    """What one invocation of train() measured: evaluations, samples, the train loss."""

    def __init__(self, trainer, test_ds, summaries, checkpoints, run_dir, start, batch_size, stop):
        self.trainer, self.test_ds = trainer, test_ds
        self.summaries, self.checkpoints = summaries, checkpoints
        self.run_dir, self.start = run_dir, start
        # steps before a resume are counted as full batches
        self.images = _value(trainer.step) * batch_size
        self.train_bits_per_dim = None
        self.evaluations, self.samples = [], []
        self.eval_seconds = None  # how long the last evaluation took
        self.stop = stop  # the loop's _StopRequested
        self.preemption = None  # set by train(): the multi-worker _Preemption

    def evaluate(self) -> dict:
        """Test bits/dim with the EMA and the raw weights; console, TensorBoard, result."""
        began = time.monotonic()
        trainer, step = self.trainer, _value(self.trainer.step)
        dist_test = trainer.strategy.experimental_distribute_dataset(self.test_ds)
        trainer.trace_for(eval_spec=dist_test.element_spec)
        entry = {"step": step, "epoch": _value(trainer.epoch), "images": self.images}

        def should_stop():
            if self.preemption is not None and self.preemption.handler is not None:
                return self.preemption.any_worker_signalled()
            return self.stop.signal is not None

        for weights in WEIGHTS:
            nll = trainer.evaluate(dist_test, weights, should_stop)
            bpd = trainer.bits_per_dim(nll)
            self.summaries.scalars(_eval_run_name(weights), step, nll=nll, bits_per_dim=bpd)
            entry[f"test_bits_per_dim_{weights}"] = bpd
        now = time.monotonic()
        self.eval_seconds = now - began
        entry["seconds"] = round(now - self.start, 1)
        self.evaluations.append(entry)
        print(
            f"epoch {entry['epoch']} step {step}: test bits/dim "
            f"{entry['test_bits_per_dim_ema']:.4f} (EMA weights), "
            f"{entry['test_bits_per_dim_raw']:.4f} (raw weights)"
        )
        return entry

    def log_samples(self, count: int, seed: int) -> None:
        """Draws and writes the sample grid. It runs in a thread the loop watches, so a
        signal abandons it within a fraction of a second (the first draw compiles the
        sampler: seconds to a minute that a preemption's grace period may not have).
        In a multi-worker run TF's preemption handler owns the signals instead: the
        grid is finished first there (``_Preemption``)."""
        if not count:
            return
        step = _value(self.trainer.step)
        done = {}

        def draw():
            try:
                done["result"] = log_samples(self.trainer.ema, self.run_dir, count, seed, step)
            except Exception as e:  # raised again in the loop's thread
                done["error"] = e

        thread = threading.Thread(target=draw, name="log_samples", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if self.stop.signal is not None:
                raise SignalReceived("sample logging")
        if "error" in done:
            raise done["error"]
        path, grid = done["result"]
        self.summaries.image("samples", grid, step)
        self.samples.append(str(path))

    def result(self) -> dict:
        last = self.evaluations[-1] if self.evaluations else {}
        return {
            "step": _value(self.trainer.step),
            "epoch": _value(self.trainer.epoch),
            "train_bits_per_dim": self.train_bits_per_dim,
            "test_bits_per_dim": last.get("test_bits_per_dim_ema"),
            "test_bits_per_dim_raw": last.get("test_bits_per_dim_raw"),
            "evaluations": self.evaluations,
            "samples": self.samples,
        }


class _Deadline:
    """train.max_minutes: whether one more step still leaves time for the final
    evaluation and checkpoint, from how long the last ones took (estimated from the
    steps' own time until they have run once)."""

    def __init__(self, start: float, max_minutes: float | None, test_ds: tf.data.Dataset):
        self.end = None if max_minutes is None else start + 60.0 * max_minutes
        batches = int(test_ds.cardinality())
        self.test_batches = batches if batches > 0 else None
        self.first_step = None  # seconds of the first step (its trace included)

    def leaves_time(self, run: _Run, step_seconds: float) -> bool:
        if self.end is None:
            return True
        if self.first_step is None:  # its time is mostly the trace: no estimate yet
            self.first_step = step_seconds
            return time.monotonic() + 2 * step_seconds < self.end
        if run.eval_seconds is not None:
            # A final evaluation was measured up to 1.5x slower than the one before it
            # (benchmarks/README.md, "Time to quality").
            finish = 1.5 * run.eval_seconds
        elif self.test_batches is not None:
            # the two eval steps' traces and first calls, taken as three first training
            # steps (with one, a final evaluation overran a 45 s budget by 5 s beside
            # another test process; with two, by 1.8 s alone), then both weights over
            # the test set, each batch taken to cost a training step (about a third)
            finish = 3 * self.first_step + 2 * self.test_batches * step_seconds
        else:
            finish = 0.1 * (self.end - run.start)
        save = run.checkpoints.seconds if run.checkpoints.seconds is not None else 2.0
        margin = max(2.0, 2 * step_seconds)
        return time.monotonic() + step_seconds + finish + save + margin < self.end


def _train_epoch(
    run: _Run, train_ds, max_epoch, max_steps, eval_every_steps, deadline, progress
) -> str | None:
    """Trains to the end of the epoch; returns why it stopped earlier, or None.

    "max_steps" or "max_minutes"; a signal raises SignalReceived after the step.
    """
    trainer = run.trainer
    # Resume mid-epoch where the checkpoint stopped: with a deterministic dataset order
    # this continues the same curve exactly.
    skip = _value(trainer.step_in_epoch)
    dist_train = trainer.strategy.experimental_distribute_dataset(train_ds.skip(skip))
    trainer.trace_for(train_spec=dist_train.element_spec)
    bar = tqdm(
        desc=f"epoch {_value(trainer.epoch) + 1}/{max_epoch}",
        unit="img",
        disable=not (progress and run.checkpoints.chief),
    )
    running, tick = None, time.monotonic()
    try:
        for batch in dist_train:
            loss, count = trainer.train_step(batch)
            nll, count = float(loss), int(count)
            step = _value(trainer.step)
            if not math.isfinite(nll):
                raise FloatingPointError(
                    f"the training loss became {nll} at step {step}; the last good checkpoint "
                    f"is kept in {run.checkpoints.directory}. Lower train.learning_rate or "
                    "check the data."
                )
            now = time.monotonic()
            seconds, tick = max(now - tick, 1e-9), now
            run.images += count
            running = nll if running is None else 0.98 * running + 0.02 * nll
            run.train_bits_per_dim = trainer.bits_per_dim(running)
            bar.update(count)
            bar.set_postfix(bpd=f"{run.train_bits_per_dim:.3f}", img_s=f"{count / seconds:.1f}")
            run.summaries.scalars(
                "train",
                step,
                nll=nll,
                bits_per_dim=trainer.bits_per_dim(nll),
                learning_rate=trainer.schedule(step - 1),
                images_per_sec=count / seconds,
            )
            if run.preemption is not None:
                run.preemption.after_step()
            if eval_every_steps and step % eval_every_steps == 0:
                run.evaluate()
                tick = time.monotonic()
            if run.stop.signal is not None:
                raise SignalReceived("training")
            if run.checkpoints.save_if_due():
                tick = time.monotonic()
            if max_steps is not None and step >= max_steps:
                return "max_steps"
            if not deadline.leaves_time(run, seconds):
                return "max_minutes"
        return None
    finally:
        bar.close()


def _value(variable) -> int:
    """An integer variable's value, also for mirrored variables (cross-replica read)."""
    return int(tf.convert_to_tensor(variable).numpy())


def _as_dict(pair) -> dict:
    images, labels = pair
    return {"images": images} if labels is None else {"images": images, "labels": labels}


def _markdown(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def log_samples(model, run_dir: Path, count: int, seed: int, step: int) -> tuple[Path, np.ndarray]:
    """Draws ``count`` samples with the (EMA) model; writes and returns a PNG grid."""

    labels = None
    if model.num_classes:
        labels = tf.range(count) % model.num_classes
    drawn = sampling.sample_fast(model, count, labels=labels, seed=(seed, step))
    grid = make_grid(drawn.numpy(), model.num_bits)
    path = run_dir / "samples" / f"step_{step:08d}.png"
    save_png(grid, path)
    return path, grid
