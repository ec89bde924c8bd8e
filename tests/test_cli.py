"""End to end through the command line: train a tiny run, then sample, evaluate, complete."""

import csv
import json
import os
import re
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
    result = invoke(
        "--log-dir", run_dir, "sample", "--num", 3, "--seed", 5, "--batch-size", 1, "--output", out
    )
    assert result.exit_code == 0, result.output
    images = np.load(out.with_suffix(".npz"))["images"]
    assert images.shape == (3, 28, 28, 1) and images.dtype.kind == "i"
    assert images.min() >= 0 and images.max() <= 255
    # a 2x2 grid of 28x28 images with 1-pixel borders (59 px), enlarged 8x to >= 448 px
    assert Image.open(out).size == (8 * (2 * 29 + 1),) * 2
    # the tests run with 2 logical CPU devices: the images above were drawn in batches of
    # one, two on the replicas and the third alone; one device drawing the same batches
    # gives the same integers
    again = tmp_path / "t.png"
    args = ("--num", 3, "--seed", 5, "--batch-size", 1, "--devices", "single", "--output", again)
    result = invoke("--log-dir", run_dir, "sample", *args)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(images, np.load(again.with_suffix(".npz"))["images"])


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


@pytest.mark.parametrize(
    "command", ["sample", "evaluate", "complete", "export OUT", "compress -o OUT.pcnn"]
)
def test_missing_run_dir_and_checkpoint_are_clear_errors(tmp_path, command):
    command = [str(tmp_path / a) if a.startswith("OUT") else a for a in command.split()]
    result = CliRunner().invoke(cli.main, ["--log-dir", str(tmp_path / "nope"), *command])
    assert result.exit_code != 0 and "does not exist" in result.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.json").write_text(
        json.dumps({"image_shape": [4, 4, 1], "filters": 4, "residual_layers_per_block": 0})
    )
    result = CliRunner().invoke(cli.main, ["--log-dir", str(tmp_path / "empty"), *command])
    assert result.exit_code != 0 and "no checkpoint" in result.output


@pytest.mark.parametrize("channels", [2])  # 28x28x1 runs in the shipped-config test
def test_the_mnist_config_trains_on_a_custom_dataset_of_any_shape(tmp_path, monkeypatch, channels):
    """The original README's flow: its MNIST config plus your own train.dataset_fn, with
    8x8 images of 2 channels and no image_shape binding: the data decides. Without
    --log-dir, the run goes to a new runs/<date-time> of the working directory."""
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
        "single",
    )
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}", run.name), run.name
    assert f"run directory: {Path('runs') / run.name} " in result.output
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


# ---------------------------------------------------------------------------- reuse
# Loads SavedModels in a process where pixelcnn cannot be imported, and writes what
# their signatures return.
LOAD_WITHOUT_PIXELCNN = """
import sys
sys.modules["pixelcnn"] = None  # `import pixelcnn` now fails
import json
import numpy as np
import tensorflow as tf
spec = json.loads(sys.argv[1])
out = {}
for name, job in spec.items():
    sig = tf.saved_model.load(job["path"]).signatures
    labels = {"labels": tf.constant(job["labels"], tf.int32)} if job["labels"] else {}
    for n in job["batches"]:  # several batch sizes through log_prob and params
        lab = {k: v[:n] for k, v in labels.items()}
        images = tf.constant(np.load(job["images"])[:n], tf.int32)
        out[f"{name}/log_prob/{n}"] = sig["log_prob"](images=images, **lab)["log_prob"].numpy().tolist()
        out[f"{name}/bpd/{n}"] = sig["log_prob"](images=images, **lab)["bits_per_dim"].numpy().tolist()
        out[f"{name}/params_shape/{n}"] = list(sig["params"](images=images, **lab)["params"].shape)
    drawn = sig["sample"](num_images=tf.constant(job["num"]), seed=tf.constant([0, 7]), **labels)
    out[f"{name}/sample"] = drawn["images"].numpy().tolist()
    if labels:
        try:
            sig["log_prob"](images=images, labels=tf.fill([int(images.shape[0])], 99))
            out[f"{name}/bad_label"] = "accepted"
        except tf.errors.InvalidArgumentError as e:
            out[f"{name}/bad_label"] = e.message
print("RESULT" + json.dumps(out))
"""


def test_export_loads_without_pixelcnn_and_matches_the_package(run_dir, tmp_path):
    import keras
    import tensorflow as tf

    from pixelcnn import PixelCNNPP, export, rundir
    from pixelcnn.inference import sampling
    from pixelcnn.likelihood import to_unit_range

    result = invoke("--log-dir", run_dir, "export", tmp_path / "exp", "--sample-batch-size", 2)
    assert result.exit_code == 0, result.output
    readme = (tmp_path / "exp" / "README.txt").read_text()
    assert "log_prob" in readme and "checkpoint:" in readme and "1/ is the SavedModel" in readme
    assert json.loads((tmp_path / "exp" / "model.json").read_text())["filters"] == 4
    model, _ = rundir.load_for_inference(run_dir)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1))
    np.save(tmp_path / "mnist.npy", images)

    # a class-conditional RGB model through the Python API
    keras.utils.set_random_seed(0)
    cond = PixelCNNPP(
        image_shape=(5, 4, 3),
        residual_blocks=2,
        residual_layers_per_block=0,
        filters=4,
        num_mixtures=2,
        dropout_rate=0.0,
        num_classes=3,
        num_bits=5,
    )
    rgb = np.random.default_rng(1).integers(0, 32, (5, 5, 4, 3))
    labels = [0, 2, 1, 1, 0]
    cond.initialize(to_unit_range(rgb, 5), tf.constant(labels))
    np.save(tmp_path / "rgb.npy", rgb)
    export(cond, tmp_path / "cond", sample_batch_size=2)

    spec = {
        "mnist": dict(
            path=str(tmp_path / "exp" / "1"),
            images=str(tmp_path / "mnist.npy"),
            labels=None,
            batches=[1, 5],
            num=3,
        ),
        "cond": dict(
            path=str(tmp_path / "cond" / "1"),
            images=str(tmp_path / "rgb.npy"),
            labels=labels,
            batches=[2, 5],
            num=5,
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PIXELCNN, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])

    for name, m, x, y in (("mnist", model, images, None), ("cond", cond, rgb, labels)):
        for n in spec[name]["batches"]:
            want = m.log_prob(x[:n], None if y is None else tf.constant(y[:n])).numpy()
            np.testing.assert_allclose(out[f"{name}/log_prob/{n}"], want, rtol=1e-5)
            assert out[f"{name}/params_shape/{n}"] == [n, *m.image_shape[:2], m.num_params]
        np.testing.assert_allclose(
            out[f"{name}/bpd/5"],
            -np.asarray(out[f"{name}/log_prob/5"]) / (x[0].size * np.log(2)),
            rtol=1e-6,
        )
        num = spec[name]["num"]
        drawn = sampling.sample_fast(m, num, labels=y, seed=(0, 7), batch_size=2).numpy()
        np.testing.assert_array_equal(out[f"{name}/sample"], drawn)
    assert "labels must lie in [0, 3)" in out["cond/bad_label"]


def test_export_refuses_an_occupied_folder(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    result = invoke("--log-dir", run_dir, "export", tmp_path / "taken")
    assert result.exit_code != 0 and "not an empty folder" in result.output
    assert (tmp_path / "taken" / "x").read_text() == "mine"


def test_compress_decompress_round_trip_and_bad_files(run_dir, tmp_path):
    from pixelcnn import data

    images = data.load_embedded_mnist()[0][:5]
    np.savez(tmp_path / "digits.npz", images=images)
    coded = tmp_path / "digits.pcnn"
    args = ("--npz", tmp_path / "digits.npz", "--num", 3, "--batch-size", 2, "-o", coded)
    result = invoke("--log-dir", run_dir, "compress", *args)
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output and "bits/dim coded" in result.output
    out = tmp_path / "back.npz"
    pngs = tmp_path / "png"
    result = invoke("--log-dir", run_dir, "decompress", coded, "-o", out, "--png-dir", pngs)
    assert result.exit_code == 0, result.output
    back = np.load(out)
    assert back["images"].dtype == np.uint8 and "labels" not in back
    np.testing.assert_array_equal(back["images"], images[:3])
    np.testing.assert_array_equal(np.asarray(Image.open(pngs / "2.png"))[..., None], images[2])

    damaged = tmp_path / "damaged.pcnn"
    damaged.write_bytes(coded.read_bytes()[:-7])
    result = CliRunner().invoke(
        cli.main,
        ["--log-dir", str(run_dir), "decompress", str(damaged), "-o", str(tmp_path / "d.npz")],
    )
    assert result.exit_code == 1 and "damaged" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "d.npz").exists()


def test_ood_writes_scores_metrics_and_roc_curves(run_dir, tmp_path):
    """The run's test split against two OOD sets (a .npz, a folder), with the run as its
    own background (the ratio is then 0 for every image)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", images=rng.integers(0, 256, (6, 28, 28, 1), np.uint8))
    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    out = tmp_path / "ood"
    args = ["--ood", f"noise={tmp_path / 'noise.npz'}", "--ood", f"flat={tmp_path / 'flat'}"]
    result = invoke(
        "--log-dir", run_dir, "ood", *args, "--background", run_dir, "--num", 8, "-o", out
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    assert {(r["ood_set"], r["score"]) for r in rows} == {
        (s, k) for s in ("noise", "flat") for k in ("nll", "likelihood_ratio", "complexity")
    }
    ratio = next(r for r in rows if r["score"] == "likelihood_ratio")
    assert ratio["auroc"] == 0.5  # every score 0: all tied
    scores = list(csv.DictReader((out / "scores.csv").open()))
    assert len(scores) == 8 + 6 + 4 and float(scores[0]["likelihood_ratio"]) == 0.0
    assert "| noise | nll |" in (out / "metrics.md").read_text()
    roc = np.asarray(Image.open(out / "roc.png"))
    assert roc.ndim == 3 and roc.shape[1] > 600  # two panels side by side

    np.savez(tmp_path / "small.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    result = CliRunner().invoke(
        cli.main,
        [
            "--log-dir",
            str(run_dir),
            "ood",
            "--ood",
            f"small={tmp_path / 'small.npz'}",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 1 and "small must have shape" in result.output


def test_a_whole_cycle_on_tensorflows_in_memory_filesystem(tmp_path):
    """train -> sample -> evaluate -> export with the data, the run directory and every
    output on ram:// (TensorFlow's in-memory filesystem, this process only): the code
    paths that serve gs:// buckets."""
    import io

    import tensorflow as tf

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, images=rng.integers(0, 256, (24, 6, 6, 1), np.uint8))
    with tf.io.gfile.GFile("ram://data/images.npz", "wb") as f:
        f.write(buffer.getvalue())
    run = "ram://runs/tiny"
    bindings = [
        "train.dataset_fn = @npz", "npz.path = 'ram://data/images.npz'",
        "npz.test_fraction = 0.25", "PixelCNNPP.image_shape = (6, 6, 1)",
    ]  # fmt: skip
    args = [a for b in bindings for a in ("--binding", b)]
    result = invoke("--config", TINY, *args, "--log-dir", run, "single")
    assert result.exit_code == 0, result.output
    listed = {n.rstrip("/") for n in tf.io.gfile.listdir(run)}
    assert {"config.gin", "model.json", "metrics.json", "checkpoints", "samples"} <= listed
    with tf.io.gfile.GFile(f"{run}/metrics.json") as f:
        metrics = json.load(f)

    result = invoke("--log-dir", run, "sample", "--num", 2, "--output", f"{run}/s.png")
    assert result.exit_code == 0, result.output
    with tf.io.gfile.GFile(f"{run}/s.npz", "rb") as f:
        assert np.load(io.BytesIO(f.read()))["images"].shape == (2, 6, 6, 1)

    result = invoke("--log-dir", run, "evaluate", "--npz", "ram://data/images.npz")
    assert result.exit_code == 0, result.output
    with tf.io.gfile.GFile(f"{run}/eval_custom.json") as f:
        assert json.load(f)["images"] == 24
    result = invoke("--log-dir", run, "evaluate")  # the run's own test split, from ram://
    assert result.exit_code == 0, result.output
    with tf.io.gfile.GFile(f"{run}/eval_test.json") as f:
        assert json.load(f)["bits_per_dim"] == pytest.approx(metrics["test_bits_per_dim"], rel=1e-4)

    result = invoke("--log-dir", run, "export", "ram://exported")
    assert result.exit_code == 0, result.output
    exported = {n.rstrip("/") for n in tf.io.gfile.listdir("ram://exported")}
    assert {"1", "model.json", "README.txt"} <= exported
    served = tf.saved_model.load("ram://exported/1")
    images = tf.constant(rng.integers(0, 256, (3, 6, 6, 1)), tf.int32)
    from pixelcnn import rundir

    model, _ = rundir.load_for_inference(run)
    np.testing.assert_allclose(
        served.signatures["log_prob"](images=images)["log_prob"].numpy(),
        model.log_prob(images).numpy(),
        rtol=1e-5,
    )
