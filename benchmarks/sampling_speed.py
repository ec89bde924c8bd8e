"""Times the reference sampler against the cached one (pixelcnn.sampling).

Configs: the original TF2 code's MNIST model (32x32x1, 64 filters, 2 gated resnets per block, 3
resolutions, 3 mixtures) and the paper's CIFAR-10 model (32x32x3, 160 filters, 5 per
block, 10 mixtures). Weights come from the data-dependent init on random images:
sampling cost does not depend on how well the model is trained.

Compilation is reported separately from sampling: ``trace_s`` is building the TF graph,
``compile_s`` the extra time of the first call (XLA compilation, graph optimisation),
``run_s`` a later call (the best of ``--repeats``). Every program is compiled per model
and batch size. The naive sampler runs for minutes (one full forward pass per pixel), so
it runs once after tracing (its ``run_s`` includes its small graph set-up), and only for
the batches asked for; for the others ``run_s`` is estimated as H * W times one forward
pass (``estimated: true``; for the batches that do run, ``estimate_s`` shows how close
the estimate is).

Usage (each row compiles its own program, so a full run takes a while):

    python benchmarks/sampling_speed.py                 # MNIST 1/16/64, CIFAR 1/16 (~15 min)
    python benchmarks/sampling_speed.py --mnist-naive-batches 1,16,64   # + ~25 min
    python benchmarks/sampling_speed.py --naive         # also run the naive CIFAR sampler
    python benchmarks/sampling_speed.py --quick         # a tiny model, to check the script

Writes a table to stdout and JSON to benchmarks/results/sampling.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from pixelcnn import PixelCNNPP  # noqa: E402
from pixelcnn.inference import sampling  # noqa: E402
from pixelcnn.likelihood import to_unit_range  # noqa: E402

CONFIGS = {
    "mnist": dict(
        image_shape=(32, 32, 1),
        filters=64,
        residual_layers_per_block=2,
        residual_blocks=3,
        num_mixtures=3,
    ),
    "cifar": dict(
        image_shape=(32, 32, 3),
        filters=160,
        residual_layers_per_block=5,
        residual_blocks=3,
        num_mixtures=10,
    ),
    "quick": dict(
        image_shape=(8, 8, 1),
        filters=8,
        residual_layers_per_block=1,
        residual_blocks=2,
        num_mixtures=3,
    ),
}

# Kinds of sampler: (label, key of pixelcnn.inference.sampling.compiled).
SAMPLERS = {
    "naive": "naive",
    "fast": "fast_xla",  # the default of sample_fast (XLA)
    "fast_no_xla": "fast_graph",  # sample_fast(..., jit_compile=False)
}


def build_model(config: dict, seed: int = 0) -> PixelCNNPP:
    """The config's model after data-dependent init on random 8-bit images."""
    tf.keras.utils.set_random_seed(seed)
    model = PixelCNNPP(**config, dropout_rate=0.0)
    images = np.random.default_rng(seed).integers(0, 256, (4, *config["image_shape"]))
    model.initialize(to_unit_range(images, model.num_bits))
    return model


def time_sampler(model: PixelCNNPP, kind: str, batch: int, repeats: int, seed=(1, 2)) -> dict:
    """Trace, compile and run times of one sampler at one batch size.

    Uses the module's ``_prepare`` and ``compiled`` to time tracing apart from
    running; the results are those of ``sample_naive``/``sample_fast``.
    """
    args = sampling._prepare(model, batch, None, seed, None, None)
    fn = sampling.compiled(model, SAMPLERS[kind])
    start = time.perf_counter()
    fn.get_concrete_function(*args)
    trace = time.perf_counter() - start
    start = time.perf_counter()
    images = fn(*args).numpy()
    first = time.perf_counter() - start
    runs = [first]
    if kind != "naive":
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args).numpy()
            runs.append(time.perf_counter() - start)
    run = min(runs[1:]) if len(runs) > 1 else first
    return {
        "sampler": kind,
        "batch": batch,
        "trace_s": round(trace, 3),
        "compile_s": round(max(first - run, 0.0), 3) if len(runs) > 1 else None,
        "run_s": round(run, 3),
        "images_per_s": round(batch / run, 3),
        "images": images,
    }


def estimate_naive(model: PixelCNNPP, batch: int, repeats: int = 3) -> dict:
    """The naive sampler's time estimated as H * W forward passes (best of ``repeats``)."""
    forward = tf.function(lambda x: model(x, training=False))
    x = tf.zeros([batch, *model.image_shape])
    forward(x).numpy()  # trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(x).numpy()
        times.append(time.perf_counter() - start)
    height, width, _ = model.image_shape
    return {
        "forward_pass_s": round(min(times), 4),
        "estimate_s": round(min(times) * height * width, 1),
    }


def compare(naive: np.ndarray, fast: np.ndarray) -> dict:
    """How much of the naive samples the fast sampler reproduced.

    With float32 networks the two samplers compute the mixture parameters with different
    operation orders (~1e-6 relative); with 256 levels a sample then lands on the other
    side of a bin edge now and then, and every later pixel of that image differs. The
    pixels before the first difference must agree.
    """
    same = np.all(naive == fast, axis=-1)  # [N, H, W]
    flat = same.reshape(len(same), -1)
    first = [int(np.argmin(row)) if not row.all() else None for row in flat]
    return {
        "identical_images": int(flat.all(axis=1).sum()),
        "identical_pixel_fraction": round(float(same.mean()), 4),
        "first_difference_pixel": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="mnist,cifar", help="comma list of mnist,cifar")
    parser.add_argument("--mnist-batches", default="1,16,64")
    parser.add_argument(
        "--mnist-naive-batches",
        default="1,16",
        help="MNIST batches that run the naive sampler (minutes each; others are estimated)",
    )
    parser.add_argument("--cifar-batches", default="1,16")
    parser.add_argument(
        "--naive", action="store_true", help="also run the naive CIFAR sampler (hours)"
    )
    parser.add_argument(
        "--no-xla-compare",
        action="store_true",
        help="skip the fast sampler without XLA (timed on MNIST to justify the default)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the fast samplers")
    parser.add_argument("--quick", action="store_true", help="a tiny 8x8 model (smoke test)")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "sampling.json")
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    if args.quick and args.output == parser.get_default("output"):
        args.output = str(Path(args.output).with_name("sampling_quick.json"))

    plan = []  # (config name, batches, fast samplers, batches that run the naive one)
    if args.quick:
        plan.append(("quick", [1, 4], ["fast", "fast_no_xla"], [1]))
    else:
        for name in args.configs.split(","):
            if name == "mnist":
                batches = [int(b) for b in args.mnist_batches.split(",")]
                naive = [int(b) for b in args.mnist_naive_batches.split(",") if b]
                kinds = ["fast"] + ([] if args.no_xla_compare else ["fast_no_xla"])
                plan.append((name, batches, kinds, naive))
            elif name == "cifar":
                batches = [int(b) for b in args.cifar_batches.split(",")]
                plan.append((name, batches, ["fast"], batches if args.naive else []))
            else:
                parser.error(f"unknown config {name!r}")

    results = []

    def report(row):
        compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
        trace_s = "-" if row.get("trace_s") is None else f"{row['trace_s']:.1f}"
        note = " (estimated)" if row.get("estimated") else ""
        print(
            f"{row['config']:6s} {row['sampler']:12s} batch {row['batch']:3d}: "
            f"run {row['run_s']:9.3f} s{note}, trace {trace_s} s, compile {compile_s} s",
            flush=True,
        )

    for name, batches, kinds, naive_batches in plan:
        model = build_model(CONFIGS[name])
        for batch in batches:
            samples = {}
            for kind in kinds:
                row = time_sampler(model, kind, batch, args.repeats)
                samples[kind] = row.pop("images")
                row["config"] = name
                results.append(row)
                report(row)
            estimate = estimate_naive(model, batch)
            if batch in naive_batches:
                row = time_sampler(model, "naive", batch, args.repeats)
                naive_images = row.pop("images")
                row.update(config=name, estimated=False, **estimate)
                results.append(row)
                report(row)
                for kind in kinds:
                    match = compare(naive_images, samples[kind])
                    next(
                        r
                        for r in results
                        if r["config"] == name and r["batch"] == batch and r["sampler"] == kind
                    )["vs_naive"] = match
                    print(f"       {kind} vs naive: {match}", flush=True)
            else:
                row = {
                    "sampler": "naive",
                    "batch": batch,
                    "trace_s": None,
                    "compile_s": None,
                    "run_s": estimate["estimate_s"],
                    "images_per_s": round(batch / estimate["estimate_s"], 4),
                    "config": name,
                    "estimated": True,
                    **estimate,
                }
                results.append(row)
                report(row)

    print()
    print(f"{'config':8s}{'sampler':14s}{'batch':>6s}{'run s':>11s}{'img/s':>10s}{'speedup':>9s}")
    for row in results:
        naive = next(
            r
            for r in results
            if (r["config"], r["sampler"], r["batch"]) == (row["config"], "naive", row["batch"])
        )
        speedup = ""
        if row["sampler"] != "naive":
            speedup = ("~" if naive["estimated"] else "") + f"{naive['run_s'] / row['run_s']:.0f}x"
        run = f"{row['run_s']:.3f}" + ("*" if row.get("estimated") else "")
        print(
            f"{row['config']:8s}{row['sampler']:14s}{row['batch']:6d}{run:>11s}"
            f"{row['images_per_s']:10.2f}{speedup:>9s}"
        )
    print("* estimated as H * W forward passes (naive sampler not run)")

    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "tensorflow": tf.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "load_average_at_start": load_at_start,
        },
        "configs": {name: CONFIGS[name] for name, *_ in plan},
        "results": results,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
