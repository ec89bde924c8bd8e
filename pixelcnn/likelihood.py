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

from pixelcnn import checks

MIN_LOG_SCALE = -7.0  # the authors clamp log scales below at -7


def params_per_component(num_channels: int) -> int:
    """Network outputs per mixture component for C channels: its logit, C means, C log
    scales and C (C - 1) / 2 coupling coefficients."""
    c = num_channels
    return 1 + 2 * c + c * (c - 1) // 2


def num_params(num_channels: int, num_mixtures: int) -> int:
    """Network outputs per pixel for C channels and K mixture components."""
    return num_mixtures * params_per_component(num_channels)


def mixtures_in(num_outputs: int, num_channels: int) -> int:
    """K from the outputs per pixel P and C; ValueError unless P fits C channels."""
    per = params_per_component(num_channels)
    if num_outputs % per:
        raise ValueError(
            f"params have {num_outputs} values per pixel, not a multiple of {per} "
            f"(what {num_channels} channels need per mixture component)"
        )
    return num_outputs // per


def param_layout(num_channels: int, num_mixtures: int) -> list[tuple[str, int, int, tuple]]:
    """Where each kind of parameter lies in the P outputs of a pixel, as (name, start,
    stop, shape): [logits (K) | means (C K) | log_scales (C K) | coeffs (C (C - 1) / 2 K)],
    each reshaped to ``shape`` (channels before components)."""
    c, k = num_channels, num_mixtures
    n_coeffs = c * (c - 1) // 2
    sizes = [("logits", (k,)), ("means", (c, k)), ("log_scales", (c, k)), ("coeffs", (n_coeffs, k))]
    layout, start = [], 0
    for name, shape in sizes:
        stop = start + math.prod(shape)
        layout.append((name, start, stop, shape))
        start = stop
    return layout


def coeff_index(c: int, j: int) -> int:
    """Row of coefficient (channel c, earlier channel j < c) in the coeffs tensor."""
    if not 0 <= j < c:
        raise ValueError(f"coefficient ({c}, {j}) needs 0 <= j < c")
    return c * (c - 1) // 2 + j


def unpack_params(params: tf.Tensor, num_channels: int, num_mixtures: int):
    """Splits raw network outputs [..., P] into mixture parameters (``param_layout``).

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
    parts = {
        name: tf.reshape(params[..., start:stop], tf.concat([batch_shape, shape], 0))
        for name, start, stop, shape in param_layout(c, k)
    }
    return parts["logits"], parts["means"], parts["log_scales"], tf.tanh(parts["coeffs"])


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
    return checks.to_unit(tf.cast(images, dtype), num_bits)


def to_integers(x: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Floats in [-1, 1] -> nearest integer level in [0, 2**b), int32."""
    v = tf.round(checks.to_levels(tf.cast(x, tf.float32), num_bits))
    return tf.cast(tf.clip_by_value(v, 0.0, float(2**num_bits - 1)), tf.int32)


def check_unit_grid(x, num_bits: int, what: str = "x"):
    """Raises ValueError unless x lies in [-1, 1] on the b-bit grid.

    Eager tensors and arrays are checked in Python (``checks.check_float_grid``);
    inside tf.function an assertion op is returned (InvalidArgumentError when run).
    """
    if tf.executing_eagerly() or isinstance(x, np.ndarray):
        checks.check_float_grid(np.asarray(x, dtype=np.float64), num_bits, what)
        return None
    top = float(2**num_bits - 1)
    x = tf.cast(x, tf.float32)
    scaled = checks.to_levels(x, num_bits)
    return tf.debugging.Assert(
        tf.logical_and(
            tf.reduce_all(tf.abs(x) <= 1.0 + 1e-6),
            tf.reduce_all(
                tf.abs(scaled - tf.round(scaled)) <= checks.grid_tolerance(num_bits) * top
            ),
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
    k = mixtures_in(params.shape[-1], c)
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
    mixtures_in(params.shape[-1], x.shape[-1])  # ValueError unless P fits C
    assertion = check_unit_grid(x, num_bits) if validate else None
    deps = [assertion] if assertion is not None else []
    with tf.control_dependencies(deps):
        return tf.reduce_sum(pixel_log_prob(x, params, num_bits), axis=[1, 2])


def pixel_log_prob(x: tf.Tensor, params: tf.Tensor, num_bits: int = 8) -> tf.Tensor:
    """log p of each pixel (all its channels) given the pixels before it, in nats:
    float [B, H, W], summing to ``mixture_log_prob`` over H and W. x: float [B, H, W, C]
    on the grid (not validated here); params: [B, H, W, P]."""
    log_weights, log_probs = subpixel_log_prob(x, params, num_bits)
    return tf.reduce_logsumexp(log_weights + tf.reduce_sum(log_probs, axis=-2), axis=-1)


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
    k = mixtures_in(params.shape[-1], c)
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
        fits = [c for c in range(1, 17) if p % params_per_component(c) == 0]
        if len(fits) != 1:
            raise ValueError(
                f"cannot tell the channel count from {p} parameters per pixel "
                f"(candidates {fits}); pass num_channels"
            )
        num_channels = fits[0]
    k = mixtures_in(p, num_channels)
    if seed is None:
        seed = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    elif isinstance(seed, int):
        seed = [0, seed]
    mix_u, logistic_u = sampling_noise(
        tf.shape(params)[:-1],
        num_channels,
        k,
        seed,
        params.dtype,
    )
    return sample_with_noise(params, num_channels, num_bits, mix_u, logistic_u)
