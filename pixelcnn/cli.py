"""Command line: train (single, multigpu, multiworker), sample, evaluate, complete,
export, compress, decompress.

    pixelcnn --config experiments/mnist.gin [--binding "train.batch_size=128"] single
    pixelcnn --log-dir runs/X sample --num 16
    pixelcnn --log-dir runs/X evaluate --per-image scores.csv
    pixelcnn --log-dir runs/X complete --num 8 --keep-rows 14
    pixelcnn --log-dir runs/X export exported/
    pixelcnn --log-dir runs/X compress --num 100 -o test.pcnn
    pixelcnn --log-dir runs/X decompress test.pcnn -o test.npz --png-dir test_png/

``python main.py ...`` runs the same commands.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_configurables() -> None:
    """Registers every gin configurable, so bindings to them parse."""
    import pixelcnn.data  # noqa: F401
    import pixelcnn.model  # noqa: F401
    import pixelcnn.train  # noqa: F401


def parse_gin(configs: tuple[str, ...], bindings: tuple[str, ...]) -> None:
    """Parses config files then bindings strictly: unknown names are errors."""
    import gin

    _import_configurables()
    # `import my_data` in a config or binding finds a module in the working directory
    # also through the console script (python main.py puts only its own folder first).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for path in configs:
        if not Path(path).is_file():
            raise click.BadParameter(f"config file {path} does not exist", param_hint="--config")
    try:
        gin.parse_config_files_and_bindings(list(configs), list(bindings))
    except (ValueError, ImportError, SyntaxError) as e:
        raise click.UsageError(f"bad gin config: {e}") from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "configs", multiple=True, help="A .gin file (repeatable).")
@click.option(
    "--binding",
    "bindings",
    multiple=True,
    help='A gin binding, e.g. "train.batch_size=128" (repeatable).',
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory: an existing one resumes (training) or is read (sample, evaluate, complete); training creates runs/<time> when omitted.",
)
@click.option("--debug", is_flag=True, help="Run eagerly (no tf.function), for debugging.")
@click.option(
    "--cpu-devices",
    type=click.IntRange(1),
    default=None,
    help="Split the CPU into N logical devices (multigpu then runs N replicas without GPUs).",
)
@click.pass_context
def main(ctx, configs, bindings, log_dir, debug, cpu_devices):  # --log-dir: the run directory
    """PixelCNN++ for TensorFlow 2: training, sampling, evaluation, completion, export,
    lossless compression."""
    ctx.ensure_object(dict)
    ctx.obj.update(configs=configs, bindings=bindings, run_dir=log_dir)
    if cpu_devices:
        from pixelcnn.distribute import split_cpu

        split_cpu(cpu_devices)
    if debug:
        import tensorflow as tf

        tf.config.run_functions_eagerly(True)


def _train(ctx, kind: str, device: str | None = None) -> None:
    from pixelcnn import distribute, rundir
    from pixelcnn import train as training

    parse_gin(ctx.obj["configs"], ctx.obj["bindings"])
    run_dir = ctx.obj["run_dir"] or rundir.new_run_dir()
    strategy = distribute.make_strategy(kind, device)
    click.echo(f"run directory: {run_dir} ({strategy.num_replicas_in_sync} replica(s))")
    try:
        result = training.train(run_dir, strategy)
    except training.TrainingInterrupted as e:
        click.echo(e.message, err=True)
        sys.exit(130)
    except training.WorkerLost as e:
        click.echo(f"Error: {e.message}", err=True)
        sys.exit(1)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option(
    "--device", default=None, help="e.g. /cpu:0 or /gpu:1 (default: first GPU, else CPU)."
)
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


# ------------------------------------------------------------------------ inference
def _run_dir(ctx) -> Path:
    if not ctx.obj["run_dir"]:
        raise click.UsageError("pass the run directory: pixelcnn --log-dir RUN_DIR ...")
    run_dir = Path(ctx.obj["run_dir"])
    if not run_dir.is_dir():
        raise click.ClickException(f"run directory {run_dir} does not exist")
    return run_dir


DEVICES = click.option(
    "--devices",
    type=click.Choice(["auto", "single", "all"]),
    default="auto",
    show_default=True,
    help="all: split the images over every local GPU (or logical CPU device) with "
    "MirroredStrategy; auto: all when there are several.",
)


def _inference_strategy(devices: str):
    from pixelcnn import distribute

    several = len(distribute.local_devices()) > 1
    if devices == "all" or (devices == "auto" and several):
        return distribute.make_strategy("multigpu")
    return distribute.make_strategy("single")


def _load(ctx, checkpoint, raw=False, strategy=None):
    from pixelcnn import rundir

    run_dir = _run_dir(ctx)
    try:
        model, path = rundir.load_for_inference(run_dir, checkpoint, not raw, strategy)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"loaded {'raw' if raw else 'EMA'} weights from {path}", err=True)
    ctx.obj["loaded"] = f"run {run_dir}, checkpoint {path}, {'raw' if raw else 'EMA'} weights"
    return run_dir, model


def _run_dataset(ctx, run_dir: Path, batch_size: int, split: str):
    """The run's (train, test) datasets, rebuilt from run_dir/config.gin."""
    import gin

    from pixelcnn import internals

    try:
        parse_gin((str(run_dir / "config.gin"), *ctx.obj["configs"]), ctx.obj["bindings"])
    except click.UsageError as e:
        if isinstance(e.__cause__, ImportError):
            raise click.ClickException(
                f"cannot rebuild the run's dataset from {run_dir / 'config.gin'}: "
                f"{e.__cause__}. The module that defines the run's train.dataset_fn must be "
                "importable (run from the folder that holds it, or add it to PYTHONPATH), "
                "or pass the images with --npz FILE or --folder DIR"
            ) from e
        raise
    try:
        dataset_fn = gin.query_parameter("train.dataset_fn")
        train_ds, test_ds = internals.call_gin_reference(dataset_fn, batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(f"cannot rebuild the run's dataset: {e}") from e
    return train_ds if split == "train" else test_ds


def _integer_batches(ctx, run_dir, model, split, npz, folder, batch_size):
    """(int images [B,H,W,C], labels [B] or None) batches from --npz, --folder or the
    run's own dataset, checked against the model; every problem is one clear message."""
    import tensorflow as tf

    from pixelcnn import data, scoring

    source = f"--npz {npz}" if npz else f"--folder {folder}" if folder else None
    try:
        if npz or folder:  # in the file's (or sorted path) order, as the results list them
            arrays = (
                data.load_npz(npz) if npz else data.load_image_folder(folder, model.image_shape)
            )
            if npz and model.num_classes and not data.npz_has_labels(npz):
                raise ValueError(
                    f"the model is class-conditional ({model.num_classes} classes) but the "
                    "file has no 'labels': add one label per image"
                )
            ds = tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size)
        else:
            ds = _run_dataset(ctx, run_dir, batch_size, split)
    except (ValueError, OSError) as e:
        raise click.ClickException(f"{source or 'the run dataset'}: {e}") from e
    batches = scoring.integer_batches(
        ds, model.image_shape, model.num_bits, model.num_classes, source or split
    )

    def checked():
        try:
            yield from batches
        except ValueError as e:
            raise click.ClickException(str(e)) from e

    return checked()


@main.command()
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option(
    "--npz",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Evaluate images from a .npz instead.",
)
@click.option(
    "--folder",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Evaluate a folder of images instead.",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--per-image",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write each image's log-likelihood to this CSV.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON result (default RUN_DIR/eval_<split>.json).",
)
@click.option("--raw-weights", is_flag=True, help="Use the raw weights instead of the EMA.")
@DEVICES
@click.pass_context
def evaluate(
    ctx, checkpoint, split, npz, folder, batch_size, per_image, output, raw_weights, devices
):
    """Bits/dim of a dataset (default: the run's test set) with the EMA weights."""
    from pixelcnn import scoring

    strategy = _inference_strategy(devices)
    run_dir, model = _load(ctx, checkpoint, raw_weights, strategy)
    batches = _integer_batches(ctx, run_dir, model, split, npz, folder, batch_size)
    try:
        scores = scoring.score(model, batches, strategy)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    result = {
        "source": npz or folder or f"run {split} set",
        **scores.summary(),
        "weights": "raw" if raw_weights else "ema",
    }
    out = (
        Path(output) if output else run_dir / f"eval_{'custom' if (npz or folder) else split}.json"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    if per_image:
        labels = scores.labels if scores.labels is not None else [-1] * len(scores.log_prob)
        with open(per_image, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "label", "log_prob_nats", "bits_per_dim"])
            rows = zip(scores.log_prob, labels, scores.bits_per_dim, strict=True)
            for i, (s, y, b) in enumerate(rows):
                w.writerow([i, int(y), f"{s:.6f}", f"{b:.6f}"])
    click.echo(json.dumps(result, indent=2))


@main.command()
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option(
    "--num", type=click.IntRange(1), default=16, show_default=True, help="Images to draw."
)
@click.option(
    "--label",
    "labels",
    type=int,
    multiple=True,
    help="Class label(s) for a conditional model (repeat; cycled over the images). Default: 0, 1, 2, ...",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG path (default RUN_DIR/samples/sample_seed<seed>.png); the .npz goes beside it.",
)
@click.option("--naive", is_flag=True, help="Use the naive sampler (one full pass per pixel).")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per compiled call (default 16); the same seed and batch size give the "
    "same images on one device or several.",
)
@DEVICES
@click.pass_context
def sample(ctx, checkpoint, num, labels, seed, output, naive, batch_size, devices):
    """Draw images from a trained run; writes a PNG grid and a .npz of integer images."""
    import numpy as np

    from pixelcnn import sampling
    from pixelcnn.images import make_grid, save_png

    strategy = _inference_strategy(devices)
    run_dir, model = _load(ctx, checkpoint, strategy=strategy)
    label_arr = _labels_for(model, labels, num)
    fn = sampling.sample_naive if naive else sampling.sample_fast
    batch_size = batch_size or sampling.BATCH_SIZE
    images = fn(
        model, num, labels=label_arr, seed=(0, seed), strategy=strategy, batch_size=batch_size
    ).numpy()
    png = Path(output) if output else run_dir / "samples" / f"sample_seed{seed}.png"
    save_png(make_grid(images, model.num_bits), png)
    npz_path = png.with_suffix(".npz")
    arrays = {"images": images}
    if label_arr is not None:
        arrays["labels"] = np.asarray(label_arr)
    np.savez_compressed(npz_path, **arrays)
    click.echo(f"wrote {png} and {npz_path}")


def _labels_for(model, labels, num):
    import tensorflow as tf

    if not model.num_classes:
        if labels:
            raise click.UsageError("--label is only for class-conditional models")
        return None
    if labels:
        import numpy as np

        from pixelcnn import contract

        try:
            contract.check_labels(np.array(labels), len(labels), model.num_classes, "--label")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--label") from e
    base = list(labels) or list(range(model.num_classes))
    return tf.constant([base[i % len(base)] for i in range(num)], tf.int32)


@main.command()
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option(
    "--num", type=click.IntRange(1), default=8, show_default=True, help="Images to complete."
)
@click.option(
    "--keep-rows",
    type=click.IntRange(0),
    default=None,
    help="Keep this many top rows (default: half the image).",
)
@click.option(
    "--mask",
    "mask_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A .npy/.png mask of known pixels [H, W] (nonzero = known) instead of --keep-rows.",
)
@click.option(
    "--images",
    "image_files",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="Image files to complete (default: the run's test set).",
)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG path (default RUN_DIR/samples/complete_seed<seed>.png).",
)
@DEVICES
@click.pass_context
def complete(ctx, checkpoint, num, keep_rows, mask_path, image_files, split, seed, output, devices):
    """Image completion: keep the known pixels, sample the rest."""
    import numpy as np
    import tensorflow as tf

    from pixelcnn import sampling
    from pixelcnn.images import make_grid, save_png

    strategy = _inference_strategy(devices)
    run_dir, model = _load(ctx, checkpoint, strategy=strategy)
    h, w, c = model.image_shape
    if image_files:
        images, labels = _read_images(image_files, model), None
        if model.num_classes:
            labels = np.zeros(len(images), np.int32)
    else:
        from pixelcnn import scoring

        batches = _integer_batches(ctx, run_dir, model, split, None, None, num)
        try:
            images, labels = scoring.take(batches, num)
        except ValueError as e:
            raise click.ClickException(str(e)) from e
    if mask_path:
        mask = _read_mask(mask_path, h, w)
    else:
        mask = sampling.top_rows_mask(h, w, h // 2 if keep_rows is None else keep_rows)
    mask = np.asarray(mask, bool)
    lab = tf.constant(labels, tf.int32) if model.num_classes and labels is not None else None
    done = sampling.complete(
        model, tf.constant(images, tf.int32), mask, labels=lab, seed=(0, seed), strategy=strategy
    ).numpy()
    top = 2**model.num_bits - 1
    shown_mask = np.where(mask[None, :, :, None], images, top // 2)
    rows = np.concatenate([images, shown_mask, done])
    png = Path(output) if output else run_dir / "samples" / f"complete_seed{seed}.png"
    save_png(make_grid(rows, model.num_bits, columns=len(images)), png)
    np.savez_compressed(png.with_suffix(".npz"), originals=images, mask=mask, completions=done)
    click.echo(f"wrote {png} (rows: originals, known pixels, completions)")


# ------------------------------------------------------------------------ reuse
@main.command(name="export")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA.")
@click.option(
    "--sample-batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per compiled call of the sample signature (default 16, as `sample`).",
)
@click.pass_context
def export_command(ctx, out_dir, checkpoint, raw_weights, sample_batch_size):
    """Write a TensorFlow SavedModel (OUT_DIR/1) that loads without pixelcnn."""
    from pixelcnn import sampling
    from pixelcnn.serving import export

    run_dir = _run_dir(ctx)
    try:
        path = export(
            run_dir,
            out_dir,
            checkpoint=checkpoint,
            use_ema=not raw_weights,
            sample_batch_size=sample_batch_size or sampling.BATCH_SIZE,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    size = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB with model.json and README.txt)")


def _report(what: str, nbytes: int, model, images, labels, seconds: float) -> None:
    """One line: images, bytes, coded and model bits/dim, images/s."""
    from pixelcnn import scoring

    model_bpd = scoring.score(model, scoring.array_batches(images, labels)).summary()[
        "bits_per_dim"
    ]
    click.echo(
        f"{what} {len(images)} images, {nbytes} bytes: {8 * nbytes / images.size:.4f} bits/dim "
        f"coded, {model_bpd:.4f} bits/dim the model's likelihood, "
        f"{len(images) / seconds:.1f} images/s"
    )


@main.command()
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option(
    "--npz", type=click.Path(exists=True, dir_okay=False), default=None, help="Images of a .npz."
)
@click.option(
    "--folder",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A folder of images.",
)
@click.option("--num", type=click.IntRange(1), default=None, help="Code the first N images.")
@click.option("--raw-weights", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per coding batch (default 64; the file records it).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="OUT.pcnn")
@click.pass_context
def compress(ctx, checkpoint, split, npz, folder, num, raw_weights, batch_size, output):
    """Losslessly compress images with the model (range coding at its likelihood)."""
    import time

    import tensorflow as tf

    from pixelcnn import codec, scoring

    tf.config.experimental.enable_op_determinism()  # the same kernels when decoding
    run_dir, model = _load(ctx, checkpoint, raw_weights)
    batches = _integer_batches(ctx, run_dir, model, split, npz, folder, 256)
    try:
        images, labels = scoring.take(batches, num)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    labels = labels if model.num_classes else None
    start = time.perf_counter()
    try:
        data = codec.encode(
            model, images, labels, batch_size or codec.BATCH_SIZE, weights=ctx.obj["loaded"]
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    seconds = time.perf_counter() - start
    _write_atomic(Path(output), lambda tmp: tmp.write_bytes(data))
    _report(f"compressed to {output}:", len(data), model, images, labels, seconds)


def _write_atomic(path: Path, write) -> None:
    """write(tmp) into a temporary file beside ``path``, then renamed to it; a folder or
    permission problem is one clear message."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {path}: {e}") from e


def _png_mode(channels: int, num_bits: int):
    """Pillow's mode and dtype for PNGs that hold the integers unscaled (8-bit, or
    16-bit grey); a clear error where no PNG fits."""
    import numpy as np

    if num_bits <= 8 and channels in (1, 3, 4):
        return {1: "L", 3: "RGB", 4: "RGBA"}[channels], np.uint8
    if channels == 1:
        return "I;16", np.uint16
    raise click.ClickException(
        f"{channels}-channel images of {num_bits} bits do not make a PNG here (1, 3 or 4 "
        "channels of up to 8 bits, or 1 channel of up to 16): use the .npz"
    )


def _write_pngs(folder: Path, images, num_bits: int) -> None:
    """One PNG per image, named by its index."""
    from PIL import Image

    mode, dtype = _png_mode(images.shape[-1], num_bits)
    folder.mkdir(parents=True, exist_ok=True)
    digits = len(str(len(images) - 1))
    for i, img in enumerate(images.astype(dtype)):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img, mode=mode).save(
            folder / f"{i:0{digits}d}.png"
        )


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", default=None, help="A checkpoint prefix (default: the latest).")
@click.option("--raw-weights", is_flag=True, help="Use the raw weights instead of the EMA.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="IMAGES.npz")
@click.option(
    "--png-dir", type=click.Path(file_okay=False), default=None, help="Also one PNG per image."
)
@click.pass_context
def decompress(ctx, source, checkpoint, raw_weights, output, png_dir):
    """Decode a .pcnn file written by `compress` with the same run and weights."""
    import time
    import warnings

    import numpy as np
    import tensorflow as tf

    from pixelcnn import codec

    tf.config.experimental.enable_op_determinism()  # as `compress` ran
    data = Path(source).read_bytes()
    try:
        codec.read_header(data)
    except codec.CodecError as e:
        raise click.ClickException(f"{source}: {e}") from e
    if png_dir and Path(png_dir).exists() and any(Path(png_dir).iterdir()):
        raise click.ClickException(f"--png-dir {png_dir} is not empty: pick a new folder")
    run_dir, model = _load(ctx, checkpoint, raw_weights)
    if png_dir:
        _png_mode(model.image_shape[-1], model.num_bits)  # before any work
    start = time.perf_counter()
    with warnings.catch_warnings():
        # a warning (another software stack) is shown before decoding starts
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_: click.echo(f"warning: {message}", err=True)
        try:
            images, labels = codec.decode(model, data)
        except codec.CodecError as e:
            raise click.ClickException(f"{source}: {e}") from e
    seconds = time.perf_counter() - start
    dtype = np.uint8 if model.num_bits <= 8 else np.uint16
    arrays = {"images": images.astype(dtype)}
    if labels is not None:
        arrays["labels"] = labels
    _write_atomic(Path(output), lambda tmp: np.savez_compressed(tmp, **arrays))
    if png_dir:
        _write_pngs(Path(png_dir), images, model.num_bits)
    _report(f"decompressed {source} to {output}:", len(data), model, images, labels, seconds)


def _read_images(paths, model):
    import numpy as np
    from PIL import Image

    h, w, c = model.image_shape
    out = []
    for p in paths:
        img = np.asarray(Image.open(p))
        if img.ndim == 2:
            img = img[..., None]
        if img.shape != (h, w, c):
            raise click.ClickException(
                f"{p} has shape {img.shape}, but the model takes images of {(h, w, c)}"
            )
        out.append(img)
    if model.num_bits != 8:
        raise click.ClickException("image files are 8-bit; this model uses num_bits != 8")
    return np.stack(out).astype(np.int32)


def _read_mask(path, h, w):
    import numpy as np
    from PIL import Image

    mask = np.load(path) if path.endswith(".npy") else np.asarray(Image.open(path).convert("L"))
    if mask.shape != (h, w):
        raise click.ClickException(f"mask {path} has shape {mask.shape}, expected {(h, w)}")
    return mask != 0


if __name__ == "__main__":
    main()
