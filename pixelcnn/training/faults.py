"""What can stop a training run before it ends, and how it stops cleanly: signals
(SIGINT/SIGTERM), a multi-worker cluster's preemption, a lost worker, the time budget.

A stop always leaves a checkpoint at the step reached and one message on how to resume.
``stopping`` turns each of them into the exception the CLI reports:
``TrainingInterrupted`` (exit 130) or ``WorkerLost`` (exit 1).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from typing import TYPE_CHECKING

import tensorflow as tf

from pixelcnn import distribute, internals, rundir

if TYPE_CHECKING:
    from pixelcnn.training.saver import Saver


# ---------------------------------------------------------------------------- exceptions
class SignalReceived(Exception):
    """A SIGINT/SIGTERM arrived; raised where the loop can stop (between steps or
    evaluation batches), caught by ``stopping``, which saves and exits."""


class Stop(Exception):
    """An exception whose message the CLI prints as it is (``str`` of one raised through
    a gin configurable gains gin's "In call to configurable" line)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TrainingInterrupted(Stop):
    """Raised after a SIGINT/SIGTERM, once the checkpoint is saved."""


class WorkerLost(Stop):
    """A multi-worker run lost a worker (killed, crashed, unreachable)."""


class _Preempted(Exception):
    """Raised by the preemption handler's exit_fn once every worker has saved."""


# ---------------------------------------------------------------------------- signals
class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step.

    In a multi-worker run ``forward_sigint()`` hands SIGINT to TF's preemption handler
    as a SIGTERM instead (``Preemption``), which owns SIGTERM there.
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


class Preemption:
    """A multi-worker run's answer to SIGTERM (or SIGINT) sent to any one worker.

    TF's ``PreemptionCheckpointHandler`` owns SIGTERM: the worker that receives it
    announces a step through the coordination service, every worker stops after that
    step, saves (the chief into the run's checkpoints, the others into scratch
    directories) and raises ``_Preempted``. It counts its calls (one per training step
    of this invocation), so it is given an empty checkpoint of its own in a directory
    nothing is written to: the run's checkpoints are read and written by
    ``saver.Saver`` alone. Single-process runs keep ``StopRequested``.

    An evaluation is one collective computation, so it is abandoned by every worker at
    once or not at all: a flag set by a SIGTERM handler chained in front of TF's is
    combined over the workers before every evaluation batch (``should_stop``).
    """

    def __init__(self, strategy, saver: Saver, stop: StopRequested):
        self.handler = self.scratch = None
        self.step = None
        self.signalled = False
        self.stop = stop
        if not distribute.is_multi_worker(strategy):
            return
        self.saver = saver
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save
        )
        own = os.path.join(saver.run_dir, "preemption")
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, tf.train.Checkpoint(), own, config
        )
        # the folder the handler writes into on a non-chief worker
        task = distribute.task_id(strategy)
        self.scratch = None if saver.chief else internals.preemption_scratch_dir(own, task)
        stop.forward_sigint()
        tf_handler = signal.getsignal(signal.SIGTERM)

        def note_and_pass_on(signum, frame):
            self.signalled = True
            tf_handler(signum, frame)

        signal.signal(signal.SIGTERM, note_and_pass_on)
        # This worker's value as a variable (a collective of a host constant has no
        # device to run on), gathered from every replica (ReduceOp has no MAX).
        with strategy.scope():
            self._value = tf.Variable(0.0, trainable=False)

        def largest():
            ctx = tf.distribute.get_replica_context()
            return tf.reduce_max(ctx.all_gather(tf.reshape(self._value * 1.0, [1]), axis=0))

        self._max = tf.function(largest, autograph=False)
        self._strategy = strategy

    def should_stop(self) -> bool:
        """Whether the run must stop now: a signal to this process, or, in a
        multi-worker run, to any worker (a collective: every worker calls it at the
        same point)."""
        if self.handler is None:
            return self.stop.signal is not None
        return self.any_worker(self.signalled)

    def any_worker(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any worker (a collective in a multi-worker run:
        every worker calls it at the same point), so that decisions each worker makes
        from its own clock, such as the time budget's, are the same on all."""
        return self.largest(1.0 if flag else 0.0) > 0

    def largest(self, value: float) -> float:
        """The largest of every worker's ``value`` (a collective, as ``any_worker``)."""
        if self.handler is None:
            return value
        self._value.assign(value)
        return float(self._strategy.experimental_local_results(self._strategy.run(self._max))[0])

    def _save(self, *args, **kwargs) -> None:
        self.step = distribute.value(self.saver.trainer.step)
        print(self.saver.save(f"preemption at step {self.step}"), flush=True)

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
        if self.scratch is not None and tf.io.gfile.exists(self.scratch):
            tf.io.gfile.rmtree(self.scratch)


@contextlib.contextmanager
def stopping(strategy, saver: Saver, stop: StopRequested):
    """Runs the training loop inside; yields its ``Preemption``. A signal, a cluster's
    preemption or a lost worker leaves a checkpoint at the step reached and becomes
    ``TrainingInterrupted`` or ``WorkerLost`` with how to resume."""
    preemption = None
    try:
        # inside the try: its variable is made by a collective, which a worker lost
        # while the others start up makes fail
        preemption = Preemption(strategy, saver, stop)
        yield preemption
        preemption.close()
    except SignalReceived as during:
        step = distribute.value(saver.trainer.step)
        what = f"signal {stop.signal}" if stop.signal else "a signal to one of the workers"
        if saver.saved_step != step:
            print(saver.save(f"{what} during {during} at step {step}"), flush=True)
        again = "commands on every worker" if stop.signal is None else "command"
        raise TrainingInterrupted(
            f"stopped by {what} during {during} at step {step} (checkpoint saved); "
            f"rerun the same {again} with the same --log-dir to resume"
        ) from None
    except _Preempted:
        raise TrainingInterrupted(
            f"stopped at step {preemption.step}, where every worker stopped after a "
            "signal to one of them (the chief saved a checkpoint there); rerun the same "
            "commands on every worker, with the same --log-dir, to resume"
        ) from None
    except tf.errors.OpError as e:
        if not distribute.is_multi_worker(strategy) or not _lost_worker(e):
            raise
        raise WorkerLost(_lost_worker_message(e, saver.run_dir)) from None
    finally:
        if preemption is not None:
            preemption.remove_scratch()


def _lost_worker(error: tf.errors.OpError) -> bool:
    """Whether a failed op in a multi-worker run means that a worker went away (not,
    say, an out-of-memory error or bad data, which are raised as they are)."""
    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
    text = error.message or ""
    return isinstance(error, lost) or "heartbeat" in text or "unhealthy" in text


def _lost_worker_message(error: tf.errors.OpError, run_dir: str) -> str:
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


# ---------------------------------------------------------------------------- the budget
def process_start() -> float | None:
    """When this process started, as a ``time.time()`` value (Linux: from /proc, so
    the interpreter's start-up and TensorFlow's import count); None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat
    return time.time() - (uptime - started_after_boot)


EXIT_SECONDS = 3.0  # writing metrics.json, printing them and shutting TensorFlow down


class Deadline:
    """train.max_minutes: whether one more step still leaves time for the final
    evaluation, checkpoint and sample grid, from how long the last ones took (estimated
    from the steps' own time until they have run once)."""

    # kept for a final grid before any was drawn (the first draw compiles the sampler):
    # a share of the budget, at most GRID_MAX seconds (its cost does not grow with the
    # budget); after one, half as much again as that one took
    GRID_SHARE, GRID_MAX = 0.1, 120.0

    def __init__(self, start: float, max_minutes: float | None, test_batches: int | None):
        """test_batches: batches per evaluation pass, None when unknown."""
        self.start = start
        self.end = None if max_minutes is None else start + 60.0 * max_minutes
        self.test_batches = test_batches
        self.first_step = None  # seconds of the first step (its trace included)
        self.steps_checked = 0  # calls of leaves_time: steps timed

    def leaves_time(
        self, step_seconds: float, eval_seconds, save_seconds, grid=False, grid_seconds=None
    ) -> bool:
        """eval_seconds, save_seconds: how long the last evaluation and checkpoint
        took, or None before the first; grid: whether a final sample grid is to be
        drawn; grid_seconds: how long the last grid took, None before the first."""
        if self.end is None:
            return True
        self.steps_checked += 1
        if self.first_step is None:  # its time is mostly the trace: no estimate yet
            self.first_step = step_seconds
            return time.monotonic() + 2 * step_seconds < self.end
        reserve = self._reserve(step_seconds, eval_seconds, save_seconds, grid, grid_seconds)
        return time.monotonic() + step_seconds + reserve < self.end

    def elapsed_fraction(
        self, step_seconds: float, eval_seconds, save_seconds, grid=False, grid_seconds=None
    ) -> float:
        """How much of the budget's training time has passed, in [0, 1]: the time since
        the start over the time from the start to where the last step must end (the
        budget less what ``leaves_time`` keeps for the end). 0 before the first step's
        time is known; the arguments are ``leaves_time``'s."""
        if self.end is None or self.steps_checked < 2:
            return 0.0  # the first step's time is mostly its trace: no estimate yet
        reserve = self._reserve(step_seconds, eval_seconds, save_seconds, grid, grid_seconds)
        # Before the first evaluation the reserve is a cautious guess (it can exceed the
        # budget): at most half the budget counts, or the schedule would reach its
        # floor at once.
        reserve = min(reserve, 0.5 * (self.end - self.start))
        training = max(self.end - reserve - self.start, 1e-9)
        return min(1.0, max(0.0, (time.monotonic() - self.start) / training))

    def _reserve(self, step_seconds, eval_seconds, save_seconds, grid, grid_seconds) -> float:
        """Seconds kept after the last step: the final evaluation, checkpoint, grid,
        a margin and the exit."""
        if eval_seconds is not None:
            # a final evaluation can take longer than the one before it (a loaded
            # machine, a cold cache): half as much again is kept in reserve
            finish = 1.5 * eval_seconds
        elif self.test_batches is not None:
            # the two eval steps' traces and first calls (forward passes only), taken as
            # two first training steps, then both weights over the test set, each batch
            # taken as half a training step: a forward pass is about a third of a step's
            # work, and evaluation runs in float32, which can be half the speed of a
            # bfloat16 forward pass
            finish = 2 * self.first_step + self.test_batches * step_seconds
        else:
            finish = 0.1 * (self.end - self.start)
        save = _save_estimate(save_seconds)
        if grid and grid_seconds is not None:
            finish += 1.5 * grid_seconds
        elif grid:
            finish += min(self.GRID_SHARE * (self.end - self.start), self.GRID_MAX)
        # a step's time for the loss's noise, and the process's exit after the return
        margin = max(2.0, 2 * step_seconds) + EXIT_SECONDS
        return finish + save + margin

    def seconds_left(self, save_seconds) -> float | None:
        """Seconds until the last checkpoint must begin for the process to exit in
        time; None without a budget. save_seconds: as in ``leaves_time``."""
        if self.end is None:
            return None
        return self.end - EXIT_SECONDS - _save_estimate(save_seconds) - time.monotonic()


def _save_estimate(save_seconds) -> float:
    """A checkpoint's seconds: the last one's, or 2 before the first."""
    return save_seconds if save_seconds is not None else 2.0
