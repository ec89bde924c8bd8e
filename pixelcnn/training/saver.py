"""Checkpoints while training: the run's ``tf.train.Checkpoint`` (model, EMA,
optimizer, epoch, step in the epoch, the schedule's progress), its manager and the save
timer. Restoring goes through ``rundir`` (the newest checkpoint that reads back whole),
as loading for inference does."""

from __future__ import annotations

import os
import time

import tensorflow as tf

from pixelcnn import distribute, rundir


class Saver:
    """Saves and restores a training run's checkpoints.

    Non-chief workers of a multi-worker run write to a scratch directory they delete.
    """

    def __init__(self, trainer, run_dir: str, keep: int, every_minutes: float):
        """keep: checkpoints kept (train.chkpt_to_keep); every_minutes: the timer's
        period (train.checkpoint_every_minutes)."""
        strategy = trainer.strategy
        self.trainer = trainer
        self.run_dir = run_dir
        self.chief = distribute.is_chief(strategy)
        self.directory = (
            rundir.checkpoint_dir(run_dir)
            if self.chief
            else os.path.join(run_dir, f"tmp_worker_{distribute.task_id(strategy)}")
        )
        state = dict(
            model=trainer.model.checkpointable(),
            ema=trainer.ema.checkpointable(),
            optimizer=trainer.optimizer,
            epoch=trainer.epoch,
            step_in_epoch=trainer.step_in_epoch,
        )
        # The schedule's progress is saved too; checkpoints written before it existed
        # lack it, so it is restored apart from the state every checkpoint holds whole.
        self.checkpoint = tf.train.Checkpoint(**state, schedule_progress=trainer.progress)
        self._state = tf.train.Checkpoint(**state)
        self._progress = tf.train.Checkpoint(schedule_progress=trainer.progress)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.directory, keep)
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
        path = rundir.restore_newest_good(self._state, candidates, partial=False)
        self._progress.restore(path).expect_partial()  # stays 0 where the file lacks it
        print(f"resumed from {path} at step {distribute.value(self.trainer.step)}")
        return True

    def save(self, reason: str) -> str:
        began = time.monotonic()
        path = self.manager.save(checkpoint_number=self.trainer.step)
        if not self.chief and tf.io.gfile.exists(self.directory):
            tf.io.gfile.rmtree(self.directory)
        self.last = time.monotonic()
        self.seconds = self.last - began
        self.saved_step = distribute.value(self.trainer.step)
        return f"{reason}: saved {path}"

    def save_if_due(self) -> bool:
        """Saves when train.checkpoint_every_minutes have passed since the last save."""
        if time.monotonic() - self.last > self.every_seconds:
            self.save("timer")
            return True
        return False
