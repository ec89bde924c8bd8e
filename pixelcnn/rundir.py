"""A run directory: the one module that knows its layout. Training writes it
(``pixelcnn.training``), the commands that read a run load from it; both sides use the
functions here.

run_dir/
  config.gin             the parsed gin config (written at start-up)
  operative_config.gin   the values the run actually used (start-up, after building)
  model.json             the model's constructor arguments (and training precision)
  metrics.json           the last evaluation, every evaluation, the samples (rewritten at
                         each evaluation, at exit and at a signal; a resume keeps its history)
  checkpoints/           tf.train.Checkpoint: model, ema, optimizer, step, epoch,
                         the schedule's progress;
  train/, eval/, eval_raw/  TensorBoard summaries
  samples/               PNG sample grids

Here: the run's files (config.gin, model.json, metrics.json and its schema), its
checkpoint candidates, restoring the newest one that reads back whole, and loading a
trained model for inference. Saving while training is ``training.saver``.

Paths are strings handled through ``tf.io.gfile``, so a run directory may be any
filesystem TensorFlow reads (a local folder, ``ram://``, ``gs://`` ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import gin
import tensorflow as tf

from pixelcnn import files
from pixelcnn.model import ModelConfig, PixelCNNPP


def new_run_dir(root: str = "runs") -> str:
    """A fresh run directory name under ``root``: runs/<date-time>[-n]."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, stamp)
    n = 1
    while tf.io.gfile.exists(path):
        n += 1
        path = os.path.join(root, f"{stamp}-{n}")
    return path


def config_path(run_dir: str | os.PathLike) -> str:
    """run_dir/config.gin: the run's parsed gin config."""
    return os.path.join(os.fspath(run_dir), "config.gin")


def checkpoint_dir(run_dir: str | os.PathLike) -> str:
    """run_dir/checkpoints: the chief's checkpoints."""
    return os.path.join(os.fspath(run_dir), "checkpoints")


def write_config(run_dir: str, model: PixelCNNPP, precision: str) -> None:
    """config.gin, operative_config.gin and model.json, at start-up."""
    files.write_atomic(config_path(run_dir), gin.config_str())
    files.write_atomic(os.path.join(run_dir, "operative_config.gin"), gin.operative_config_str())
    summary = model.config_summary() | {"precision": precision}
    files.write_atomic(os.path.join(run_dir, "model.json"), json.dumps(summary, indent=2) + "\n")


def metrics_path(run_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(run_dir), "metrics.json")


def read_metrics(run_dir: str | os.PathLike) -> dict | None:
    """The run's metrics.json (``reporting.Report`` writes it), or None where it has
    none. Raises ValueError, naming the file, where it is not JSON or its evaluations
    and grids are not lists of entries with steps and of paths."""
    path = metrics_path(run_dir)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    evaluations = metrics.get("evaluations", []) if isinstance(metrics, dict) else None
    samples = metrics.get("samples", []) if isinstance(metrics, dict) else None
    steps = isinstance(evaluations, list) and all(
        isinstance(e, dict) and isinstance(e.get("step"), int) for e in evaluations
    )
    if not (steps and isinstance(samples, list) and all(isinstance(p, str) for p in samples)):
        raise ValueError(f"{path} is not a run's metrics (evaluations with steps, grids' paths)")
    return metrics


def model_config(run_dir: str) -> ModelConfig:
    """The architecture recorded in run_dir/model.json (written at start-up)."""
    path = os.path.join(run_dir, "model.json")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a pixelcnn run directory")
    with tf.io.gfile.GFile(path) as f:
        return ModelConfig.from_json(json.load(f))


class NoGoodCheckpoint(FileNotFoundError):
    """No checkpoint of a run reads back whole."""


def checkpoint_candidates(run_dir: str | os.PathLike, checkpoint: str | None = None) -> list[str]:
    """Checkpoint prefixes to try, newest first: ``checkpoint`` alone if given (it must
    exist), else every checkpoint in the run's checkpoints/ folder: those its manager's
    state file lists and any ckpt-N it has lost track of (a missing or damaged state
    file must not make a run start over)."""
    if checkpoint is not None:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        return [checkpoint]
    ckpt_dir = checkpoint_dir(run_dir)
    try:
        state = tf.train.get_checkpoint_state(ckpt_dir)
    except (ValueError, UnicodeDecodeError, tf.errors.OpError):
        state = None
    listed = list(state.all_model_checkpoint_paths) if state is not None else []
    if state is not None and state.model_checkpoint_path:
        listed.append(state.model_checkpoint_path)
    found = [f[: -len(".index")] for f in tf.io.gfile.glob(os.path.join(ckpt_dir, "ckpt-*.index"))]
    # Both already name the folder: get_checkpoint_state joins the state file's relative
    # paths to it, and the glob's pattern starts with it (relative when run_dir is).
    return sorted(set(listed + found), key=_checkpoint_number, reverse=True)


def _checkpoint_number(prefix: str) -> int:
    number = os.path.basename(prefix).rsplit("-", 1)[-1]
    return int(number) if number.isdigit() else -1


def restore_newest_good(
    checkpoint: tf.train.Checkpoint, candidates: list[str], partial: bool
) -> str:
    """Restores the first of ``candidates`` (newest first) that reads back whole.

    A damaged checkpoint (a truncated or missing data file, a failed checksum, e.g.
    after the disk filled during a save) is reported on stderr and the previous one is
    tried. ``partial``: the checkpoint may hold more than ``checkpoint`` tracks (an
    inference model reads only the EMA or the raw weights). Returns the path restored;
    NoGoodCheckpoint when none reads back.
    """
    damaged = []
    for path in candidates:
        try:
            # TensorFlow checks a CRC32C of every tensor it reads and of the index: a
            # flipped byte in a tensor restored here, a truncated or missing file all
            # raise (a truncated data file as IndexError).
            status = checkpoint.restore(path)
            if partial:
                status.expect_partial()
            status.assert_existing_objects_matched()
        # a truncated file surfaces as IndexError ("Read less bytes than requested")
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, OSError) as err:
            reason = str(err).strip().splitlines()[0][:300]
            damaged.append(f"{path} ({type(err).__name__}: {reason})")
            print(f"warning: checkpoint {path} cannot be read ({reason})", file=sys.stderr)
            continue
        if damaged:
            print(
                f"warning: fell back to {path}, the newest checkpoint that reads", file=sys.stderr
            )
        return path
    raise NoGoodCheckpoint(
        "no checkpoint of this run can be read: " + "; ".join(damaged) + ". Restore the "
        "files from a backup, or start a new run in another directory"
    )


def load_for_inference(
    run_dir: str | os.PathLike,
    checkpoint: str | None = None,
    use_ema: bool = True,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[PixelCNNPP, str]:
    """The run's model with its EMA (or raw) weights from the given checkpoint, else the
    newest one that reads back whole (as resuming does; damaged ones are reported).

    With a strategy the variables are created in its scope (mirrored over its devices).
    Returns (model, the checkpoint path used).
    """
    run_dir = os.fspath(run_dir)
    if not tf.io.gfile.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = model_config(run_dir)
    candidates = checkpoint_candidates(run_dir, checkpoint)
    if not candidates:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(run_dir)}: train first (a run saves every "
            "epoch), or pass --checkpoint"
        )
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        # inference runs in float32 whatever the training precision; every architecture
        # argument explicit, so gin bindings cannot interfere
        model = PixelCNNPP(**config.to_json())
        model.build_variables()
        ckpt = tf.train.Checkpoint(**{"ema" if use_ema else "model": model.checkpointable()})
        path = restore_newest_good(ckpt, candidates, partial=True)
    return model, path
