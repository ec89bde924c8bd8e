"""Autoregressive sampling and image completion for ``PixelCNNPP``.

Two samplers with the same signature and the same results:

* ``sample_naive``: the reference. For each pixel in raster order it runs the whole
  network on the current image and samples that pixel (all channels at once, the
  channel coupling lives in ``likelihood.sample_with_noise``). H * W full forward passes,
  inside one ``tf.function`` (a ``tf.while_loop``).
* ``sample_fast``: cached generation (Ramachandran et al. 2017, "Fast Generation for
  Convolutional Autoregressive Models", arXiv 1704.06001). Each layer keeps a cache of
  the inputs it will read again; at each pixel only the values that just became
  computable are computed, each with the layer's own weights on a small window
  (``pixelcnn.generation``).

Both samplers draw all their noise up front with ``likelihood.sampling_noise([N, H, W],
C, K, seed)`` (outside any XLA cluster, so the stream is identical for both), so for a
given seed they produce the same integers; the only difference is the order of floating
point operations inside the network (~1e-6 relative in float32), which can flip a sample
only when it lands within that distance of a bin edge.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import tensorflow as tf

from pixelcnn import checks, distribute, likelihood
from pixelcnn.inference.generation import CachedGeneration

if TYPE_CHECKING:
    from pixelcnn.model import PixelCNNPP

__all__ = [
    "BATCH_SIZE",
    "FILL",
    "batch_layout",
    "compiled",
    "complete",
    "fixed_batches",
    "sample_fast",
    "sample_naive",
    "top_rows_mask",
]

Labels = Sequence[int] | np.ndarray | tf.Tensor | None
Seed = int | tuple[int, int] | Sequence[int]


# ----------------------------------------------------------------------------- inputs
def top_rows_mask(height: int, width: int, rows: int) -> np.ndarray:
    """A known-pixel mask that keeps the top ``rows`` rows: bool [height, width]."""
    if not 0 <= int(rows) <= int(height):
        raise ValueError(f"rows must be in [0, {height}], got {rows}")
    mask = np.zeros((int(height), int(width)), dtype=bool)
    mask[: int(rows)] = True
    return mask


def _check_labels(model, labels, n: int):
    """labels: int [N] in [0, num_classes) for a conditional model, else None."""
    checked = checks.model_labels(model.num_classes, labels, n)
    return None if checked is None else tf.constant(checked, tf.int32)


def cycled_labels(num_classes: int | None, labels, num: int):
    """Labels for ``num`` images: the given ones repeated in turn (default 0, 1, 2,
    ...) as int32 [num] for a conditional model, None for an unconditional one
    (ValueError if labels were given)."""
    if not num_classes:
        if labels:
            raise ValueError("labels are only for class-conditional models")
        return None
    if labels:
        checks.check_labels(np.array(labels), len(labels), num_classes, "labels")
    base = list(labels) or list(range(num_classes))
    return tf.constant([base[i % len(base)] for i in range(num)], tf.int32)


def _check_seed(seed) -> tf.Tensor:
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        seed = (0, int(seed))
    arr = np.asarray(seed)
    if arr.shape != (2,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"seed must be an int or a pair of ints, got {seed!r}")
    return tf.constant(arr, tf.int64)


def _check_known(model, known_images, known_mask, n: int):
    """Returns (known_x float32 [N, H, W, C] in [-1, 1], mask bool [N, H, W])."""
    h, w, c = model.image_shape
    if (known_images is None) != (known_mask is None):
        raise ValueError("pass known_images and known_mask together (or neither)")
    if known_images is None:
        return tf.zeros([n, h, w, c], tf.float32), tf.zeros([n, h, w], tf.bool)
    images = np.asarray(known_images)
    if images.shape[:1] != (n,):
        raise ValueError(
            f"known_images must hold num_images = {n} images, got shape {images.shape}"
        )
    checks.check_integer_images(images, model.image_shape, model.num_bits, "known_images")
    mask = np.asarray(known_mask)
    if mask.dtype != bool:
        raise ValueError(f"known_mask must be bool, got dtype {mask.dtype}")
    if mask.shape == (h, w):
        mask = np.broadcast_to(mask, (n, h, w))
    elif mask.shape != (n, h, w):
        raise ValueError(
            f"known_mask must have shape [{h}, {w}] or [{n}, {h}, {w}], got {mask.shape}"
        )
    # The same float32 conversion for both samplers, so known pixels enter the network
    # with identical values.
    known_x = likelihood.to_unit_range(tf.constant(images, tf.int32), model.num_bits)
    return known_x, tf.constant(mask, tf.bool)


def _prepare(model, num_images, labels, seed, known_images, known_mask):
    """Validates the arguments; returns the tensors both samplers consume."""
    n = checks.check_positive_int(num_images, "num_images")
    labels_t = _check_labels(model, labels, n)
    seed_t = _check_seed(seed)
    known_x, mask = _check_known(model, known_images, known_mask, n)
    h, w, c = model.image_shape
    if not model.built:
        # Build (random weights) eagerly, as a plain call would: variables cannot be
        # created inside the compiled samplers.
        model(tf.zeros([1, h, w, c]), None if labels_t is None else labels_t[:1])
    # Drawn eagerly, outside any XLA cluster: the same stream for both samplers.
    mix_u, logistic_u = likelihood.sampling_noise([n, h, w], c, model.num_mixtures, seed_t)
    return labels_t, mix_u, logistic_u, known_x, mask


def compiled(model, kind: str):
    """The model's generation program of kind "naive", "fast_xla" or "fast_graph": a
    tf.function held by ``model.programs`` (traced once per batch size)."""

    def build():
        if kind == "naive":
            # A weak reference, so the model's own programs do not keep it alive.
            ref = weakref.ref(model)
            return tf.function(lambda *args: _naive_loop(ref(), *args), autograph=False)
        jit = kind == "fast_xla"
        plan = CachedGeneration(model, jit)
        return tf.function(plan.generate, jit_compile=jit, autograph=False)

    return model.programs.get(kind, build)


BATCH_SIZE = 16  # images per compiled generation call, unless the caller picks another


class Fill(NamedTuple):
    """What the images that fill up the last batch get, per generation argument."""

    labels: int = 0
    mix_u: float = 0.5
    logistic_u: float = 0.5
    known: float = 0.0
    mask: bool = False


FILL = Fill()


def batch_layout(x: tf.Tensor, batch_size: int, value) -> tf.Tensor:
    """x [n, ...] as [ceil(n / batch_size), batch_size, ...], the last batch filled up
    with ``value``: the one batch layout of generation. It works for a static n and
    for one known only when a graph runs (the export's ``sample`` signature)."""
    n = tf.shape(x)[0]
    batches = (n + batch_size - 1) // batch_size
    pad = tf.concat([[[0, batches * batch_size - n]], tf.zeros([x.shape.rank - 1, 2], tf.int32)], 0)
    x = tf.pad(x, pad, constant_values=tf.cast(value, x.dtype))
    return tf.reshape(x, tf.concat([[batches, batch_size], tf.shape(x)[1:]], 0))


def fixed_batches(
    strategy: tf.distribute.Strategy | None, fn, args: tuple, fill: tuple, batch_size: int
) -> tf.Tensor:
    """fn(*args) over the images in batches of exactly ``batch_size``, in order.

    args: tensors with the images as their first axis, or None. The batches are
    ``batch_layout``'s (``fill[k]`` fills up args[k]) and the extra results dropped; with
    a strategy of k replicas each replica runs one batch, k at a time, and batches left
    over after the last full round run one by one on the default device. So image n is
    always computed in the same position of the same program, whatever the number of
    images or replicas: the results are the same integers (floating point results can
    depend on the batch shape), which the exported sampler and the codec rely on.
    """
    k = 1 if strategy is None else strategy.num_replicas_in_sync
    n = int(next(a for a in args if a is not None).shape[0])
    laid = [
        None if a is None else batch_layout(a, batch_size, value)
        for a, value in zip(args, fill, strict=True)
    ]
    batches = int(next(a for a in laid if a is not None).shape[0])

    def group(start, count):  # batches [start, start + count) as one tensor per arg
        return tuple(
            None if a is None else tf.reshape(a[start : start + count], [-1, *a.shape[2:]])
            for a in laid
        )

    outputs = []
    for b in range(0, batches, k):
        if batches - b >= k:  # one batch per replica
            outputs.append(distribute.run_split(strategy, fn, group(b, k)))
        else:  # fewer batches left than replicas: the same program, one batch at a time
            for rest in range(b, batches):
                outputs.append(fn(*group(rest, 1)))
    return tf.concat(outputs, axis=0)[:n]


def _run(model, kind: str, args: tuple, strategy: tf.distribute.Strategy | None, batch_size):
    """The compiled sampler on ``args`` in fixed batches (``fixed_batches``)."""
    batch_size = checks.check_positive_int(batch_size, "batch_size")
    return fixed_batches(strategy, compiled(model, kind), args, FILL, batch_size)


# ----------------------------------------------------------------------------- naive
def _naive_loop(model, labels, mix_u, logistic_u, known_x, mask):
    """The whole reference generation: H * W full forward passes in a while loop."""
    h, w, c = model.image_shape
    n = mix_u.shape[0]
    positions = tf.reshape(tf.range(h * w), [1, h, w, 1])

    def body(t, x):
        i, j = t // w, t % w
        params = model(x, labels, training=False)  # float32 [N, H, W, P]
        value = likelihood.sample_with_noise(
            params[:, i, j], c, model.num_bits, mix_u[:, i, j], logistic_u[:, i, j]
        )  # [N, C] in [-1, 1]
        value = tf.where(mask[:, i, j, None], known_x[:, i, j], value)
        return t + 1, tf.where(positions == t, value[:, None, None, :], x)

    x0 = tf.zeros([n, h, w, c], tf.float32)
    _, x = tf.while_loop(lambda t, _: t < h * w, body, (tf.constant(0), x0))
    return likelihood.to_integers(x, model.num_bits)


def sample_naive(
    model: PixelCNNPP,
    num_images: int,
    labels: Labels = None,
    seed: Seed = (0, 0),
    known_images: np.ndarray | tf.Tensor | None = None,
    known_mask: np.ndarray | tf.Tensor | None = None,
    strategy: tf.distribute.Strategy | None = None,
    batch_size: int = BATCH_SIZE,
) -> tf.Tensor:
    """Reference sampler: one full forward pass per pixel (slow, obviously correct).

    Args:
      model: a ``PixelCNNPP`` (built with random weights if it never ran); dropout is
        off (``training=False``).
      num_images: N.
      labels: int [N] in [0, num_classes) for a class-conditional model, else None.
      seed: int or pair of ints; the noise is ``sampling_noise([N, H, W], C, K, seed)``.
      known_images: int [N, H, W, C] in [0, 2**bits), or None.
      known_mask: bool [H, W] or [N, H, W]; where true the pixel (all channels) is copied
        from ``known_images`` instead of sampled (image completion). None with
        ``known_images=None``.
      strategy: optional tf.distribute strategy whose scope holds the model's variables
        (e.g. MirroredStrategy over several GPUs): the images are split over its
        replicas; the result is the same as on one device.
      batch_size: images per compiled call (the last batch is filled up, the extra
        images dropped). The same seed and batch size give the same integers on one
        device or several (``fixed_batches``); another batch size can change them
        (floating point rounding depends on the batch shape).
    Returns:
      int32 [N, H, W, C] in [0, 2**model.num_bits).
    """
    args = _prepare(model, num_images, labels, seed, known_images, known_mask)
    return _run(model, "naive", args, strategy, batch_size)


# ----------------------------------------------------------------------------- fast
def sample_fast(
    model: PixelCNNPP,
    num_images: int,
    labels: Labels = None,
    seed: Seed = (0, 0),
    known_images: np.ndarray | tf.Tensor | None = None,
    known_mask: np.ndarray | tf.Tensor | None = None,
    strategy: tf.distribute.Strategy | None = None,
    batch_size: int = BATCH_SIZE,
    jit_compile: bool = True,
) -> tf.Tensor:
    """Cached sampler (Ramachandran et al. 2017): the same integers as ``sample_naive``.

    Same arguments and result as ``sample_naive``: returns int32 [N, H, W, C] in
    [0, 2**model.num_bits). Each pixel costs one position of every layer (plus one row
    of the u stream per image row) instead of a whole forward pass. ``jit_compile``:
    compile the generation with XLA (the default: it fuses the many small per-pixel ops
    and updates the caches in place, so it compiles more slowly but runs faster;
    benchmarks/README.md, "Sampling") or run it as a plain TF graph.

    The first call per model and batch size traces and compiles the generation program
    (XLA; tens of seconds for the paper-sized networks), later calls reuse it. The
    parameters agree with the naive sampler's up to float rounding (different operation
    order), so a float32 sample that lands within ~1e-6 of a bin edge can round the other
    way, after which the two images diverge; with 8-bit images of 32x32 that happens
    now and then, with float64 models practically never.
    """
    args = _prepare(model, num_images, labels, seed, known_images, known_mask)
    kind = "fast_xla" if jit_compile else "fast_graph"
    return _run(model, kind, args, strategy, batch_size)


def complete(
    model: PixelCNNPP,
    images: np.ndarray | tf.Tensor,
    known_mask: np.ndarray | tf.Tensor | None = None,
    labels: Labels = None,
    seed: Seed = (0, 0),
    fast: bool = True,
    keep_rows: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    batch_size: int = BATCH_SIZE,
) -> tf.Tensor:
    """Image completion: samples the unknown pixels given the known ones.

    Args:
      model: a ``PixelCNNPP``.
      images: int [N, H, W, C] in [0, 2**bits); only the known pixels are read.
      known_mask: bool [H, W] or [N, H, W], true where the pixel (all its channels) is
        given.
      labels, seed: as in ``sample_naive``.
      fast: use ``sample_fast`` (default) or ``sample_naive``; both give the same result.
      keep_rows: instead of ``known_mask``, keep the top ``keep_rows`` rows (see
        ``top_rows_mask``).
      strategy, batch_size: as in ``sample_naive``.
    Returns:
      int32 [N, H, W, C] in [0, 2**bits), equal to ``images`` where the mask is true.
    """
    if (known_mask is None) == (keep_rows is None):
        raise ValueError("pass exactly one of known_mask and keep_rows")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != tuple(model.image_shape):
        raise ValueError(
            f"images must have shape [N, {', '.join(map(str, model.image_shape))}] "
            f"(model.image_shape), got {images.shape}"
        )
    if keep_rows is not None:
        h, w, _ = model.image_shape
        known_mask = top_rows_mask(h, w, keep_rows)
    sampler = sample_fast if fast else sample_naive
    return sampler(model, images.shape[0], labels, seed, images, known_mask, strategy, batch_size)
