"""Layers: concat_elu and its dropout against autodiff and float64, the dropout masks,
the weight-normalised convolutions' linear maps (folded scale, recompute)."""

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_mask_rate_and_scale(rate):
    keep, scale = layers.dropout_keep_mask(tf.constant([64, 32, 32, 16]), rate, tf.constant([3, 4]))
    frac = np.mean(keep.numpy())
    n = keep.shape.num_elements()
    # The kept fraction is Binomial(n, 1 - rate) / n: 5 standard deviations.
    assert abs(frac - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    assert abs(scale - 1 / (1 - rate)) < 1e-4 / (1 - rate) ** 2
    again, _ = layers.dropout_keep_mask(tf.constant([64, 32, 32, 16]), rate, tf.constant([3, 4]))
    np.testing.assert_array_equal(keep.numpy(), again.numpy())


def plain_concat_elu(x):
    """The formula in the computation's own dtype, differentiated by autodiff."""
    return tf.nn.elu(tf.concat([x, -x], axis=-1))


@pytest.mark.parametrize("dtype", [tf.float64, tf.bfloat16])
def test_concat_elu_and_its_dropout_match_autodiff(rng, dtype):
    """Against autodiff of the plain formula in float64, on the same (rounded) inputs."""
    x = tf.constant(rng.normal(0, 2, (3, 4, 5, 6)), dtype)
    x = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0]], tf.zeros([1], dtype))  # an exact zero
    keep, _ = layers.dropout_keep_mask(tf.constant([3, 4, 5, 12]), 0.3, tf.constant([1, 2]))
    dy = tf.constant(rng.normal(size=(3, 4, 5, 12)), dtype)
    x64, dy64 = tf.cast(x, tf.float64), tf.cast(dy, tf.float64)
    pairs = {
        "concat_elu": (layers.concat_elu, plain_concat_elu),
        "dropout": (
            lambda x: layers.concat_elu_dropout(x, keep),
            lambda x: tf.where(keep, plain_concat_elu(x), tf.zeros([], x.dtype)),
        ),
    }
    # bfloat16: one rounding of the values (2**-8 relative), a few of the gradients
    tol = 1e-12 if dtype == tf.float64 else 2e-2
    for name, (fused_fn, plain_fn) in pairs.items():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, x64])
            fused, plain = fused_fn(x), plain_fn(x64)
            fused_sum, plain_sum = tf.reduce_sum(fused * dy), tf.reduce_sum(plain * dy64)
        np.testing.assert_allclose(
            tf.cast(fused, tf.float64), plain, rtol=min(tol, 2**-8 + 1e-4), err_msg=name
        )
        np.testing.assert_allclose(
            tf.cast(tape.gradient(fused_sum, x), tf.float64),
            tape.gradient(plain_sum, x64),
            rtol=tol,
            atol=tol,
            err_msg=name,
        )


def test_bfloat16_concat_elu_is_one_rounding_of_the_exact_value(rng):
    """Small negative inputs too, where exp(z) - 1 computed in bfloat16 cancels."""
    x = tf.constant(rng.normal(0, 0.05, (4, 8, 8, 16)), tf.bfloat16)
    exact = plain_concat_elu(tf.cast(x, tf.float64))
    got = tf.cast(layers.concat_elu(x), tf.float64)
    # where |z| >= 1e-3 the float32 Elu is exact to 1e-4 relative; rounding to
    # bfloat16 (8 significant bits) adds at most 2**-8 relative
    big = tf.abs(exact) >= 1e-3
    relative = tf.boolean_mask(tf.abs(got - exact) / tf.abs(exact), big)
    assert float(tf.reduce_max(relative)) <= 2**-8 + 1e-4
    assert float(tf.reduce_mean(relative)) < 2e-3


def test_dropout_layer_scales_the_kept_units(rng):
    layer = layers.ConcatEluDropout(0.5)
    x = tf.constant(rng.normal(size=(2, 3, 4, 8)), tf.float32)
    y = layer(x, training=True).numpy()
    expected = plain_concat_elu(x).numpy() * 2.0  # 1 / P(keep) = 2 at rate 1/2
    kept = y != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], expected[kept], rtol=1e-6)
    np.testing.assert_array_equal(layer(x).numpy(), plain_concat_elu(x).numpy())


@pytest.mark.parametrize("recompute", [True, False])
def test_conv_on_folds_the_scale_into_the_kernel(rng, recompute):
    conv = layers.WeightNormConv2D(5, (2, 3), "down")
    x = tf.constant(rng.normal(size=(2, 4, 6, 3)), tf.float32)
    conv(plain_concat_elu(x), init=True)
    dy = tf.constant(rng.normal(size=(2, 4, 6, 5)), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        folded = conv.conv_of_activation(layers.concat_elu, x, scale=2.5, recompute=recompute)
        direct = conv(2.5 * plain_concat_elu(x))
        folded_sum, direct_sum = tf.reduce_sum(folded * dy), tf.reduce_sum(direct * dy)
    np.testing.assert_allclose(folded.numpy(), direct.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(folded_sum, [x, *conv.trainable_variables]),
        tape.gradient(direct_sum, [x, *conv.trainable_variables]),
        strict=True,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
