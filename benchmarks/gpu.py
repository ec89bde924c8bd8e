"""The GPU benchmark: one script for a short slot on a GPU machine.

    pip install -e ".[gpu,test]"
    python benchmarks/gpu.py OUT_DIR                 # on a GPU machine: 8 minutes at most
    python benchmarks/gpu.py OUT_DIR --cpu-smoke     # every part on the CPU, a tiny model

Parts, in priority order, each in its own process with its own time limit (a part that
runs out of time is recorded as such and the next one starts); OUT_DIR/results.json and
OUT_DIR/results.md are rewritten after every part, so a slot that ends early keeps
what finished:
  train-B1, train-B2: training and evaluation img/s of B1 and B2 (benchmarks/
    throughput.py's configurations) in float32, bfloat16 and float16, each without and
    with XLA (train.jit_compile), and the peak GPU memory of each row;
  sampling: the cached sampler (``sample_fast``) drawing 16 and 256 images against
    the naive one (a full forward pass per sub-pixel) drawing 16, B1's size;
  codec: a run's test images compressed in one process and decompressed in another
    (format 2: the exact entropy model, on the CPU), exactness, bits/dim and img/s;
  gpu-tests: ``pytest -m gpu`` (cached against naive sampling, the codec round trip,
    float16 training);
  export: the SavedModel export of the codec part's run and its ``sample`` signature.
Without a GPU (and without --cpu-smoke) it prints one line and exits 0. With
--cpu-smoke every part runs once, cut down: one training row per part, no 256-image
draw, and the gpu tests only collected (the suite runs them anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import CONFIGS  # noqa: E402

SMOKE_CONFIG = dict(
    image_shape=(8, 8, 1), filters=4, residual_layers_per_block=0, num_mixtures=2, batch=4
)
PRECISIONS = ("float32", "bfloat16", "float16")
# (part, seconds allowed on a GPU); the whole script keeps to BUDGET seconds
PARTS = [("train-B1", 150), ("sampling", 60), ("codec", 75), ("gpu-tests", 90),
         ("export", 45), ("train-B2", 150)]  # fmt: skip
BUDGET = 480


# ----------------------------------------------------------------------- the parts
def _device(smoke: bool) -> str:
    return "/cpu:0" if smoke else "/gpu:0"


def _model_config(name: str, smoke: bool) -> tuple[dict, int]:
    cfg = dict(SMOKE_CONFIG if smoke else CONFIGS[name])
    return cfg, cfg.pop("batch")


def _median_seconds(fn, calls: int) -> float:
    import numpy as np

    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_rows(name: str, smoke: bool) -> list[tuple[bool, str]]:
    """(XLA, precision) of the rows of a training part. The smoke run has one row per
    part, float16 on B1 and float32 with XLA on B2 (the same tiny model in both): each
    path of this script runs, and the suite's test of it stays short (the suite trains
    every precision and XLA in its own tests)."""
    if not smoke:
        return [(jit, p) for jit in (False, True) for p in PRECISIONS]
    return [(False, "float16")] if name == "B1" else [(True, "float32")]


def part_train(name: str, smoke: bool, out: Path) -> dict:
    """Training and evaluation img/s in every precision, without and with XLA."""
    import numpy as np
    import tensorflow as tf

    from pixelcnn.model import PixelCNNPP
    from pixelcnn.training.trainer import Trainer, TrainerOptions

    cfg, batch = _model_config(name, smoke)
    blocks = 2 if smoke else 3
    strategy = tf.distribute.OneDeviceStrategy(_device(smoke))
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.integers(0, 256, (batch, *cfg["image_shape"])) * (2 / 255) - 1, tf.float32
    )
    batch_dict, rows = {"images": images}, []
    for jit, precision in train_rows(name, smoke):
        if not smoke:
            tf.config.experimental.reset_memory_stats("GPU:0")

        def model_fn(dtype):
            return PixelCNNPP(residual_blocks=blocks, dropout_rate=0.5, dtype=dtype, **cfg)

        options = TrainerOptions(precision=precision, jit_compile=jit)
        trainer = Trainer(strategy, model_fn, options)
        trainer.initialize(images)
        began = time.perf_counter()
        float(trainer.train_step(batch_dict)[0])  # trace, compile
        float(trainer.eval_steps["ema"](batch_dict)[0])
        compile_s = time.perf_counter() - began
        steps = 2 if smoke else 10
        train_s = _median_seconds(lambda t=trainer: float(t.train_step(batch_dict)[0]), steps)
        eval_s = _median_seconds(lambda t=trainer: float(t.eval_steps["ema"](batch_dict)[0]), steps)
        peak = None if smoke else tf.config.experimental.get_memory_info("GPU:0")["peak"]
        rows.append({
            "config": name, "precision": precision, "xla": jit, "batch": batch,
            "train_images_per_s": round(batch / train_s, 2),
            "eval_images_per_s": round(batch / eval_s, 2),
            "first_step_and_eval_s": round(compile_s, 1),
            "peak_gpu_memory_gb": None if peak is None else round(peak / 2**30, 2),
        })  # fmt: skip
        _partial(out, rows)
    return {"rows": rows}


def part_sampling(smoke: bool, out: Path) -> dict:
    """Cached sampling of 16 and 256 images against the naive sampler's 16."""
    import tensorflow as tf

    from pixelcnn.inference import sampling
    from pixelcnn.model import PixelCNNPP

    cfg, _ = _model_config("B1", smoke)
    with tf.device(_device(smoke)):
        model = PixelCNNPP(residual_blocks=2 if smoke else 3, dropout_rate=0.0, **cfg)
        model.initialize(tf.random.uniform([4, *cfg["image_shape"]], -1, 1, seed=0))
        rows = []
        draws = (
            [("fast", 16), ("naive", 16)] if smoke else [("fast", 16), ("fast", 256), ("naive", 16)]
        )
        for sampler, n in draws:
            fn = sampling.sample_fast if sampler == "fast" else sampling.sample_naive

            def draw(seed, fn=fn, n=n):
                return fn(model, n, seed=seed, batch_size=n).numpy()

            began = time.perf_counter()
            draw((0, 0))  # with its compile
            first = time.perf_counter() - began
            seconds = _median_seconds(
                lambda draw=draw: draw((0, 1)), 1 if sampler == "naive" else 2
            )
            rows.append({"sampler": sampler, "images": n, "first_call_s": round(first, 2),
                         "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2)})  # fmt: skip
            _partial(out, rows)
    return {"rows": rows, "image_shape": list(cfg["image_shape"])}


def _cli(*args, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=True)  # fmt: skip


def _run_for(smoke: bool, work: Path) -> tuple[Path, Path]:
    """(run, images.npz): a 2-step training run at B1's size (padded digits; for the
    smoke run experiments/tiny.gin as it is) for the codec and export parts, and 32 of
    its digits; made once."""
    import numpy as np

    from pixelcnn import data

    run, images = work / "run", work / "images.npz"
    metrics = run / "metrics.json"  # written at every evaluation: "stopped" says it ended
    if metrics.exists() and json.loads(metrics.read_text())["stopped"] not in (None, "interrupted"):
        return run, images
    work.mkdir(parents=True, exist_ok=True)
    bindings = ["train.max_steps = 2", "train.images_to_log = 0", "embedded_mnist.test_size = 64"]
    pad = None
    if not smoke:
        cfg, batch = _model_config("B1", smoke)
        pad = cfg["image_shape"][0]
        bindings += [
            f"train.batch_size = {batch}", f"embedded_mnist.pad_to = {pad}",
            f"PixelCNNPP.image_shape = {tuple(cfg['image_shape'])}", "PixelCNNPP.residual_blocks = 3",
            f"PixelCNNPP.filters = {cfg['filters']}", f"PixelCNNPP.num_mixtures = {cfg['num_mixtures']}",
            f"PixelCNNPP.residual_layers_per_block = {cfg['residual_layers_per_block']}",
        ]  # fmt: skip
    digits = data.pad_images(data.load_embedded_mnist()[0][:32], pad)
    np.savez(images, images=digits)
    args = [a for b in bindings for a in ("--binding", b)]
    _cli(
        "--config",
        ROOT / "experiments" / "tiny.gin",
        *args,
        "--log-dir",
        run,
        "single",
        timeout=600,
    )
    return run, images


def part_codec(smoke: bool, out: Path) -> dict:
    """compress in one process, decompress in another: exact? bits/dim, img/s."""
    import numpy as np

    run, images = _run_for(smoke, out / "work")
    coded, decoded = out / "work" / "digits.pcnn", out / "work" / "decoded.npz"
    encode = _cli("--log-dir", run, "compress", "--npz", images, "-o", coded, timeout=300)
    decode = _cli("--log-dir", run, "decompress", coded, "-o", decoded, timeout=300)
    original, ours = np.load(images)["images"], np.load(decoded)["images"]
    return {
        "images": int(len(ours)),
        "file_bytes": coded.stat().st_size,
        "exact": bool(np.array_equal(original, ours)),
        "compress": encode.stdout.strip().splitlines()[-1],
        "decompress": decode.stdout.strip().splitlines()[-1],
    }


def part_export(smoke: bool, out: Path) -> dict:
    """The SavedModel of the codec part's run and its ``sample`` signature."""
    import tensorflow as tf

    run, _ = _run_for(smoke, out / "work")
    began = time.perf_counter()
    _cli("--log-dir", run, "export", out / "work" / "export", timeout=300)
    export_s = time.perf_counter() - began
    served = tf.saved_model.load(str(out / "work" / "export" / "1"))
    sample = served.signatures["sample"]
    began = time.perf_counter()
    n = 16
    first = sample(num_images=tf.constant(n), seed=tf.constant([0, 0]))
    first_s = time.perf_counter() - began
    assert next(iter(first.values())).shape[0] == n
    seconds = _median_seconds(
        lambda: sample(num_images=tf.constant(n), seed=tf.constant([0, 1])), 2
    )
    return {"export_s": round(export_s, 1), "sample_first_call_s": round(first_s, 2),
            "sample_images": n, "sample_images_per_s": round(n / seconds, 2)}  # fmt: skip


def part_gpu_tests(smoke: bool, out: Path) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-n0", "-m", "gpu", "-p", "no:cacheprovider"]
    if smoke:
        command.append("--collect-only")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    return {"command": " ".join(command[1:]), "exit_code": done.returncode,
            "summary": lines[-1] if lines else done.stderr[-500:]}  # fmt: skip


def run_part(name: str, smoke: bool, out: Path) -> dict:
    if name.startswith("train-"):
        return part_train(name.split("-")[1], smoke, out)
    return {"sampling": part_sampling, "codec": part_codec, "export": part_export,
            "gpu-tests": part_gpu_tests}[name](smoke, out)  # fmt: skip


# ----------------------------------------------------------------------- the driver
def _partial(out: Path, rows: list) -> None:
    """A part's rows so far, for the driver to keep when the part runs out of time."""
    (out / "partial.json").write_text(json.dumps(rows))


def markdown(results: dict) -> str:
    lines = [f"# GPU benchmark ({results['device']}, {results['started']})", ""]
    for name, part in results["parts"].items():
        lines += [f"## {name}: {part['status']} in {part['seconds']} s", ""]
        rows = part.get("rows") or []
        if rows:
            keys = list(rows[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
        rest = {k: v for k, v in part.items() if k not in ("rows", "status", "seconds")}
        lines += [f"- {k}: {v}" for k, v in rest.items()]
        lines.append("")
    return "\n".join(lines)


def device_name(smoke: bool) -> str | None:
    """The GPU's name, "cpu (smoke)" for the smoke run, None without a GPU."""
    if smoke:
        return "cpu (smoke)"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} x {details.get('device_name', 'GPU')} (compute capability {details.get('compute_capability')})"  # noqa: E501


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part on the CPU, tiny")
    parser.add_argument("--parts", default=",".join(p for p, _ in PARTS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out_dir)
    if args.child:
        result = run_part(args.child, args.cpu_smoke, out)
        (out / f"{args.child}.json").write_text(json.dumps(result))
        return 0
    device = device_name(args.cpu_smoke)
    if device is None:
        print(
            "benchmarks/gpu.py: no GPU visible to TensorFlow, nothing measured (--cpu-smoke runs every part on the CPU)"
        )  # noqa: E501
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    began = time.monotonic()
    for name, limit in PARTS:
        if name not in args.parts.split(","):
            continue
        left = BUDGET - (time.monotonic() - began)
        if left < 10:
            results["parts"][name] = {
                "status": "skipped: the 8-minute budget is spent",
                "seconds": 0,
            }
            continue
        timeout = 600 if args.cpu_smoke else min(limit, left)
        (out / "partial.json").unlink(missing_ok=True)
        start = time.monotonic()
        command = [sys.executable, __file__, str(out), "--child", name]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                part = {"status": "ok"} | json.loads((out / f"{name}.json").read_text())
            else:
                part = {"status": "failed", "error": done.stderr.strip()[-1500:]}
        except subprocess.TimeoutExpired:
            part = {"status": f"out of time ({timeout:.0f} s)"}
        if part["status"] != "ok" and (out / "partial.json").exists():
            part["rows"] = json.loads((out / "partial.json").read_text())
        part["seconds"] = round(time.monotonic() - start, 1)
        results["parts"][name] = part
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(markdown(results))
        print(f"{name}: {part['status']} ({part['seconds']} s)", flush=True)
    (out / "partial.json").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
