"""Run directories: what training writes, and loading a trained model back from them.

run_dir/
  config.gin             the parsed gin config (written at start-up)
  operative_config.gin   the values the run actually used (start-up, after building)
  model.json             the model's constructor arguments (and training precision)
  metrics.json           the last evaluation, every evaluation, the samples (at exit)
  checkpoints/           tf.train.Checkpoint: model, ema, optimizer, step, epoch;
                         ckpt-N.sha256 beside each: the SHA-256 of its files
  train/, eval/, eval_raw/  TensorBoard summaries
  samples/               PNG sample grids
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import gin
import tensorflow as tf

from pixelcnn.model import ModelConfig, PixelCNNPP


def new_run_dir(root: str = "runs") -> Path:
    """A fresh run directory name under ``root``: runs/<date-time>[-n]."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_config(run_dir: Path, model: PixelCNNPP, precision: str) -> None:
    """config.gin, operative_config.gin and model.json, at start-up."""
    write_text_atomic(run_dir / "config.gin", gin.config_str())
    write_text_atomic(run_dir / "operative_config.gin", gin.operative_config_str())
    summary = model.config_summary() | {"precision": precision}
    write_text_atomic(run_dir / "model.json", json.dumps(summary, indent=2) + "\n")


def model_config(run_dir: Path) -> ModelConfig:
    """The architecture recorded in run_dir/model.json (written at start-up)."""
    path = run_dir / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a pixelcnn run directory")
    return ModelConfig.from_json(json.loads(path.read_text()))


class NoGoodCheckpoint(FileNotFoundError):
    """No checkpoint of a run reads back whole."""


def checkpoint_candidates(run_dir: str | os.PathLike, checkpoint: str | None = None) -> list[str]:
    """Checkpoint prefixes to try, newest first: ``checkpoint`` alone if given (it must
    exist), else every checkpoint the run's manager kept."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if checkpoint is not None:
        if not tf.io.gfile.exists(checkpoint + ".index"):
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        return [checkpoint]
    state = tf.train.get_checkpoint_state(str(ckpt_dir))
    paths = list(state.all_model_checkpoint_paths) if state is not None else []
    if not paths and state is not None and state.model_checkpoint_path:
        paths = [state.model_checkpoint_path]
    return [p if os.path.isabs(p) else str(ckpt_dir / p) for p in reversed(paths)]


def _checkpoint_files(prefix: str) -> list[str]:
    return sorted(tf.io.gfile.glob(prefix + ".data-*")) + [prefix + ".index"]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(prefix: str) -> None:
    """Writes PREFIX.sha256: the SHA-256 of each file of the checkpoint at ``prefix``.

    TensorFlow's reader notices a truncated or missing file, but not every altered byte;
    with this manifest ``restore_newest_good`` does.
    """
    lines = [f"{_sha256(f)}  {os.path.basename(f)}\n" for f in _checkpoint_files(prefix)]
    write_text_atomic(Path(prefix + ".sha256"), "".join(lines))


def remove_stale_checksums(directory: str | os.PathLike) -> None:
    """Deletes the manifests of checkpoints the manager has rotated away."""
    for manifest in tf.io.gfile.glob(os.path.join(str(directory), "*.sha256")):
        if not tf.io.gfile.exists(manifest[: -len(".sha256")] + ".index"):
            tf.io.gfile.remove(manifest)


def verify_checksums(prefix: str) -> None:
    """ValueError if a file of the checkpoint differs from its PREFIX.sha256 (when the
    checkpoint has one: those written before the manifests existed are not checked)."""
    manifest = prefix + ".sha256"
    if not tf.io.gfile.exists(manifest):
        return
    folder = os.path.dirname(prefix)
    with tf.io.gfile.GFile(manifest) as f:
        for line in f:
            digest, name = line.strip().split("  ", 1)
            path = os.path.join(folder, name)
            if not tf.io.gfile.exists(path):
                raise ValueError(f"{name} is missing")
            if _sha256(path) != digest:
                raise ValueError(
                    f"{name} does not match its SHA-256 in {os.path.basename(manifest)}"
                )


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
            verify_checksums(path)
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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    config = model_config(run_dir)
    candidates = checkpoint_candidates(run_dir, checkpoint)
    if not candidates:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir / 'checkpoints'}: train first (a run saves every "
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
