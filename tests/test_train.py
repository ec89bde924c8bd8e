"""Training: strategies agree, resume, configs, clear errors, signals, summaries."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import gin
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    ROOT,
    SHAPE,
    TINY,
    array_dataset_fn,
    bind_tiny,
    free_ports,
    initial_weights,
    make_batches,
    make_trainer,
    run_steps,
    set_weights,
    summary_values,
    worker_env,
)

from pixelcnn import likelihood, rundir
from pixelcnn.files import make_grid
from pixelcnn.inference import codec
from pixelcnn.model import PixelCNNPP
from pixelcnn.training import faults
from pixelcnn.training import train as training
from pixelcnn.training.saver import Saver
from pixelcnn.training.trainer import Trainer, TrainerOptions


def test_mirrored_matches_one_device_and_partial_batches_are_means():
    """2 full global batches then a partial one of 4 images (split over 2 replicas),
    the gradient clipped by its global norm: the whole batch's, not each replica's."""
    images, weights = make_batches(n_batches=3)[:20], initial_weights()
    clip = 1.0  # well below this model's gradient norms, so every step is clipped
    results = {}
    for name, strategy in [
        ("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    ]:
        trainer = make_trainer(strategy, clip_norm=clip)
        set_weights(trainer, weights)
        if name == "one":  # what the optimizer is given
            norms = _record_gradient_norms(trainer)
        losses = run_steps(trainer, images[:16])
        # the loss of the partial batch is the mean NLL of its 4 images
        last = tf.constant(images[16:], tf.int32)
        expected = -float(tf.reduce_mean(trainer.model.log_prob(last)))
        losses += run_steps(trainer, images[16:])
        assert losses[2] == pytest.approx(expected, rel=1e-5)
        results[name] = (losses, [v.numpy() for v in trainer.model.trainable_variables])
        # full and partial batches ran one graph, traced once
        assert trainer.train_step.experimental_get_tracing_count() == 1
    assert norms == pytest.approx([clip] * 3, rel=1e-5)
    assert len(results["one"][0]) == 3
    np.testing.assert_allclose(results["one"][0], results["mirrored"][0], rtol=1e-5)
    assert results["one"][0][1] != results["one"][0][0]  # the step changed the weights
    for a, b in zip(results["one"][1], results["mirrored"][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _record_gradient_norms(trainer) -> list:
    """Wraps a one-device trainer's optimizer (before its step is traced) so that the
    global norm of every gradient it applies is appended to the returned list."""
    norms, apply = [], trainer.optimizer.apply_gradients

    def recording(grads_and_vars):
        grads_and_vars = list(grads_and_vars)
        norm = tf.linalg.global_norm([g for g, _ in grads_and_vars])
        tf.py_function(lambda n: norms.append(float(n)) or 0, [norm], tf.int32)
        return apply(grads_and_vars)

    trainer.optimizer.apply_gradients = recording
    return norms


def test_learning_rate_warms_up_then_decays():
    from pixelcnn.training.trainer import LearningRate

    steps = np.arange(0, 40)
    expected = 2e-3 * 0.99**steps * np.minimum(1.0, (steps + 1) / 10)
    got = [float(LearningRate(2e-3, 0.99, warmup_steps=10)(s)) for s in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = [float(LearningRate(2e-3, 0.99)(s)) for s in steps]
    np.testing.assert_allclose(plain, 2e-3 * 0.99**steps, rtol=1e-5)


def test_training_step_stays_finite_where_log_scales_are_large():
    """A network whose output log scales reach 13 (a wide logistic, e.g. after an
    overshoot at a high learning rate) trains on: finite loss, gradients and weights.
    The likelihood's gradient was NaN there, which stopped such runs."""
    trainer = make_trainer(tf.distribute.OneDeviceStrategy("/cpu:0"))
    set_weights(trainer, initial_weights())
    out = trainer.model.out_nin
    k = TINY["num_mixtures"]
    bias = np.zeros(out.b.shape, np.float32)
    bias[2 * k : 3 * k] = 13.0  # the log scales of the one channel
    out.b.assign(bias)
    out.g.assign(np.full(out.g.shape, 1e-3, np.float32))
    losses = run_steps(trainer, make_batches(n_batches=2))
    assert np.all(np.isfinite(losses)), losses
    for v in trainer.model.trainable_variables:
        assert np.all(np.isfinite(v.numpy())), v.path


WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, {tests!r})
    import helpers as t
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    blob = np.load({blob!r}, allow_pickle=True)
    images, weights = blob["images"], list(blob["weights"])
    trainer = t.make_trainer(strategy)
    t.set_weights(trainer, weights)
    index = int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])

    def dataset_fn(ctx):
        # each worker reads its own half of every global batch of 8
        ds = tf.data.Dataset.from_tensor_slices(images).batch(8)
        ds = ds.map(lambda x: x[ctx.input_pipeline_id * 4:(ctx.input_pipeline_id + 1) * 4])
        return ds.map(lambda x: {{"images": tf.cast(x, tf.float32) * (2 / 255) - 1}})

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    trainer.trace_for(train_spec=dist.element_spec)  # as train() does
    losses = [float(trainer.train_step(b)[0]) for b in dist]
    print("LOSSES", json.dumps(losses))
    """
)


def test_multiworker_matches_one_device(tmp_path):
    images, weights = make_batches(), initial_weights()
    blob = tmp_path / "blob.npz"
    np.savez(blob, images=images, weights=np.array(weights, dtype=object))
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), blob=str(blob)))
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=worker_env(workers, i),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    losses = [json.loads(out.split("LOSSES")[-1].strip().splitlines()[0]) for out in outputs]

    trainer = make_trainer(tf.distribute.OneDeviceStrategy("/cpu:0"))
    set_weights(trainer, weights)
    expected = run_steps(trainer, images)
    for worker_losses in losses:
        np.testing.assert_allclose(worker_losses, expected, rtol=1e-5)


# ---------------------------------------------------------------------------- train()
def test_resume_continues_the_same_curve(tmp_path, clean_gin):
    """Bit-exact resume with dropout, a background model's perturbed images and its
    weight penalty (every draw is a function of seed, step or epoch and batch)."""
    images = make_batches(n_batches=4)
    background = ["train.mutation_rate = 0.2", "train.l2_weight = 0.001"]
    bind_tiny(["PixelCNNPP.dropout_rate = 0.3", *background])  # the masks must continue too
    fn = array_dataset_fn(images)
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    straight = training.train(
        tmp_path / "a", one, dataset_fn=fn, batch_size=8, max_steps=4, max_epoch=1, progress=False
    )
    training.train(
        tmp_path / "b", one, dataset_fn=fn, batch_size=8, max_steps=2, max_epoch=1, progress=False
    )
    resumed = training.train(
        tmp_path / "b", one, dataset_fn=fn, batch_size=8, max_steps=4, max_epoch=1, progress=False
    )
    assert straight["step"] == resumed["step"] == 4
    # images seen count the steps before the resume too
    assert straight["evaluations"][-1]["images"] == resumed["evaluations"][-1]["images"] == 32
    a, _ = rundir.load_for_inference(tmp_path / "a")
    b, _ = rundir.load_for_inference(tmp_path / "b")
    # Same data order (skip to the stopped step), same restored optimizer and EMA state,
    # the same dropout masks (a function of seed, step and replica), same deterministic
    # CPU kernels: bit-exact.
    for x, y in zip(a.trainable_variables, b.trainable_variables, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert straight["test_bits_per_dim"] == resumed["test_bits_per_dim"]
    # the run directory alone rebuilds the model
    assert json.loads((tmp_path / "b" / "model.json").read_text())["filters"] == 8
    config = (tmp_path / "b" / "operative_config.gin").read_text()
    assert "PixelCNNPP.filters = 8" in config
    assert "train.mutation_rate = 0.2" in config and "train.l2_weight = 0.001" in config
    # evaluations score the test images as they are: only training images are perturbed
    clean = likelihood.bits_per_dim(b.log_prob(images[:8]).numpy().mean(), SHAPE)
    assert resumed["test_bits_per_dim"] == pytest.approx(float(clean), rel=1e-5)


def digits_8x8(n):
    """n MNIST digits of the embedded subset at 8x8: every third pixel of the centre."""
    from pixelcnn import data

    images, _ = data.load_embedded_mnist()
    return images[:n, 2:26:3, 2:26:3]


def test_a_checkpoint_of_the_old_layout_loads(tmp_path):
    """tests/data/legacy_run was saved by the code before the per-resolution levels
    (every layer an attribute of the model, commit 95eb8d9): inference and resuming
    read it whole, with the same log-probs, Adam slots and codec fingerprint."""
    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "data" / "legacy_run", run)
    expected = np.load(run / "expected.npz")
    images, labels = expected["images"], expected["labels"]

    model, _ = rundir.load_for_inference(run)
    np.testing.assert_allclose(model.log_prob(images, labels), expected["log_prob_ema"], rtol=1e-6)
    # compressed files name their weights by this fingerprint (variable paths included)
    assert codec.weights_fingerprint(model) == str(expected["ema_fingerprint"])

    config = rundir.model_config(run).to_json()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    options = TrainerOptions(learning_rate=2e-3, ema_decay=0.9)
    trainer = Trainer(strategy, lambda dtype: PixelCNNPP(**config, dtype=dtype), options)
    assert Saver(trainer, run, keep=2, every_minutes=10).restore()
    assert int(trainer.step) == int(expected["step"])
    np.testing.assert_allclose(
        trainer.model.log_prob(images, labels), expected["log_prob_model"], rtol=1e-6
    )
    # Adam's slots are named after the variable, under the optimizer's own name
    # (adam, adam_1, ... in a process that made several)
    slots = {v.path.split("/", 1)[1]: v.numpy() for v in trainer.optimizer.variables}
    for v in trainer.model.trainable_variables:
        for kind in ("momentum", "velocity"):
            mine = slots[v.path.replace("/", "_") + "_" + kind]
            np.testing.assert_array_equal(mine, expected[f"{kind}:{v.path}"])


@pytest.mark.parametrize("warmup", [None, 3])
def test_ema_variables_follow_the_warmed_up_average_step_by_step(warmup):
    """After each optimizer step t (from 0) the Trainer's EMA weights equal the float64
    recurrence e <- e - (1 - d_t)(e - w) on the raw weights w after that step, with
    d_t = min(0.9995, (1 + t) / (warmup + t)): TensorFlow's num_updates warm-up (10)
    by default."""
    options = {} if warmup is None else {"ema_warmup": warmup}
    trainer = make_trainer(tf.distribute.OneDeviceStrategy("/cpu:0"), **options)
    set_weights(trainer, initial_weights())
    images = make_batches(n_batches=4)
    ema = [v.numpy().astype(np.float64) for v in trainer.ema.trainable_variables]
    for t in range(4):
        run_steps(trainer, images[8 * t : 8 * t + 8])
        d = min(0.9995, (1 + t) / ((warmup or 10) + t))
        raw = [v.numpy().astype(np.float64) for v in trainer.model.trainable_variables]
        ema = [e - (1 - d) * (e - w) for e, w in zip(ema, raw, strict=True)]
        for e, v in zip(ema, trainer.ema.trainable_variables, strict=True):
            np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-7)


def test_ema_of_a_short_run_is_as_good_as_the_raw_weights(tmp_path, clean_gin):
    """284 steps with the default decay (0.9995): the average covers the steps taken, so
    the EMA weights score no worse than the raw ones (without the warm-up they keep 87%
    of the initial weights and scored 4.44 against 3.45 bits/dim)."""
    images = digits_8x8(4800)
    gin.parse_config(
        [
            "PixelCNNPP.residual_blocks = 2",
            "PixelCNNPP.residual_layers_per_block = 1",
            "PixelCNNPP.filters = 8",
            "PixelCNNPP.num_mixtures = 2",
            "PixelCNNPP.dropout_rate = 0.0",
            "train.images_to_log = 0",
        ]
    )

    def fn(batch_size):
        test = tf.data.Dataset.from_tensor_slices(images[:256]).batch(batch_size)
        return tf.data.Dataset.from_tensor_slices(images[256:]).batch(batch_size), test

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    result = training.train(
        tmp_path, one, dataset_fn=fn, batch_size=16, learning_rate=3e-3, progress=False,
        max_epoch=1,
    )  # fmt: skip
    assert result["step"] == 284  # one epoch of 4,544 images
    ema, raw = result["test_bits_per_dim"], result["test_bits_per_dim_raw"]
    assert raw < 4.0  # it learned something
    assert ema <= raw + 0.02, (ema, raw)
    evaluation = result["evaluations"][-1]
    assert evaluation["test_bits_per_dim_ema"] == ema and evaluation["step"] == 284
    # raw means the training weights, as `evaluate --raw-weights` scores them
    model, _ = rundir.load_for_inference(tmp_path, use_ema=False)
    x = tf.constant(images[:256], tf.int32)
    bpd = float(tf.reduce_mean(likelihood.bits_per_dim(model.log_prob(x), model.image_shape)))
    assert bpd == pytest.approx(raw, rel=1e-5)


def test_max_minutes_is_kept_by_the_whole_command(tmp_path):
    """`train.max_minutes = 1.5` (the tiny config, an endless run): the command exits
    within 90 s of its start, TensorFlow's import, the final evaluation, the sample
    grid and the checkpoint included, having trained past its first step. (A shorter budget can be
    spent on import, build and the first step's trace alone on a loaded slow machine,
    which no estimate can save.)"""
    import time

    run = tmp_path / "run"
    command = [
        sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "experiments/tiny.gin"),
        "--binding", "train.max_minutes = 1.5", "--binding", "train.max_steps = None",
        "--binding", "train.max_epoch = 1000", "--binding", "embedded_mnist.test_size = 16",
        "--binding", "train.log_images_every = 1000", "--log-dir", str(run), "single",
    ]  # fmt: skip
    began = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    elapsed = time.time() - began
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert elapsed < 90.0, elapsed
    result = json.loads((run / "metrics.json").read_text())
    assert result["stopped"] == "max_minutes"
    # it trained past its first step (how far depends on the machine), and the final
    # evaluation is of the last step, timed per pass
    assert result["step"] >= 2 and result["evaluations"][-1]["step"] == result["step"]
    assert result["evaluations"][-1]["eval_seconds_ema"] > 0
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    assert int(latest.rsplit("-", 1)[1]) == result["step"]
    # no epoch drew a grid: the final one, in the tenth of the budget kept for it
    assert [Path(p).name for p in result["samples"]] == [f"step_{result['step']:08d}.png"]
    # what the run wrote for TensorBoard
    tags = set()
    for split in ("train", "eval", "eval_raw"):
        tags |= {f"{split}/{tag}" for _, tag, _ in summary_values(run, split)}
    assert {
        "train/nll",
        "train/bits_per_dim",
        "train/learning_rate",
        "train/images_per_sec",
        "eval/nll",
        "eval/bits_per_dim",
        "eval_raw/nll",
        "eval_raw/bits_per_dim",
        "train/operative_config",
        "train/samples",
    } <= tags


def test_sample_grids_are_enlarged_with_borders():
    images = np.arange(4 * 28 * 28).reshape(4, 28, 28, 1) % 256
    grid = make_grid(images, 8)
    # 2x2 images of 28 + 1-pixel borders = 59 pixels, enlarged 8x to 472 >= 448
    assert grid.shape == (472, 472, 1)
    small = grid[::8, ::8]
    np.testing.assert_array_equal(np.repeat(np.repeat(small, 8, 0), 8, 1), grid)
    np.testing.assert_array_equal(small[1:29, 30:58, 0], images[1, ..., 0])
    assert (small[0] == 128).all() and (small[:, 29] == 128).all()  # the borders
    assert make_grid(np.zeros((2, 500, 20, 3), int), 8).shape == (502, 43, 3)


def test_sigterm_saves_before_exit(tmp_path, clean_gin):
    bind_tiny()
    images = make_batches(n_batches=6)

    def fn(batch_size):
        ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).enumerate()

        def maybe_signal(i, x):
            def send(i):
                if int(i) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return i

            tf.py_function(send, [i], tf.int64)
            return x

        return ds.map(maybe_signal), tf.data.Dataset.from_tensor_slices(images[:8]).batch(8)

    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    with pytest.raises(faults.TrainingInterrupted, match="resume"):
        training.train(tmp_path, one, dataset_fn=fn, batch_size=8, max_epoch=1, progress=False)
    latest = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert latest is not None and 1 <= int(latest.rsplit("-", 1)[1]) < 6


def test_nan_loss_stops_with_a_clear_error(tmp_path, clean_gin):
    bind_tiny(["train.learning_rate = 1e30"])  # the first update destroys the weights
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        training.train(
            tmp_path,
            one,
            dataset_fn=array_dataset_fn(make_batches(4)),
            batch_size=8,
            max_epoch=1,
            progress=False,
        )


@pytest.mark.parametrize(
    "images,message",
    [
        (np.full((8, 6, 6, 1), 0.5, np.float32), "grid"),
        (np.zeros((8, 6, 6, 3), np.uint8), "image_shape"),
        (np.zeros((8, 6, 6), np.uint8), "rank"),
    ],
)
def test_bad_datasets_fail_before_training(tmp_path, clean_gin, images, message):
    bind_tiny()
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    with pytest.raises(ValueError, match=message):
        training.train(
            tmp_path, one, dataset_fn=array_dataset_fn(images), batch_size=8, progress=False
        )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "binding,message",
    [
        ({"max_minutes": 0}, "max_minutes must be positive"),
        ({"mutation_rate": 1.0}, r"mutation_rate must be in \[0, 1\)"),
        ({"clip_norm": 0.0}, "clip_norm must be positive"),
        ({"log_images_every": 0}, "log_images_every"),
        ({"raw_eval_every": 0}, "raw_eval_every"),
        ({"images_to_log": -1}, "images_to_log"),
        ({"precision": "float8"}, "precision must be one of"),
        ({"batch_size": 3}, "divisible by the 2 replicas"),
        ({"ema_warmup": 1}, "ema_warmup must be a number above 1"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"learning_rate_decay": 1.01}, r"learning_rate_decay must be in \(0, 1\]"),
        ({"learning_rate_decay": 0.0}, r"learning_rate_decay must be in \(0, 1\]"),
        ({"beta_1": 1.0}, r"beta_1 must be in \[0, 1\)"),
        ({"beta_2": -0.1}, r"beta_2 must be in \[0, 1\)"),
        ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\]"),
    ],
)
def test_bad_bindings_fail_before_the_data_is_read(tmp_path, clean_gin, binding, message):
    def dataset_fn(batch_size):
        raise AssertionError("the data was read")

    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)  # all the checks read
    kwargs = {"batch_size": 8, "progress": False, **binding}
    with pytest.raises(ValueError, match=message):
        training.train(tmp_path, two_replicas, dataset_fn=dataset_fn, **kwargs)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------- configs
def write_offline_data(tmp_path) -> list[tuple[str, str]]:
    """Small files in the formats the MNIST and CIFAR-10 loaders read (their download
    needs a network): mnist.npz as keras.datasets writes it (digits of the embedded
    subset) and a cifar-10-batches-py folder of random images; the bindings to them."""
    import pickle

    from pixelcnn import data

    digits, labels = data.load_embedded_mnist()
    mnist = tmp_path / "mnist.npz"
    np.savez(
        mnist, x_train=digits[:64, ..., 0], y_train=labels[:64], x_test=digits[64:72, ..., 0],
        y_test=labels[64:72],
    )  # fmt: skip
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 8) for i in range(1, 6)), ("test_batch", 8)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), np.uint8), b"labels": [1] * n}
        (cifar / name).write_bytes(pickle.dumps(batch))
    return [("mnist.path", str(mnist)), ("cifar10.path", str(tmp_path))]


@pytest.mark.parametrize(
    "config", sorted((ROOT / "experiments").glob("*.gin")), ids=lambda p: p.name
)
def test_every_shipped_config_trains_a_step(config, tmp_path, clean_gin):
    """Each shipped config, as written (its dataset, optimizer, schedule, precision and
    EMA bindings; MNIST and CIFAR-10 read small local files), runs one training step and
    its evaluations, with the network narrowed (8 filters, 2 resolutions, no resnets) to
    keep the suite fast; the data decides the image shape unless the config binds it."""
    from pixelcnn import cli

    cli.app.parse_gin((str(config),), ())
    overrides = [
        ("PixelCNNPP.filters", 8),
        ("PixelCNNPP.residual_blocks", 2),
        ("PixelCNNPP.residual_layers_per_block", 0),
        ("train.batch_size", 8),
        ("train.max_steps", 1),
        ("train.images_to_log", 0),
        ("embedded_mnist.test_size", 16),  # a smaller test split, evaluated twice per run
        *write_offline_data(tmp_path),
    ]
    with gin.unlock_config():
        for name, value in overrides:
            gin.bind_parameter(name, value)
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    with contextlib.ExitStack() as stack:
        if config.name == "imagenet32.gin":  # TFDS's generated stand-in, offline
            stack.enter_context(mock_tfds(num_examples=16))
        result = training.train(tmp_path / "run", one, progress=False)
    assert result["step"] == 1
    assert math.isfinite(result["test_bits_per_dim"])
    assert math.isfinite(result["test_bits_per_dim_raw"])
    shape = json.loads((tmp_path / "run" / "model.json").read_text())["image_shape"]
    rgb = ("cifar10.gin", "imagenet32.gin")
    assert tuple(shape) == ((32, 32, 3) if config.name in rgb else (28, 28, 1))


def mock_tfds(num_examples: int):
    """TFDS's offline stand-in: random examples of each dataset's features."""
    import tensorflow_datasets

    testing = tensorflow_datasets.testing
    return testing.mock_data(num_examples=num_examples, policy=testing.MockPolicy.USE_CODE)


def test_misspelt_binding_names_the_binding(clean_gin):
    from click.testing import CliRunner

    from pixelcnn import cli

    result = CliRunner().invoke(
        cli.main,
        [
            "--config",
            str(ROOT / "experiments/tiny.gin"),
            "--binding",
            "train.batch_sise=4",
            "single",
        ],
    )
    assert result.exit_code != 0
    assert "batch_sise" in result.output


def test_raw_weights_are_scored_every_nth_evaluation_and_at_the_end(tmp_path, clean_gin):
    bind_tiny()
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    fn = array_dataset_fn(make_batches(n_batches=6))
    result = training.train(
        tmp_path, one, dataset_fn=fn, batch_size=8, max_steps=3, eval_every_steps=1,
        raw_eval_every=3, progress=False,
    )  # fmt: skip
    evaluations = result["evaluations"]
    assert [e["step"] for e in evaluations] == [1, 2, 3]
    assert all("test_bits_per_dim_ema" in e for e in evaluations)
    assert ["test_bits_per_dim_raw" in e for e in evaluations] == [False, False, True]
    assert result["test_bits_per_dim_raw"] == evaluations[-1]["test_bits_per_dim_raw"]


def test_xla_steps_match_and_resume(tmp_path):
    """train.jit_compile: the XLA-compiled training and evaluation steps compute what
    the plain ones do, and an XLA trainer restored from a checkpoint continues exactly."""
    images, weights = make_batches(n_batches=3), initial_weights()
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    plain, xla = make_trainer(one), make_trainer(one, jit_compile=True)
    for trainer in (plain, xla):
        set_weights(trainer, weights)
    np.testing.assert_allclose(
        run_steps(xla, images[:16]), run_steps(plain, images[:16]), rtol=1e-4
    )
    for a, b in zip(xla.model.trainable_variables, plain.model.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5)
    test = tf.data.Dataset.from_tensor_slices(images[16:]).batch(8)
    test = test.map(lambda x: {"images": tf.cast(x, tf.float32) * (2 / 255) - 1})
    assert xla.evaluate(test, "ema") == pytest.approx(plain.evaluate(test, "ema"), rel=1e-4)
    assert xla.eval_steps["ema"].experimental_get_tracing_count() == 1

    # restored from a checkpoint, the compiled trainer continues exactly (the same
    # trainer object: a fresh one would compile the XLA step once more)
    state = tf.train.Checkpoint(model=xla.model, ema=xla.ema, optimizer=xla.optimizer)
    path = state.write(str(tmp_path / "ckpt"))
    saved = [v.numpy() for v in xla.model.trainable_variables]
    losses = run_steps(xla, images[16:])
    after = [v.numpy() for v in xla.model.trainable_variables]
    state.read(path).assert_consumed()
    for a, b in zip(xla.model.trainable_variables, saved, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    assert run_steps(xla, images[16:]) == losses
    for a, b in zip(xla.model.trainable_variables, after, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_every_binding_of_train_is_a_typed_option_with_the_same_default():
    """train()'s bindings travel as TrainerOptions and LoopOptions fields of the same
    names and defaults, passed by keyword only (no positional order to get wrong)."""
    import dataclasses
    import inspect

    from pixelcnn.training.loop import LoopOptions

    params = inspect.signature(training.train).parameters
    bindings = set(params) - {"run_dir", "strategy", "started", "dataset_fn"}
    fields = {f.name: f for cls in (TrainerOptions, LoopOptions) for f in dataclasses.fields(cls)}
    assert bindings == set(fields)
    shared = {"seed"}  # the one binding both use
    assert len(dataclasses.fields(TrainerOptions)) + len(dataclasses.fields(LoopOptions)) == len(
        fields
    ) + len(shared)
    for name, field in fields.items():
        assert field.default == params[name].default, name
    with pytest.raises(TypeError):
        TrainerOptions(1e-3)  # keyword-only
