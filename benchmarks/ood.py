"""Out-of-distribution detection on the embedded MNIST subset, end to end.

    python benchmarks/ood.py [--minutes 8] [--out benchmarks/results/ood]
        [--mutation-rate 0.2] [--l2-weight 1e-4] [--background-binding BINDING ...]
        [--model-from runs/ood/model] [--background-from runs/ood/background]

Trains a model and its background model (the same config with train.mutation_rate and
train.l2_weight, Ren et al. 2019; --background-binding changes it further, e.g. to a
smaller network), unless --model-from / --background-from name them,
on the 4,500 training digits, each as a `pixelcnn single` command with a time budget,
then scores the 500 test digits against OOD sets built here, offline: constant images, uniform
noise, inverted test digits, two sets of glyphs rendered with Pillow's built-in
font (letters; punctuation and symbols) and outlined shapes. Every score (negative log-likelihood,
likelihood ratio, input complexity with PNG, and with WebP, JPEG-XL and JPEG 2000 when
imagecodecs, the bench extra, is installed) on every set: AUROC, AUPRC, FPR at 95% TPR;
each set's share of non-zero pixels beside its mean scores; the typicality test over
batches of M = 1, 5, 10; and the seconds each score takes against `evaluate`'s
log-likelihoods. The score chosen before looking at the sets: the likelihood ratio.
Writes ood.json and ood.md into --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHOSEN = "likelihood_ratio"  # the one score for every set, chosen before looking
MODEL = [
    "train.dataset_fn = @embedded_mnist",
    "train.batch_size = 32",
    "train.learning_rate = 2e-3",
    "train.learning_rate_decay = 0.99995",
    "train.max_epoch = 1000",
    "train.images_to_log = 0",
    "train.chkpt_to_keep = 1",
    "train.precision = 'auto'",
    "PixelCNNPP.image_shape = (28, 28, 1)",
    "PixelCNNPP.residual_blocks = 3",
    "PixelCNNPP.residual_layers_per_block = 1",
    "PixelCNNPP.filters = 32",
    "PixelCNNPP.num_mixtures = 5",
    "PixelCNNPP.dropout_rate = 0.0",
]


def train(run_dir: Path, bindings: list[str], minutes: float) -> float:
    """One `pixelcnn single` run of the model config; its wall time in seconds."""
    command = [sys.executable, str(ROOT / "main.py")]
    for b in [*MODEL, *bindings, f"train.max_minutes = {minutes}"]:
        command += ["--binding", b]
    command += ["--log-dir", str(run_dir), "single"]
    began = time.time()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - began


def glyphs(characters: str, count: int, seed: int) -> np.ndarray:
    """``count`` 28x28 images of single characters drawn white on black in Pillow's
    built-in font at random sizes and offsets: uint8 [count, 28, 28, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.zeros((count, 28, 28, 1), np.uint8)
    for k in range(count):
        font = ImageFont.load_default(size=int(rng.integers(16, 25)))
        canvas = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(canvas)
        char = characters[rng.integers(len(characters))]
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        x = (28 - (right - left)) // 2 - left + int(rng.integers(-2, 3))
        y = (28 - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
        draw.text((x, y), char, fill=255, font=font)
        out[k, ..., 0] = np.asarray(canvas)
    return out


def shapes(count: int, seed: int) -> np.ndarray:
    """``count`` 28x28 images of one outlined ellipse, rectangle, triangle or a line,
    drawn white on black at 4x the size and downsampled with a box filter (soft edges,
    as the digits have) at random sizes, positions and stroke widths: uint8
    [count, 28, 28, 1]. Added after the backgrounds were chosen on the other sets, to
    check those choices on images none of them was tuned on."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = np.zeros((count, 28, 28, 1), np.uint8)
    for k in range(count):
        canvas = Image.new("L", (112, 112), 0)
        draw = ImageDraw.Draw(canvas)
        x0, y0 = rng.integers(16, 44, 2)
        x1, y1 = rng.integers(68, 96, 2)
        width = int(rng.integers(6, 13))
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), outline=255, width=width)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), outline=255, width=width)
        elif kind == 2:
            apex = int(rng.integers(x0, x1))
            draw.polygon([(apex, y0), (x1, y1), (x0, y1)], outline=255, width=width)
        else:
            draw.line((x0, y0, x1, y1) if rng.integers(2) else (x0, y1, x1, y0), 255, width)
        out[k, ..., 0] = np.asarray(canvas.resize((28, 28), Image.Resampling.BOX))
    return out


def ood_sets(test: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    levels = np.linspace(0, 255, 100).round().astype(np.uint8)
    return {
        "constant": np.broadcast_to(levels[:, None, None, None], (100, 28, 28, 1)).copy(),
        "uniform noise": rng.integers(0, 256, (100, 28, 28, 1), np.uint8),
        "inverted digits": 255 - test,
        "letters": glyphs(string.ascii_letters, 500, seed=1),
        "symbols": glyphs("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", 500, seed=2),
        "shapes": shapes(500, seed=3),
    }


def other_compressors(ood, scores, test, sets, num_bits: int) -> list[dict]:
    """Input complexity with each compressor other than PNG that imagecodecs (the bench
    extra) provides, from the NLL already scored: metric rows as ood.compare's."""
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        print("imagecodecs not installed: input complexity with PNG only")
        return []

    from pixelcnn import image_codecs

    rows = []
    for compressor in [c for c in image_codecs.COMPRESSORS if c != "png"]:
        inside = ood.complexity(scores["in"]["nll"], test, num_bits, compressor)
        for name, images in sets.items():
            outside = ood.complexity(scores[name]["nll"], images, num_bits, compressor)
            kind = f"complexity ({compressor})"
            rows.append({"ood_set": name, "score": kind, **ood.metrics(inside, outside)})
    return rows


def ink(scores, test, sets) -> dict:
    """Per set: the mean fraction of non-zero pixels and each score's mean, and, over
    the test digits, each score's correlation with that fraction (what a score that
    only counts background pixels would show)."""
    images = {"in": test, **sets}
    out = {
        name: {
            "ink": float((x > 0).mean()),
            **{k: float(v.mean()) for k, v in scores[name].items()},
        }
        for name, x in images.items()
    }
    fraction = (test > 0).mean(axis=(1, 2, 3))
    out["correlation with ink, test digits"] = {
        k: float(np.corrcoef(fraction, v)[0, 1]) if np.std(v) > 0 else None  # JSON has no NaN
        for k, v in scores["in"].items()
    }
    return out


def typicality(scorer, ood, train_images, test, sets) -> list[dict]:
    """Fraction of batches flagged, for M = 1, 5, 10: the fit uses the training digits'
    mean NLL and half of the test digits; the other half gives the false positives."""
    bits = {name: scorer.scores(x, ["nll"])["nll"] for name, x in sets.items()}
    test_nll = scorer.scores(test, ["nll"])["nll"]
    held, fresh = test_nll[::2], test_nll[1::2]
    train_nll = scorer.scores(train_images, ["nll"])["nll"]
    rows = []
    for m in (1, 5, 10):
        test_ = ood.TypicalityTest(m, fpr=0.05).fit(train_nll, held)
        row = {"M": m, "in-distribution (false positives)": float(test_.predict(fresh).mean())}
        row |= {name: float(test_.predict(v).mean()) for name, v in bits.items()}
        rows.append(row)
    return rows


def timing(scorer, scoring, test) -> dict:
    """Seconds to score the test digits: evaluate's log-likelihoods, and each score."""
    model = scorer.model

    def seconds(fn):
        fn()  # compiled and warm
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began

    return {
        "evaluate (log p)": seconds(
            lambda: scoring.score(model, scoring.array_batches(test, None))
        ),
        "nll": seconds(lambda: scorer.scores(test, ["nll"])),
        "likelihood_ratio": seconds(lambda: scorer.scores(test, ["likelihood_ratio"])),
        "complexity (png)": seconds(lambda: scorer.scores(test, ["complexity"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget, each model")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ood")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "ood")
    parser.add_argument("--mutation-rate", type=float, default=0.2, help="the background's")
    parser.add_argument("--l2-weight", type=float, default=1e-4, help="the background's")
    parser.add_argument(
        "--background-binding", action="append", default=[], metavar="BINDING",
        help="a further gin binding for the background only, e.g. a smaller network: "
        "'PixelCNNPP.filters = 16' (repeatable)",
    )  # fmt: skip
    for name in ("model", "background"):
        parser.add_argument(
            f"--{name}-from", type=Path, default=None,
            help=f"a {name} run of this script to score with instead of training one (e.g. "
            "to compare backgrounds against one model, or to score again)",
        )  # fmt: skip
    args = parser.parse_args()
    args.runs = args.runs.resolve()  # main.py runs in ROOT
    given = {"model": args.model_from, "background": args.background_from}
    runs = {}
    for name, run in given.items():
        if run is not None:
            runs[name] = run.resolve()
            if not (runs[name] / "checkpoints").is_dir():
                parser.error(f"--{name}-from {run}: no checkpoints/ there")
        else:
            runs[name] = args.runs / name
            if runs[name].exists():  # `single` would resume it instead of training anew
                parser.error(f"{runs[name]} exists: remove it or pass another --runs")
    background_bindings = [f"train.mutation_rate = {args.mutation_rate}",
                  f"train.l2_weight = {args.l2_weight}", *args.background_binding]  # fmt: skip
    if given["background"] is not None:  # what it was trained with
        config = (runs["background"] / "operative_config.gin").read_text().splitlines()
        background_bindings = [
            line for line in config
            if "mutation_rate" in line or "l2_weight" in line or line.startswith("PixelCNNPP.")
        ]  # fmt: skip
    began = time.time()
    bindings = {"model": [], "background": background_bindings}
    seconds = {  # the model first
        name: None if given[name] else train(runs[name], bindings[name], args.minutes)
        for name in runs
    }
    from pixelcnn import data, load_for_inference
    from pixelcnn.inference import ood, scoring

    model, _ = load_for_inference(runs["model"])
    background, _ = load_for_inference(runs["background"])
    (train_images, _), (test, _) = data.embedded_mnist_split()  # what the runs were tested on
    sets = ood_sets(test)
    scorer = ood.Scorer(model, background, "png", batch_size=256)  # as evaluate batches
    scores, rows = ood.compare(scorer, test, sets)
    rows += other_compressors(ood, scores, test, sets, model.num_bits)
    result = {
        "command": shlex.join(["python", "benchmarks/ood.py", *sys.argv[1:]]),
        "chosen_score": CHOSEN,
        "training_seconds": seconds,
        "test_bits_per_dim": {
            name: json.loads((run / "metrics.json").read_text())["test_bits_per_dim"]
            for name, run in runs.items()
        },
        "runs": {name: str(run) for name, run in runs.items()},
        "background_bindings": background_bindings,
        "metrics": rows,
        "ink": ink(scores, test, sets),
        "typicality": typicality(scorer, ood, train_images[:1000], test, sets),
        "scoring_seconds": timing(scorer, scoring, test),
    }
    result["wall_seconds"] = time.time() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ood.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ood.md").write_text(ood.markdown(rows))
    from pixelcnn import files

    files.save_png(ood.roc_image(scores), args.out / "roc.png")
    print(ood.markdown(rows))
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()
