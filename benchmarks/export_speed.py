"""The SavedModel export of a run: size on disk, load time and signature call times.

    python benchmarks/export_speed.py --log-dir RUN

Exports RUN (EMA weights) to a temporary folder, then, in a fresh Python process in
which `import pixelcnn` fails, loads it with tf.saved_model.load and times each
signature: the first call (it includes XLA compilation for `sample`) and the median of
5 later calls, for log_prob / params on 64 images and sample of 16 images. Prints the
float32 matmul peak measured in the same run. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import matmul_peak  # noqa: E402

CLIENT = """
import sys, time, json
sys.modules["pixelcnn"] = None
import numpy as np, tensorflow as tf
start = time.perf_counter()
m = tf.saved_model.load(sys.argv[1])
out = {"load_s": time.perf_counter() - start}
shape = json.loads(sys.argv[2])
images = tf.constant(np.random.default_rng(0).integers(0, 256, (64, *shape)), tf.int32)
calls = {
    "log_prob_64": lambda: m.signatures["log_prob"](images=images),
    "params_64": lambda: m.signatures["params"](images=images),
    "sample_16": lambda: m.signatures["sample"](num_images=tf.constant(16), seed=tf.constant([0, 1])),
}
for name, call in calls.items():
    start = time.perf_counter(); call(); first = time.perf_counter() - start
    times = []
    for _ in range(5):
        start = time.perf_counter(); call(); times.append(time.perf_counter() - start)
    out[name] = {"first_s": first, "median_s": float(np.median(times))}
print("RESULT" + json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", required=True)
    args = parser.parse_args()
    from pixelcnn import export, load_for_inference

    peak = matmul_peak("float32", windows=5)
    model, _ = load_for_inference(args.log_dir)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export(args.log_dir, Path(tmp) / "exported")
        export_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        proc = subprocess.run(
            [sys.executable, "-c", CLIENT, str(path), json.dumps(list(model.image_shape))],
            capture_output=True,
            text=True,
            check=True,
        )
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    print(f"matmul peak float32: {peak:.0f} GFLOP/s")
    print(f"export: {export_s:.1f} s, SavedModel {size / 1e6:.2f} MB")
    print(f"load (fresh process, no pixelcnn): {result.pop('load_s'):.2f} s")
    for name, r in result.items():
        print(f"{name}: first call {r['first_s']:.2f} s, then {1e3 * r['median_s']:.0f} ms")


if __name__ == "__main__":
    main()
