"""Training: ``train`` and the loop of epochs around a ``trainer.Trainer``.

``train`` is the gin-configurable entry point behind ``pixelcnn single | multigpu |
multiworker``: it builds the model for the data, restores or initialises it, then runs
epochs of steps with evaluations (EMA and raw weights), checkpoints, summaries and
sample grids. The run directory and checkpoints are ``pixelcnn.checkpoints``; what
the run reports, ``pixelcnn.reporting``; signals, preemption and the time budget,
``pixelcnn.faults``; devices and strategies, ``pixelcnn.distribute``.

The bindings of ``train``:
  dataset_fn: see ``pixelcnn.contract``; the images' (H, W, C) decide the model's
    image_shape unless ``PixelCNNPP.image_shape`` is bound (then they must match).
  batch_size: global, over all replicas; init_batch_size: images of the data-dependent
    init (once, never on resume).
  learning_rate, learning_rate_decay (a factor every step), beta_1, beta_2: Adam, the
    authors' defaults; warmup_steps: the rate ramped up linearly over the first steps;
    clip_norm: the global norm each batch's gradient is clipped to (None: not clipped);
    ema_decay, ema_warmup: Polyak averaging, min(ema_decay, (1 + t) / (ema_warmup + t))
    at step t (``trainer.ema_decay_at``: 10, TensorFlow's warm-up, averages about the last
    tenth of the steps until the cap; lower, longer).
  max_epoch, max_steps, max_minutes: where to stop; the time budget includes the final
    evaluation, checkpoint and sample grid of the final weights, counted from ``started``
    (a ``time.time()``: the CLI passes its process's start) or else from the call.
  chkpt_to_keep, checkpoint_every_minutes: checkpoints, also written every epoch, at the
    end and on SIGINT/SIGTERM.
  eval_every_steps: evaluations besides each epoch's; raw_eval_every: the raw (training)
    weights are scored at every that-many-th evaluation and the last (the EMA weights at
    every one).
  images_to_log every log_images_every epochs, and of the final weights at the end: sample
    grids (0: none).
  precision: "float32", "bfloat16" or "float16" (mixed: weights, EMA, optimizer state
    and the likelihood stay float32; float16 scales the loss dynamically and skips a
    step whose gradient overflows, counted in TensorBoard as train/skipped_steps) or
    "auto" (``distribute.choose_precision``). Evaluations are float32 whatever it is.
  jit_compile: the model's passes in the training and evaluation steps compiled by XLA.
  seed: initial weights, dropout masks, data perturbation and samples.
  mutation_rate, l2_weight: a likelihood ratio's background model (``data.mutate``,
    ``trainer.Trainer``); 0 for an ordinary model.
"""

from __future__ import annotations

import functools
import math
import os
import time

import gin
import keras
import tensorflow as tf
from tqdm.auto import tqdm

from pixelcnn import checkpoints, checks, contract, data, distribute, faults, passes, reporting
from pixelcnn.model import PixelCNNPP
from pixelcnn.trainer import PRECISIONS, Trainer


# ---------------------------------------------------------------------------- the loop
@gin.configurable(denylist=["run_dir", "strategy", "started"])
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
    ema_warmup: float = 10.0,
    warmup_steps: int = 0,
    clip_norm: float | None = None,
    max_epoch: int = 100,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    chkpt_to_keep: int = 5,
    checkpoint_every_minutes: float = 10.0,
    eval_every_steps: int | None = None,
    raw_eval_every: int = 1,
    images_to_log: int = 16,
    log_images_every: int = 1,
    init_batch_size: int = 16,
    precision: str = "float32",
    jit_compile: bool = False,
    seed: int = 0,
    mutation_rate: float = 0.0,
    l2_weight: float = 0.0,
    progress: bool = True,
    started: float | None = None,
) -> dict:
    """Trains a PixelCNNPP (built from the gin bindings of PixelCNNPP) on
    ``dataset_fn(batch_size) -> (train, test)``; a ``run_dir`` with checkpoints resumes.
    Every argument after ``strategy`` is a gin binding (the module docstring says what
    each does). Returns {"step", "epoch", "train_bits_per_dim", "test_bits_per_dim"
    (EMA), "test_bits_per_dim_raw", "evaluations", "samples", "stopped"}, as in
    metrics.json (a resumed run's earlier evaluations and grids first). The data's
    iterators stay alive until the process exits (``pixelcnn.passes``).
    """
    start = time.monotonic() - (0.0 if started is None else max(0.0, time.time() - started))
    options = dict(seed=seed, l2_weight=l2_weight, warmup_steps=warmup_steps, clip_norm=clip_norm,
                   jit_compile=bool(jit_compile), ema_warmup=ema_warmup)  # fmt: skip
    optimizer = (learning_rate, learning_rate_decay, beta_1, beta_2, ema_decay)
    _check_arguments(strategy, dataset_fn, batch_size, precision, max_minutes, mutation_rate,
                     (optimizer, options),
                     (images_to_log, log_images_every, raw_eval_every))  # fmt: skip
    trainer, train_ds, test_ds, init = _build(
        strategy, dataset_fn, batch_size, optimizer, precision, options
    )
    samples = (images_to_log, log_images_every, seed)
    loop = _Loop(trainer, os.fspath(run_dir), test_ds, (start, max_minutes), batch_size,
                 (progress, samples, mutation_rate, raw_eval_every))  # fmt: skip
    try:
        loop.set_up(init, init_batch_size, (chkpt_to_keep, checkpoint_every_minutes))
        with faults.StopRequested() as stop, faults.stopping(strategy, loop.saver, stop) as ends:
            stopped = loop.run(train_ds, (max_epoch, max_steps, eval_every_steps), stop, ends)
        return loop.finish(stopped, max_minutes)
    except faults.TrainingInterrupted:
        loop.interrupted()
        raise
    finally:
        loop.close()


def _build(strategy, dataset_fn, batch_size, optimizer, precision, options):
    """The Trainer for the data's image shape (the precision resolved for the hardware)
    and the checked, converted datasets. Returns (trainer, train_ds, test_ds, (images,
    labels or None) of the first batch). options: Trainer's keyword arguments."""
    precision = distribute.resolve_precision(precision)
    keras.utils.set_random_seed(options["seed"])
    train_ds, test_ds = dataset_fn(batch_size)
    first = contract.first_batch(train_ds, "train")
    model_fn = functools.partial(PixelCNNPP, image_shape=_image_shape(first))
    trainer = Trainer(strategy, model_fn, *optimizer, precision, **options)
    model = trainer.model
    # Validate the data before any work: one clear error instead of a wasted run.
    contract.check_batch(first, model.image_shape, model.num_bits, model.num_classes, "train")
    contract.check_batch(test_ds, model.image_shape, model.num_bits, model.num_classes, "test")
    train_ds = contract.as_model_input(train_ds, model.num_bits, model.image_shape)
    test_ds = contract.as_model_input(test_ds, model.num_bits, model.image_shape)
    return trainer, train_ds, test_ds, contract.to_model_input(first, model.num_bits)


class _Loop:
    """The epochs of one ``train`` invocation: steps, evaluations, checkpoints, sample
    grids, and where to stop (``max_epoch``, ``max_steps``, the time budget, a signal)."""

    def __init__(self, trainer, run_dir: str, test_ds, budget, batch_size, settings):
        """budget: (start, a time.monotonic(); train.max_minutes or None). settings:
        (progress bar or not, (images_to_log, log_images_every, seed), mutation_rate,
        raw_eval_every)."""
        self.trainer, self.run_dir, self.batch_size = trainer, run_dir, batch_size
        self.progress, self.samples, self.mutation_rate, self.raw_eval_every = settings
        self.chief = distribute.is_chief(trainer.strategy)
        self.test = passes.Passes(trainer.strategy, test_ds)
        self.deadline = faults.Deadline(*budget, self.test.batches)
        self.train = None  # the training split's Passes, from run()
        self.saver = self.report = None  # from set_up()
        self.stop = self.preemption = None  # from run(): faults.StopRequested, faults.stopping
        self.step_seconds = None  # the last training step's, for the budget
        self.budgeted = False  # whether any worker has a time budget
        self.evaluations = 0

    def set_up(self, init, init_batch_size: int, keep) -> None:
        """Records the config, then restores the newest good checkpoint, or runs the
        data-dependent init on the first ``init_batch_size`` images (a new run).
        keep: (checkpoints kept, minutes between timed saves)."""
        trainer = self.trainer
        if self.chief:
            checkpoints.write_config(self.run_dir, trainer.model, trainer.precision)
        self.saver = checkpoints.Checkpoints(trainer, self.run_dir, trainer.strategy, *keep)
        restored = self.saver.restore()
        if not restored:
            trainer.initialize(*(t if t is None else t[:init_batch_size] for t in init))
        # steps before a resume are counted as full batches
        self.images = distribute.value(trainer.step) * self.batch_size
        summaries = reporting.Summaries(self.run_dir, self.chief)  # training starts now
        self.report = reporting.Report(
            trainer, self.test, summaries, self.run_dir, self.deadline.start, self.chief
        )
        if restored:
            self.report.resume(distribute.value(trainer.step))

    def close(self) -> None:
        """Lets the data's iterators go (``passes.Passes.close``)."""
        for p in (self.train, self.test):
            if p is not None:
                p.close()

    def finish(self, stopped: str | None, max_minutes) -> dict:
        """The last save (a signal now only waits for it), summaries, metrics.json."""
        if self.saver.saved_step != distribute.value(self.trainer.step):
            self.saver.save("end")
        self.report.summaries.flush()
        result = self.report.result(stopped or "finished")
        if stopped == "max_minutes":
            print(f"stopped at step {result['step']} to fit train.max_minutes = {max_minutes}")
        self.report.write(result)
        return result

    def interrupted(self) -> None:
        """metrics.json of a run stopped by a signal (its evaluations so far)."""
        if self.report is not None:
            self.report.write(self.report.result("interrupted"))

    def evaluate(self, final: bool = False, weights=None) -> None:
        """An evaluation: the EMA weights, and the raw ones every ``raw_eval_every``-th
        time and at the end (``weights`` names them instead)."""
        self.evaluations += 1
        if weights is None:
            raw = final or self.evaluations % self.raw_eval_every == 0
            weights = ("ema", "raw") if raw else ("ema",)
        self.report.evaluate(self.images, self.preemption.should_stop, weights)

    def run(self, train_ds, limits, stop, preemption) -> str | None:
        """Trains until the end; returns why it stopped earlier ("max_steps",
        "max_minutes") or None. A signal raises faults.SignalReceived. limits:
        (max_epoch, max_steps, eval_every_steps); stop, preemption: the signals'
        ``faults.StopRequested`` and ``faults.stopping``'s handler."""
        max_epoch, max_steps, eval_every_steps = limits
        self.stop, self.preemption = stop, preemption
        trainer, count, every, seed = self.trainer, *self.samples
        # every worker agrees whether to check the budget each step (a worker without
        # one must still join the others' collective)
        self.budgeted = self.preemption.any_worker(self.deadline.end is not None)
        # Resume mid-epoch where the checkpoint stopped: with a deterministic dataset
        # order this continues the same curve exactly.
        first, skip = distribute.value(trainer.epoch), distribute.value(trainer.step_in_epoch)
        bits, rate = trainer.model.num_bits, self.mutation_rate

        def mutated(dataset, epoch):  # a background model's perturbed data, new every epoch
            return data.mutate(dataset, rate, bits, trainer.seed, epoch)

        per_epoch = mutated if rate else None
        self.train = passes.Passes(trainer.strategy, train_ds, first, skip, per_epoch)
        trainer.trace_for(train_spec=self.train.element_spec)
        stopped = None
        while stopped is None and distribute.value(trainer.epoch) < max_epoch:
            if max_steps is not None and distribute.value(trainer.step) >= max_steps:
                break
            # the epoch's end spent time evaluating, drawing and saving: a next step
            # may no longer fit (checked before any step, or the final evaluation
            # would repeat the epoch's for one step more)
            if self.step_seconds is not None and self.out_of_time(self.step_seconds):
                stopped = "max_minutes"
                break
            stopped = self.epoch(max_epoch, max_steps, eval_every_steps)
            if stopped == "max_minutes":  # only the final evaluation and save are left
                break
            if stopped is None:
                trainer.epoch.assign_add(1)
                trainer.step_in_epoch.assign(0)
            self.evaluate()
            epoch = distribute.value(trainer.epoch)
            if stopped is None and epoch % every == 0 and count:
                if self.chief:
                    self.report.log_samples(count, seed, self.stop)
            self.saver.save(f"epoch {epoch}")
            if self.stop.signal is not None:  # arrived while sampling or saving
                raise faults.SignalReceived("the end of an epoch")
        self.preemption.close()
        last = self.report.evaluations[-1] if self.report.evaluations else {}
        if last.get("step") != distribute.value(trainer.step):
            self.evaluate(final=True)
        elif "test_bits_per_dim_raw" not in last:  # the final result reports both
            self.evaluate(weights=("raw",))
        drawn = self.report.grid_step == distribute.value(trainer.step)
        if count and self.chief and not drawn:
            self.draw_final_grid(count, seed)
        return stopped

    def draw_final_grid(self, count: int, seed: int) -> None:
        """The grid of the weights the run ends with (unless an epoch's grid is of
        them), in the time the budget kept for it before the last checkpoint
        (abandoned if it takes longer)."""
        left = self.deadline.seconds_left(self.saver.seconds)
        self.report.log_samples(count, seed, self.stop, left)

    def epoch(self, max_epoch, max_steps, eval_every_steps) -> str | None:
        """Trains to the end of the epoch; returns why it stopped earlier, or None."""
        trainer = self.trainer
        desc = f"epoch {distribute.value(trainer.epoch) + 1}/{max_epoch}"
        show = self.progress and self.chief
        with tqdm(desc=desc, unit="img", disable=not show) as bar:
            tick = time.monotonic()
            for batch in self.train.next_pass():
                seconds, tick = self.step(batch, bar, tick)
                self.step_seconds = seconds
                step = distribute.value(trainer.step)
                if eval_every_steps and step % eval_every_steps == 0:
                    self.evaluate()
                    tick = time.monotonic()
                if self.stop.signal is not None:
                    raise faults.SignalReceived("training")
                if self.saver.save_if_due():
                    tick = time.monotonic()
                if max_steps is not None and step >= max_steps:
                    return "max_steps"
                if self.out_of_time(seconds):
                    return "max_minutes"
        return None

    def out_of_time(self, step_seconds: float) -> bool:
        """Whether the time budget ends the training now (on every worker at once: a
        collective every step when any worker has a budget, ``self.budgeted``)."""
        if not self.budgeted:
            return False
        report = self.report
        grid = self.samples[0] > 0  # a grid of the final weights is drawn at the end
        finish = (report.eval_seconds, self.saver.seconds, grid, report.grid_seconds)
        return self.preemption.any_worker(not self.deadline.leaves_time(step_seconds, *finish))

    def step(self, batch, bar, tick: float) -> tuple[float, float]:
        """One training step, its loss checked and reported; (seconds, now)."""
        loss, count, taken = self.trainer.train_step(batch)
        nll, count = float(loss), int(count)
        step = distribute.value(self.trainer.step)
        now = time.monotonic()
        seconds = max(now - tick, 1e-9)
        self.images += count
        if not bool(taken):  # float16's overflow: the loss scale drops, training goes on
            self.report.skipped_step(step)
        elif not math.isfinite(nll):
            raise FloatingPointError(
                f"the training loss became {nll} at step {step}; the last good checkpoint "
                f"is kept in {self.saver.directory}. Lower train.learning_rate or check the "
                "data."
            )
        else:
            self.report.train_step(step, nll, count, seconds)
        bar.update(count)
        if self.report.train_bits_per_dim is not None:
            bpd = self.report.train_bits_per_dim
            bar.set_postfix(bpd=f"{bpd:.3f}", img_s=f"{count / seconds:.1f}")
        self.preemption.after_step()
        return seconds, now


def _check_arguments(
    strategy, dataset_fn, batch_size, precision, max_minutes, rate, trainer_args, counts
) -> None:
    """ValueError for a bad binding, before any data is read. trainer_args: (optimizer,
    options) as ``_build`` takes them; counts: (images_to_log, log_images_every,
    raw_eval_every)."""
    if dataset_fn is gin.REQUIRED or dataset_fn is None:
        raise ValueError("bind train.dataset_fn, e.g. `train.dataset_fn = @embedded_mnist`")
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(
            f"train.precision must be one of {[*PRECISIONS, 'auto']}, got {precision!r}"
        )
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(
            f"train.batch_size={batch_size} must be divisible by the "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    checks.check_positive(max_minutes, "train.max_minutes", optional=True)
    checks.check_fraction(rate, "train.mutation_rate", zero=True)
    (learning_rate, decay, beta_1, beta_2, ema_decay), options = trainer_args
    checks.check_positive(learning_rate, "train.learning_rate")
    checks.check_fraction(decay, "train.learning_rate_decay", one=True)
    checks.check_fraction(beta_1, "train.beta_1", zero=True)
    checks.check_fraction(beta_2, "train.beta_2", zero=True)
    checks.check_fraction(ema_decay, "train.ema_decay", zero=True, one=True)  # 1: no cap
    checks.check_positive(options["clip_norm"], "train.clip_norm", optional=True)
    checks.check_int(options["warmup_steps"], "train.warmup_steps", minimum=0)
    checks.check_above(
        options["ema_warmup"], "train.ema_warmup", 1, " (at 1 the average never moves)"
    )
    images_to_log, log_images_every, raw_eval_every = counts
    checks.check_int(images_to_log, "train.images_to_log", minimum=0)
    checks.check_positive_int(log_images_every, "train.log_images_every")
    checks.check_positive_int(raw_eval_every, "train.raw_eval_every")


def _image_shape(batch) -> tuple[int, int, int]:
    """PixelCNNPP.image_shape as bound in gin, else the (H, W, C) of the data's images."""
    try:
        bound = gin.query_parameter("PixelCNNPP.image_shape")
    except ValueError:  # not bound
        bound = None
    if bound is not None:
        return tuple(bound)
    return contract.infer_image_shape(batch)
