"""Faults: signals during evaluation, damaged checkpoints, exact resume with dropout."""

import json
import os
import shutil
import signal
import time

import gin
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, bind_tiny, free_ports, plain, random_images, worker_env

from pixelcnn import rundir
from pixelcnn.training import faults, reporting
from pixelcnn.training import train as training

ONE = "/cpu:0"


def train(run_dir, dataset_fn, **kwargs):
    return training.train(
        run_dir, tf.distribute.OneDeviceStrategy(ONE), dataset_fn=dataset_fn, batch_size=8,
        progress=False, **kwargs,
    )  # fmt: skip


def test_sigterm_during_evaluation_abandons_it_saves_and_exits(tmp_path, tiny_gin):
    """SIGTERM while the test set (400 batches) is being scored: the evaluation stops at
    the next batch, the weights are saved at the step reached, TrainingInterrupted."""
    read = []

    def fn(batch_size):
        test = tf.data.Dataset.from_tensor_slices(random_images(3200, seed=1)).batch(batch_size)

        def count(x):
            def note(_):
                read.append(time.monotonic())
                if len(read) == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                return 0

            seen = tf.py_function(note, [0], tf.int32)
            seen.set_shape([])
            return x + 0 * tf.cast(seen, x.dtype)

        train_set = tf.data.Dataset.from_tensor_slices(random_images(24)).batch(batch_size)
        return train_set, test.map(count)

    with pytest.raises(faults.TrainingInterrupted, match="resume"):
        train(tmp_path, fn, max_epoch=1)
    exited = time.monotonic()
    # prefetching reads a few batches ahead; far from the 400 a finished evaluation reads
    assert len(read) < 40, len(read)
    print(f"exit {exited - read[4]:.2f} s after the signal, {len(read)} of 400 batches read")
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert int(latest.rsplit("-", 1)[1]) == 3  # the epoch's 3 steps are saved


def data_file(path):
    return path + ".data-00000-of-00001"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with checkpoints at steps 2 and 4."""
    path = tmp_path_factory.mktemp("run")
    gin.clear_config()
    bind_tiny()
    fn = plain(random_images(32), random_images(8, seed=1))
    train(path, fn, max_epoch=1, max_steps=2)
    train(path, fn, max_epoch=1, max_steps=4)
    gin.clear_config()
    assert tf.train.latest_checkpoint(str(path / "checkpoints")).endswith("-4")
    return path


def damaged_copy(run, tmp_path, damage, where=0.5):
    """A copy of the run whose newest checkpoint is damaged as the disk can damage it
    (a flipped byte at fraction ``where`` of the file)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = tf.train.latest_checkpoint(str(copy / "checkpoints"))
    target = newest + ".index" if damage.endswith("index") else data_file(newest)
    blob = open(target, "rb").read()
    if damage.startswith("truncate"):  # e.g. the disk filled during the save
        open(target, "wb").write(blob[: len(blob) // 2])
    elif damage.startswith("delete"):
        os.remove(target)
    else:  # one flipped byte in the middle of the weights or of the index
        flipped = bytearray(blob)
        flipped[int(len(blob) * where)] ^= 0xFF
        open(target, "wb").write(bytes(flipped))
    return copy


# TensorFlow's reader reports each of these itself (a CRC32C per tensor and per index
# block): no manifest of our own is needed.
@pytest.mark.parametrize(
    "damage", ["truncate", "delete", "flip_index", "delete_index", "truncate_index"]
)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_read(
    two_checkpoints, tmp_path, damage, capsys
):
    run = damaged_copy(two_checkpoints, tmp_path, damage)
    model, path = rundir.load_for_inference(run)  # as sample, evaluate, complete read it
    assert path.endswith("-2")
    err = capsys.readouterr().err
    assert "ckpt-4 cannot be read" in err and "fell back to" in err


@pytest.mark.parametrize("where", [0.0, 0.25, 0.5, 0.75, 0.999])
def test_a_flipped_byte_of_the_weights_is_reported_or_not_read(
    two_checkpoints, tmp_path, where, capsys
):
    """An inference load reads the EMA weights only, and TensorFlow checks the CRC32C of
    each tensor it reads: a flipped byte elsewhere (the raw weights, Adam's slots) leaves
    the EMA weights as they were saved, one inside them is reported."""
    intact, _ = rundir.load_for_inference(two_checkpoints)
    run = damaged_copy(two_checkpoints, tmp_path, "flip", where)
    model, path = rundir.load_for_inference(run)
    if path.endswith("-2"):
        assert "ckpt-4 cannot be read" in capsys.readouterr().err
    else:
        for a, b in zip(intact.weights, model.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoints_are_found_without_the_state_file(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    os.remove(run / "checkpoints" / "checkpoint")
    assert rundir.load_for_inference(run)[1].endswith("-4")
    (run / "checkpoints" / "checkpoint").write_text("garbage\n")
    assert [p[-6:] for p in rundir.checkpoint_candidates(run)] == ["ckpt-4", "ckpt-2"]


def test_a_run_named_by_a_relative_path_loads(two_checkpoints, tmp_path, monkeypatch):
    """`--log-dir runs/X`: the checkpoints' paths are the folder's, never joined twice."""
    shutil.copytree(two_checkpoints, tmp_path / "runs" / "r")
    monkeypatch.chdir(tmp_path)
    folder = os.path.join("runs", "r", "checkpoints")
    assert rundir.checkpoint_candidates("runs/r") == [
        os.path.join(folder, "ckpt-4"),
        os.path.join(folder, "ckpt-2"),
    ]
    assert rundir.load_for_inference("runs/r")[1] == os.path.join(folder, "ckpt-4")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(
    two_checkpoints, tmp_path, tiny_gin, capsys, damage
):
    """Resuming reads every tensor, so any flipped byte of the weights is reported."""
    run = damaged_copy(two_checkpoints, tmp_path, damage)
    result = train(
        run, plain(random_images(32), random_images(8, seed=1)), max_epoch=1, max_steps=4
    )
    out = capsys.readouterr()
    assert "cannot be read" in out.err and "-2 at step 2" in out.out
    assert result["step"] == 4  # and the damaged step-4 checkpoint is written again
    assert rundir.load_for_inference(run)[1].endswith("-4")


def test_no_readable_checkpoint_is_one_clear_error(two_checkpoints, tmp_path, tiny_gin):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for path in tf.train.get_checkpoint_state(str(run / "checkpoints")).all_model_checkpoint_paths:
        os.remove(data_file(path))
    with pytest.raises(rundir.NoGoodCheckpoint, match="no checkpoint of this run can be read"):
        rundir.load_for_inference(run)
    with pytest.raises(rundir.NoGoodCheckpoint, match="can be read"):
        train(run, plain(random_images(32), random_images(8, seed=1)), max_epoch=1, max_steps=6)


# ---------------------------------------------------------------------------- workers
def start_workers(run_dir, max_steps, log_dir, extra=(), per_worker=((), ())):
    """Two multiworker processes of the tiny config on 127.0.0.1 (main.py, as a user),
    run from ``log_dir`` (where a test may put a dataset module); per_worker: each
    one's own extra arguments."""
    import subprocess
    import sys

    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        env = worker_env(workers, i)
        command = [
            sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "experiments/tiny.gin"),
            "--binding", f"train.max_steps = {max_steps}", "--binding", "train.images_to_log = 0",
            "--binding", "embedded_mnist.test_size = 16", *extra, *per_worker[i],
            "--log-dir", str(run_dir), "multiworker",
        ]  # fmt: skip
        log = open(log_dir / f"worker{i}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)
        )
    return procs


def wait_for_training(run_dir, procs, before=0, seconds=3.0):
    """Until the chief has opened a new training summary file (there were ``before``),
    then ``seconds`` more."""
    began = time.monotonic()
    while len(list((run_dir / "train").glob("events.*"))) <= before:
        assert all(p.poll() is None for p in procs), "a worker exited before training"
        assert time.monotonic() - began < 180, "the workers did not start training"
        time.sleep(0.2)
    time.sleep(seconds)


def test_a_signal_to_one_worker_stops_every_worker_at_one_step_then_resume_and_a_kill(tmp_path):
    """SIGTERM to worker 1 mid-epoch: both workers stop after the same step, the chief's
    checkpoint holds it, both exit 130 saying how to resume. The same commands resume
    there; SIGKILL of worker 1 then makes the chief exit within a minute with an error
    that names the lost worker and the checkpoint to resume from."""
    import re

    run_dir = tmp_path / "run"
    procs = start_workers(run_dir, 100_000, tmp_path)
    wait_for_training(run_dir, procs)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=60) for p in procs]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [130, 130], logs
    steps = {int(m) for log in logs for m in re.findall(r"stopped at step (\d+)", log)}
    assert len(steps) == 1, logs
    (step,) = steps
    assert "rerun the same commands on every worker" in logs[0]
    assert rundir.checkpoint_candidates(run_dir)[0].endswith(f"ckpt-{step}")
    assert not (run_dir / "tmp_worker_1").exists() and not (run_dir / "workertemp_1").exists()

    before = len(list((run_dir / "train").glob("events.*")))
    procs = start_workers(run_dir, 100_000, tmp_path)
    wait_for_training(run_dir, procs, before, seconds=1.0)
    procs[1].kill()
    began = time.monotonic()
    assert procs[0].wait(timeout=60) == 1
    assert time.monotonic() - began < 60
    procs[1].wait()
    chief = (tmp_path / "worker0.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt-{step}'} at step {step}" in chief
    assert "lost contact with /job:worker/replica:0/task:1" in chief, chief[-3000:]
    assert f"the newest checkpoint is {run_dir / 'checkpoints'}" in chief
    assert "Traceback" not in chief


def test_workers_with_different_clocks_stop_for_the_budget_at_the_same_step(tmp_path):
    """Each worker's budget estimate is its own (here, only worker 0 has a budget): the
    one that runs out first stops every worker at the same step, and all exit in time
    (one worker stopping alone would leave the other waiting in a collective)."""
    import re

    run_dir = tmp_path / "run"
    budgets = [("--binding", "train.max_minutes = 0.5"), ()]  # worker 1: no budget at all
    procs = start_workers(run_dir, 100_000, tmp_path, per_worker=budgets)
    codes = [p.wait(timeout=120) for p in procs]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    steps = [re.findall(r"stopped at step (\d+) to fit train.max_minutes", log) for log in logs]
    assert steps[0] == steps[1] and len(steps[0]) == 1, logs
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == int(steps[0][0])


def test_sigterm_while_drawing_the_sample_grid_abandons_it(tmp_path, tiny_gin, monkeypatch):
    """The epoch-end grid (its first draw compiles the sampler, up to a minute) is
    abandoned at a signal: the weights are saved and the run exits within a second."""
    import threading

    signalled, finished, on_disk = [], threading.Event(), []

    def slow_grid(*args):
        signalled.append(time.monotonic())
        on_disk.append(json.loads((tmp_path / "metrics.json").read_text()))
        os.kill(os.getpid(), signal.SIGTERM)
        finished.wait(60)  # a long compile, in the drawing thread

    monkeypatch.setattr(reporting, "log_samples", slow_grid)
    gin.bind_parameter("train.images_to_log", 2)
    try:
        with pytest.raises(faults.TrainingInterrupted, match="sample logging"):
            train(tmp_path, plain(random_images(16), random_images(8, seed=1)), max_epoch=1)
        assert time.monotonic() - signalled[0] < 2.0
    finally:
        finished.set()
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert int(latest.rsplit("-", 1)[1]) == 2  # both steps of the epoch are saved
    # metrics.json held the epoch's evaluation before the grid began, and says why it ended
    assert [e["step"] for e in on_disk[0]["evaluations"]] == [2] and on_disk[0]["stopped"] is None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        metrics["stopped"] == "interrupted" and metrics["evaluations"] == on_disk[0]["evaluations"]
    )


def test_a_run_ends_with_a_grid_of_its_final_weights(tmp_path, tiny_gin, monkeypatch):
    """Grids every 2 epochs of 2 steps: a run of 3 epochs draws one at step 4 and one
    of its final weights at step 6; a resume to epoch 4 draws the epoch's grid only."""
    drawn = []

    def fake_grid(model, run_dir, count, seed, step, cancelled=None):
        drawn.append(step)
        return f"step_{step}.png", np.zeros((4, 4, 3), np.uint8)

    monkeypatch.setattr(reporting, "log_samples", fake_grid)
    gin.bind_parameter("train.images_to_log", 2)
    gin.bind_parameter("train.log_images_every", 2)
    dataset_fn = plain(random_images(16), random_images(8, seed=1))
    assert train(tmp_path, dataset_fn, max_epoch=3)["samples"] == ["step_4.png", "step_6.png"]
    resumed = train(tmp_path, dataset_fn, max_epoch=4)  # metrics.json keeps the earlier grids
    assert resumed["samples"] == ["step_4.png", "step_6.png", "step_8.png"]
    assert drawn == [4, 6, 8]


def test_a_resumed_runs_metrics_json_keeps_its_history(tmp_path, tiny_gin, capsys):
    """A resume keeps the evaluations up to its checkpoint's step (not one made after
    it, of weights no checkpoint kept); an unreadable metrics.json is set aside."""
    dataset_fn = plain(random_images(16), random_images(8, seed=1))
    first = train(tmp_path, dataset_fn, max_epoch=1)["evaluations"]
    path = tmp_path / "metrics.json"
    metrics = json.loads(path.read_text())
    assert metrics["evaluations"] == first and [e["step"] for e in first] == [2]
    lost = dict(first[0], step=3, test_bits_per_dim_ema=99.0)  # after the last checkpoint
    path.write_text(json.dumps(dict(metrics, evaluations=[*first, lost], stopped=None)))
    resumed = train(tmp_path, dataset_fn, max_epoch=2)
    assert resumed["evaluations"][0] == first[0] and [
        e["step"] for e in resumed["evaluations"]
    ] == [2, 4]
    assert json.loads(path.read_text()) == json.loads(json.dumps(resumed))
    path.write_text("{")
    again = train(tmp_path, dataset_fn, max_epoch=3)
    assert "is not JSON" in capsys.readouterr().out
    assert (tmp_path / "metrics.json.unreadable").read_text() == "{"
    assert [e["step"] for e in again["evaluations"]] == [6]


def test_the_budget_is_checked_before_an_epoch_begins(tmp_path, tiny_gin, monkeypatch):
    """When the epoch's end (evaluation, grid, checkpoint) leaves no time for another
    step, the run stops there: no step more, and no second evaluation of the weights."""
    calls = []

    def leaves_time(self, *args, **kwargs):
        calls.append(args)
        return len(calls) <= 2  # the epoch's two steps; the next check finds no time

    monkeypatch.setattr(faults.Deadline, "leaves_time", leaves_time)
    result = train(
        tmp_path, plain(random_images(16), random_images(8, seed=1)), max_epoch=3, max_minutes=10
    )
    assert result["stopped"] == "max_minutes" and result["step"] == 2 and len(calls) == 3
    assert [e["step"] for e in result["evaluations"]] == [2]
    assert "test_bits_per_dim_raw" in result["evaluations"][0]


SIGNAL_IN_EVALUATION = """
import json, os, signal
import gin
import numpy as np
import tensorflow as tf
from pixelcnn import data

WORKER = json.loads(os.environ["TF_CONFIG"])["task"]["index"]


@gin.configurable
def dataset(batch_size):
    images = data.load_embedded_mnist()[0]
    seen = []

    def note(x):
        seen.append(1)
        if WORKER == 1 and len(seen) == 3:  # worker 1, inside the first evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return x

    def watched(x):
        return tf.numpy_function(note, [x], tf.uint8, stateful=True)

    test = tf.data.Dataset.from_tensor_slices(images[:800]).batch(batch_size).map(watched)
    return tf.data.Dataset.from_tensor_slices(images[800:864]).batch(batch_size), test
"""


def test_a_signal_during_a_multi_worker_evaluation_stops_every_worker_there(tmp_path):
    """SIGTERM to worker 1 while the workers evaluate: all abandon the evaluation at the
    same batch, the chief saves the step reached, both exit 130."""
    (tmp_path / "signal_data.py").write_text(SIGNAL_IN_EVALUATION)
    run_dir = tmp_path / "run"
    procs = start_workers(
        run_dir,
        100_000,
        tmp_path,
        extra=(
            "--binding",
            "import signal_data",
            "--binding",
            "train.dataset_fn = @signal_data.dataset",
        ),
    )
    codes = [p.wait(timeout=180) for p in procs]
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [130, 130], logs
    for log in logs:
        assert "a signal to one of the workers during evaluation at step 8" in log, log[-2000:]
    assert rundir.checkpoint_candidates(run_dir)[0].endswith("ckpt-8")


def test_the_budget_keeps_time_for_the_evaluation_checkpoint_and_a_final_grid(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    deadline = faults.Deadline(start=1000.0, max_minutes=1.0, test_batches=None)  # ends at 1060
    assert deadline.leaves_time(1.0, None, None)  # the first step: no estimate yet
    now[0] = 1040.0
    # a step (1 s), the final evaluation with half again in reserve (6), a checkpoint
    # (2 before the first), a margin of two steps or 2 s, the exit (3): 1054
    assert deadline.leaves_time(1.0, 4.0, None)
    # and a final grid: a tenth of the budget (6 s) more
    assert not deadline.leaves_time(1.0, 4.0, None, grid=True)
    # after a grid was drawn: half as much again as it took (2 s: 3 s kept)
    assert deadline.leaves_time(1.0, 4.0, None, grid=True, grid_seconds=2.0)
    now[0] = 1030.0
    assert deadline.leaves_time(1.0, 4.0, None, grid=True)
    # what is left for the grid once the checkpoint and exit are counted
    assert deadline.seconds_left(5.0) == pytest.approx(1060 - 3 - 5 - 1030)
    assert faults.Deadline(1000.0, None, None).seconds_left(None) is None
