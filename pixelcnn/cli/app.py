"""The command group, its global options, and what the commands share: the options
that read a run, loading its model, the images to work on, clear errors.

Nothing here imports TensorFlow at module level: ``pixelcnn --help`` and every
``pixelcnn COMMAND --help`` print without it.
"""

from __future__ import annotations

import os

import click

from pixelcnn.image_codecs import COMPRESSORS  # noqa: F401 (re-exported for the commands)

EXAMPLES = """\b
Examples:
  pixelcnn --config experiments/quickstart.gin single
  pixelcnn --config experiments/mnist.gin --binding "train.batch_size=128" multigpu
  pixelcnn --log-dir runs/X sample --num 16
  pixelcnn --log-dir runs/X evaluate --per-image scores.csv
  pixelcnn --log-dir runs/X compress --num 100 -o test.pcnn

python main.py ... runs the same commands."""


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXAMPLES,
)
@click.option("--config", "configs", multiple=True, help="A .gin file (repeatable).")
@click.option("--binding", "bindings", multiple=True, help='e.g. "train.batch_size=128".')
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    help="Run directory: an existing one resumes (training) or is read (sample, evaluate, "
    "complete, ...); training creates runs/<time> when omitted.",
)
@click.option("--debug", is_flag=True, help="Run eagerly (no tf.function), for debugging.")
@click.option("--cpu-devices", type=click.IntRange(1), help="Split the CPU into N logical devices.")
@click.pass_context
def main(ctx, configs, bindings, log_dir, debug, cpu_devices):
    """PixelCNN++ for TensorFlow 2: train a model, then sample, evaluate, complete,
    export, compress and detect out-of-distribution images with it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    ctx.ensure_object(dict)
    ctx.obj.update(configs=configs, bindings=bindings, run_dir=log_dir)
    if cpu_devices:
        from pixelcnn.distribute import split_cpu

        split_cpu(cpu_devices)
    if debug:
        import tensorflow as tf

        tf.config.run_functions_eagerly(True)


def parse_gin(configs: tuple[str, ...], bindings: tuple[str, ...]) -> None:
    """``config.parse`` with its errors as click's."""
    from pixelcnn import config

    try:
        config.parse(configs, bindings)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="--config") from e
    except config.ConfigError as e:
        raise click.UsageError(str(e)) from e


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
    from pixelcnn import distribute, rundir

    run_dir = run_dir_of(ctx)
    strategy = None if devices is None else distribute.inference_strategy(devices)
    model, path = checked(rundir.load_for_inference, run_dir, checkpoint, not raw, strategy)
    click.echo(f"loaded {'raw' if raw else 'EMA'} weights from {path}", err=True)
    ctx.obj["loaded"] = f"run {run_dir}, checkpoint {path}, {'raw' if raw else 'EMA'} weights"
    return run_dir, model, strategy


def source_batches(ctx, run_dir, model, split, npz, folder, batch_size):
    """``scoring.integer_batches`` of --npz, --folder (in the file's or sorted path
    order, as results list them), or else the run's own ``split``, rebuilt from its
    config.gin (with --config and --binding); every problem, named by its source, as
    one clear message."""
    import tensorflow as tf

    from pixelcnn import config, data, files
    from pixelcnn.inference import scoring

    source = f"--npz {npz}" if npz else f"--folder {folder}" if folder else None
    try:
        if npz:
            arrays = data.load_npz(npz)
            if model.num_classes and not data.npz_has_labels(npz):
                raise ValueError(
                    f"the model is class-conditional ({model.num_classes} classes) but the "
                    "file has no 'labels': add one label per image"
                )
            dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
        elif folder:
            arrays = files.load_image_folder(folder, model.image_shape)
            dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
        else:
            configs, bindings = ctx.obj["configs"], ctx.obj["bindings"]
            train, test = config.run_datasets(run_dir, batch_size, configs, bindings)
            dataset = train if split == "train" else test
    except (ValueError, OSError) as e:  # the run's own config says what is wrong
        prefix = f"{source or 'the run dataset'}: " if source or isinstance(e, OSError) else ""
        raise click.ClickException(f"{prefix}{e}") from e
    batches = scoring.integer_batches(
        dataset, model.image_shape, model.num_bits, model.num_classes, source or split
    )
    try:
        yield from batches
    except ValueError as e:  # check_batch's message names the source
        raise click.ClickException(str(e)) from e
