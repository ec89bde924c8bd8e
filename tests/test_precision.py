"""Mixed precision (bfloat16, float16 with loss scaling) must not cost likelihood."""

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn import data
from pixelcnn.model import PixelCNNPP
from pixelcnn.training.trainer import Trainer, TrainerOptions

SHAPE = (12, 12, 1)


def digits(n_train=1024, n_test=256):
    """Centre 12x12 crops of the embedded MNIST digits (on the 8-bit grid)."""
    images, _ = data.load_embedded_mnist()
    rng = np.random.default_rng(0)
    images = images[rng.permutation(len(images))][:, 8:20, 8:20]
    return images[:n_train], images[n_train : n_train + n_test]


def train_and_evaluate(precision, train_images, test_images, evaluate_at, batch=32):
    """Test bits/dim after each number of steps in evaluate_at, from one run."""

    def model_fn(dtype):
        return PixelCNNPP(
            SHAPE,
            residual_blocks=2,
            residual_layers_per_block=1,
            filters=16,
            num_mixtures=3,
            dropout_rate=0.0,
            dtype=dtype,
        )

    options = TrainerOptions(
        learning_rate=3e-3, learning_rate_decay=0.99, ema_decay=0.98, precision=precision
    )
    trainer = Trainer(tf.distribute.OneDeviceStrategy("/cpu:0"), model_fn, options)
    to_x = lambda v: tf.cast(v, tf.float32) * (2 / 255) - 1  # noqa: E731
    trainer.initialize(to_x(train_images[:batch]))
    steps = max(evaluate_at)
    ds = tf.data.Dataset.from_tensor_slices(train_images).repeat().batch(batch).take(steps)
    test = (
        tf.data.Dataset.from_tensor_slices(test_images)
        .batch(128)
        .map(lambda v: {"images": to_x(v)})
    )
    if precision != "float32":  # the weights the optimizer updates stay float32
        assert trainer.model.compute_dtype == precision
        assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}
        assert {v.dtype for v in trainer.ema.trainable_variables} == {"float32"}
    bits_per_dim = {}
    for step, b in enumerate(ds, start=1):
        # float16 skips a step whose gradient overflowed and lowers its loss scale (10 of
        # the first 100 on one CPU): the batch is given again, so every precision makes
        # the same updates from the same batches
        for _ in range(64):
            if bool(trainer.train_step({"images": to_x(b)})[2]):
                break
        if step in evaluate_at:
            bits_per_dim[step] = trainer.bits_per_dim(trainer.evaluate(test))
    return bits_per_dim


# The two-sided tolerance of a mixed precision against float32 with the same initial
# weights and batches (after 100 steps bfloat16 differed by 0.018 bits/dim).
TOLERANCE = 0.04

# Steps before each comparison: a float16 step is many times slower than a float32 one
# on a CPU, so float16 is compared after fewer steps.
STEPS = {"bfloat16": 100, "float16": 40}


@pytest.fixture(scope="module")
def float32_bits_per_dim():
    train_images, test_images = digits()
    fp32 = train_and_evaluate("float32", train_images, test_images, set(STEPS.values()))
    # 8 bits/dim is a uniform guess: the model must have learned for the comparison to mean much
    assert all(bits < 4.5 for bits in fp32.values()), fp32
    return fp32


@pytest.mark.parametrize("precision", list(STEPS))
def test_mixed_precision_training_matches_float32_bits_per_dim(precision, float32_bits_per_dim):
    train_images, test_images = digits()
    steps = STEPS[precision]
    mixed = train_and_evaluate(precision, train_images, test_images, {steps})[steps]
    fp32 = float32_bits_per_dim[steps]
    print(f"test bits/dim after {steps} steps: float32 {fp32:.4f}, {precision} {mixed:.4f}")
    # Two-sided, as the likelihood should not depend on the precision either way.
    assert abs(mixed - fp32) < TOLERANCE, (fp32, mixed)


def test_auto_precision_follows_the_hardware():
    from pixelcnn.distribute import choose_precision

    intel = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    amd = {"avx2", "fma", "avx512f"}  # AVX-512 without its bfloat16 instructions
    assert choose_precision(intel, [])[0] == "bfloat16"
    assert choose_precision({"avx512_bf16"}, [])[0] == "bfloat16"
    assert choose_precision({"amx_bf16"}, [])[0] == "bfloat16"
    assert choose_precision(amd, [])[0] == "float32"
    assert choose_precision(None, [])[0] == "float32"  # flags unreadable
    # the GPUs decide when there are any: Ampere and later compute bfloat16
    assert choose_precision(amd, [(8, 0)])[0] == "bfloat16"
    assert choose_precision(amd, [(9, 0), (8, 6)])[0] == "bfloat16"
    # Volta and Turing: float16 tensor cores, no bfloat16; older GPUs: float32
    assert choose_precision(intel, [(7, 5)])[0] == "float16"
    assert choose_precision(amd, [(7, 0)])[0] == "float16"
    assert choose_precision(intel, [(8, 0), (7, 0)])[0] == "float16"  # the slowest decides
    assert choose_precision(intel, [(6, 1)])[0] == "float32"
    assert choose_precision(intel, [(8, 6), (6, 0)])[0] == "float32"


def test_auto_precision_reads_this_machine(capsys):
    from pixelcnn import distribute

    flags = distribute.cpu_flags()
    expected = distribute.choose_precision(flags, distribute.gpu_capabilities())[0]
    assert distribute.resolve_precision("auto") == expected
    assert f"precision auto: {expected}" in capsys.readouterr().out
    assert distribute.resolve_precision("float32") == "float32"


# Far above what float16 gradients can carry, yet few halvings from a scale that fits
# (each halving is a skipped step, and the test's time)
FIRST_SCALE_EXPONENT = 32


@pytest.mark.gpu  # also in benchmarks/gpu.py's run on a GPU
def test_float16_skips_an_overflowing_step_and_resume_restores_the_scale(
    tmp_path, clean_gin, monkeypatch
):
    """An injected overflow (a first loss scale of 2**32 makes the float16 gradients
    infinite, float16's largest finite value being 65504): the loop skips those steps
    without a NaN stop, counts them, and goes on; the lowered scale is checkpointed,
    and a resumed run starts from it (from 2**32 again it would skip steps anew)."""
    import functools

    import keras
    from helpers import array_dataset_fn, bind_tiny, make_batches

    from pixelcnn.training import train as training

    monkeypatch.setattr(
        keras.optimizers,
        "LossScaleOptimizer",
        functools.partial(
            keras.optimizers.LossScaleOptimizer, initial_scale=2.0**FIRST_SCALE_EXPONENT
        ),
    )
    bind_tiny(["train.precision = 'float16'"])
    run = functools.partial(
        training.train,
        tmp_path,
        tf.distribute.OneDeviceStrategy("/cpu:0"),
        dataset_fn=array_dataset_fn(make_batches(n_batches=4)),
        batch_size=8,
        max_epoch=100,
        progress=False,
    )  # one call: a second one's compile would double the test's time
    first = run(max_steps=2)
    # skipped steps leave the step count: the steps taken after them reach max_steps
    assert first["skipped_steps"] >= 1 and first["step"] == 2
    assert np.isfinite(first["test_bits_per_dim"])
    scale = _saved_loss_scale(tmp_path)
    assert scale == 2.0 ** (FIRST_SCALE_EXPONENT - first["skipped_steps"])
    # what a resumed run restores (train() resumes through the same Checkpoints)
    from pixelcnn import rundir
    from pixelcnn.training.saver import Saver
    from pixelcnn.training.trainer import Trainer, TrainerOptions

    config = rundir.model_config(tmp_path).to_json()
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    options = TrainerOptions(
        learning_rate=2e-3, learning_rate_decay=1.0, ema_decay=0.99, precision="float16"
    )
    trainer = Trainer(strategy, lambda dtype: PixelCNNPP(**config, dtype=dtype), options)
    assert float(trainer.loss_scale) == 2.0**FIRST_SCALE_EXPONENT
    assert Saver(trainer, tmp_path, keep=2, every_minutes=10).restore()
    assert float(trainer.loss_scale) == scale and int(trainer.step) == 2


def _saved_loss_scale(run_dir) -> float:
    """The dynamic loss scale in a run's newest checkpoint, read by name."""
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints"))
    names = [n for n in reader.get_variable_to_shape_map() if "dynamic_scale" in n]
    assert len(names) == 1, names
    return float(reader.get_tensor(names[0]))
