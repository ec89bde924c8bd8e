"""End to end through the command line: train a tiny run, then sample, evaluate, complete."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pixelcnn import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "tiny.gin")


def invoke(*args):
    gin.clear_config()
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    gin.clear_config()
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    result = invoke("--config", TINY, "--log-dir", path, "single")
    assert result.exit_code == 0, result.output
    return path


def test_training_writes_a_complete_run_directory(run_dir):
    for name in ("config.gin", "operative_config.gin", "model.json", "metrics.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["test_bits_per_dim"] > 0
    grid = Image.open(metrics["samples"][0])
    assert grid.size[0] > 28


def test_sample_writes_png_and_integer_npz(run_dir, tmp_path):
    out = tmp_path / "s.png"
    result = invoke("--log-dir", run_dir, "sample", "--num", 3, "--seed", 5, "--output", out)
    assert result.exit_code == 0, result.output
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.shape == (3, 28, 28, 1) and images.dtype.kind == "i"
    assert images.min() >= 0 and images.max() <= 255
    # a 2x2 grid of 28x28 images with 1-pixel borders (59 px), enlarged 8x to >= 448 px
    assert Image.open(out).size == (8 * (2 * 29 + 1),) * 2
    # the tests run with 2 logical CPU devices: the images above were split over two
    # replicas; one device draws the same integers
    again = tmp_path / "t.png"
    result = invoke(
        "--log-dir",
        run_dir,
        "sample",
        "--num",
        3,
        "--seed",
        5,
        "--devices",
        "single",
        "--output",
        again,
    )
    assert result.exit_code == 0, result.output
    # The same images up to float rounding: per-replica batches of 2 and 1 against one
    # of 3 run different kernels, so a value within an ulp of a bin edge may round to
    # the neighbouring level (and condition the later pixels on it).
    same = images == np.load(again.with_suffix(".npz"))["images"]
    assert same.mean() > 0.99, same.mean()


def test_evaluate_matches_training_and_writes_per_image_csv(run_dir, tmp_path):
    scores = tmp_path / "scores.csv"
    result = invoke("--log-dir", run_dir, "evaluate", "--per-image", scores)
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval_test.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["images"] == 500
    assert report["bits_per_dim"] == pytest.approx(metrics["test_bits_per_dim"], rel=1e-4)
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == 500
    mean_bpd = np.mean([float(r["bits_per_dim"]) for r in rows])
    assert mean_bpd == pytest.approx(report["bits_per_dim"], rel=1e-5)
    # the tests run with 2 logical CPU devices, so the above split every batch over two
    # replicas; one device gives the same score for every image, in the same order
    single = tmp_path / "single.csv"
    result = invoke("--log-dir", run_dir, "evaluate", "--devices", "single", "--per-image", single)
    assert result.exit_code == 0, result.output
    one = [float(r["log_prob_nats"]) for r in csv.DictReader(single.open())]
    np.testing.assert_allclose(one, [float(r["log_prob_nats"]) for r in rows], rtol=1e-5)


def test_complete_keeps_the_known_rows(run_dir, tmp_path):
    out = tmp_path / "c.png"
    result = invoke(
        "--log-dir", run_dir, "complete", "--num", 2, "--keep-rows", 20, "--output", out
    )
    assert result.exit_code == 0, result.output
    blob = np.load(out.with_suffix(".npz"))
    assert blob["completions"].shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(blob["completions"][:, :20], blob["originals"][:, :20])
    assert blob["mask"][:20].all() and not blob["mask"][20:].any()


def bad_npz(path, kind):
    if kind == "no images key":
        np.savez(path, pixels=np.zeros((2, 28, 28, 1), np.uint8))
    elif kind == "float images":
        np.savez(path, images=np.zeros((2, 28, 28, 1), np.float32))
    else:  # not an .npz at all
        path.write_bytes(b"this is not a NumPy file")
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("no images key", "no key 'images'"),
        ("float images", "integer levels"),
        ("not npz", "is not an .npz file"),
    ],
)
def test_evaluate_bad_npz_is_one_clear_message(run_dir, tmp_path, kind, message):
    path = bad_npz(tmp_path / "x.npz", kind)
    result = CliRunner().invoke(
        cli.main, ["--log-dir", str(run_dir), "evaluate", "--npz", str(path)]
    )
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_complete_names_the_missing_dataset_module(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = copy / "config.gin"
    config.write_text("import my_missing_data_module\n" + config.read_text())
    result = CliRunner().invoke(cli.main, ["--log-dir", str(copy), "complete", "--num", "1"])
    gin.clear_config()
    assert result.exit_code == 1, result.output
    assert "my_missing_data_module" in result.output and "importable" in result.output
    assert "--npz" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["sample", "evaluate", "complete"])
def test_missing_run_dir_and_checkpoint_are_clear_errors(tmp_path, command):
    result = CliRunner().invoke(cli.main, ["--log-dir", str(tmp_path / "nope"), command])
    assert result.exit_code != 0 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.json").write_text(
        json.dumps({"image_shape": [4, 4, 1], "filters": 4, "residual_layers_per_block": 0})
    )
    result = CliRunner().invoke(cli.main, ["--log-dir", str(tmp_path / "empty"), command])
    assert result.exit_code != 0 and "no checkpoint" in result.output


@pytest.mark.parametrize("channels", [2])  # 28x28x1 runs in the shipped-config test
def test_the_mnist_config_trains_on_a_custom_dataset_of_any_shape(tmp_path, monkeypatch, channels):
    """The original README's flow: its MNIST config plus your own train.dataset_fn, with
    8x8 images of 2 channels and no image_shape binding: the data decides."""
    module = f"my_data_{channels}"
    (tmp_path / f"{module}.py").write_text(
        "import gin, numpy as np, tensorflow as tf\n"
        "@gin.configurable\n"
        "def dataset(batch_size):\n"
        f"    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, {channels}), np.uint8)\n"
        "    ds = tf.data.Dataset.from_tensor_slices(x)\n"
        "    return ds.batch(batch_size), ds.take(8).batch(batch_size)\n"
    )
    monkeypatch.chdir(tmp_path)  # a module in the working directory, as a user has it
    run = tmp_path / "run"
    result = invoke(
        "--config",
        ROOT / "experiments" / "mnist.gin",
        "--binding",
        f"import {module}",
        "--binding",
        f"train.dataset_fn = @{module}.dataset",
        *("--binding", "PixelCNNPP.filters = 4", "--binding", "train.max_steps = 1"),
        *("--binding", "PixelCNNPP.residual_layers_per_block = 1"),
        *("--binding", "train.images_to_log = 0", "--binding", "train.batch_size = 8"),
        "--log-dir",
        run,
        "single",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "model.json").read_text())["image_shape"] == [8, 8, channels]


def test_multigpu_trains_and_resumes_on_two_logical_cpus(tmp_path):
    """`--cpu-devices 2 multigpu` mirrors over two logical CPU devices, then resumes.

    A subprocess, as a user runs it: one MirroredStrategy per process (several in one
    process can confuse TensorFlow's collective ops on CPU).
    """
    base = [sys.executable, str(ROOT / "main.py"), "--cpu-devices", "2", "--config", TINY]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    first = subprocess.run(
        [*base, "--log-dir", str(tmp_path), "multigpu"], capture_output=True, text=True, env=env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 replica(s)" in first.stdout
    again = subprocess.run(
        [*base, "--binding", "train.max_steps = 3", "--log-dir", str(tmp_path), "multigpu"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3
