"""How fast the network's convolutions alone run: the ceiling of the train and eval steps.

    python benchmarks/conv_ceiling.py              # B1 and B2, float32
    python benchmarks/conv_ceiling.py --configs B1 --precision bfloat16

Records every convolution of a forward pass (input shape, kernel, stride, padding) and
times each one alone on random data as the model runs it (the causal pad fused into
the convolution, the bias added): forward only ("eval"), and forward plus the gradients
for its input, kernel and bias ("train", 3x the forward FLOPs). The sum of those times
against the model's FLOPs is the fastest any step built from these kernels could go,
with every elementwise op, the likelihood and the optimizer free. It is reported as a
fraction of the matmul peak measured in the same process, overall and per kind of
convolution, next to benchmarks/throughput.py's fractions for the real steps. Results:
stdout and benchmarks/results/conv_ceiling.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from throughput import CONFIGS, matmul_peak, multiply_adds, record_products  # noqa: E402


def time_call(fn, args, seconds: float = 0.6) -> float:
    """Median seconds per call over repeated calls for about ``seconds``."""
    import numpy as np

    fn(*args).numpy()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def products(model, images) -> list:
    """[(kind, forward FLOPs per batch, fn, (x, kernel, bias))] for every convolution of
    one forward pass of ``model`` on ``images``: fn(x, kernel, bias) is the product as
    the model runs it (causal pad fused into the convolution, bias added), on random
    inputs of its shapes and compute dtype."""
    import tensorflow as tf

    from pixelcnn.layers import WeightNormConv2DTranspose

    result = []
    for layer, padded_shape, kernel_shape, y_shape in record_products(model, images):
        compute = layer.compute_dtype
        transpose = isinstance(layer, WeightNormConv2DTranspose)
        # The timed product pads its input itself, as the model does (the pad is fused
        # into the convolution): start from the shape before padding.
        x_shape = list(padded_shape)
        if not transpose:
            for axis, (before, after) in enumerate(layer.padding):
                x_shape[axis] -= before + after
        x = tf.cast(tf.random.normal(x_shape), compute)
        kernel = tf.cast(tf.random.normal(kernel_shape, stddev=0.05), compute)
        bias = tf.cast(layer.b, compute)
        kh, kw = layer.kernel_size
        if transpose:
            kind = f"transposed {kh}x{kw}"
        else:
            kind = f"{kh}x{kw} stride {layer.strides}, {x_shape[3]}->{layer.filters}"

        def forward(x, kernel, bias, layer=layer, transpose=transpose):
            return layer.linear_map(x if transpose else layer.pad(x), kernel) + bias

        flops = 2.0 * multiply_adds(layer, padded_shape, y_shape) * x_shape[0]
        result.append((kind, flops, forward, (x, kernel, bias)))
    return result


def evaluate(forward):
    """The forward product alone, reduced to a scalar."""
    import tensorflow as tf

    def fn(x, kernel, bias):
        return tf.reduce_sum(forward(x, kernel, bias)[..., :1])

    return fn


def train(forward):
    """The forward product and the gradients for its input, kernel and bias."""
    import tensorflow as tf

    def fn(x, kernel, bias):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, bias])
            y = forward(x, kernel, bias)
        grads = tape.gradient(y, [x, kernel, bias], output_gradients=tf.ones_like(y))
        # y itself is used too: the gradients do not need it, and graph pruning would
        # drop the forward convolution.
        return tf.add_n([tf.reduce_sum(tf.cast(t[..., :1], tf.float32)) for t in [y, *grads]])

    return fn


MODES = {"eval": (evaluate, 1), "train": (train, 3)}  # mode -> (fn, FLOPs over forward)


def all_convolutions(model, images, mode: str):
    """One tf.function (no arguments) that runs every convolution of a pass (``mode``
    "eval") or of a training step ("train": with the three gradients each) once, on
    random inputs: the convolutions of a step without the rest, to time beside it."""
    import tensorflow as tf

    make, _ = MODES[mode]
    calls = [(make(forward), args) for _, _, forward, args in products(model, images)]

    @tf.function(autograph=False)
    def step():
        return tf.add_n([tf.cast(fn(*args), tf.float32) for fn, args in calls])

    return step


def ceiling(name: str, precision: str) -> dict:
    import numpy as np
    import tensorflow as tf

    from pixelcnn.model import PixelCNNPP

    cfg = dict(CONFIGS[name])
    batch = cfg.pop("batch")
    dtype = "float32" if precision == "float32" else "mixed_bfloat16"
    model = PixelCNNPP(residual_blocks=3, dropout_rate=0.5, dtype=dtype, **cfg)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (batch, *cfg["image_shape"])), tf.float32)
    model(images)  # build
    calls = products(model, images)
    peak = matmul_peak(precision, windows=3)

    # mode -> kind -> [flops, seconds]
    kinds = {m: collections.defaultdict(lambda: [0.0, 0.0]) for m in MODES}
    for kind, flops, forward, args in calls:
        for mode, (make, factor) in MODES.items():
            seconds = time_call(tf.function(make(forward)), args)
            kinds[mode][kind][0] += factor * flops
            kinds[mode][kind][1] += seconds
    result = {"config": name, "precision": precision, "matmul_peak_gflops": peak}
    for mode, by_kind in kinds.items():
        total_flops = sum(f for f, _ in by_kind.values())
        total_seconds = sum(s for _, s in by_kind.values())
        result[mode] = {
            "gflop_per_batch": total_flops / 1e9,
            "images_per_s": batch / total_seconds,
            "fraction_of_peak": total_flops / total_seconds / 1e9 / peak,
            "by_kind": {
                k: {"gflop": f / 1e9, "seconds": s, "fraction_of_peak": f / s / 1e9 / peak}
                for k, (f, s) in sorted(by_kind.items())
            },
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="B1,B2")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "conv_ceiling.json")
    )
    args = parser.parse_args()
    results = []
    for name in args.configs.split(","):
        r = ceiling(name, args.precision)
        results.append(r)
        for mode in ("eval", "train"):
            m = r[mode]
            print(
                f"{name} {args.precision} {mode}: convolutions alone {m['images_per_s']:.2f} img/s"
                f" = {100 * m['fraction_of_peak']:.0f}% of the matmul peak"
                f" ({r['matmul_peak_gflops']:.0f} GFLOP/s)"
            )
            for kind, k in m["by_kind"].items():
                print(
                    f"    {kind:32s} {k['gflop']:7.2f} GFLOP  {1e3 * k['seconds']:8.1f} ms"
                    f"  {100 * k['fraction_of_peak']:4.0f}%"
                )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
