"""The likelihood against independent float64 NumPy computations and enumeration."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from pixelcnn import likelihood
from pixelcnn.likelihood import (
    bits_per_dim,
    coeff_index,
    mixture_log_prob,
    mixture_sample,
    num_params,
    unpack_params,
)


# ----------------------------------------------------------------- float64 reference
def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def reference_log_prob(x, params, num_channels, num_mixtures, num_bits):
    """float64 per-pixel log p, written from the formula independently of the module.

    x: [N, C] grid values; params: [N, P] in the documented layout. Returns [N].
    """
    x = np.asarray(x, np.float64)
    p = np.asarray(params, np.float64)
    c, k = num_channels, num_mixtures
    logits = p[:, :k]
    means = p[:, k : k + c * k].reshape(-1, c, k)
    log_s = np.maximum(p[:, k + c * k : k + 2 * c * k].reshape(-1, c, k), -7.0)
    coeffs = np.tanh(p[:, k + 2 * c * k :].reshape(len(p), c * (c - 1) // 2, k))
    half = 1.0 / (2**num_bits - 1)
    total = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # [N, K]
    for ch in range(c):
        mu = means[:, ch].copy()
        for j in range(ch):
            mu += coeffs[:, ch * (ch - 1) // 2 + j] * x[:, j : j + 1]
        s = np.exp(log_s[:, ch])
        up = (x[:, ch : ch + 1] + half - mu) / s
        lo = (x[:, ch : ch + 1] - half - mu) / s
        log_up, log_lo = log_sigmoid(up), log_sigmoid(lo)
        # log(sigmoid(up) - sigmoid(lo)) = log sigmoid(up) + log(1 - exp(log_lo - log_up))
        # when the bin is below the mean; mirrored (1 - sigmoid) form above it.
        below = log_up + np.log(-np.expm1(np.minimum(log_lo - log_up, -1e-300)))
        log_1m_lo, log_1m_up = log_sigmoid(-lo), log_sigmoid(-up)
        above = log_1m_lo + np.log(-np.expm1(np.minimum(log_1m_up - log_1m_lo, -1e-300)))
        interior = np.where(up < 0, below, above)
        # Bins far narrower than the logistic (scale > e^15): the two sigmoids agree in
        # more digits than float64 holds, so use pdf(centre) * width, whose relative
        # error (width / scale)^2 / 24 is below 1e-18 there.
        z = (x[:, ch : ch + 1] - mu) / s
        log_pdf_mass = log_sigmoid(z) + log_sigmoid(-z) - log_s[:, ch] + np.log(2 * half)
        interior = np.where(log_s[:, ch] > 15.0, log_pdf_mass, interior)
        level = np.rint((x[:, ch : ch + 1] + 1) / 2 * (2**num_bits - 1))
        lp = np.where(level == 0, log_up, np.where(level == 2**num_bits - 1, log_1m_lo, interior))
        total = total + lp
    return np.logaddexp.reduce(total, axis=1)


def random_params(rng, n, c, k, log_scale_range=(-8.0, 7.0), mean_range=(-3.0, 3.0)):
    logits = rng.normal(0, 2, (n, k))
    means = rng.uniform(*mean_range, (n, c * k))
    log_s = rng.uniform(*log_scale_range, (n, c * k))
    coeffs = rng.normal(0, 1.5, (n, c * (c - 1) // 2 * k))
    return np.concatenate([logits, means, log_s, coeffs], axis=1)


def random_grid(rng, n, c, num_bits):
    top = 2**num_bits - 1
    v = rng.integers(0, top + 1, (n, c))
    v[: n // 8] = 0  # plenty of both edges
    v[n // 8 : n // 4] = top
    return 2.0 * v / top - 1.0


def as_float32(a):
    """The values a float32 computation is actually given."""
    return np.asarray(a, np.float32).astype(np.float64)


def tf_per_pixel(x, params, num_bits, dtype=tf.float32):
    """Our mixture_log_prob on N one-pixel images: [N, C], [N, P] -> [N]."""
    x4 = tf.constant(x[:, None, None, :], dtype)
    p4 = tf.constant(params[:, None, None, :], dtype)
    return mixture_log_prob(x4, p4, num_bits).numpy()


# ----------------------------------------------------------------- layout
def test_unpack_layout_and_coefficient_order():
    c, k = 4, 2
    p = np.arange(num_params(c, k), dtype=np.float32)[None, None, None, :] / 100.0
    logits, means, log_scales, coeffs = unpack_params(tf.constant(p), c, k)
    assert logits.shape == (1, 1, 1, k)
    assert means.shape == (1, 1, 1, c, k) and log_scales.shape == (1, 1, 1, c, k)
    assert coeffs.shape == (1, 1, 1, c * (c - 1) // 2, k)
    # means[c, k] sits at K + c * K + k; log_scales after all means, raw (unclamped)
    assert means.numpy()[0, 0, 0, 2, 1] == pytest.approx((k + 2 * k + 1) / 100.0)
    assert log_scales.numpy()[0, 0, 0, 3, 0] == pytest.approx((k + c * k + 3 * k) / 100.0)
    # coefficient rows (1,0), (2,0), (2,1), (3,0), (3,1), (3,2), after tanh
    order = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert [coeff_index(ch, j) for ch, j in order] == list(range(6))
    start = k + 2 * c * k
    assert coeffs.numpy()[0, 0, 0, coeff_index(2, 1), 1] == pytest.approx(
        math.tanh((start + 2 * k + 1) / 100.0), rel=1e-6
    )


def test_wrong_parameter_count_is_a_clear_error():
    x = tf.zeros([1, 2, 2, 3])
    with pytest.raises(ValueError, match="values per pixel"):
        mixture_log_prob(x, tf.zeros([1, 2, 2, 29]))


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("c,k,bits", [(1, 3, 8), (3, 4, 8), (4, 2, 5), (2, 3, 1), (1, 2, 16)])
def test_matches_float64_reference_everywhere(rng, c, k, bits):
    n = 4000
    params = random_params(rng, n, c, k, mean_range=(-4.0, 4.0))
    x = random_grid(rng, n, c, bits)
    ref = reference_log_prob(as_float32(x), as_float32(params), c, k, bits)
    ours = tf_per_pixel(x, params, bits)
    assert np.all(np.isfinite(ours))
    # 1e-4 nats per sub-pixel; float32 cannot hold a log-probability of -2000 closer
    # than a few ulps, hence the relative term for the far tails.
    err = np.abs(ours - ref)
    assert np.all(err <= c * 1e-4 + 3e-7 * np.abs(ref)), err.max()
    # float64 inputs give float64 answers, far inside 1e-4 nats per sub-pixel
    ours64 = tf_per_pixel(x, params, bits, tf.float64)
    ref64 = reference_log_prob(x, params, c, k, bits)
    assert np.max(np.abs(ours64 - ref64) / (1 + np.abs(ref64))) <= 1e-8


def test_tiny_scales_and_far_means(rng):
    """Log scale at the -7 clamp, means far outside [-1, 1]: tails of e^-1000 nats."""
    n, c, k = 2000, 1, 1
    params = random_params(rng, n, c, k, log_scale_range=(-7.0, -6.5), mean_range=(-3, 3))
    x = random_grid(rng, n, c, 8)
    ref = reference_log_prob(as_float32(x), as_float32(params), c, k, 8)
    assert ref.min() < -1000  # the test really reaches far tails
    ours = tf_per_pixel(x, params, 8)
    assert np.all(np.abs(ours - ref) <= 1e-4 + 3e-7 * np.abs(ref))


def authors_log_prob_rgb(x, params, k):
    """The authors' thresholded discretized_mix_logistic_loss for one RGB pixel, NumPy."""
    logits = params[:, :k]
    means = params[:, k : 4 * k].reshape(-1, 3, k)
    log_s = np.maximum(params[:, 4 * k : 7 * k].reshape(-1, 3, k), -7.0)
    co = np.tanh(params[:, 7 * k :].reshape(-1, 3, k))  # alpha, beta, gamma
    xr, xg, xb = (x[:, i : i + 1] for i in range(3))
    m = np.stack(
        [means[:, 0], means[:, 1] + co[:, 0] * xr, means[:, 2] + co[:, 1] * xr + co[:, 2] * xg],
        axis=1,
    )
    centred = x[:, :, None] - m
    inv = np.exp(-log_s)
    plus_in, min_in = inv * (centred + 1 / 255.0), inv * (centred - 1 / 255.0)
    cdf_plus, cdf_min = 1 / (1 + np.exp(-plus_in)), 1 / (1 + np.exp(-min_in))
    log_cdf_plus = plus_in - np.logaddexp(0, plus_in)
    log_one_minus_cdf_min = -np.logaddexp(0, min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv * centred
    log_pdf_mid = mid_in - log_s - 2.0 * np.logaddexp(0, mid_in)
    xx = x[:, :, None]
    lp = np.where(
        xx < -0.999,
        log_cdf_plus,
        np.where(
            xx > 0.999,
            log_one_minus_cdf_min,
            np.where(
                cdf_delta > 1e-5,
                np.log(np.maximum(cdf_delta, 1e-12)),
                log_pdf_mid - np.log(127.5),
            ),
        ),
    )
    total = lp.sum(axis=1) + logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    interior = (xx >= -0.999) & (xx <= 0.999)
    fell_back = np.any(interior & (cdf_delta <= 1e-5), axis=(1, 2))
    return np.logaddexp.reduce(total, axis=1), fell_back


def test_agrees_with_authors_formula_where_it_is_accurate(rng):
    n, k = 3000, 5
    params = random_params(rng, n, 3, k, log_scale_range=(-4.0, 0.0), mean_range=(-1, 1))
    x = random_grid(rng, n, 3, 8)
    ours = tf_per_pixel(x, params, 8)
    theirs, fell_back = authors_log_prob_rgb(x, params, k)
    # their formula is exact where no bin mass falls below their 1e-5 cut-off
    accurate = ~fell_back
    assert accurate.sum() > n // 4
    np.testing.assert_allclose(ours[accurate], theirs[accurate], atol=1e-4)
    # where it falls back to pdf * bin width, it is off and we are not
    ref = reference_log_prob(x, params, 3, k, 8)
    assert np.abs(theirs - ref).max() > 1e-3
    np.testing.assert_allclose(ours, ref, atol=3e-4, rtol=1e-6)


def test_gradients_finite_for_extreme_parameters(rng):
    n, c, k = 512, 3, 3
    params = random_params(rng, n, c, k, log_scale_range=(-9.0, 9.0), mean_range=(-40, 40))
    x = tf.constant(random_grid(rng, n, c, 8)[:, None, None, :], tf.float32)
    p = tf.Variable(params[:, None, None, :].astype(np.float32))
    with tf.GradientTape() as tape:
        lp = mixture_log_prob(x, p, 8)
    grad = tape.gradient(lp, p)
    assert np.all(np.isfinite(lp.numpy())) and np.all(np.isfinite(grad.numpy()))
    assert np.abs(grad.numpy()).max() > 0


@pytest.mark.parametrize("c,k,bits", [(1, 3, 8), (3, 2, 8), (2, 2, 5), (1, 2, 1), (1, 2, 16)])
def test_values_and_gradients_finite_over_what_a_diverging_network_emits(rng, c, k, bits):
    """Raw log scales in [-20, 60], means within +-50, logits within +-80, both edges.

    log1mexp's unused branch once overflowed for log scales above ~12.5 and tf.where
    turned the inf into a NaN gradient while the value stayed finite.
    """
    top = 2**bits - 1
    n = 3000
    params = random_params(rng, n, c, k, log_scale_range=(-20.0, 60.0), mean_range=(-50, 50))
    params[:, :k] = rng.uniform(-80, 80, (n, k))
    # a sweep of every log scale at every position, on both edges and inside
    sweep = np.linspace(-20.0, 60.0, 161)
    params[: len(sweep), k + c * k : k + 2 * c * k] = sweep[:, None]
    x = random_grid(rng, n, c, bits)
    x[: len(sweep) // 3] = -1.0
    x[len(sweep) // 3 : 2 * len(sweep) // 3] = 1.0
    if top < n:  # every grid value of the first channel appears
        x[-(top + 1) :, 0] = 2.0 * np.arange(top + 1) / top - 1.0
    p = tf.Variable(params[:, None, None, :].astype(np.float32))
    with tf.GradientTape() as tape:
        lp = mixture_log_prob(tf.constant(x[:, None, None, :], tf.float32), p, bits)
    grad = tape.gradient(lp, p).numpy()
    assert np.all(np.isfinite(lp.numpy())), "log p is not finite"
    assert np.all(np.isfinite(grad)), f"{int((~np.isfinite(grad)).sum())} gradients not finite"
    ref = reference_log_prob(as_float32(x), as_float32(params), c, k, bits)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-5, atol=c * 2e-4)
    # the gradient is the float64 one where the float32 value is well conditioned
    eps = 1e-3
    probe = params[:64].copy()
    probe[:, k + c * k : k + 2 * c * k] = rng.uniform(12.0, 16.0, (64, c * k))
    base = reference_log_prob(x[:64], probe, c, k, bits)
    moved = probe.copy()
    moved[:, k + c * k] += eps  # channel 0, component 0's log scale
    numeric = (reference_log_prob(x[:64], moved, c, k, bits) - base) / eps
    pv = tf.Variable(probe[:, None, None, :].astype(np.float32))
    with tf.GradientTape() as tape:
        lp = mixture_log_prob(tf.constant(x[:64, None, None, :], tf.float32), pv, bits)
    ours = tape.gradient(lp, pv).numpy()[:, 0, 0, k + c * k]
    np.testing.assert_allclose(ours, numeric, atol=2e-3, rtol=1e-2)


# ----------------------------------------------------------------- normalisation
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_one_channel_pixel_sums_to_one(rng, bits):
    k = 4
    levels = 2**bits
    for params in random_params(rng, 5, 1, k, log_scale_range=(-7, 3), mean_range=(-1.5, 1.5)):
        x = (2.0 * np.arange(levels) / (levels - 1) - 1.0)[:, None]
        lp = tf_per_pixel(x, np.tile(params, (levels, 1)), bits, tf.float32)
        assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)


def test_rgb_pixel_sums_to_one_over_all_256_cubed_values(rng):
    k = 3
    params = random_params(rng, 1, 3, k, log_scale_range=(-4, 0), mean_range=(-1, 1))[0]
    grid = (2.0 * np.arange(256) / 255.0 - 1.0).astype(np.float32)
    g, b = np.meshgrid(grid, grid, indexing="ij")
    gb = np.stack([g.ravel(), b.ravel()], axis=1)  # [65536, 2]
    p4 = tf.constant(np.tile(params.astype(np.float32), (65536, 1))[:, None, None, :])

    @tf.function
    def mass_for_red(r):
        x = tf.concat([tf.fill([65536, 1], r), gb], axis=1)[:, None, None, :]
        lp = mixture_log_prob(x, p4, 8, validate=False)
        return tf.reduce_sum(tf.exp(tf.cast(lp, tf.float64)))

    total = sum(float(mass_for_red(tf.constant(r))) for r in grid)
    assert total == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------- validation
def test_off_grid_and_out_of_range_inputs_raise():
    params = tf.zeros([1, 2, 2, 3])
    with pytest.raises(ValueError, match="not on the 8-bit grid"):
        mixture_log_prob(tf.fill([1, 2, 2, 1], 0.5), params)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        mixture_log_prob(tf.fill([1, 2, 2, 1], 3.0), params)
    # 3-bit data evaluated as 3-bit is fine, as 8-bit it is off the grid
    x = tf.fill([1, 2, 2, 1], 2 * 3 / 7 - 1.0)
    assert np.isfinite(mixture_log_prob(x, params, num_bits=3).numpy()).all()
    with pytest.raises(ValueError, match="grid"):
        mixture_log_prob(x, params, num_bits=8)


def test_off_grid_inside_tf_function_fails_at_run_time():
    f = tf.function(lambda x, p: mixture_log_prob(x, p))
    with pytest.raises(tf.errors.InvalidArgumentError, match="grid"):
        f(tf.fill([1, 2, 2, 1], 0.5), tf.zeros([1, 2, 2, 3]))


def test_bits_per_dim():
    lp = tf.constant([-math.log(2.0) * 3 * 4 * 5 * 2.5])
    assert bits_per_dim(lp, (3, 4, 5)).numpy()[0] == pytest.approx(2.5)


# ----------------------------------------------------------------- sampling
def enumerate_probs(params, c, bits):
    """All joint values of one pixel and their probabilities: [L^C, C], [L^C]."""
    levels = 2**bits
    grid = 2.0 * np.arange(levels) / (levels - 1) - 1.0
    joint = np.stack(np.meshgrid(*[grid] * c, indexing="ij"), -1).reshape(-1, c)
    lp = reference_log_prob(
        joint,
        np.tile(params, (len(joint), 1)),
        c,
        len(params) // (1 + 2 * c + c * (c - 1) // 2),
        bits,
    )
    return joint, np.exp(lp)


@pytest.mark.parametrize("c,bits", [(1, 3), (2, 2)])
def test_sample_frequencies_match_probabilities(rng, c, bits):
    k = 3
    params = random_params(rng, 1, c, k, log_scale_range=(-2.0, -0.5), mean_range=(-1, 1))[0]
    joint, probs = enumerate_probs(params, c, bits)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    n = 40_000
    p4 = tf.constant(np.tile(params.astype(np.float32), (n, 1))[:, None, None, :])
    samples = mixture_sample(p4, num_bits=bits, seed=7, num_channels=c).numpy().reshape(n, c)
    levels = 2**bits
    idx = np.rint((samples + 1) / 2 * (levels - 1)).astype(int)
    assert np.allclose(samples, 2 * idx / (levels - 1) - 1, atol=1e-6)  # on the grid
    flat = np.ravel_multi_index(idx.T, [levels] * c)
    observed = np.bincount(flat, minlength=levels**c)
    expected = probs * n
    keep = expected > 5  # pool the rare cells, as chi-square needs
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_sampling_is_reproducible_and_seed_dependent():
    p = tf.random.stateless_normal([2, 4, 4, 30], [1, 2])
    a = mixture_sample(p, seed=3, num_channels=3)
    b = mixture_sample(p, seed=3, num_channels=3)
    c = mixture_sample(p, seed=4, num_channels=3)
    assert np.array_equal(a.numpy(), b.numpy()) and not np.array_equal(a.numpy(), c.numpy())
    with pytest.raises(ValueError, match="num_channels"):
        mixture_sample(p, seed=3)


def test_log1mexp_accuracy():
    d = np.logspace(-8, 2, 200)
    ours = likelihood.log1mexp(tf.constant(d, tf.float64)).numpy()
    np.testing.assert_allclose(ours, np.log(-np.expm1(-d)), rtol=1e-12, atol=1e-15)
