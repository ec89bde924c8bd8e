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


def test_paper_sizes_build(tmp_path):
    model = PixelCNNPP((32, 32, 3))
    model(tf.zeros([1, 32, 32, 3]))
    # 3 resolutions: 15 + 16 + 16... resnets per stream; 10 mixtures of RGB: 100 outputs
    assert model.num_params == 100
    n_resnets = sum(len(level.u) for level in model.up + model.down)
    assert n_resnets == 5 * 3 + 5 + 6 + 6
    assert [level.resolution for level in model.down] == [2, 1, 0]
    # every variable is in the checkpoint (TensorFlow's object graph does not follow
    # Keras' lists of layers: checkpointable() is what checkpoints see)
    path = tf.train.Checkpoint(model=model.checkpointable()).write(str(tmp_path / "ckpt"))
    saved = [name for name, _ in tf.train.list_variables(path) if name.startswith("model/")]
    assert len(saved) == len(model.weights)


# ----------------------------------------------------------------- weight-norm init
def test_data_dependent_init_statistics(rng, monkeypatch):
    shape = (8, 8, 3)
    model = tiny(shape, residual_blocks=3, filters=16)
    x = grid_batch(rng, 16, shape)
    model.initialize(x)

    # Every conv output leaves through `call` or, in the gated resnets,
    # `conv_of_activation`.
    recorded = []
    for cls, method in (
        (layers.WeightNormConv2D, "call"),
        (layers.WeightNormConv2D, "conv_of_activation"),
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


def test_dropout_masks_are_a_function_of_the_seed(rng):
    shape = (5, 4, 1)
    model = tiny(shape, dropout_rate=0.5)
    x = grid_batch(rng, 2, shape)
    model.initialize(x)

    def out(seed):
        return model(x, training=True, dropout_seed=tf.constant(seed, tf.int64)).numpy()

    np.testing.assert_array_equal(out([1, 2]), out([1, 2]))
    assert np.abs(out([1, 2]) - out([1, 3])).max() > 0
    indices = [
        r.dropout.index
        for r in model.layers_by_name().values()
        if isinstance(r, layers.GatedResnet)
    ]
    assert sorted(indices) == list(range(len(indices)))  # each layer draws its own masks


def test_dropout_only_in_training(rng):
    shape = (4, 4, 1)
    model = tiny(shape, dropout_rate=0.5)
    x = grid_batch(rng, 2, shape)
    model.initialize(x)
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    assert np.abs(model(x, training=True).numpy() - model(x).numpy()).max() > 0


def test_recomputed_activations_give_the_same_gradients(rng):
    shape = (6, 5, 2)
    model = tiny(shape, dropout_rate=0.3, num_classes=3)
    x = grid_batch(rng, 3, shape)
    labels = tf.constant([0, 2, 1])
    model.initialize(x, labels)
    resnets = [
        layer for layer in model.layers_by_name().values() if isinstance(layer, layers.GatedResnet)
    ]
    seed = tf.constant([5, 7], tf.int64)  # the same dropout masks in both passes

    def gradients(recompute):
        for r in resnets:
            r.recompute = recompute

        @tf.function  # graph mode: where graph optimisation could undo the recompute
        def grads():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = -tf.reduce_sum(
                    likelihood.mixture_log_prob(
                        x, model(x, labels, training=True, dropout_seed=seed)
                    )
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
        resnets = [r for r in model.layers_by_name().values() if isinstance(r, layers.GatedResnet)]
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
    with pytest.raises(ValueError, match="integer levels"):
        model.log_prob(tf.zeros([1, 4, 4, 1]))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.log_prob(tf.fill([1, 4, 4, 1], 256))
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(tf.zeros([1, 4, 5, 1], tf.int32))


# ----------------------------------------------------------------- saving
def test_keras_native_saving_round_trips(tmp_path, rng):
    """model.save("m.keras") and keras.saving.load_model give the same network, weights
    and outputs (the pixelcnn package must be importable: its classes are registered)."""
    import keras

    shape = (5, 4, 2)
    model = tiny(shape, num_classes=3, dropout_rate=0.2, num_bits=5)
    x = grid_batch(rng, 2, shape, bits=5)
    labels = tf.constant([0, 2])
    model.initialize(x, labels)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, PixelCNNPP) and loaded.config == model.config
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(loaded(x, labels).numpy(), model(x, labels).numpy())
