"""The package's steps against the plain reference network, and each speed trick on/off.

    python benchmarks/speed_ab.py                  # B1, every mode and trick
    python benchmarks/speed_ab.py --config B2 --pairs 5 --no-tricks

Everything runs in one process: for each comparison the two steps alternate, call by
call, and the result is the median of the time ratios of the pairs, so this machine's
drift (tens of percent within minutes) moves both sides alike. Modes: float32
training, bfloat16 training (Keras mixed precision) and float32 evaluation of the EMA
weights. "convolutions alone" is every convolution of the step (with its gradients in
training) and nothing else, in one tf.function (``conv_ceiling.all_convolutions``): its
ratio is the step's distance from that ceiling. "reference" is ``benchmarks/reference.py`` (the same network written plainly,
checked here to compute the same parameters); a trick row switches one trick off in
the package for the step it traces (the patch is active only while tracing) and
reports how much slower (> 1) or faster (< 1) the step became.
The matmul peak is measured before and after. Results: stdout and
benchmarks/results/speed_ab.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import conv_ceiling  # noqa: E402
import numpy as np  # noqa: E402
import reference  # noqa: E402
import tensorflow as tf  # noqa: E402
from throughput import CONFIGS, matmul_peak  # noqa: E402

from pixelcnn import layers  # noqa: E402
from pixelcnn.model import PixelCNNPP  # noqa: E402
from pixelcnn.training.trainer import Trainer, TrainerOptions  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _plain_crop(x, begin, size):
    return x[:, begin[0] : begin[0] + size[0], begin[1] : begin[1] + size[1]]


def _keras_like_dropout(self, x, training=False, seed=None):
    if not training or self.rate == 0:
        return layers.concat_elu, 1.0
    seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), self.index)

    def f(x):
        return tf.nn.experimental.stateless_dropout(layers.concat_elu(x), self.rate, seed)

    return f, 1.0


# Each trick: how to switch it off while a step is traced (None: an argument instead).
TRICKS = {
    "recompute": None,  # PixelCNNPP(recompute_activations=...)
    "fused dropout (16-bit masks, folded scale)": lambda: patched(
        layers.ConcatEluDropout, "activation", _keras_like_dropout
    ),
    "tf.slice crops": lambda: patched(layers, "crop", _plain_crop),
}
# Tricks that change nothing in an evaluation step (no gradients, no dropout).
TRAINING_ONLY = {"recompute", "fused dropout (16-bit masks, folded scale)"}


def package_step(arch, precision, mode, images, recompute=None, patch=None):
    def model_fn(dtype):
        return PixelCNNPP(**arch, dropout_rate=0.5, recompute_activations=recompute, dtype=dtype)

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    trainer = Trainer(strategy, model_fn, TrainerOptions(precision=precision))
    trainer.initialize(images)
    step = trainer.train_step if mode != "eval" else trainer.eval_steps["ema"]
    with patch() if patch else contextlib.nullcontext():
        _call(step, images)  # traces with the patch active
    return step, trainer


def reference_step(arch, precision, mode, images, source):
    """The reference's step, from ``source``'s (a package Trainer's) weights; checks
    first that the reference computes the package's parameters (EMA weights)."""
    trainer = reference.ReferenceTrainer(arch | {"dropout_rate": 0.5}, precision)
    reference.copy_weights(source.model, trainer.model)
    reference.copy_weights(source.ema, trainer.ema)
    gap = float(tf.reduce_max(tf.abs(trainer.ema(images) - source.ema(images))))
    assert gap < 1e-3, f"the reference computes another network (max difference {gap})"
    return trainer.train_step if mode != "eval" else trainer.eval_step


def convolutions_step(trainer, mode, images):
    """The step's convolutions alone, called as a step is."""
    model = trainer.model if mode != "eval" else trainer.ema
    convs = conv_ceiling.all_convolutions(model, images, "eval" if mode == "eval" else "train")
    return lambda batch: convs()


def _call(step, images) -> float:
    start = time.perf_counter()
    float(tf.nest.flatten(step({"images": images}))[0])
    return time.perf_counter() - start


def ratio(base, other, images, pairs: int) -> dict:
    """Median over ``pairs`` of time(other) / time(base), the two called alternately
    (which goes first alternates too)."""
    for step in (base, other):  # warm up
        _call(step, images)
    ratios = []
    for k in range(pairs):
        if k % 2:
            t_other, t_base = _call(other, images), _call(base, images)
        else:
            t_base, t_other = _call(base, images), _call(other, images)
        ratios.append(t_other / t_base)
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return {"ratio": float(med), "iqr": [float(q1), float(q3)], "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="B1", choices=sorted(CONFIGS))
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--modes", default="train_float32,train_bfloat16,eval")
    parser.add_argument("--no-tricks", action="store_true", help="only the reference rows")
    parser.add_argument(
        "--tricks", default=",".join(TRICKS), help=f"comma-separated, of: {', '.join(TRICKS)}"
    )
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    tricks = [] if args.no_tricks else args.tricks.split(",")
    if unknown := set(tricks) - set(TRICKS):
        parser.error(f"unknown tricks {sorted(unknown)}: choose from {list(TRICKS)}")
    arch = dict(CONFIGS[args.config])
    batch = arch.pop("batch")
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (batch, *arch["image_shape"]))
    images = tf.constant(2.0 * v / 255.0 - 1.0, tf.float32)

    out = Path(args.output or Path(__file__).parent / "results" / f"speed_ab_{args.config}.json")
    result = {
        "config": args.config,
        "batch": batch,
        "cpu": _cpu_name(),
        "time_ratio": "median time(comparison) / time(package step) over alternating pairs; "
        "> 1: the package's step is faster",
        "matmul_peak_before": {d: matmul_peak(d, windows=3) for d in ("float32", "bfloat16")},
        "rows": [],
    }
    print(f"{args.config}, batch {batch}; matmul peak before: {result['matmul_peak_before']}")
    for mode in args.modes.split(","):
        precision = "bfloat16" if mode == "train_bfloat16" else "float32"
        base, trainer = package_step(arch, precision, mode, images)
        comparisons = [
            ("convolutions alone", convolutions_step(trainer, mode, images)),
            ("reference (plain network)", reference_step(arch, precision, mode, images, trainer)),
        ]
        if precision == "bfloat16":  # the aim: bfloat16 against the plain float32 network
            comparisons.append(
                ("reference in float32", reference_step(arch, "float32", mode, images, trainer))
            )
        for name in tricks:
            patch = TRICKS[name]
            if mode == "eval" and name in TRAINING_ONLY:
                continue
            if name == "recompute":
                # the default: on in float32, off in bfloat16; time the other setting
                on = precision == "float32"
                step, _ = package_step(arch, precision, mode, images, recompute=not on)
                name = f"recompute {'off' if on else 'on'}"
            else:
                step, _ = package_step(arch, precision, mode, images, patch=patch)
                name = f"without {name}"
            comparisons.append((name, step))
        for name, step in comparisons:
            r = ratio(base, step, images, args.pairs)
            result["rows"].append({"mode": mode, "comparison": name, **r})
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every row
            print(
                f"{mode:15s} {name:50s} time ratio {r['ratio']:.3f} "
                f"(IQR {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f})"
                + (
                    f": the step takes {1 / r['ratio']:.3f}x"
                    if name == "convolutions alone"
                    else ""
                ),
                flush=True,
            )
    result["matmul_peak_after"] = {d: matmul_peak(d, windows=3) for d in ("float32", "bfloat16")}
    print(f"matmul peak after: {result['matmul_peak_after']}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in info.split()]
    return f"{name} ({', '.join(flags) or 'no AVX-512'})"


if __name__ == "__main__":
    main()
