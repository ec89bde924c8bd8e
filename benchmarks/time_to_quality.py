"""Time to quality: a training recipe's test bits/dim against images seen and wall time.

    python benchmarks/time_to_quality.py [--config experiments/mnist_30min.gin]

Runs ``python main.py --config CONFIG --log-dir DIR single`` as a user would (one
process, compile and evaluations included in the wall clock), measures the machine's
float32 and bfloat16 matmul peak just before and just after it (this machine's speed
drifts by 2x between days), then reads the run's ``metrics.json``: every evaluation's
step, images seen, seconds since the command started, EMA and raw test bits/dim and
the seconds of each pass, and the share of the command spent evaluating.
Writes benchmarks/results/time_to_quality.json and prints the curve. Run it on a quiet
machine: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import matmul_peak  # noqa: E402


def peaks() -> dict:
    return {d: round(matmul_peak(d, windows=5), 1) for d in ("float32", "bfloat16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "mnist_30min.gin"))
    parser.add_argument("--log-dir", default=None, help="default: runs/ttq-<time>")
    parser.add_argument("--binding", action="append", default=[])
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/time_to_quality.json"))
    args = parser.parse_args()
    log_dir = Path(args.log_dir or ROOT / "runs" / time.strftime("ttq-%Y%m%d-%H%M%S"))
    if log_dir.exists():
        raise SystemExit(f"{log_dir} exists: the benchmark needs a fresh run directory")

    before = peaks()
    print(f"matmul peak before: {before} GFLOP/s", flush=True)
    command = [sys.executable, str(ROOT / "main.py"), "--config", args.config]
    for b in args.binding:
        command += ["--binding", b]
    command += ["--log-dir", str(log_dir), "single"]
    began = time.monotonic()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.monotonic() - began
    after = peaks()
    print(f"matmul peak after: {after} GFLOP/s")

    metrics = json.loads((log_dir / "metrics.json").read_text())
    evaluations = metrics["evaluations"]
    eval_seconds = sum(v for e in evaluations for k, v in e.items() if k.startswith("eval_seconds"))
    result = {
        "config": str(Path(args.config).resolve().relative_to(ROOT)),
        "bindings": args.binding,
        "command_seconds": round(wall, 1),
        "evaluation_seconds": round(eval_seconds, 1),
        "matmul_peak_gflops_before": before,
        "matmul_peak_gflops_after": after,
        "stopped": metrics["stopped"],
        "evaluations": evaluations,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    def cell(e, key, form):
        return format(e[key], form) if key in e else "-"

    print(
        f"\n{'minutes':>8} {'step':>6} {'images':>7} {'EMA bpd':>8} {'raw bpd':>8} {'EMA s':>6} {'raw s':>6}"
    )
    for e in evaluations:
        print(
            f"{e['seconds'] / 60:8.1f} {e['step']:6d} {e['images']:7d} "
            f"{cell(e, 'test_bits_per_dim_ema', '8.4f'):>8} {cell(e, 'test_bits_per_dim_raw', '8.4f'):>8} "
            f"{cell(e, 'eval_seconds_ema', '6.1f'):>6} {cell(e, 'eval_seconds_raw', '6.1f'):>6}"
        )
    print(
        f"command {wall / 60:.2f} min, evaluating {eval_seconds:.0f} s "
        f"({100 * eval_seconds / wall:.1f}% of it)"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
