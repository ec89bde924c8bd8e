"""The learning rate's schedules: the run's end from max_steps, max_epoch or the time
budget, the progress kept across a resume, the EMA's warm-up and its cap."""

import math
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from helpers import plain, random_images, summary_values

from pixelcnn import rundir
from pixelcnn.training import faults, loop, reporting, saver, trainer
from pixelcnn.training import train as training

ONE = "/cpu:0"


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_a_schedule_to_the_end_follows_its_formula_in_the_progress(kind):
    progress = tf.Variable(0.0)
    rate = trainer.LearningRate(2e-3, 0.5, warmup_steps=4, kind=kind, floor=0.1, progress=progress)
    for step, p in [(0, 0.0), (2, 0.01), (3, 0.25), (10, 0.5), (50, 0.9), (99, 1.0), (99, 1.7)]:
        progress.assign(p)
        q = min(p, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * q)) if kind == "cosine" else 1 - q
        expected = 2e-3 * (0.1 + 0.9 * shape) * min(1.0, (step + 1) / 4)
        assert float(rate(step)) == pytest.approx(expected, rel=1e-5), (step, p)
    # the decay factor is the exponential schedule's alone
    assert float(rate(99)) == pytest.approx(2e-4, rel=1e-5)


def test_bad_schedule_bindings_are_named():
    with pytest.raises(ValueError, match="train.schedule must be one of"):
        trainer.TrainerOptions(schedule="step").check()
    with pytest.raises(ValueError, match=r"learning_rate_floor must be in \[0, 1\]"):
        trainer.TrainerOptions(schedule="cosine", learning_rate_floor=1.5).check()


def test_progress_takes_the_first_end_never_goes_back_and_spreads_a_resumed_budget():
    by_steps = loop.Progress(total_steps=200, budgeted=False, restored=0.0)
    assert [by_steps.at(s) for s in (0, 50, 199, 200, 300)] == [0.0, 0.25, 0.995, 1.0, 1.0]
    both = loop.Progress(total_steps=200, budgeted=True, restored=0.0)
    assert both.at(20, time_fraction=0.5) == 0.5  # the budget ends first
    assert both.at(21, time_fraction=0.4) == 0.5  # a longer reserve estimate: no step back
    assert both.at(180, time_fraction=0.6) == 0.9  # now the steps end first
    # resumed at 0.4 under a new budget: the remaining 0.6 spread over it
    resumed = loop.Progress(total_steps=None, budgeted=True, restored=0.4)
    assert resumed.at(500) == 0.4
    assert resumed.at(501, time_fraction=0.5) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="needs to know the end"):
        loop.Progress(total_steps=None, budgeted=False, restored=0.0)


def test_the_budgets_elapsed_fraction_counts_to_where_the_last_step_ends(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    deadline = faults.Deadline(start=1000.0, max_minutes=1.0, test_batches=None)  # ends at 1060
    assert deadline.elapsed_fraction(1.0, 4.0, None) == 0.0  # no step timed yet
    deadline.leaves_time(1.0, None, None)  # the first step
    assert deadline.elapsed_fraction(1.0, 4.0, None) == 0.0  # its time is its trace
    deadline.leaves_time(1.0, None, None)
    now[0] = 1024.0
    # kept for the end: the evaluation with half again (6), a checkpoint (2), a margin
    # of 2 s and the exit (3): the last step ends at 1047
    assert deadline.elapsed_fraction(1.0, 4.0, None) == pytest.approx(24 / 47)
    now[0] = 1050.0
    assert deadline.elapsed_fraction(1.0, 4.0, None) == 1.0
    # a first step of 20 s (its trace) before any evaluation: the cautious reserve
    # (two first steps and the test set) is counted as half the budget at most
    now[0] = 1010.0
    assert deadline.elapsed_fraction(20.0, None, None) == pytest.approx(10 / 30)


class StepClock:
    """A stand-in for the training modules' ``time``: ``monotonic()`` moves only when a
    training step runs, by ``first`` seconds for the first (its trace) and ``each`` for
    every later one, so a budgeted run takes the same steps on any machine."""

    def __init__(self, first: float, each: float):
        self.now, self.first, self.each, self.steps = time.monotonic(), first, each, 0

    def monotonic(self) -> float:
        return self.now

    def advance(self) -> None:
        self.now += self.first if self.steps == 0 else self.each
        self.steps += 1

    def __getattr__(self, name):  # time.time, time.sleep, ...: the real ones
        return getattr(time, name)


def test_a_budgeted_cosine_run_anneals_over_its_budget_not_at_once(tmp_path, tiny_gin, monkeypatch):
    """A 30-second budget on a step clock (a 3-second first step, its trace, then half a
    second a step): the first step's trace must not end the schedule; the rate falls over
    the run and ends near its floor."""
    clock = StepClock(first=3.0, each=0.5)
    for module in (faults, loop, reporting, saver, training):
        monkeypatch.setattr(module, "time", clock)
    step = loop.Loop.step

    def timed_step(self, batch, bar, tick):
        clock.advance()  # before the step: its end, read after it, has moved
        return step(self, batch, bar, tick)

    monkeypatch.setattr(loop.Loop, "step", timed_step)
    fn = plain(random_images(64), random_images(8, seed=1))
    result = training.train(
        tmp_path, tf.distribute.OneDeviceStrategy(ONE), dataset_fn=fn, batch_size=8,
        max_epoch=1000, max_minutes=0.5, schedule="cosine", learning_rate=1e-3,
        learning_rate_floor=0.1, progress=False, images_to_log=0,
    )  # fmt: skip
    assert result["stopped"] == "max_minutes"
    rates = learning_rates(tmp_path)
    steps = sorted(rates)
    # the reserve before the first evaluation (two first steps, the test set, a
    # checkpoint and margins) leaves room for many steps, and more after it
    assert len(steps) >= 20, (result["step"], rates)
    assert rates[steps[0]] > 5e-4, rates  # not at the floor from the start
    assert rates[steps[1]] > 5e-4, rates  # nor after the trace's step
    assert rates[steps[-1]] < 2.5e-4, rates  # near the floor (1e-4) at the end
    ordered = [rates[k] for k in steps]
    assert all(a >= b for a, b in zip(ordered, ordered[1:])), rates  # never rises


def learning_rates(run_dir):
    """{step: the learning rate of that step} from the run's TensorBoard event files."""
    return {
        step: float(tf.make_ndarray(value.tensor))
        for step, tag, value in summary_values(run_dir, "train")
        if tag == "learning_rate"
    }


def test_a_resumed_cosine_run_continues_the_same_schedule(tmp_path, tiny_gin, capsys):
    """max_steps 6, cosine to a floor: a run stopped by a signal after step 3 and
    resumed ends with the weights of the run that went straight through (bit-exact),
    and the schedule's progress was saved with it."""
    train_images = random_images(48)

    def fn(batch_size, interrupt=None):
        seen = []

        def note(x):
            seen.append(1)
            if interrupt is not None and len(seen) == interrupt:
                os.kill(os.getpid(), signal.SIGINT)
            return x

        train = tf.data.Dataset.from_tensor_slices(train_images).batch(batch_size)
        if interrupt is not None:
            train = train.map(lambda x: tf.numpy_function(note, [x], tf.uint8, stateful=True))
        test = tf.data.Dataset.from_tensor_slices(random_images(8, seed=1)).batch(batch_size)
        return train, test

    one = tf.distribute.OneDeviceStrategy(ONE)
    common = dict(
        batch_size=8, max_steps=6, max_epoch=1, progress=False, schedule="cosine",
        learning_rate_floor=0.1, learning_rate=2e-3, images_to_log=0,
    )  # fmt: skip
    straight = training.train(tmp_path / "a", one, dataset_fn=fn, **common)
    assert straight["step"] == 6
    # the rate of step k (k earlier steps) is the cosine at progress k / 6
    expected = [2e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 6))) for k in range(6)]
    got = learning_rates(tmp_path / "a")
    np.testing.assert_allclose([got[k + 1] for k in range(6)], expected, rtol=1e-5)
    # the default EMA cap (0.9995) is never reached in 6 steps, and the run says so
    assert "would cap the EMA's decay from step 17,991" in capsys.readouterr().out
    with pytest.raises(faults.TrainingInterrupted):
        # the signal arrives while the 4th batch is read ahead: training stops at a step
        training.train(tmp_path / "b", one, dataset_fn=lambda b: fn(b, interrupt=4), **common)
    stopped_at = int(rundir.checkpoint_candidates(tmp_path / "b")[0].rsplit("-", 1)[1])
    assert 1 <= stopped_at < 6
    progress = tf.Variable(0.0)
    tf.train.Checkpoint(schedule_progress=progress).restore(
        rundir.checkpoint_candidates(tmp_path / "b")[0]
    ).expect_partial()
    assert float(progress) == pytest.approx((stopped_at - 1) / 6)  # set before its last step
    resumed = training.train(tmp_path / "b", one, dataset_fn=fn, **common)
    assert resumed["step"] == 6
    a, _ = rundir.load_for_inference(tmp_path / "a")
    b, _ = rundir.load_for_inference(tmp_path / "b")
    for x, y in zip(a.trainable_variables, b.trainable_variables, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_the_ema_cap_step_is_where_the_warm_up_reaches_the_cap():
    for decay, warmup in [(0.9995, 10.0), (0.999, 3.0), (0.99, 2.0)]:
        t = trainer.ema_cap_step(decay, warmup)
        assert float(trainer.ema_decay_at(decay, t - 1, warmup)) < decay
        assert float(trainer.ema_decay_at(decay, t + 1, warmup)) == pytest.approx(decay)
        assert (1 + t) / (warmup + t) == pytest.approx(decay)
    assert trainer.ema_cap_step(1.0, 10.0) == math.inf
