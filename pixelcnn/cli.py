"""Command line: train (single, multigpu, multiworker); on a trained run
(``pixelcnn.commands``) sample, evaluate, complete, export, compress, decompress, ood.

    pixelcnn --config experiments/mnist.gin [--binding "train.batch_size=128"] single
    pixelcnn --log-dir runs/X sample --num 16
    pixelcnn --log-dir runs/X evaluate --per-image scores.csv
    pixelcnn --log-dir runs/X complete --num 8 --keep-rows 14
    pixelcnn --log-dir runs/X export exported/
    pixelcnn --log-dir runs/X compress --num 100 -o test.pcnn
    pixelcnn --log-dir runs/X decompress test.pcnn -o test.npz --png-dir test_png/
    pixelcnn --log-dir runs/X ood --ood noise=noise.npz --background runs/BG -o ood/

``python main.py ...`` runs the same commands.
"""

from __future__ import annotations

import json
import os
import sys

import click


def parse_gin(configs: tuple[str, ...], bindings: tuple[str, ...]) -> None:
    """``config.parse`` with its errors as click's."""
    from pixelcnn import config

    try:
        config.parse(configs, bindings)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--config") from e
    except config.ConfigError as e:
        raise click.UsageError(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "configs", multiple=True, help="A .gin file (repeatable).")
@click.option("--binding", "bindings", multiple=True, help='e.g. "train.batch_size=128".')
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    help="Run directory: an existing one resumes (training) or is read (sample, evaluate, complete); training creates runs/<time> when omitted.",
)
@click.option("--debug", is_flag=True, help="Run eagerly (no tf.function), for debugging.")
@click.option("--cpu-devices", type=click.IntRange(1), help="Split the CPU into N logical devices.")
@click.pass_context
def main(ctx, configs, bindings, log_dir, debug, cpu_devices):  # --log-dir: the run directory
    """PixelCNN++ for TensorFlow 2: training, sampling, evaluation, completion, export,
    lossless compression."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    ctx.ensure_object(dict)
    ctx.obj.update(configs=configs, bindings=bindings, run_dir=log_dir)
    if cpu_devices:
        from pixelcnn.distribute import split_cpu

        split_cpu(cpu_devices)
    if debug:
        import tensorflow as tf

        tf.config.run_functions_eagerly(True)


def _train(ctx, kind: str, device: str | None = None) -> None:
    from pixelcnn import checkpoints, distribute, faults
    from pixelcnn import train as training

    parse_gin(ctx.obj["configs"], ctx.obj["bindings"])
    run_dir = ctx.obj["run_dir"] or checkpoints.new_run_dir()
    strategy = distribute.make_strategy(kind, device)
    click.echo(f"run directory: {run_dir} ({strategy.num_replicas_in_sync} replica(s))")
    try:
        result = training.train(run_dir, strategy, started=faults.process_start())
    except faults.TrainingInterrupted as e:
        click.echo(e.message, err=True)
        sys.exit(130)
    except faults.WorkerLost as e:
        click.echo(f"Error: {e.message}", err=True)
        sys.exit(1)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--device", help="e.g. /cpu:0 or /gpu:1 (default: first GPU, else CPU).")
@click.pass_context
def single(ctx, device):
    """Train on one device."""
    _train(ctx, "single", device)


@main.command()
@click.pass_context
def multigpu(ctx):
    """Train with MirroredStrategy on all local GPUs (or logical CPU devices)."""
    _train(ctx, "multigpu")


@main.command()
@click.pass_context
def multiworker(ctx):
    """Train with MultiWorkerMirroredStrategy across the machines in TF_CONFIG."""
    _train(ctx, "multiworker")


# ------------------------------------------------------------------------ shared by the commands
def run_dir_of(ctx) -> str:
    import tensorflow as tf

    run_dir = ctx.obj["run_dir"]
    if not run_dir:
        raise click.UsageError("pass the run directory: pixelcnn --log-dir RUN_DIR ...")
    if not tf.io.gfile.isdir(run_dir):
        raise click.ClickException(f"run directory {run_dir} does not exist")
    return run_dir


def checked(fn, *args, param: str | None = None, **kwargs):
    """fn(*args, **kwargs), a ValueError or OSError as one clear message (about the
    option ``param`` when given)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        if param is not None:
            raise click.BadParameter(str(e), param_hint=param) from e
        raise click.ClickException(str(e)) from e


def write(path: str, content) -> None:
    """files.write_atomic, a folder or permission problem as one clear message."""
    from pixelcnn import files

    checked(files.write_atomic, path, content)


class Existing(click.ParamType):
    """A path that must exist, a file or a folder, checked through tf.io.gfile: local
    paths and the URLs TensorFlow's filesystems read (gs://, s3://, hdfs://, ram://)."""

    def __init__(self, kind: str):
        self.kind, self.name = kind, f"existing {kind}"

    def convert(self, value, param, ctx):
        import tensorflow as tf

        path = os.path.expanduser(os.fspath(value))
        if not tf.io.gfile.exists(path):
            self.fail(f"{path} does not exist", param, ctx)
        if tf.io.gfile.isdir(path) != (self.kind == "folder"):
            self.fail(f"{path} is not a {self.kind}", param, ctx)
        return path


FILE = click.Path(dir_okay=False)
EXISTING_FILE = Existing("file")
EXISTING_FOLDER = Existing("folder")
CHECKPOINT = click.option(
    "--checkpoint", default=None, help="A checkpoint prefix (default: the newest that reads)."
)
RAW_WEIGHTS = click.option(
    "--raw-weights", is_flag=True, help="Use the raw weights instead of the EMA."
)
SPLIT = click.option(
    "--split", type=click.Choice(["test", "train"]), default="test", show_default=True
)
NPZ = click.option("--npz", type=EXISTING_FILE, help="Images (and labels) of a .npz file.")
FOLDER = click.option("--folder", type=EXISTING_FOLDER, help="A folder of images.")
DEVICES = click.option(
    "--devices",
    type=click.Choice(["auto", "single", "all"]),
    default="auto",
    show_default=True,
    help="all: split the images over every local GPU (or logical CPU device) with "
    "MirroredStrategy; auto: all when there are several.",
)


def load(ctx, checkpoint, raw=False, devices=None):
    """(run directory, model, strategy): the run's EMA (or raw) weights, in the scope of
    the strategy ``--devices`` asks for (None without)."""
    from pixelcnn import checkpoints, distribute

    run_dir = run_dir_of(ctx)
    strategy = None if devices is None else distribute.inference_strategy(devices)
    load = checkpoints.load_for_inference
    model, path = checked(load, run_dir, checkpoint, not raw, strategy)
    click.echo(f"loaded {'raw' if raw else 'EMA'} weights from {path}", err=True)
    ctx.obj["loaded"] = f"run {run_dir}, checkpoint {path}, {'raw' if raw else 'EMA'} weights"
    return run_dir, model, strategy


def integer_batches(ctx, run_dir, model, split, npz, folder, batch_size):
    """``scoring.source_batches`` from --npz, --folder or the run's own dataset, every
    problem as one clear message."""
    from pixelcnn import scoring

    batches = scoring.source_batches(
        model, batch_size, split, npz, folder, run_dir, ctx.obj["configs"], ctx.obj["bindings"]
    )
    try:
        yield from batches
    except ValueError as e:
        raise click.ClickException(str(e)) from e


# The commands that read a trained run register themselves on ``main``.
from pixelcnn import commands  # noqa: E402, F401

if __name__ == "__main__":
    main()
