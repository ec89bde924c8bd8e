"""The commands that read a trained run: sample, evaluate, complete (inference),
export, compress, decompress (reuse) and ood (out-of-distribution detection). The
shared options and helpers are ``cli.app``'s; ``pixelcnn.cli`` adds the commands to the
group."""

from __future__ import annotations

import json
import os

import click

from pixelcnn.cli.app import (
    CHECKPOINT,
    COMPRESSORS,
    DEVICES,
    EXISTING_FILE,
    EXISTING_FOLDER,
    FILE,
    FOLDER,
    NPZ,
    RAW_WEIGHTS,
    SPLIT,
    checked,
    load,
    run_dir_of,
    source_batches,
    write,
)


@click.command()
@CHECKPOINT
@SPLIT
@NPZ
@FOLDER
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per scoring batch (default 64).",
)
@click.option("--per-image", type=FILE, help="Write each image's log-likelihood to this CSV.")
@click.option("--output", type=FILE, help="JSON result (default RUN_DIR/eval_<split>.json).")
@RAW_WEIGHTS
@DEVICES
@click.pass_context
def evaluate(
    ctx, checkpoint, split, npz, folder, batch_size, per_image, output, raw_weights, devices
):
    """Bits/dim of a dataset (default: the run's test set) with the EMA weights.

    \b
    Example: pixelcnn --log-dir runs/X evaluate --per-image scores.csv"""
    from pixelcnn.inference import scoring

    run_dir, model, strategy = load(ctx, checkpoint, raw_weights, devices)
    batch_size = batch_size or scoring.BATCH_SIZE
    batches = source_batches(ctx, run_dir, model, split, npz, folder, batch_size)
    scores = checked(scoring.score, model, batches, strategy)
    result = {
        "source": npz or folder or f"run {split} set",
        **scores.summary(),
        "weights": "raw" if raw_weights else "ema",
    }
    name = f"eval_{'custom' if (npz or folder) else split}.json"
    write(output or os.path.join(run_dir, name), json.dumps(result, indent=2) + "\n")
    if per_image:
        write(per_image, scores.csv())
    click.echo(json.dumps(result, indent=2))


@click.command()
@CHECKPOINT
@click.option("--num", type=click.IntRange(1), default=16, show_default=True, help="Images.")
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
    type=FILE,
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
    """Draw images from a trained run; writes a PNG grid and a .npz of integer images.

    \b
    Example: pixelcnn --log-dir runs/X sample --num 16 --seed 1"""
    from pixelcnn import files
    from pixelcnn.inference import sampling

    run_dir, model, strategy = load(ctx, checkpoint, devices=devices)
    if labels and not model.num_classes:
        raise click.UsageError("--label is only for class-conditional models")
    label_arr = checked(sampling.cycled_labels, model.num_classes, labels, num, param="--label")
    fn = sampling.sample_naive if naive else sampling.sample_fast
    batch_size = batch_size or sampling.BATCH_SIZE
    images = fn(
        model, num, labels=label_arr, seed=(0, seed), strategy=strategy, batch_size=batch_size
    ).numpy()
    png = output or os.path.join(run_dir, "samples", f"sample_seed{seed}.png")
    npz_path = os.path.splitext(png)[0] + ".npz"
    checked(files.save_png, files.make_grid(images, model.num_bits), png)
    checked(files.save_npz, npz_path, images=images, labels=label_arr)
    click.echo(f"wrote {png} and {npz_path}")


@click.command()
@CHECKPOINT
@click.option("--num", type=click.IntRange(1), default=8, show_default=True, help="Images.")
@click.option(
    "--keep-rows", type=click.IntRange(0), help="Keep this many top rows (default: half)."
)
@click.option(
    "--mask",
    "mask_path",
    type=EXISTING_FILE,
    help="A .npy/.png mask of known pixels [H, W] (nonzero = known) instead of --keep-rows.",
)
@click.option(
    "--images",
    "image_files",
    type=EXISTING_FILE,
    multiple=True,
    help="Image files to complete (default: the run's test set).",
)
@SPLIT
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--output", type=FILE, help="PNG path (default RUN_DIR/samples/complete_seed<seed>.png)."
)
@DEVICES
@click.pass_context
def complete(ctx, checkpoint, num, keep_rows, mask_path, image_files, split, seed, output, devices):
    """Image completion: keep the known pixels, sample the rest.

    \b
    Example: pixelcnn --log-dir runs/X complete --num 8 --keep-rows 14"""
    import numpy as np
    import tensorflow as tf

    from pixelcnn import files
    from pixelcnn.inference import sampling

    run_dir, model, strategy = load(ctx, checkpoint, devices=devices)
    h, w, c = model.image_shape
    if image_files:
        if model.num_bits != 8:
            raise click.ClickException("image files are 8-bit; this model uses num_bits != 8")
        images, labels = checked(files.read_images, image_files, model.image_shape), None
        if model.num_classes:
            labels = np.zeros(len(images), np.int32)
    else:
        from pixelcnn.inference import scoring

        batches = source_batches(ctx, run_dir, model, split, None, None, num)
        images, labels = checked(scoring.take, batches, num)
    if mask_path:
        mask = checked(files.read_mask, mask_path, h, w)
    else:
        mask = sampling.top_rows_mask(h, w, h // 2 if keep_rows is None else keep_rows)
    mask = np.asarray(mask, bool)
    lab = tf.constant(labels, tf.int32) if model.num_classes and labels is not None else None
    done = sampling.complete(
        model, tf.constant(images, tf.int32), mask, labels=lab, seed=(0, seed), strategy=strategy
    ).numpy()
    png = output or os.path.join(run_dir, "samples", f"complete_seed{seed}.png")
    checked(files.save_png, files.completion_grid(images, mask, done, model.num_bits), png)
    npz_path = os.path.splitext(png)[0] + ".npz"
    checked(files.save_npz, npz_path, originals=images, mask=mask, completions=done)
    click.echo(f"wrote {png} (rows: originals, known pixels, completions)")


# ------------------------------------------------------------------------ reuse
@click.command(name="export")
@click.argument("out_dir", type=click.Path(file_okay=False))
@CHECKPOINT
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA.")
@click.option(
    "--sample-batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per compiled call of the sample signature (default 16, as `sample`).",
)
@click.pass_context
def export_command(ctx, out_dir, checkpoint, raw_weights, sample_batch_size):
    """Write a TensorFlow SavedModel (OUT_DIR/1) that loads without pixelcnn.

    \b
    Example: pixelcnn --log-dir runs/X export exported/"""
    from pixelcnn import files
    from pixelcnn.inference import sampling
    from pixelcnn.inference.serving import export

    run_dir = run_dir_of(ctx)
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
    size = files.folder_size(out_dir)
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB with model.json and README.txt)")


@click.command()
@CHECKPOINT
@SPLIT
@NPZ
@FOLDER
@click.option("--num", type=click.IntRange(1), default=None, help="Code the first N images.")
@RAW_WEIGHTS
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per coding batch (default 64; the file records it).",
)
@click.option("-o", "--output", type=FILE, required=True, help="OUT.pcnn")
@click.pass_context
def compress(ctx, checkpoint, split, npz, folder, num, raw_weights, batch_size, output):
    """Losslessly compress images with the model (range coding at its likelihood).

    \b
    Example: pixelcnn --log-dir runs/X compress --num 100 -o test.pcnn"""
    import time

    from pixelcnn.inference import codec, scoring

    run_dir, model, _ = load(ctx, checkpoint, raw_weights)
    batches = source_batches(ctx, run_dir, model, split, npz, folder, scoring.BATCH_SIZE)
    images, labels = checked(scoring.take, batches, num)
    labels = labels if model.num_classes else None
    start = time.perf_counter()
    batch_size = batch_size or codec.BATCH_SIZE
    data = checked(codec.encode, model, images, labels, batch_size, weights=ctx.obj["loaded"])
    seconds = time.perf_counter() - start
    write(output, data)
    click.echo(f"compressed to {output}: " + _report(len(data), model, images, labels, seconds))


@click.command()
@click.argument("source", type=EXISTING_FILE)
@CHECKPOINT
@RAW_WEIGHTS
@click.option("-o", "--output", type=FILE, required=True, help="IMAGES.npz")
@click.option(
    "--png-dir", type=click.Path(file_okay=False), default=None, help="Also one PNG per image."
)
@click.pass_context
def decompress(ctx, source, checkpoint, raw_weights, output, png_dir):
    """Decode a .pcnn file written by `compress` with the same run and weights, on any
    machine.

    \b
    Example: pixelcnn --log-dir runs/X decompress test.pcnn -o test.npz --png-dir test_png/"""
    import time
    import warnings

    import numpy as np
    import tensorflow as tf

    from pixelcnn import files, image_codecs
    from pixelcnn.inference import codec

    with tf.io.gfile.GFile(source, "rb") as f:
        data = f.read()
    try:
        version = codec.read_header(data)["version"]
    except codec.CodecError as e:
        raise click.ClickException(f"{source}: {e}") from e
    if version == 1:  # the float32 network's tables: the kernels `compress` ran then
        tf.config.experimental.enable_op_determinism()
    if png_dir and tf.io.gfile.exists(png_dir) and tf.io.gfile.listdir(png_dir):
        raise click.ClickException(f"--png-dir {png_dir} is not empty: pick a new folder")
    run_dir, model, _ = load(ctx, checkpoint, raw_weights)
    if png_dir:
        checked(image_codecs.png_mode, model.image_shape[-1], model.num_bits)  # before any work
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
    checked(files.save_npz, output, images=images.astype(dtype), labels=labels)
    if png_dir:
        checked(files.write_pngs, png_dir, images, model.num_bits)
    line = _report(len(data), model, images, labels, seconds)
    click.echo(f"decompressed {source} to {output}: {line}")


# ------------------------------------------------------------------------ OOD detection
@click.command(name="ood")
@click.option(
    "--ood",
    "ood_sets",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="An out-of-distribution set: a .npz of images or a folder of them (repeatable).",
)
@click.option(
    "--background",
    type=EXISTING_FOLDER,
    help="The background model's run directory: adds the likelihood ratio.",
)
@click.option(
    "--compressor",
    type=click.Choice(COMPRESSORS),
    default="png",
    show_default=True,
    help="For the input-complexity score (all but png need imagecodecs).",
)
@CHECKPOINT
@SPLIT
@NPZ
@FOLDER
@click.option("--num", type=click.IntRange(1), help="Score at most N images of each set.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per scoring batch (default 64).",
)
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="A folder.")
@click.pass_context
def ood_command(
    ctx, ood_sets, background, compressor, checkpoint, split, npz, folder, num, batch_size, output
):
    """Out-of-distribution detection: scores the in-distribution images (default: the
    run's test split) and each OOD set; writes scores.csv, metrics.json, metrics.md
    (AUROC, AUPRC, FPR at 95% TPR of every score on every set) and roc.png.

    \b
    Example: pixelcnn --log-dir runs/X ood --ood noise=noise.npz --background runs/BG -o ood/"""
    from pixelcnn import checks, data, files, rundir
    from pixelcnn.inference import ood, scoring

    batch_size = batch_size or scoring.BATCH_SIZE
    run_dir, model, _ = load(ctx, checkpoint)
    bg = None
    if background:
        bg, path = checked(rundir.load_for_inference, background)
        click.echo(f"background: EMA weights from {path}", err=True)
        checked(ood.check_background, model, bg)
    batches = source_batches(ctx, run_dir, model, split, npz, folder, batch_size)
    in_images, _ = checked(scoring.take, batches, num)
    sets = {}
    for source in ood_sets:
        name, sep, path = source.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{source!r}: give NAME=PATH", param_hint="--ood")
        reader = data.load_npz if path.endswith(".npz") else files.load_image_folder
        images, _ = checked(reader, path)
        checked(checks.check_integer_images, images, model.image_shape, model.num_bits, name)
        sets[name] = images[:num]
    scorer = ood.Scorer(model, bg, compressor, batch_size)
    scores, rows = checked(ood.compare, scorer, in_images, sets)
    write(os.path.join(output, "scores.csv"), ood.scores_csv(scores))
    write(os.path.join(output, "metrics.json"), json.dumps(rows, indent=2) + "\n")
    write(os.path.join(output, "metrics.md"), ood.markdown(rows))
    checked(files.save_png, ood.roc_image(scores), os.path.join(output, "roc.png"))
    click.echo(ood.markdown(rows))


def _report(nbytes: int, model, images, labels, seconds: float) -> str:
    """One line on a coded set: images, bytes, coded and model bits/dim, images/s."""
    from pixelcnn.inference import scoring

    scores = scoring.score(model, scoring.array_batches(images, labels))
    model_bpd = scores.summary()["bits_per_dim"]
    return (
        f"{len(images)} images, {nbytes} bytes: {8 * nbytes / images.size:.4f} bits/dim "
        f"coded, {model_bpd:.4f} bits/dim the model's likelihood, "
        f"{len(images) / seconds:.1f} images/s"
    )


COMMANDS = (sample, evaluate, complete, export_command, compress, decompress, ood_command)
