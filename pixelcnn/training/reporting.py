"""What a training run reports: evaluations (EMA and raw weights), TensorBoard
summaries, sample grids and metrics.json."""

from __future__ import annotations

import json
import math
import os
import threading
import time

import gin
import numpy as np
import tensorflow as tf

from pixelcnn import distribute, files, rundir
from pixelcnn.inference import sampling
from pixelcnn.training import faults
from pixelcnn.training.trainer import WEIGHTS


def eval_run_name(weights: str) -> str:
    """The TensorBoard run of an evaluation: eval/ (EMA weights), eval_raw/."""
    return "eval" if weights == "ema" else f"eval_{weights}"


class Summaries:
    """TensorBoard writers: train/, eval/ (EMA weights) and eval_raw/ (raw weights).
    The operative config goes in as text at start-up."""

    def __init__(self, run_dir: str, chief: bool):
        names = ("train", *(eval_run_name(w) for w in WEIGHTS))
        self.writers = {
            k: tf.summary.create_file_writer(os.path.join(run_dir, k))
            if chief
            else tf.summary.create_noop_writer()
            for k in names
        }
        text = "\n".join("    " + line for line in gin.operative_config_str().splitlines())
        with self.writers["train"].as_default():
            tf.summary.text("operative_config", text, step=0)

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


def log_samples(
    model, run_dir: str, count: int, seed: int, step: int, cancelled=None
) -> tuple[str, np.ndarray] | None:
    """Draws ``count`` samples with the (EMA) model; writes and returns a PNG grid, or
    writes nothing (None) if the ``cancelled`` event was set while it drew."""
    labels = None
    if model.num_classes:
        labels = tf.range(count) % model.num_classes
    drawn = sampling.sample_fast(model, count, labels=labels, seed=(seed, step))
    if cancelled is not None and cancelled.is_set():
        return None
    grid = files.make_grid(drawn.numpy(), model.num_bits)
    path = os.path.join(run_dir, "samples", f"step_{step:08d}.png")
    files.save_png(grid, path)
    return path, grid


class Report:
    """What a run measured: this invocation's evaluations, sample grids and train loss,
    after a resumed run's earlier evaluations and grids (the chief's, from metrics.json)."""

    def __init__(self, trainer, test, summaries: Summaries, run_dir: str, start: float, chief):
        """test: the test split's ``passes.Passes``; chief: whether this worker writes
        metrics.json."""
        self.trainer, self.test = trainer, test
        self.summaries, self.run_dir, self.start = summaries, run_dir, start
        self.chief = chief
        self.train_bits_per_dim = None
        self.evaluations, self.samples = [], []  # this invocation's
        self.earlier = {"evaluations": [], "samples": []}  # a resumed run's, from metrics.json
        self.pass_seconds = {}  # how long the last pass of each weights took
        self.skipped_steps = 0  # float16 steps whose gradient overflowed
        self.grid_seconds = None  # how long the last sample grid took
        self.grid_step = None  # the step of the weights it was drawn with

    def skipped_step(self, step: int) -> None:
        """A step skipped for an overflowing float16 gradient, and the lowered scale."""
        self.skipped_steps += 1
        self.summaries.scalars(
            "train",
            step,
            skipped_steps=self.skipped_steps,
            loss_scale=float(self.trainer.loss_scale),
        )

    def train_step(self, step: int, nll: float, count: int, seconds: float) -> None:
        """One training step's loss (nats per image) and speed, to TensorBoard."""
        trainer = self.trainer
        running = self.train_bits_per_dim
        bpd = trainer.bits_per_dim(nll)
        self.train_bits_per_dim = bpd if running is None else 0.98 * running + 0.02 * bpd
        self.summaries.scalars(
            "train",
            step,
            nll=nll,
            bits_per_dim=bpd,
            learning_rate=trainer.schedule(step - 1),
            images_per_sec=count / seconds,
        )

    def evaluate(self, images: int, should_stop, weights=WEIGHTS) -> dict:
        """Test bits/dim with these weights ("ema", "raw"); console, TensorBoard, result.
        A second evaluation at the same step adds to its entry. ``should_stop()`` is
        asked before every batch (``faults.SignalReceived``)."""
        trainer, step = self.trainer, distribute.value(self.trainer.step)
        trainer.trace_for(eval_spec=self.test.element_spec)
        entry = {"step": step, "epoch": distribute.value(trainer.epoch), "images": images}
        if self.evaluations and self.evaluations[-1]["step"] == step:
            entry = self.evaluations.pop()
        for w in weights:
            pass_began = time.monotonic()
            nll = trainer.evaluate(self.test.next_pass(), w, should_stop)
            bpd = trainer.bits_per_dim(nll)
            self.summaries.scalars(eval_run_name(w), step, nll=nll, bits_per_dim=bpd)
            entry[f"test_bits_per_dim_{w}"] = bpd
            self.pass_seconds[w] = time.monotonic() - pass_began
            entry[f"eval_seconds_{w}"] = round(self.pass_seconds[w], 2)
        entry["seconds"] = round(time.monotonic() - self.start, 1)
        self.evaluations.append(entry)
        self.write(self.result(None))  # a run killed later keeps what it measured
        scored = [
            f"{entry[f'test_bits_per_dim_{w}']:.4f} ({w} weights)"
            for w in WEIGHTS
            if f"test_bits_per_dim_{w}" in entry
        ]
        print(f"epoch {entry['epoch']} step {step}: test bits/dim " + ", ".join(scored))
        return entry

    @property
    def eval_seconds(self) -> float | None:
        """What an evaluation of both weights takes, from the last pass of each."""
        if not self.pass_seconds:
            return None
        known = list(self.pass_seconds.values())
        return sum(self.pass_seconds.get(w, max(known)) for w in WEIGHTS)

    def log_samples(self, count: int, seed: int, stop: faults.StopRequested, seconds=None) -> None:
        """Draws and writes the sample grid. It runs in a thread the loop watches, so a
        signal abandons it within a fraction of a second (the first draw compiles the
        sampler: seconds to a minute that a preemption's grace period may not have).
        In a multi-worker run TF's preemption handler owns the signals instead: the
        grid is finished first there (``faults.Preemption``). seconds: abandon it,
        with a message, after that long (the time budget's end; not begun if <= 0)."""
        if not count:
            return
        if seconds is not None and seconds <= 0:
            print("the sample grid was not drawn: no time was left in train.max_minutes")
            return
        began = time.monotonic()
        step = distribute.value(self.trainer.step)
        done, cancelled = {}, threading.Event()

        def draw():
            try:
                model, run_dir = self.trainer.ema, self.run_dir
                done["result"] = log_samples(model, run_dir, count, seed, step, cancelled)
            except Exception as e:  # raised again in the loop's thread
                done["error"] = e

        thread = threading.Thread(target=draw, name="log_samples", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if stop.signal is not None:
                raise faults.SignalReceived("sample logging")
            if seconds is not None and time.monotonic() - began > seconds:
                cancelled.set()  # the thread may go on drawing, but writes nothing
                print("the sample grid was not drawn: it did not fit in train.max_minutes")
                return
        if "error" in done:
            raise done["error"]
        path, grid = done["result"]
        self.summaries.image("samples", grid, step)
        self.samples.append(path)
        self.grid_seconds, self.grid_step = time.monotonic() - began, step

    def resume(self, step: int) -> None:
        """A run resumed at ``step``: its metrics.json goes on from the evaluations up to
        that step and the sample grids that earlier invocations recorded there (later
        evaluations were of weights no checkpoint kept; they are made again). A
        metrics.json that cannot be read is set aside as metrics.json.unreadable."""
        if not self.chief:
            return
        try:
            earlier = rundir.read_metrics(self.run_dir) or {}
        except ValueError as e:
            path = rundir.metrics_path(self.run_dir)
            tf.io.gfile.rename(path, path + ".unreadable", overwrite=True)
            print(f"{e}: moved to {path}.unreadable; metrics.json starts afresh")
            return
        evaluations = [e for e in earlier.get("evaluations", []) if e["step"] <= step]
        self.earlier = {"evaluations": evaluations, "samples": earlier.get("samples", [])}

    def result(self, stopped: str | None) -> dict:
        """The run's metrics: the last evaluation, every evaluation and sample grid
        (a resumed run's earlier ones first), the train loss; ``stopped``: why it ended
        (None while it goes on)."""
        last = self.evaluations[-1] if self.evaluations else {}
        first = self.evaluations[0]["step"] if self.evaluations else math.inf
        earlier = [e for e in self.earlier["evaluations"] if e["step"] < first]
        return {
            "step": distribute.value(self.trainer.step),
            "epoch": distribute.value(self.trainer.epoch),
            "train_bits_per_dim": self.train_bits_per_dim,
            "test_bits_per_dim": last.get("test_bits_per_dim_ema"),
            "test_bits_per_dim_raw": last.get("test_bits_per_dim_raw"),
            "skipped_steps": self.skipped_steps,
            "evaluations": earlier + self.evaluations,
            "samples": list(dict.fromkeys(self.earlier["samples"] + self.samples)),
            "stopped": stopped,
        }

    def write(self, result: dict) -> None:
        """metrics.json in the run directory (by the chief only)."""
        if self.chief:
            files.write_atomic(
                rundir.metrics_path(self.run_dir), json.dumps(result, indent=2) + "\n"
            )
