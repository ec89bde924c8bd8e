"""The discretised logistic mixture likelihood, for any channel count C and bit depth b.

Sub-pixel values v in {0, ..., 2**b - 1} map to x = 2 v / (2**b - 1) - 1 in [-1, 1].

Parameter layout (last axis of the network output, P = K * (1 + 2 C + C (C - 1) / 2)):

    [ logits (K) | means (C * K) | log_scales (C * K) | coeffs (C (C - 1) / 2 * K) ]

means, log_scales and coeffs are stored channel-major: entry (c, k) of means is at
``K + c * K + k``. Coefficient rows follow the row-major lower triangle of the channel
coupling matrix: (c=1, j=0), (c=2, j=0), (c=2, j=1), (c=3, j=0), ... Channel c's mean
is shifted by sum_{j<c} coeff[c, j] * x_j, so for RGB the rows are the paper's alpha
(G from R), beta (B from R) and gamma (B from G).

The bin mass is computed exactly in log space,
    log(sigmoid(a) - sigmoid(b)) = log1mexp(a - b) - softplus(-a) - softplus(b),
with a, b the scaled upper and lower bin edges; the lowest bin integrates from -inf
(log sigmoid(a)) and the highest to +inf (log sigmoid(-b)). Each term is computed
without cancellation, so there are no thresholds and no pdf fallback (the authors'
code switches to pdf * bin width where the mass is below 1e-5); gradients are finite
everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

MIN_LOG_SCALE = -7.0  # the authors clamp log scales below at -7


def num_params(num_channels: int, num_mixtures: int) -> int:
    """Network outputs per pixel for C channels and K mixture components."""
    c = num_channels
    return num_mixtures * (1 + 2 * c + c * (c - 1) // 2)


def coeff_index(c: int, j: int) -> int:
    """Row of coefficient (channel c, earlier channel j < c) in the coeffs tensor."""
    if not 0 <= j < c:
        raise ValueError(f"coefficient ({c}, {j}) needs 0 <= j < c")
    return c * (c - 1) // 2 + j


def unpack_params(params: tf.Tensor, num_channels: int, num_mixtures: int):
    """Splits raw network outputs [..., P] into mixture parameters.

    Returns:
      logits: [..., K] unnormalised mixture log-weights.
      means: [..., C, K].
      log_scales: [..., C, K] raw (not clamped).
      coeffs: [..., C (C - 1) / 2, K], after tanh.
    """
    c, k = num_channels, num_mixtures
    expected = num_params(c, k)
    if params.shape[-1] is not None and params.shape[-1] != expected:
        raise ValueError(
            f"params have {params.shape[-1]} values per pixel, but {c} channels and {k} "
            f"mixtures need {expected}"
        )
    batch_shape = tf.shape(params)[:-1]
    logits = params[..., :k]
    means = tf.reshape(params[..., k : k + c * k], tf.concat([batch_shape, [c, k]], 0))
    log_scales = tf.reshape(
        params[..., k + c * k : k + 2 * c * k], tf.concat([batch_shape, [c, k]], 0)
    )
    n_coeffs = c * (c - 1) // 2
    coeffs = tf.tanh(
        tf.reshape(params[..., k + 2 * c * k :], tf.concat([batch_shape, [n_coeffs, k]], 0))
    )
    return logits, means, log_scales, coeffs


def coupled_means(means: tf.Tensor, coeffs: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Channel c's mean plus sum_{j<c} coeff[c, j] * x_j.

    means: [..., C, K]; coeffs: [..., C (C - 1) / 2, K]; x: [..., C] the true values.
    Returns [..., C, K].
    """
    c = means.shape[-2]
    rows = [means[..., 0, :]]
    for ch in range(1, c):
        start = ch * (ch - 1) // 2
        # [..., ch, K] * [..., ch, 1] summed over the earlier channels
        shift = tf.reduce_sum(coeffs[..., start : start + ch, :] * x[..., :ch, None], axis=-2)
        rows.append(means[..., ch, :] + shift)
    return tf.stack(rows, axis=-2)


def log1mexp(d: tf.Tensor) -> tf.Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler 2012).

    Each branch gets an argument clipped into its own half, so the branch that is not
    taken stays finite: ``tf.where``'s gradient multiplies the unused branch's gradient
    by zero, and an inf there (log1p(-exp(-d)) for d below ~1e-7 in float32, i.e. log
    scales above ~12.5) would make it NaN.
    """
    cut = math.log(2.0)
    small = tf.minimum(d, cut)
    large = tf.maximum(d, cut)
    return tf.where(d < cut, tf.math.log(-tf.math.expm1(-small)), tf.math.log1p(-tf.exp(-large)))


def to_unit_range(images: tf.Tensor, num_bits: int, dtype=tf.float32) -> tf.Tensor:
    """Integers in [0, 2**b) -> floats on the grid in [-1, 1]."""
    top = float(2**num_bits - 1)
    return tf.cast(images, dtype) * (2.0 / top) - 1.0


def to_integers(x: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Floats in [-1, 1] -> nearest integer level in [0, 2**b), int32."""
    top = float(2**num_bits - 1)
    v = tf.round((tf.cast(x, tf.float32) + 1.0) * (top / 2.0))
    return tf.cast(tf.clip_by_value(v, 0.0, top), tf.int32)


def grid_tolerance(num_bits: int) -> float:
    """Largest distance from the grid accepted for float inputs (float32 rounding)."""
    return 1e-3 / float(2**num_bits - 1)


def check_unit_grid(x, num_bits: int, what: str = "x"):
    """Raises ValueError unless x lies in [-1, 1] on the b-bit grid.

    Eager tensors and arrays are checked in Python; inside tf.function an assertion op
    is returned (it raises InvalidArgumentError when run).
    """
    top = float(2**num_bits - 1)
    if tf.executing_eagerly() or isinstance(x, np.ndarray):
        arr = np.asarray(x, dtype=np.float64)
        if arr.size == 0:
            return None
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(
                f"{what} must lie in [-1, 1] (images v in [0, {int(top)}] map to "
                f"2 v / {int(top)} - 1); got values in [{lo:.4g}, {hi:.4g}]"
            )
        scaled = (arr + 1.0) * (top / 2.0)
        off = np.abs(scaled - np.round(scaled))
        worst = float(off.max())
        if worst > grid_tolerance(num_bits) * top:
            raise ValueError(
                f"{what} is not on the {num_bits}-bit grid: the likelihood of a discretised "
                f"model is only defined at x = 2 v / {int(top)} - 1 for integer v. "
                f"{int((off > grid_tolerance(num_bits) * top).sum())} values are off the "
                "grid (was the data resized with interpolation, or scaled with another "
                "bit depth?)"
            )
        return None
    x = tf.cast(x, tf.float32)
    scaled = (x + 1.0) * (top / 2.0)
    return tf.debugging.Assert(
        tf.logical_and(
            tf.reduce_all(tf.abs(x) <= 1.0 + 1e-6),
            tf.reduce_all(tf.abs(scaled - tf.round(scaled)) <= grid_tolerance(num_bits) * top),
        ),
        [f"{what} must lie in [-1, 1] on the {num_bits}-bit grid"],
    )


def subpixel_log_prob(x: tf.Tensor, params: tf.Tensor, num_bits: int = 8) -> tf.Tensor:
    """Per-component, per-channel log bin masses.

    x: float [B, H, W, C] on the grid; params: [B, H, W, P].
    Returns (log_mix_weights [B, H, W, K], log_probs [B, H, W, C, K]).
    """
    params = tf.convert_to_tensor(params)
    x = tf.cast(x, params.dtype)
    c = x.shape[-1]
    k = params.shape[-1] // (1 + 2 * c + c * (c - 1) // 2)
    logits, means, log_scales, coeffs = unpack_params(params, c, k)
    mu = coupled_means(means, coeffs, x)  # [B, H, W, C, K]
    log_scales = tf.maximum(log_scales, MIN_LOG_SCALE)
    inv_scale = tf.exp(-log_scales)
    half_bin = 1.0 / float(2**num_bits - 1)
    centred = x[..., None] - mu
    upper = inv_scale * (centred + half_bin)  # a: the bin's scaled upper edge
    lower = inv_scale * (centred - half_bin)  # b: the bin's scaled lower edge
    width = inv_scale * (2.0 * half_bin)  # a - b, computed without cancellation

    level = to_integers(x, num_bits)[..., None]
    top = 2**num_bits - 1
    interior = log1mexp(width) - tf.nn.softplus(-upper) - tf.nn.softplus(lower)
    log_probs = tf.where(
        level == 0,
        -tf.nn.softplus(-upper),  # log sigmoid(a): mass from -inf
        tf.where(level == top, -tf.nn.softplus(lower), interior),  # log sigmoid(-b)
    )
    return tf.nn.log_softmax(logits, axis=-1), log_probs


def mixture_log_prob(
    x: tf.Tensor, params: tf.Tensor, num_bits: int = 8, validate: bool = True
) -> tf.Tensor:
    """Log-likelihood of each image in nats.

    Args:
      x: float [B, H, W, C] in [-1, 1], on the grid 2 v / (2**b - 1) - 1.
      params: float [B, H, W, P] raw network outputs (layout: module docstring).
      num_bits: b.
      validate: check that x is on the grid (ValueError when eager).
    Returns:
      float [B] log p(x) in nats (dtype of params).
    """
    params = tf.convert_to_tensor(params)
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4 or params.shape.rank != 4:
        raise ValueError(
            f"x and params must be [B, H, W, C] and [B, H, W, P], got {x.shape} and {params.shape}"
        )
    c = x.shape[-1]
    per_pixel = 1 + 2 * c + c * (c - 1) // 2
    if params.shape[-1] % per_pixel:
        raise ValueError(
            f"params have {params.shape[-1]} values per pixel, not a multiple of {per_pixel} "
            f"(what {c} channels need per mixture component)"
        )
    assertion = check_unit_grid(x, num_bits) if validate else None
    deps = [assertion] if assertion is not None else []
    with tf.control_dependencies(deps):
        log_weights, log_probs = subpixel_log_prob(x, params, num_bits)
        per_pixel_lp = tf.reduce_logsumexp(
            log_weights + tf.reduce_sum(log_probs, axis=-2), axis=-1
        )  # [B, H, W]
        return tf.reduce_sum(per_pixel_lp, axis=[1, 2])


def bits_per_dim(log_prob, image_shape):
    """-log p / (H W C ln 2): log-likelihoods in nats -> bits per sub-pixel.

    log_prob: a tensor (gives a tensor), an array or a float (give float64). This is
    the one place the conversion is written; a mean NLL per image converts as
    ``bits_per_dim(-nll, image_shape)``.
    """
    dims = float(np.prod(image_shape))
    if isinstance(log_prob, tf.Tensor | tf.Variable):
        return -log_prob / (dims * math.log(2.0))
    return -np.asarray(log_prob, np.float64) / (dims * math.log(2.0))


def sample_with_noise(
    params: tf.Tensor, num_channels: int, num_bits: int, mix_u: tf.Tensor, logistic_u: tf.Tensor
) -> tf.Tensor:
    """One sample per pixel from given uniform noise, rounded to the grid.

    params: [..., P]; mix_u: uniform [..., K] in (0, 1); logistic_u: uniform [..., C].
    Component by Gumbel-max over the logits; channels in order, each mean coupled to the
    already sampled (and rounded) earlier channels, clipped to [-1, 1] and rounded to
    its bin (the authors do not round; we do, so samples are valid images).
    Returns float [..., C] in [-1, 1] on the grid.
    """
    c = num_channels
    k = params.shape[-1] // (1 + 2 * c + c * (c - 1) // 2)
    logits, means, log_scales, coeffs = unpack_params(params, c, k)
    gumbel = -tf.math.log(-tf.math.log(tf.cast(mix_u, logits.dtype)))
    choice = tf.one_hot(tf.argmax(logits + gumbel, axis=-1), k, dtype=params.dtype)  # [..., K]
    mean = tf.reduce_sum(means * choice[..., None, :], axis=-1)  # [..., C]
    log_scale = tf.reduce_sum(tf.maximum(log_scales, MIN_LOG_SCALE) * choice[..., None, :], -1)
    coeff = tf.reduce_sum(coeffs * choice[..., None, :], axis=-1)  # [..., C(C-1)/2]
    u = tf.cast(logistic_u, params.dtype)
    noise = tf.math.log(u) - tf.math.log1p(-u)
    top = float(2**num_bits - 1)
    xs = []
    for ch in range(c):
        mu = mean[..., ch]
        for j in range(ch):
            mu = mu + coeff[..., coeff_index(ch, j)] * xs[j]
        value = tf.clip_by_value(mu + tf.exp(log_scale[..., ch]) * noise[..., ch], -1.0, 1.0)
        xs.append(tf.round((value + 1.0) * (top / 2.0)) * (2.0 / top) - 1.0)
    return tf.stack(xs, axis=-1)


def sampling_noise(shape, num_channels: int, num_mixtures: int, seed, dtype=tf.float32):
    """Uniform noise for ``sample_with_noise`` at every position of ``shape`` [...].

    Drawn in (1e-5, 1 - 1e-5) like the authors, from a stateless seed (two ints), so the
    same seed gives the same noise whichever sampler consumes it.
    """
    seed = tf.convert_to_tensor(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    shape = tf.cast(tf.convert_to_tensor(shape), tf.int32)
    mix_u = tf.random.stateless_uniform(
        tf.concat([shape, [num_mixtures]], 0), seeds[0], 1e-5, 1.0 - 1e-5, dtype=dtype
    )
    logistic_u = tf.random.stateless_uniform(
        tf.concat([shape, [num_channels]], 0), seeds[1], 1e-5, 1.0 - 1e-5, dtype=dtype
    )
    return mix_u, logistic_u


def mixture_sample(params: tf.Tensor, num_bits: int = 8, seed=None, num_channels=None):
    """One sample from the mixture at every pixel.

    Args:
      params: float [B, H, W, P].
      num_bits: b.
      seed: int or pair of ints for reproducible samples; None draws a fresh one.
      num_channels: C; inferred from P only when a single C <= 16 fits (P = 30, for
        instance, fits C = 1, 2 and 3, so pass it whenever you know it).
    Returns:
      float [B, H, W, C] in [-1, 1] on the b-bit grid.
    """
    params = tf.convert_to_tensor(params)
    p = params.shape[-1]
    if num_channels is None:
        fits = [c for c in range(1, 17) if p % (1 + 2 * c + c * (c - 1) // 2) == 0]
        if len(fits) != 1:
            raise ValueError(
                f"cannot tell the channel count from {p} parameters per pixel "
                f"(candidates {fits}); pass num_channels"
            )
        num_channels = fits[0]
    per = 1 + 2 * num_channels + num_channels * (num_channels - 1) // 2
    if p % per:
        raise ValueError(f"{p} parameters per pixel do not fit {num_channels} channels")
    if seed is None:
        seed = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    elif isinstance(seed, int):
        seed = [0, seed]
    mix_u, logistic_u = sampling_noise(
        tf.shape(params)[:-1],
        num_channels,
        p // per,
        seed,
        params.dtype,
    )
    return sample_with_noise(params, num_channels, num_bits, mix_u, logistic_u)
