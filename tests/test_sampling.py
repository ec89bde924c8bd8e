"""The cached sampler against the reference sampler, completion, and sample statistics.

Every model here is tiny (4 filters, at most one gated resnet per block, images up to
8x8), but each fast sampler still compiles one XLA program per model and batch size,
so the models are module fixtures and the tests reuse batch sizes.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from pixelcnn import PixelCNNPP
from pixelcnn.inference import sampling
from pixelcnn.inference.sampling import complete, sample_fast, sample_naive, top_rows_mask
from pixelcnn.likelihood import mixture_log_prob, to_unit_range

BITS = 3
N = 3  # images per sampler call in the exactness tests (one compiled program per model)


def make_model(image_shape, blocks, layers, num_classes=None, dtype="float64", seed=0):
    """A tiny PixelCNN++ after data-dependent init on random images (so weights are
    realistic, not the raw initialisers).

    Float64 by default, for the exactness tests: fast and naive evaluate the same network
    with different operation orders, so float32 parameters differ by ~1e-6 and a sample
    that lands within that distance of a bin edge (or a near tie between mixture
    components) could round differently, and every later pixel would then differ. In
    float64 the differences are ~1e-15 and the parameters are cast to float32 before
    sampling (the model's output dtype), so both samplers see bit-identical parameters
    except with probability ~1e-8. The class-conditional config and
    ``test_first_pixel_distribution_matches_the_model`` keep the default float32.

    The float64 model gets the weights of its float32 twin (initialised in float32 and
    copied), so both dtypes of a config hold the same network.
    """
    config = dict(
        image_shape=image_shape,
        residual_blocks=blocks,
        residual_layers_per_block=layers,
        filters=4,
        num_mixtures=2,
        dropout_rate=0.0,
        num_classes=num_classes,
        num_bits=BITS,
    )
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 2**BITS, (8, *image_shape))
    labels = rng.integers(0, num_classes, 8) if num_classes else None
    x = to_unit_range(images, BITS)
    base = PixelCNNPP(**config)
    base.initialize(x, labels)
    if dtype == "float32":
        return base
    model = PixelCNNPP(**config, dtype=dtype)
    model(x, labels)  # build
    model.set_weights(base.get_weights())
    return model


CONFIGS = {
    # Four resolutions (6x6, 3x3, 2x2, 1x1): odd sizes at every level, and deep enough
    # for the tf2xla work-around in sampling.CachedGeneration.initial_state to matter.
    "6x6x1_R4": dict(image_shape=(6, 6, 1), blocks=4, layers=0),
    "7x5x3_R2": dict(image_shape=(7, 5, 3), blocks=2, layers=1),
    "5x8x2_R1": dict(image_shape=(5, 8, 2), blocks=1, layers=0),
    # float32, the default dtype: exact equality is expected here too (3-bit bins are
    # ~0.3 wide, float32 differences ~1e-7), just less robustly than in float64.
    "5x6x3_R2_3classes": dict(
        image_shape=(5, 6, 3), blocks=2, layers=0, num_classes=3, dtype="float32"
    ),
}


@functools.cache
def config_model(name):
    """One model per config for the whole module, so its compiled samplers are reused."""
    return make_model(**CONFIGS[name])


@pytest.fixture(params=list(CONFIGS))
def model(request):
    return config_model(request.param)


@pytest.fixture
def rgb_model():
    return config_model("7x5x3_R2")


def labels_for(model, n=N):
    return None if model.num_classes is None else np.arange(n) % model.num_classes


# ----------------------------------------------------------------------------- exactness
@pytest.mark.gpu  # also in benchmarks/gpu.py's run on a GPU
def test_fast_matches_naive(model):
    labels = labels_for(model)
    for seed in [(0, 0), (3, 7)]:
        naive = sample_naive(model, N, labels, seed=seed).numpy()
        fast = sample_fast(model, N, labels, seed=seed).numpy()
        assert naive.shape == fast.shape == (N, *model.image_shape)
        assert naive.dtype == fast.dtype == np.int32
        assert naive.min() >= 0 and naive.max() < 2**BITS
        np.testing.assert_array_equal(fast, naive)
        assert len(np.unique(fast)) > 1  # not a degenerate constant image


def test_class_label_changes_samples():
    model = config_model("5x6x3_R2_3classes")
    a = sample_fast(model, N, labels=[0, 0, 0], seed=5).numpy()
    b = sample_fast(model, N, labels=[2, 2, 2], seed=5).numpy()
    assert not np.array_equal(a, b)


def test_reproducible_and_seed_dependent(rgb_model):
    a = sample_fast(rgb_model, N, seed=(4, 2)).numpy()
    b = sample_fast(rgb_model, N, seed=(4, 2)).numpy()
    c = sample_fast(rgb_model, N, seed=(4, 3)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # an int seed is (0, seed)
    np.testing.assert_array_equal(
        sample_fast(rgb_model, N, seed=9).numpy(), sample_fast(rgb_model, N, seed=(0, 9)).numpy()
    )
    # every call above reused the one program the model holds for this batch size
    assert sampling.compiled(rgb_model, "fast_xla").experimental_get_tracing_count() == 1


# ----------------------------------------------------------------------------- completion
def test_completion_keeps_known_pixels_and_matches_naive(rgb_model):
    h, w, c = rgb_model.image_shape
    rng = np.random.default_rng(7)
    images = rng.integers(0, 2**BITS, (N, h, w, c))
    mask = rng.random((N, h, w)) < 0.5  # a different mask per image
    fast = complete(rgb_model, images, mask, seed=(2, 2)).numpy()
    naive = complete(rgb_model, images, mask, seed=(2, 2), fast=False).numpy()
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_array_equal(fast[mask], images[mask])
    free = sample_fast(rgb_model, N, seed=(2, 2)).numpy()
    assert not np.array_equal(fast[~mask], free[~mask])  # the known pixels matter


def test_completion_of_top_rows(rgb_model):
    h, w, c = rgb_model.image_shape
    images = np.random.default_rng(8).integers(0, 2**BITS, (N, h, w, c))
    out = complete(rgb_model, images, keep_rows=3, seed=(5, 1)).numpy()
    np.testing.assert_array_equal(out[:, :3], images[:, :3])
    same = complete(rgb_model, images, top_rows_mask(h, w, 3), seed=(5, 1)).numpy()
    np.testing.assert_array_equal(out, same)
    assert out.min() >= 0 and out.max() < 2**BITS
    everything = complete(rgb_model, images, keep_rows=h).numpy()
    np.testing.assert_array_equal(everything, images)


def test_top_rows_mask():
    mask = top_rows_mask(4, 3, 2)
    assert mask.shape == (4, 3) and mask.dtype == bool
    assert mask[:2].all() and not mask[2:].any()
    with pytest.raises(ValueError, match="rows"):
        top_rows_mask(4, 3, 5)


# ----------------------------------------------------------------------------- statistics
def test_first_pixel_distribution_matches_the_model():
    # The first pixel's distribution is the network's output at (0, 0) on any input.
    model = make_model((2, 2, 1), blocks=1, layers=1, dtype="float32", seed=3)
    n = 2000
    samples = sample_fast(model, n, seed=(11, 0)).numpy()[:, 0, 0, 0]
    params = model(tf.zeros([1, 2, 2, 1]))[:, :1, :1]
    levels = np.arange(2**BITS)
    x = to_unit_range(levels.reshape(-1, 1, 1, 1), BITS)
    log_probs = mixture_log_prob(x, tf.repeat(params, len(levels), axis=0), BITS)
    probs = np.exp(log_probs.numpy().astype(np.float64))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    observed = np.bincount(samples, minlength=len(levels))
    expected = probs * n
    # Merge the rare levels so every expected count is >= 5 (chi-square validity).
    order = np.argsort(expected)
    merged_obs, merged_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for k in order:
        acc_o, acc_e = acc_o + observed[k], acc_e + expected[k]
        if acc_e >= 5:
            merged_obs.append(acc_o)
            merged_exp.append(acc_e)
            acc_o = acc_e = 0.0
    merged_obs[-1] += acc_o
    merged_exp[-1] += acc_e
    assert len(merged_exp) >= 3, f"the test needs a spread-out pixel distribution: {probs}"
    merged_exp = np.asarray(merged_exp) * (n / sum(merged_exp))  # sums exactly to n
    _, p_value = stats.chisquare(merged_obs, merged_exp)
    assert p_value > 1e-3, (observed, expected)
    # All pixels agree with the reference sampler too (a float32 model; 4 forward passes).
    np.testing.assert_array_equal(samples, sample_naive(model, n, seed=(11, 0)).numpy()[:, 0, 0, 0])


# ----------------------------------------------------------------------------- errors
def test_clear_errors(rgb_model):
    h, w, c = rgb_model.image_shape
    images = np.zeros((N, h, w, c), np.int32)
    mask = np.zeros((h, w), bool)
    with pytest.raises(ValueError, match="known_images must have shape"):
        sample_fast(rgb_model, N, known_images=images[:, :, :-1], known_mask=mask)
    with pytest.raises(ValueError, match="known_mask must have shape"):
        sample_fast(rgb_model, N, known_images=images, known_mask=mask[:-1])
    with pytest.raises(ValueError, match="known_mask must be bool"):
        sample_fast(rgb_model, N, known_images=images, known_mask=mask.astype(int))
    with pytest.raises(ValueError, match="together"):
        sample_naive(rgb_model, N, known_images=images)
    with pytest.raises(ValueError, match=r"lie in \[0, 8\)"):
        complete(rgb_model, images + 8, mask)
    with pytest.raises(ValueError, match="unconditional"):
        sample_fast(rgb_model, N, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="num_images"):
        sample_fast(rgb_model, 0)
    with pytest.raises(ValueError, match="exactly one"):
        complete(rgb_model, images, mask, keep_rows=2)
    with pytest.raises(ValueError, match="seed"):
        sample_fast(rgb_model, N, seed=(1, 2, 3))


def test_conditional_model_needs_labels():
    model = PixelCNNPP(
        image_shape=(3, 3, 1), residual_blocks=1, residual_layers_per_block=0, filters=4,
        num_mixtures=2, num_classes=3, num_bits=BITS,
    )  # fmt: skip
    with pytest.raises(ValueError, match="class-conditional"):
        sample_fast(model, 2)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        sample_naive(model, 2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sample_fast(model, 2, labels=[0, 3])
