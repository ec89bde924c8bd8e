"""Training and evaluation throughput against the machine's matmul peak.

    python benchmarks/throughput.py                      # B1 and B2, float32 and bfloat16
    python benchmarks/throughput.py --configs B1 --precisions float32 --steps 5

B1 is the original TF2 code's MNIST configuration (32x32x1, filters 64, 2 layers per block,
3 mixtures, batch 16); B2 the paper's CIFAR configuration (32x32x3, filters 160, 5 layers
per block, 10 mixtures, batch 8); Q the network of quickstart.gin and mnist_30min.gin
(28x28x1, filters 32, 1 layer per block, 5 mixtures, batch 16), built here with dropout 0.5
like the others. The timed steps are the ones training uses
(pixelcnn.trainer.Trainer.train_step / eval_step), on synthetic data already in memory.
Each row runs in a fresh process, so its peak RSS is its own. Each row also measures
the matmul peak right before and right after its timings, and its fractions are of the
mean of the two: this machine's peak drifts by tens of percent over minutes. Evaluation
always runs the float32 EMA model, so its fraction is of the float32 peak.

Besides the defaults, three variants of float32 training are measured (skip them with
``--no-variants``): "no-recompute" (PixelCNNPP.recompute_activations = False: faster,
more memory; it is already off for bfloat16), "xla" (the training step compiled with
XLA, jit_compile=True) and "4-steps-per-call" (four training steps inside one
tf.function call, as Keras' steps_per_execution does); see VARIANT_ROWS.
Results: a table on stdout and JSON in benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIGS = {
    "B1": dict(
        image_shape=(32, 32, 1), filters=64, residual_layers_per_block=2, num_mixtures=3, batch=16
    ),
    "B2": dict(
        image_shape=(32, 32, 3), filters=160, residual_layers_per_block=5, num_mixtures=10, batch=8
    ),
    # The network of experiments/quickstart.gin and mnist_30min.gin.
    "Q": dict(
        image_shape=(28, 28, 1), filters=32, residual_layers_per_block=1, num_mixtures=5, batch=16
    ),
}


def record_products(model, images) -> list:
    """[(layer, input shape, kernel shape, output shape)] of every linear map of one pass.

    Recorded at ``linear_map``, the linear map itself, whichever path calls it; its input
    is already padded.
    """
    from pixelcnn.layers import WeightNormConv2D, WeightNormConv2DTranspose

    calls = []
    originals = {}
    for cls in (WeightNormConv2D, WeightNormConv2DTranspose):
        originals[cls] = cls.linear_map

        def linear_map(self, x, kernel, _original=originals[cls]):
            out = _original(self, x, kernel)
            calls.append((self, tuple(x.shape), tuple(kernel.shape), tuple(out.shape)))
            return out

        cls.linear_map = linear_map
    try:
        model(images)
    finally:
        for cls, original in originals.items():
            cls.linear_map = original
    return calls


def multiply_adds(layer, x_shape, y_shape) -> int:
    """Multiply-adds per image of one product (transposed: per input position)."""
    from pixelcnn.layers import WeightNormConv2DTranspose

    kh, kw = layer.kernel_size
    positions = x_shape[1:3] if isinstance(layer, WeightNormConv2DTranspose) else y_shape[1:3]
    return positions[0] * positions[1] * kh * kw * x_shape[3] * y_shape[3]


def conv_flops(model) -> float:
    """Forward FLOPs per image: 2 * multiply-adds of every convolution (exact count)."""
    import tensorflow as tf

    calls = record_products(model, tf.zeros([1, *model.image_shape]))
    return sum(2.0 * multiply_adds(layer, x, y) for layer, x, _, y in calls)


def matmul_peak(dtype: str, n: int = 2048, windows: int = 7) -> float:
    """GFLOP/s of an n x n matmul in this dtype: the median of one-second windows."""
    import numpy as np
    import tensorflow as tf

    a = tf.random.normal([n, n], dtype=tf.float32)
    a = tf.cast(a, dtype)
    f = tf.function(lambda a: tf.matmul(a, a))
    f(a).numpy()
    rates = []
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            f(a).numpy()
            reps += 1
        rates.append(2.0 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return float(np.median(rates))


def pipeline_throughput(batch: int = 16, seconds: float = 3.0) -> float:
    """Images/s of the training input pipeline alone (embedded MNIST, as train() maps it)."""
    import tensorflow as tf

    from pixelcnn import data
    from pixelcnn.data import contract

    train_ds, _ = data.embedded_mnist(batch)
    ds = train_ds.map(lambda *e: contract.to_model_input(e, 8), num_parallel_calls=tf.data.AUTOTUNE)
    it = iter(ds.prefetch(tf.data.AUTOTUNE).repeat())
    next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += int(next(it)[0].shape[0])
    return images / (time.perf_counter() - start)


def measure(name: str, precision: str, steps: int, variant: str = "default") -> dict:
    """Runs in a child process: times train and eval steps of one configuration."""
    import numpy as np
    import tensorflow as tf

    from pixelcnn.model import PixelCNNPP
    from pixelcnn.training.trainer import Trainer, TrainerOptions

    cfg = dict(CONFIGS[name])
    batch = cfg.pop("batch")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    recompute = False if variant == "no-recompute" else None  # None: the model's default

    def model_fn(dtype):
        return PixelCNNPP(
            residual_blocks=3,
            dropout_rate=0.5,
            recompute_activations=recompute,
            dtype=dtype,
            **cfg,
        )

    trainer = Trainer(strategy, model_fn, TrainerOptions(precision=precision))
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (batch, *cfg["image_shape"]))
    images = tf.constant(2.0 * v / 255.0 - 1.0, tf.float32)
    trainer.initialize(images)
    batch_dict = {"images": images}
    flops = conv_flops(trainer.ema)

    def timed(fn, n):
        """Images per second of one call, from the median of n timed calls.

        The median, because this machine's speed drifts by 10-15% from one second
        to the next; a mean over a few calls moved the figures by that much.
        """
        fn(batch_dict)  # trace and warm up
        float(tf.nest.flatten(fn(batch_dict))[0])
        times = []
        for _ in range(n):
            start = time.perf_counter()
            float(tf.nest.flatten(fn(batch_dict))[0])
            times.append(time.perf_counter() - start)
        return batch / float(np.median(times))

    train_step, images_per_call = trainer.train_step, batch
    if variant == "xla":
        train_step = tf.function(trainer._train_step, jit_compile=True)
    elif variant == "4-steps-per-call":

        @tf.function
        def train_step(batch):
            out = trainer._train_step(batch)
            for _ in tf.range(3):
                out = trainer._train_step(batch)
            return out

        images_per_call = 4 * batch
        steps = max(3, steps // 4)
    # This machine's matmul peak drifts by tens of percent over minutes, so each row
    # measures it right before and right after its own timings and is compared with
    # their mean (the run-level peak printed first only says how fast the machine was).
    dtypes = sorted({"float32", precision})
    before = {d: matmul_peak(d, windows=3) for d in dtypes}
    train_ips = timed(train_step, steps) * images_per_call / batch
    eval_ips = timed(trainer.eval_steps["ema"], steps) if variant == "default" else None
    after = {d: matmul_peak(d, windows=3) for d in dtypes}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    return {
        "config": name,
        "precision": precision,
        "variant": variant,
        "batch": batch,
        "forward_gflop_per_image": flops / 1e9,
        "train_gflop_per_image": 3 * flops / 1e9,
        "train_images_per_s": train_ips,
        "eval_images_per_s": eval_ips,
        "peak_rss_gb": rss,
        "matmul_peak_gflops_before": before,
        "matmul_peak_gflops_after": after,
        "matmul_peak_gflops": {d: (before[d] + after[d]) / 2 for d in dtypes},
    }


# Variants of float32 training, measured once each (the XLA and several-steps rows only
# on B1: one B2 XLA compile alone takes minutes).
VARIANT_ROWS = [("B1", "no-recompute"), ("B1", "xla"), ("B1", "4-steps-per-call")]
VARIANT_ROWS += [("B2", "no-recompute")]


def run_child(name: str, precision: str, steps: int, variant: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, precision, str(steps), variant],
        capture_output=True,
        text=True,
        check=False,
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(f"{name} {precision} {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="B1,B2")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 16 B1, 4 B2)")
    parser.add_argument("--no-variants", action="store_true", help="skip the variant rows")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "throughput.json")
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, precision, steps, variant = args.child
        print("RESULT " + json.dumps(measure(name, precision, int(steps), variant)))
        return

    import tensorflow as tf

    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    print(
        f"matmul peak: float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s"
    )
    pipeline = pipeline_throughput()
    print(f"input pipeline alone: {pipeline:.0f} images/s")
    configs = args.configs.split(",")
    jobs = [(n, p, "default") for n in configs for p in args.precisions.split(",")]
    if not args.no_variants:
        jobs += [(n, "float32", v) for n, v in VARIANT_ROWS if n in configs]
    rows = []
    for name, precision, variant in jobs:
        steps = args.steps or (16 if name == "B1" else 4)
        r = run_child(name, precision, steps, variant)
        peak = r["matmul_peak_gflops"]
        r["train_fraction_of_peak"] = (
            r["train_images_per_s"] * r["train_gflop_per_image"] / peak[precision]
        )
        # Evaluation runs the float32 EMA model whatever the training precision.
        if r["eval_images_per_s"] is not None:
            r["eval_fraction_of_peak"] = (
                r["eval_images_per_s"] * r["forward_gflop_per_image"] / peak["float32"]
            )
        rows.append(r)
        evaluation = (
            f"eval {r['eval_images_per_s']:7.2f} img/s ({100 * r['eval_fraction_of_peak']:3.0f}%)"
            if r["eval_images_per_s"] is not None
            else ""
        )
        print(
            f"{name} {precision:9s} {variant:16s} train {r['train_images_per_s']:7.2f} img/s "
            f"({100 * r['train_fraction_of_peak']:3.0f}% of peak)  {evaluation}  "
            f"RSS {r['peak_rss_gb']:.2f} GB  (peak "
            + ", ".join(f"{d} {v:.0f}" for d, v in peak.items())
            + " GFLOP/s)",
            flush=True,
        )
    result = {
        "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__},
        "matmul_peak_gflops": peaks,
        "input_pipeline_images_per_s": pipeline,
        "results": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
