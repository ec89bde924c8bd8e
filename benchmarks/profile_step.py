"""Where a training or evaluation step spends its time outside the convolutions.

    python benchmarks/profile_step.py                       # B1, float32 and bfloat16
    python benchmarks/profile_step.py --config B2 --steps 3 --precisions float32

Traces a few of the steps ``train`` runs (``Trainer.train_step`` and the EMA evaluation
step, on synthetic data in memory) with TensorFlow's profiler, reads the trace it writes
(the XSpace protobuf the trace viewer reads) and sums the time of every TensorFlow op
executed on the CPU by op type. Op time is summed over threads (two ops can run at
once), so shares are of the total op time, not of wall time. The convolutions (forward
and both gradients, oneDNN's fused variants and the 1x1 einsums included) are one
group; every other op type gets its share, largest first, and grouped by what in the network runs them (``GROUPS``). Results: stdout and
benchmarks/results/profile_<config>.json; the raw traces stay in --trace-dir for
TensorBoard's profile plugin (``--from-traces`` re-reads them without a run).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from throughput import CONFIGS  # noqa: E402

from pixelcnn.model import PixelCNNPP  # noqa: E402
from pixelcnn.training.trainer import Trainer, TrainerOptions  # noqa: E402


def is_convolution(op_type: str) -> bool:
    """A convolution or one of its gradients, under oneDNN's names too (_MklNative...,
    ...PadWithFusedConv2D: the causal pad and the bias fused in); Einsum is the 1x1
    "nin" convolutions (``WeightNormConv2D.linear_map``) and their gradients."""
    return "Conv2D" in op_type or op_type.endswith("Einsum")


def op_times(trace_dir: str) -> dict:
    """{op type: summed seconds} of the TensorFlow ops in the trace under trace_dir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"no trace written under {trace_dir}")
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                op_type = _op_type(plane.event_metadata[event.metadata_id])
                if op_type is not None:
                    totals[op_type] += event.duration_ps * 1e-12
    return dict(totals)


def _op_type(meta) -> str | None:
    """The op type of a TensorFlow op's event (its name is "node name:OpType"), else
    None (executor and thread-pool bookkeeping, function calls, allocations)."""
    name = meta.name
    if "::" in name or ":" not in name:
        return None
    op_type = name.rsplit(":", 1)[1]
    return op_type if op_type and op_type.isidentifier() else None


# The op types outside the convolutions by what in the network runs them; the rest is
# "everything else" (Adam, the likelihood, pads, reads).
GROUPS = {
    "Elu, EluGrad (concat_elu)": ("Elu", "EluGrad"),
    "ConcatV2, Neg (concat_elu's [x, -x])": ("ConcatV2", "Neg"),
    "Slice (crops, the pads' gradients)": ("Slice",),
    "dropout (random bits, compare, select)": (
        "StatelessRandomUniformFullIntV2",
        "GreaterEqual",
        "SelectV2",
        "Bitcast",
    ),
    "Cast (mixed precision, the float32 Elu)": ("Cast",),
    "the gate and sums (Split, Sigmoid, SigmoidGrad, Mul, AddN, AddV2)": (
        "Split",
        "Sigmoid",
        "SigmoidGrad",
        "Mul",
        "AddN",
        "AddV2",
    ),
}


def table(totals: dict, top: int) -> dict:
    """Shares of the total op time: the convolutions, then every other op type."""
    total = sum(totals.values())
    conv = sum(s for t, s in totals.items() if is_convolution(t))
    others = sorted(((s, t) for t, s in totals.items() if not is_convolution(t)), reverse=True)
    rows = [{"op": t, "seconds": s, "share": s / total} for s, t in others[:top]]
    rest = sum(s for s, _ in others[top:])
    grouped = {g: sum(totals.get(t, 0.0) for t in types) / total for g, types in GROUPS.items()}
    members = {t for types in GROUPS.values() for t in types}
    grouped["everything else"] = (
        sum(s for t, s in totals.items() if not is_convolution(t) and t not in members) / total
    )
    return {
        "groups": grouped,
        "total_op_seconds": total,
        "convolutions_share": conv / total,
        "outside_share": 1 - conv / total,
        "outside": rows,
        "rest_share": rest / total,
        "conv_types": sorted(t for t in totals if is_convolution(t)),
    }


def profile(config: str, precision: str, steps: int, trace_root: str, top: int) -> dict:
    arch = dict(CONFIGS[config])
    batch = arch.pop("batch")
    rng = np.random.default_rng(0)
    v = rng.integers(0, 256, (batch, *arch["image_shape"]))
    images = tf.constant(2.0 * v / 255.0 - 1.0, tf.float32)

    def model_fn(dtype):
        return PixelCNNPP(**arch, dropout_rate=0.5, dtype=dtype)

    trainer = Trainer(
        tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn, TrainerOptions(precision=precision)
    )
    trainer.initialize(images)
    result = {"config": config, "precision": precision, "batch": batch, "steps": steps}
    for mode, step in (("train", trainer.train_step), ("eval", trainer.eval_steps["ema"])):
        for _ in range(2):  # trace and warm up
            float(tf.nest.flatten(step({"images": images}))[0])
        trace_dir = os.path.join(trace_root, f"{config}_{precision}_{mode}")
        # level 3: an event per executed op (the default records only the functions)
        options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=3)
        tf.profiler.experimental.start(trace_dir, options=options)
        start = time.perf_counter()
        for _ in range(steps):
            float(tf.nest.flatten(step({"images": images}))[0])
        wall = (time.perf_counter() - start) / steps
        tf.profiler.experimental.stop()
        result[mode] = {"wall_seconds_per_step": wall, **table(op_times(trace_dir), top)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="B1", choices=sorted(CONFIGS))
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top", type=int, default=12, help="op types listed outside the convs")
    parser.add_argument("--trace-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--from-traces", action="store_true", help="re-read the traces in --trace-dir, no run"
    )
    args = parser.parse_args()
    trace_root = args.trace_dir or tempfile.mkdtemp(prefix="pixelcnn_profile_")
    out = Path(args.output or Path(__file__).parent / "results" / f"profile_{args.config}.json")
    results = []
    for precision in args.precisions.split(","):
        if args.from_traces:
            r = {"config": args.config, "precision": precision}
            for mode in ("train", "eval"):
                path = os.path.join(trace_root, f"{args.config}_{precision}_{mode}")
                r[mode] = {"wall_seconds_per_step": None, **table(op_times(path), args.top)}
        else:
            r = profile(args.config, precision, args.steps, trace_root, args.top)
        results.append(r)
        for mode in ("train", "eval"):
            m = r[mode]
            wall = m["wall_seconds_per_step"]
            print(
                f"{args.config} {precision} {mode}: "
                + (f"{wall * 1e3:.0f} ms/step (traced); " if wall is not None else "")
                + f"convolutions {100 * m['convolutions_share']:.1f}% of op time, "
                f"the rest {100 * m['outside_share']:.1f}%"
            )
            for row in m["outside"]:
                print(f"    {row['op']:36s} {100 * row['share']:5.1f}%")
            print(f"    {'(other op types)':36s} {100 * m['rest_share']:5.1f}%")
            print("  by group:")
            for group, share in m["groups"].items():
                print(f"    {group:68s} {100 * share:5.1f}%")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": _cpu(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}; traces in {trace_root}")


def _cpu() -> str:
    from speed_ab import _cpu_name

    return _cpu_name()


if __name__ == "__main__":
    main()
