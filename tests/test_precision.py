"""bfloat16 mixed precision must not cost likelihood."""

import numpy as np
import tensorflow as tf

from pixelcnn import data
from pixelcnn.model import PixelCNNPP
from pixelcnn.trainer import Trainer

SHAPE = (12, 12, 1)


def digits(n_train=1024, n_test=256):
    """Centre 12x12 crops of the embedded MNIST digits (on the 8-bit grid)."""
    images, _ = data.load_embedded_mnist()
    rng = np.random.default_rng(0)
    images = images[rng.permutation(len(images))][:, 8:20, 8:20]
    return images[:n_train], images[n_train : n_train + n_test]


def train_and_evaluate(precision, train_images, test_images, steps=100, batch=32):
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

    trainer = Trainer(
        tf.distribute.OneDeviceStrategy("/cpu:0"),
        model_fn,
        learning_rate=3e-3,
        learning_rate_decay=0.99,
        beta_1=0.95,
        beta_2=0.9995,
        ema_decay=0.98,
        precision=precision,
    )
    to_x = lambda v: tf.cast(v, tf.float32) * (2 / 255) - 1  # noqa: E731
    trainer.initialize(to_x(train_images[:batch]))
    ds = tf.data.Dataset.from_tensor_slices(train_images).repeat().batch(batch).take(steps)
    for b in ds:
        trainer.train_step({"images": to_x(b)})
    test = (
        tf.data.Dataset.from_tensor_slices(test_images)
        .batch(128)
        .map(lambda v: {"images": to_x(v)})
    )
    if precision == "bfloat16":  # the weights the optimizer updates stay float32
        assert trainer.model.compute_dtype == "bfloat16"
        assert {v.dtype for v in trainer.model.trainable_variables} == {"float32"}
        assert {v.dtype for v in trainer.ema.trainable_variables} == {"float32"}
    return trainer.bits_per_dim(trainer.evaluate(test))


def test_bfloat16_training_matches_float32_bits_per_dim():
    train_images, test_images = digits()
    fp32 = train_and_evaluate("float32", train_images, test_images)
    bf16 = train_and_evaluate("bfloat16", train_images, test_images)
    # 8 bits/dim is a uniform guess: the model must have learned for the comparison to mean much
    assert fp32 < 4.5
    print(f"test bits/dim: float32 {fp32:.4f}, bfloat16 {bf16:.4f}")
    # Two-sided, as the likelihood should not depend on the precision either way. The
    # same initial weights and batches: after 100 steps the two runs differ by 0.018
    # bits/dim (float32 3.846, bfloat16 3.828), after 300 by about 0.01 (3.594 and
    # 3.583).
    assert abs(bf16 - fp32) < 0.04, (fp32, bf16)


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
    assert choose_precision(intel, [(7, 5)])[0] == "float32"
    assert choose_precision(intel, [(8, 0), (7, 0)])[0] == "float32"  # the slowest decides


def test_auto_precision_reads_this_machine(capsys):
    from pixelcnn import distribute

    flags = distribute.cpu_flags()
    expected = distribute.choose_precision(flags, distribute.gpu_capabilities())[0]
    assert distribute.resolve_precision("auto") == expected
    assert f"precision auto: {expected}" in capsys.readouterr().out
    assert distribute.resolve_precision("float32") == "float32"
