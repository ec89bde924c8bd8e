"""The network: causality, shapes, weight-norm init, conditioning, errors."""

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn import PixelCNNPP, layers, likelihood


def tiny(shape, **overrides):
    kwargs = dict(
        residual_blocks=2, residual_layers_per_block=1, filters=8, num_mixtures=2, dropout_rate=0.0
    )
    kwargs.update(overrides)
    return PixelCNNPP(shape, **kwargs)


def grid_batch(rng, batch, shape, bits=8):
    v = rng.integers(0, 2**bits, (batch, *shape))
    return tf.constant(2.0 * v / (2**bits - 1) - 1.0, tf.float32)


# ----------------------------------------------------------------- causality
@pytest.mark.parametrize(
    "shape,blocks,classes", [((6, 5, 3), 3, None), ((5, 7, 2), 2, 3), ((4, 4, 1), 1, None)]
)
def test_output_depends_only_on_earlier_pixels(rng, shape, blocks, classes):
    model = tiny(shape, residual_blocks=blocks, num_classes=classes)
    x = grid_batch(rng, 2, shape)
    labels = tf.constant([0, 1]) if classes else None
    model.initialize(x, labels)
    h, w = shape[:2]

    @tf.function
    def grad_of_pixel(i, j):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, labels)
            target = tf.reduce_sum(out[0, i, j])
        return tape.gradient(target, x)

    for i in range(h):
        for j in range(w):
            g = np.abs(grad_of_pixel(tf.constant(i), tf.constant(j)).numpy())
            assert g[1].max() == 0, "no dependence across the batch"
            per_pixel = g[0].max(axis=-1).reshape(-1)  # raster order
            k = i * w + j
            assert per_pixel[k:].max() == 0, f"pixel ({i},{j}) sees itself or later pixels"
            if k > 0:  # and it does see earlier ones: the test can fail
                assert per_pixel[:k].max() > 0


def test_channel_order_within_a_pixel(rng):
    """log p(x_0..x_c) at a pixel does not depend on channels > c of that pixel."""
    shape = (3, 3, 3)
    model = tiny(shape)
    x = grid_batch(rng, 2, shape)
    model.initialize(x)
    for c in range(3):
        with tf.GradientTape() as tape:
            tape.watch(x)
            log_w, log_p = likelihood.subpixel_log_prob(x, model(x))
            # marginal of channels 0..c at pixel (1, 1) of image 0
            marginal = tf.reduce_logsumexp(
                log_w[0, 1, 1] + tf.reduce_sum(log_p[0, 1, 1, : c + 1], axis=0)
            )
        g = np.abs(tape.gradient(marginal, x).numpy())[0, 1, 1]
        assert np.all(g[c + 1 :] == 0), f"channel {c} sees later channels"
        assert np.all(g[: c + 1] > 0)


# ----------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((28, 28, 1), 3),
        ((20, 12, 3), 3),
        ((15, 9, 3), 3),
        ((9, 4, 2), 4),
        ((1, 1, 1), 3),
        ((8, 8, 5), 1),
    ],
)
def test_output_shapes(rng, shape, blocks):
    model = tiny(shape, residual_blocks=blocks, residual_layers_per_block=0, filters=4)
    x = grid_batch(rng, 3, shape)
    out = model.initialize(x)
    assert out.shape == (3, *shape[:2], likelihood.num_params(shape[2], 2))
    assert out.dtype == tf.float32
    assert np.all(np.isfinite(model(x).numpy()))
    lp = model.log_prob(tf.cast((x + 1) * 127.5 + 0.25, tf.int32))
    assert lp.shape == (3,) and np.all(np.isfinite(lp.numpy()))


def test_paper_sizes_build():
    model = PixelCNNPP((32, 32, 3))
    model(tf.zeros([1, 32, 32, 3]))
    # 3 resolutions: 15 + 16 + 16... resnets per stream; 10 mixtures of RGB: 100 outputs
    assert model.num_params == 100
    n_resnets = sum(len(b) for b in model.up_u + model.down_u)
    assert n_resnets == 5 * 3 + 5 + 6 + 6


# ----------------------------------------------------------------- weight-norm init
def test_data_dependent_init_statistics(rng, monkeypatch):
    shape = (8, 8, 3)
    model = tiny(shape, residual_blocks=3, filters=16)
    x = grid_batch(rng, 16, shape)
    model.initialize(x)

    # Every conv output leaves through `call` or, in the gated resnets, `on`.
    recorded = []
    for cls, method in (
        (layers.WeightNormConv2D, "call"),
        (layers.WeightNormConv2D, "on"),
        (layers.WeightNormConv2DTranspose, "call"),
    ):
        original = getattr(cls, method)

        def recording(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            recorded.append((self, out))
            return out

        monkeypatch.setattr(cls, method, recording)
    model(x, training=False)
    assert len(recorded) == len([v for v in model.weights if v.name == "g"])
    for layer, out in recorded:
        t = out.numpy().reshape(-1, out.shape[-1])
        std = t.std(axis=0)
        live = std > 1e-6  # units that see no data (row 0 of the u stream) stay constant
        assert live.mean() > 0.5
        np.testing.assert_allclose(t.mean(axis=0), 0.0, atol=2e-3 * max(layer.init_scale, 1))
        np.testing.assert_allclose(std[live], layer.init_scale, rtol=2e-3)


def test_init_under_mirrored_strategy(rng):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    shape = (6, 6, 1)
    x = grid_batch(rng, 8, shape)
    with strategy.scope():
        model = tiny(shape)
        model.initialize(x)
    reference = tiny(shape)
    reference(x)
    reference.set_weights([w.numpy() for w in model.weights])
    g = [w for w in model.weights if w.name == "g"][0]
    assert not np.allclose(np.asarray(g.numpy()), 1.0)
    # every replica holds the initialised weights
    for v in strategy.experimental_local_results(g):
        np.testing.assert_array_equal(v.numpy(), g.numpy())
    np.testing.assert_allclose(reference(x).numpy(), model(x).numpy(), atol=1e-5)


# ----------------------------------------------------------------- conditioning
def test_conditional_output_depends_on_label(rng):
    shape = (4, 4, 1)
    model = tiny(shape, num_classes=4)
    x = grid_batch(rng, 2, shape)
    model.initialize(x, tf.constant([0, 1]))
    a = model(x, tf.constant([0, 0])).numpy()
    b = model(x, tf.constant([3, 0])).numpy()
    assert np.abs(a[0] - b[0]).max() > 1e-3
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x)


def test_dropout_only_in_training(rng):
    shape = (4, 4, 1)
    model = tiny(shape, dropout_rate=0.5)
    x = grid_batch(rng, 2, shape)
    model.initialize(x)
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    assert np.abs(model(x, training=True).numpy() - model(x).numpy()).max() > 0


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
    """The formula, differentiated by autodiff (the layers' versions have own gradients)."""
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
        folded = conv.on(layers.concat_elu, x, scale=2.5, recompute=recompute)
        direct = conv(2.5 * plain_concat_elu(x))
        folded_sum, direct_sum = tf.reduce_sum(folded * dy), tf.reduce_sum(direct * dy)
    np.testing.assert_allclose(folded.numpy(), direct.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(folded_sum, [x, *conv.trainable_variables]),
        tape.gradient(direct_sum, [x, *conv.trainable_variables]),
        strict=True,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recompute", [True, False])
def test_conv_on_parts_equals_conv_on_their_concatenation(rng, recompute):
    nin = layers.WeightNormConv2D(4)
    u = tf.constant(rng.normal(size=(2, 3, 5, 3)), tf.float32)
    s = tf.constant(rng.normal(size=(2, 3, 5, 2)), tf.float32)
    nin(plain_concat_elu(tf.concat([u, s], -1)), init=True)
    dy = tf.constant(rng.normal(size=(2, 3, 5, 4)), tf.float32)
    shared = layers.SharedConcatElu()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([u, s])
        # the parts' concat_elu comes from the shared cache, as in the network
        fx = (shared(u), shared(s))
        parts = nin.on(layers.concat_elu, (u, s), recompute=recompute, fx=fx)
        whole = nin(plain_concat_elu(tf.concat([u, s], -1)))
        parts_sum, whole_sum = tf.reduce_sum(parts * dy), tf.reduce_sum(whole * dy)
    assert shared(u) is fx[0]  # computed once
    np.testing.assert_allclose(parts.numpy(), whole.numpy(), rtol=1e-5, atol=1e-5)
    sources = [u, s, *nin.trainable_variables]
    for a, b in zip(
        tape.gradient(parts_sum, sources), tape.gradient(whole_sum, sources), strict=True
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1x1"):
        layers.WeightNormConv2D(4, (2, 3), "down").on(layers.concat_elu, (u, s))


def test_recomputed_activations_give_the_same_gradients(rng):
    shape = (6, 5, 2)
    model = tiny(shape, dropout_rate=0.3, num_classes=3)
    x = grid_batch(rng, 3, shape)
    labels = tf.constant([0, 2, 1])
    model.initialize(x, labels)
    resnets = [layer for layer in model._flatten_layers() if isinstance(layer, layers.GatedResnet)]
    seeds = [r.dropout.seed_generator.state.numpy() for r in resnets]

    def gradients(recompute):
        for r, seed in zip(resnets, seeds, strict=True):
            r.recompute = recompute
            r.dropout.seed_generator.state.assign(seed)  # the same dropout masks

        @tf.function  # graph mode: where graph optimisation could undo the recompute
        def grads():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = -tf.reduce_sum(
                    likelihood.mixture_log_prob(x, model(x, labels, training=True))
                )
            return tape.gradient(loss, [x, *model.trainable_variables])

        return [g.numpy() for g in grads()]

    recomputed, stored = gradients(True), gradients(False)
    assert len(recomputed) == len(model.trainable_variables) + 1
    for a, b in zip(recomputed, stored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert all(np.abs(g).max() > 0 for g in recomputed[1:])


def test_recompute_default_follows_the_compute_dtype():
    for dtype, expected in (("float32", True), ("mixed_bfloat16", False)):
        model = tiny((4, 4, 1), dtype=dtype)
        resnets = [r for r in model._flatten_layers() if isinstance(r, layers.GatedResnet)]
        assert model.recompute_activations is expected
        assert resnets and all(r.recompute is expected for r in resnets)
    assert tiny((4, 4, 1), dtype="mixed_bfloat16", recompute_activations=True).recompute_activations


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(image_shape=(28, 28)), "height, width, channels"),
        (dict(image_shape=(28, 0, 1)), "width"),
        (dict(image_shape=(8, 8, 1), residual_blocks=0), "residual_blocks"),
        (dict(image_shape=(8, 8, 1), num_mixtures=0), "num_mixtures"),
        (dict(image_shape=(8, 8, 1), dropout_rate=1.0), "dropout_rate"),
        (dict(image_shape=(8, 8, 1), num_bits=0), "num_bits"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PixelCNNPP(**kwargs)


def test_log_prob_input_errors(rng):
    model = tiny((4, 4, 1))
    with pytest.raises(ValueError, match="integers"):
        model.log_prob(tf.zeros([1, 4, 4, 1]))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.log_prob(tf.fill([1, 4, 4, 1], 256))
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(tf.zeros([1, 4, 5, 1], tf.int32))
