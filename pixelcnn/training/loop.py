"""The loop of epochs around a ``trainer.Trainer``: steps, evaluations, checkpoints,
sample grids, and where to stop (``max_epoch``, ``max_steps``, the time budget, a
signal). ``train.train`` builds its ``LoopOptions`` from the gin bindings."""

from __future__ import annotations

import dataclasses
import math
import time

from tqdm.auto import tqdm

from pixelcnn import checks, data, distribute, rundir
from pixelcnn.training import faults, passes, reporting
from pixelcnn.training.saver import Saver
from pixelcnn.training.trainer import ema_cap_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """What the loop does around the steps; the fields are train()'s bindings of the
    same names (``pixelcnn.training.train`` says what each does)."""

    batch_size: int = 16  # global, over all replicas
    init_batch_size: int = 16  # images of the data-dependent init
    # where to stop
    max_epoch: int = 100
    max_steps: int | None = None
    max_minutes: float | None = None
    # evaluations and sample grids
    eval_every_steps: int | None = None
    raw_eval_every: int = 1
    images_to_log: int = 16
    log_images_every: int = 1
    # checkpoints
    chkpt_to_keep: int = 5
    checkpoint_every_minutes: float = 10.0
    # the data
    mutation_rate: float = 0.0
    seed: int = 0
    progress: bool = True

    def check(self, replicas: int) -> None:
        """ValueError naming the binding that is wrong, before any data is read."""
        if self.batch_size % replicas:
            raise ValueError(
                f"train.batch_size={self.batch_size} must be divisible by the {replicas} replicas"
            )
        checks.check_positive(self.max_minutes, "train.max_minutes", optional=True)
        checks.check_fraction(self.mutation_rate, "train.mutation_rate", zero=True)
        checks.check_int(self.images_to_log, "train.images_to_log", minimum=0)
        checks.check_positive_int(self.log_images_every, "train.log_images_every")
        checks.check_positive_int(self.raw_eval_every, "train.raw_eval_every")


class Progress:
    """The run's progress in [0, 1] for a schedule that anneals to the run's end
    (``trainer.LearningRate``), from whichever end comes first: the steps done over the
    steps the run takes (``max_steps``, or ``max_epoch`` times the batches of an epoch
    when the data's length is known), or the elapsed share of the time budget's
    training time (``faults.Deadline.elapsed_fraction``). A resumed run goes on from
    the progress its checkpoint holds: by steps it continues the same schedule exactly;
    under a time budget (which counts from this invocation's start) the progress left
    is spread over the new budget. It never goes back."""

    def __init__(self, total_steps: int | None, budgeted: bool, restored: float):
        if total_steps is None and not budgeted:
            raise ValueError(
                "a learning rate schedule that ends with the run needs to know the end: "
                "bind train.max_steps or train.max_minutes, or give the training data a "
                "known length (tf.data.experimental.assert_cardinality)"
            )
        self.total_steps, self.restored, self.value = total_steps, restored, restored

    def at(self, step: int, time_fraction: float = 0.0) -> float:
        """The progress before the step after ``step`` earlier ones."""
        by_steps = 0.0 if self.total_steps is None else step / max(self.total_steps, 1)
        by_time = self.restored + (1.0 - self.restored) * time_fraction
        self.value = min(1.0, max(self.value, by_steps, by_time))
        return self.value


class Loop:
    """The epochs of one ``train`` invocation."""

    def __init__(self, trainer, run_dir: str, test_ds, options: LoopOptions, start: float):
        """start: when the run's clock started (a ``time.monotonic()``), for the time
        budget and the evaluations' seconds."""
        self.trainer, self.run_dir, self.options = trainer, run_dir, options
        self.chief = distribute.is_chief(trainer.strategy)
        self.test = passes.Passes(trainer.strategy, test_ds)
        self.deadline = faults.Deadline(start, options.max_minutes, self.test.batches)
        self.train = None  # the training split's Passes, from run()
        self.saver = self.report = None  # from set_up()
        self.stop = self.preemption = None  # from run(): faults.StopRequested, faults.stopping
        self.step_seconds = None  # the last training step's, for the budget
        self.budgeted = False  # whether any worker has a time budget
        self.progress = None  # a schedule's ``Progress``, from run(); None: not needed
        self.evaluations = 0
        self.images = 0

    def set_up(self, init) -> None:
        """Records the config, then restores the newest good checkpoint, or runs the
        data-dependent init on the first ``init_batch_size`` images of ``init``
        ((images, labels or None), a new run)."""
        trainer, options = self.trainer, self.options
        if self.chief:
            rundir.write_config(self.run_dir, trainer.model, trainer.precision)
        self.saver = Saver(
            trainer, self.run_dir, options.chkpt_to_keep, options.checkpoint_every_minutes
        )
        restored = self.saver.restore()
        if not restored:
            n = options.init_batch_size
            trainer.initialize(*(t if t is None else t[:n] for t in init))
        # steps before a resume are counted as full batches
        self.images = distribute.value(trainer.step) * options.batch_size
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

    def finish(self, stopped: str | None) -> dict:
        """The last save (a signal now only waits for it), summaries, metrics.json."""
        if self.saver.saved_step != distribute.value(self.trainer.step):
            self.saver.save("end")
        self.report.summaries.flush()
        result = self.report.result(stopped or "finished")
        if stopped == "max_minutes":
            minutes = self.options.max_minutes
            print(f"stopped at step {result['step']} to fit train.max_minutes = {minutes}")
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
            raw = final or self.evaluations % self.options.raw_eval_every == 0
            weights = ("ema", "raw") if raw else ("ema",)
        self.report.evaluate(self.images, self.preemption.should_stop, weights)

    def run(self, train_ds, stop, preemption) -> str | None:
        """Trains until the end; returns why it stopped earlier ("max_steps",
        "max_minutes") or None. A signal raises faults.SignalReceived. stop,
        preemption: the signals' ``faults.StopRequested`` and ``faults.stopping``'s
        handler."""
        self.stop, self.preemption = stop, preemption
        trainer, options = self.trainer, self.options
        count = options.images_to_log
        # every worker agrees whether to check the budget each step (a worker without
        # one must still join the others' collective)
        self.budgeted = self.preemption.any_worker(self.deadline.end is not None)
        # Resume mid-epoch where the checkpoint stopped: with a deterministic dataset
        # order this continues the same curve exactly.
        first, skip = distribute.value(trainer.epoch), distribute.value(trainer.step_in_epoch)
        bits, rate = trainer.model.num_bits, options.mutation_rate

        def mutated(dataset, epoch):  # a background model's perturbed data, new every epoch
            return data.mutate(dataset, rate, bits, trainer.seed, epoch)

        per_epoch = mutated if rate else None
        self.train = passes.Passes(trainer.strategy, train_ds, first, skip, per_epoch)
        if trainer.schedule.kind != "exponential":
            self.progress = Progress(self.total_steps(), self.budgeted, trainer.progress_value())
            self.set_progress()
        self.note_ema_cap()
        trainer.trace_for(train_spec=self.train.element_spec)
        stopped = None
        while stopped is None and distribute.value(trainer.epoch) < options.max_epoch:
            if (
                options.max_steps is not None
                and distribute.value(trainer.step) >= options.max_steps
            ):
                break
            # the epoch's end spent time evaluating, drawing and saving: a next step
            # may no longer fit (checked before any step, or the final evaluation
            # would repeat the epoch's for one step more)
            if self.step_seconds is not None and self.out_of_time(self.step_seconds):
                stopped = "max_minutes"
                break
            stopped = self.epoch()
            if stopped == "max_minutes":  # only the final evaluation and save are left
                break
            if stopped is None:
                trainer.epoch.assign_add(1)
                trainer.step_in_epoch.assign(0)
            self.evaluate()
            epoch = distribute.value(trainer.epoch)
            if stopped is None and epoch % options.log_images_every == 0 and count:
                if self.chief:
                    self.report.log_samples(count, options.seed, self.stop)
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
            self.draw_final_grid()
        return stopped

    def draw_final_grid(self) -> None:
        """The grid of the weights the run ends with (unless an epoch's grid is of
        them), in the time the budget kept for it before the last checkpoint
        (abandoned if it takes longer)."""
        left = self.deadline.seconds_left(self.saver.seconds)
        self.report.log_samples(self.options.images_to_log, self.options.seed, self.stop, left)

    def epoch(self) -> str | None:
        """Trains to the end of the epoch; returns why it stopped earlier, or None."""
        trainer, options = self.trainer, self.options
        desc = f"epoch {distribute.value(trainer.epoch) + 1}/{options.max_epoch}"
        show = options.progress and self.chief
        with tqdm(desc=desc, unit="img", disable=not show) as bar:
            tick = time.monotonic()
            for batch in self.train.next_pass():
                seconds, tick = self.step(batch, bar, tick)
                self.step_seconds = seconds
                step = distribute.value(trainer.step)
                if options.eval_every_steps and step % options.eval_every_steps == 0:
                    self.evaluate()
                    tick = time.monotonic()
                if self.stop.signal is not None:
                    raise faults.SignalReceived("training")
                if self.saver.save_if_due():
                    tick = time.monotonic()
                if options.max_steps is not None and step >= options.max_steps:
                    return "max_steps"
                if self.out_of_time(seconds):
                    return "max_minutes"
                if self.progress is not None:
                    self.set_progress(seconds)
        return None

    def total_steps(self) -> int | None:
        """The steps the run takes by max_steps and max_epoch, None when unknown."""
        ends = [self.options.max_steps]
        if self.train.batches is not None:
            ends.append(self.options.max_epoch * self.train.batches)
        ends = [e for e in ends if e is not None]
        return min(ends) if ends else None

    def note_ema_cap(self) -> None:
        """Says so when the run ends before train.ema_decay caps the EMA's warm-up: the
        average is then set by train.ema_warmup alone."""
        trainer, total = self.trainer, self.total_steps()
        cap = ema_cap_step(trainer.ema_decay, trainer.ema_warmup)
        if self.chief and total is not None and total < cap < math.inf:
            print(
                f"note: train.ema_decay = {trainer.ema_decay:g} would cap the EMA's decay "
                f"from step {math.ceil(cap):,}, after this run's {total:,} steps: the average "
                f"is set by train.ema_warmup = {trainer.ema_warmup:g} alone (step u's weights "
                f"count about as u^{trainer.ema_warmup - 2:g}; trainer.ema_decay_at)"
            )

    def set_progress(self, step_seconds: float | None = None) -> None:
        """Sets the schedule's progress for the next step (the same on every worker:
        each worker's clock is read, the largest share is taken)."""
        fraction = 0.0
        if self.budgeted and step_seconds is not None:
            fraction = self.deadline.elapsed_fraction(*self.end_costs(step_seconds))
            fraction = self.preemption.largest(fraction)
        step = distribute.value(self.trainer.step)
        self.trainer.set_progress(self.progress.at(step, fraction))

    def out_of_time(self, step_seconds: float) -> bool:
        """Whether the time budget ends the training now (on every worker at once: a
        collective every step when any worker has a budget, ``self.budgeted``)."""
        if not self.budgeted:
            return False
        left = self.deadline.leaves_time(*self.end_costs(step_seconds))
        return self.preemption.any_worker(not left)

    def end_costs(self, step_seconds: float) -> tuple:
        """What the budget keeps time for after the last step, as ``faults.Deadline``
        takes it: (step seconds, the last evaluation's and checkpoint's seconds,
        whether a final grid is drawn, the last grid's seconds)."""
        report = self.report
        grid = self.options.images_to_log > 0  # a grid of the final weights is drawn
        return step_seconds, report.eval_seconds, self.saver.seconds, grid, report.grid_seconds

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
