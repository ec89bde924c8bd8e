"""benchmarks/gpu.py, the script for a GPU slot, runs every part (on the CPU, tiny)."""

import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run(*args, timeout):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, SCRIPT, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_gpu_benchmark_runs_every_part_on_the_cpu(tmp_path):
    bare = run(tmp_path / "none", timeout=300)
    assert bare.returncode == 0 and "no GPU" in bare.stdout  # one line, nothing written
    assert not (tmp_path / "none").exists()
    done = run(tmp_path / "out", "--cpu-smoke", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "out" / "results.json").read_text())["parts"]
    assert list(parts) == ["train-B1", "sampling", "codec", "gpu-tests", "export", "train-B2"]
    assert not {k: v for k, v in parts.items() if v["status"] != "ok"}
    # the smoke run: float16 on B1, XLA on B2
    rows = {
        name: [(r["precision"], r["xla"]) for r in parts[name]["rows"]]
        for name in parts
        if name.startswith("train")
    }
    assert rows == {"train-B1": [("float16", False)], "train-B2": [("float32", True)]}
    for name in rows:
        assert all(r["train_images_per_s"] > 0 for r in parts[name]["rows"])
        assert all(r["eval_images_per_s"] > 0 for r in parts[name]["rows"])
    assert [r["sampler"] for r in parts["sampling"]["rows"]] == ["fast", "naive"]
    assert parts["codec"]["exact"] is True and parts["codec"]["images"] == 32
    assert parts["gpu-tests"]["exit_code"] == 0
    assert "tests collected" in parts["gpu-tests"]["summary"]
    assert parts["export"]["sample_images_per_s"] > 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| config | precision | xla |" in table
