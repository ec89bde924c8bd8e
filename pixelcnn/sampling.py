"""Autoregressive sampling and image completion for ``PixelCNNPP``.

Two samplers with the same signature and the same results:

* ``sample_naive``: the reference. For each pixel in raster order it runs the whole
  network on the current image and samples that pixel (all channels at once, the
  channel coupling lives in ``likelihood.sample_with_noise``). H * W full forward passes,
  inside one ``tf.function`` (a ``tf.while_loop``).
* ``sample_fast``: cached generation (Ramachandran et al. 2017, "Fast Generation for
  Convolutional Autoregressive Models", arXiv 1704.06001). Each layer keeps a cache of
  the inputs it will read again; at each pixel only the values that just became
  computable are computed, each with the layer's own weights on a small window.

Why the cache schedule is exact. Call a tensor at resolution r (stride 2**r) "u-type"
(the u stream: it only sees rows above) or "ul-type" (the ul stream: rows above and
pixels to the left). By causality of the shifted convolutions,

* row a of a u-type tensor depends only on image rows < a * 2**r, and
* position (a, b) of a ul-type tensor depends only on image pixels strictly before
  (a * 2**r, b * 2**r) in raster order.

So when pixel (i, j) is about to be sampled, these are final and get computed: for every
r with i % 2**r == 0 and j == 0, the next row (i / 2**r) of every u-type tensor at
resolution r; for every r with i % 2**r == 0 and j % 2**r == 0, the ul-type values at
(i / 2**r, j / 2**r). The resolutions due are always 0..m for some m, and they are
computed in the network's topological order (first layers; first half at 0..m; second
half at m..0). A transposed conv is applied as soon as its input is known: output
(2a + p, 2b + q) is input (a, b) times kernel tap (p, q), so one input row (position)
yields two output rows (a 2x2 block), which the finer resolution reads later.
``CachedGeneration`` describes the loops and caches.

Both samplers draw all their noise up front with ``likelihood.sampling_noise([N, H, W],
C, K, seed)`` (outside any XLA cluster, so the stream is identical for both), so for a
given seed they produce the same integers; the only difference is the order of floating
point operations inside the network (~1e-6 relative in float32), which can flip a sample
only when it lands within that distance of a bin edge.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from pixelcnn import contract, distribute, internals, likelihood
from pixelcnn.layers import WeightNormConv2DTranspose, concat_elu

if TYPE_CHECKING:
    from pixelcnn.model import PixelCNNPP

__all__ = [
    "BATCH_SIZE",
    "CachedGeneration",
    "compiled",
    "complete",
    "fixed_batches",
    "model_cache",
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
    checked = contract.model_labels(model.num_classes, labels, n)
    return None if checked is None else tf.constant(checked, tf.int32)


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
    contract.check_integer_images(images, model.image_shape, model.num_bits, "known_images")
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
    n = contract.check_positive_int(num_images, "num_images")
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


# Compiled functions, one set per model (a tf.function retraces per batch size).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_cache(model) -> dict:
    """A dict that lives as long as ``model`` (compiled programs for it: here and in
    ``pixelcnn.codec``)."""
    return _CACHE.setdefault(model, {})


def compiled(model, kind: str):
    """The model's tf.function of kind "naive", "fast_xla" or "fast_graph" (cached)."""
    per_model = model_cache(model)
    if kind not in per_model:
        if kind == "naive":
            # Only a weak reference to the model in the cached value, or the cache would
            # keep every model alive (the fast plan holds a weak reference too).
            ref = weakref.ref(model)
            per_model[kind] = tf.function(lambda *args: _naive_loop(ref(), *args), autograph=False)
        else:
            jit = kind == "fast_xla"
            plan = CachedGeneration(model, jit)
            per_model[kind] = tf.function(plan.generate, jit_compile=jit, autograph=False)
    return per_model[kind]


BATCH_SIZE = 16  # images per compiled generation call, unless the caller picks another

# What the images that fill up the last batch get: label 0, noise 0.5, no known pixels.
FILL = (0, 0.5, 0.5, 0.0, False)


def check_batch_size(batch_size) -> int:
    return contract.check_positive_int(batch_size, "batch_size")


def fixed_batches(
    strategy: tf.distribute.Strategy | None, fn, args: tuple, fill: tuple, batch_size: int
) -> tf.Tensor:
    """fn(*args) over the images in batches of exactly ``batch_size``, in order.

    args: tensors with the images as their first axis, or None. The last batch is
    filled up (``fill[k]`` for args[k]) and the extra results dropped; with a strategy
    of k replicas each replica runs one batch, k at a time, and batches left over after
    the last full round run one by one on the default device. So image n is
    always computed in the same position of the same program, whatever the number of
    images or replicas: the results are the same integers (floating point results can
    depend on the batch shape), which the exported sampler and the codec rely on.
    """
    k = 1 if strategy is None else strategy.num_replicas_in_sync
    n = int(next(a for a in args if a is not None).shape[0])
    batches = -(-n // batch_size)

    def part(start, size):
        return tuple(
            a if a is None else _fill_up(a[start : start + size], size, value)
            for a, value in zip(args, fill, strict=True)
        )

    outputs = []
    for b in range(0, batches, k):
        if batches - b >= k:  # one batch per replica
            group = part(b * batch_size, k * batch_size)
            outputs.append(distribute.run_split(strategy, fn, group))
        else:  # fewer batches left than replicas: the same program, one batch at a time
            for rest in range(b, batches):
                outputs.append(fn(*part(rest * batch_size, batch_size)))
    return tf.concat(outputs, axis=0)[:n]


def _fill_up(x: tf.Tensor, size: int, value) -> tf.Tensor:
    """x [m, ...] padded along the first axis to [size, ...] with ``value``."""
    extra = size - int(x.shape[0])
    if extra == 0:
        return x
    pad = [[0, extra]] + [[0, 0]] * (x.shape.rank - 1)
    return tf.pad(x, pad, constant_values=tf.cast(value, x.dtype))


def _run(model, kind: str, args: tuple, strategy: tf.distribute.Strategy | None, batch_size):
    """The compiled sampler on ``args`` in fixed batches (``fixed_batches``)."""
    batch_size = check_batch_size(batch_size)
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
def _trailing_zeros(n: int) -> int:
    """The largest t with n % 2**t == 0, for n >= 1."""
    return (n & -n).bit_length() - 1


class CachedGeneration:
    """The cached generation program for one model (traced once per batch size).

    Schedule. Pixel (i, j) is due at level m(i, j) = min(tz(i), tz(j), R - 1) (tz: the
    number of trailing zero bits, tz(0) = infinity): the ul-type values of resolutions
    0..m are computed there, and at j = 0 the u-type rows of resolutions 0..m(i, 0). The
    level only depends on i and j modulo B = 2**(R - 1), so the loops run over blocks of
    B rows and, inside row i, over blocks of 2**m(i, 0) columns, with the block bodies
    unrolled in Python: every level is static and there is no ``tf.cond`` (XLA copies
    the buffers that pass through a conditional).

    The last blocks may stick out of the image. Those "phantom" rows and columns (up to
    Hp = B ceil(H / B), Wp = B ceil(W / B)) are computed into buffers large enough for
    them, and phantom values only ever feed phantom values: the ul stream reads up and
    left, the u stream is computed on whole real-width rows and reads only rows above,
    and the stride-2 and transposed convs map phantom positions to phantom positions
    (sizes round up). The only real readers of a phantom column are the first [2, 3] and
    [1, 3] convs at the image's right edge, which read one column past it, the zero
    padding: phantom pixels are stored as zeros (ones channel included) to keep it zero.
    Phantom rows skip their column loop.

    Caches. Every conv input is a *stream*, and nothing is ever read from a buffer that
    is written in the same loop (XLA must then copy the buffer at every pixel):

    * a row stream (u-type, at resolution r of size Hr x Wr) keeps only ``prev``, the
      previous row zero-padded by one column on each side [N, 1, Wr + 2, C]. A [2, 3]
      down-shifted conv's output row a reads padded rows a - 1, a: ``prev`` and the new
      row. The stride-2 conv to r + 1 reads the same window at even rows.
    * a position stream (ul-type) keeps ``prev``, the previous row (one zero column on the
      left) [N, 1, Wp_r + 1, C], read only; ``cur``, the current row, written only; and
      ``left``, the value just left of the current position [N, 1, 1, C]. A [2, 2]
      down-right conv's output (a, b) reads (a - 1, b - 1), (a - 1, b) from ``prev``,
      (a, b - 1) = ``left`` and (a, b) = the new value; the stride-2 conv to r + 1 reads
      the same window at even (a, b). Each new row of resolution r swaps ``prev`` and
      ``cur``; at b = 0 ``left`` (the previous row's last value) is replaced by zeros.
    * the image is a position stream of the input with its ones channel (``x``), padded on
      both sides, plus the output image ``out`` [N, Hp, Wp, C] (written only).
    * transposed convs, u: ``double`` [N, 2, 2 W(r+1), F] are the two rows that row a' of
      resolution r + 1 produces for rows 2a', 2a' + 1 of resolution r (uncropped; the
      reader crops to Wr). ul: input (a', b') fills the 2x2 block (2a' + p, 2b' + q) with
      tap (p, q); ``last`` holds the latest block (read on even rows, where the block is
      from this pixel or the previous one at that resolution), and its bottom row goes to
      a row stream (``cur``/``prev``) that the odd row reads.
    * u-type resnet outputs of the current row ([N, 1, Wp_r, F], zero beyond Wr) are the ul
      stream's auxiliary inputs; they are loop invariants of the column loop.
    """

    def __init__(self, model, jit: bool):
        self._model = weakref.ref(model)  # the cache must not keep the model alive
        self.jit = jit
        self.levels = model.residual_blocks
        self.sizes = model.sizes
        self.filters = model.filters
        self.dtype = tf.as_dtype(model.compute_dtype)
        self.block = 2 ** (self.levels - 1)
        height, width, _ = model.image_shape
        self.padded_hw = (
            -(-height // self.block) * self.block,
            -(-width // self.block) * self.block,
        )
        self._weights: dict = {}

    @property
    def model(self):
        return self._model()

    # ------------------------------------------------------------------ primitives
    def _linear(self, layer, x):
        """``layer.preactivation(x)`` on an already padded window x, with the weight-normed
        kernel computed once per generation (not per pixel).

        A window exactly the size of the kernel (one output position) is a matrix
        product, much cheaper than a tiny convolution; anything else goes through the
        layer's own ``linear_map``.
        """
        kernel, bias = self._weights[id(layer)]
        x = tf.cast(x, self.dtype)
        n, h, w, c = x.shape
        is_conv = not isinstance(layer, WeightNormConv2DTranspose)
        if is_conv and (h, w) == tuple(layer.kernel_size):
            y = tf.matmul(tf.reshape(x, [n, h * w * c]), tf.reshape(kernel, [h * w * c, -1]))
            return tf.reshape(y, [n, 1, 1, -1]) + bias
        return layer.linear_map(x, kernel) + bias

    def _put(self, buf, value, row, col):
        """buf with ``value`` [N, h, w, C] written at spatial offset (row, col)."""
        value = tf.cast(value, buf.dtype)
        if self.jit:
            return internals.dynamic_update_slice(buf, value, tf.stack([0, row, col, 0]))
        n, h, w, _ = value.shape
        grid = tf.meshgrid(tf.range(n), row + tf.range(h), col + tf.range(w), indexing="ij")
        return tf.tensor_scatter_nd_update(buf, tf.stack(grid, axis=-1), value)

    @staticmethod
    def _window(buf, row, col, h, w):
        """buf[:, row:row + h, col:col + w] with static h, w."""
        n, _, _, c = buf.shape
        return tf.slice(buf, tf.stack([0, row, col, 0]), [n, h, w, c])

    @staticmethod
    def _row_window(state, key, row):
        """Pushes ``row`` [N, 1, Wr, C] on a row stream; returns the [N, 2, Wr + 2, C]
        window (previous and new row, zero-padded columns) of a [2, 3] down conv."""
        padded = tf.pad(row, [[0, 0], [0, 0], [1, 1], [0, 0]])
        window = tf.concat([state[key + "/prev"], padded], axis=1)
        state[key + "/prev"] = padded
        return window

    def _pos_window(self, state, prev, key, b, value):
        """Pushes ``value`` [N, 1, 1, C] at column b of a position stream; returns the
        [N, 2, 2, C] window of a [2, 2] down-right conv at (current row, b).

        ``prev`` holds the read-only previous rows (a loop invariant of the column loop).
        """
        above = self._window(prev[key + "/prev"], 0, b, 1, 2)
        # ``left`` still holds the previous row's last value at b = 0: the padding is zero.
        left = state[key + "/left"]
        left = tf.where(b > 0, left, tf.zeros_like(left))
        window = tf.concat([above, tf.concat([left, value], axis=2)], axis=1)
        state[key + "/cur"] = self._put(state[key + "/cur"], value, 0, b + 1)
        state[key + "/left"] = value
        return window

    def _streams(self, kind: str):
        """Names of the cached streams of one kind, "u" (whole rows) or "ul" (single
        positions): (resolution, key, channels)."""
        f = self.filters
        for r in range(self.levels):
            for part in ("up", "down"):
                for k in range(len(self.model.level(part, r).u)):
                    yield r, f"{kind}/r{r}/{part}{k}/c1", 2 * f
                    yield r, f"{kind}/r{r}/{part}{k}/c2", 2 * f
            if r + 1 < self.levels:
                yield r, f"{kind}/r{r}/halve", f

    def _u_streams(self):
        return self._streams("u")

    def _ul_streams(self):
        return self._streams("ul")

    def initial_state(self, n: int, zero: tf.Tensor) -> dict:
        """All caches, filled with ``zero`` (a scalar 0): see the class docstring.

        ``zero`` must not be a compile-time constant: with constant initial values TF
        2.21's tf2xla propagates some of them (caches that no pixel of a row block
        changes) into the loop bodies and then fails on the chain of column loops
        ("Cannot find body function ... for While node", tensorflow issue #122886).
        """
        channels = self.model.image_shape[2]
        hp, wp = self.padded_hw
        f, dt = self.filters, self.dtype

        def zeros(*shape):
            return tf.fill([n, *shape], tf.cast(zero, dt))

        state = {
            "out": tf.fill([n, hp, wp, channels], tf.cast(zero, tf.float32)),
            "x/prev": zeros(1, wp + 2, channels + 1),
            "x/cur": zeros(1, wp + 2, channels + 1),
            "x/left": zeros(1, 1, channels + 1),
        }
        for r, key, c in self._u_streams():
            state[key + "/prev"] = zeros(1, self.sizes[r][1] + 2, c)
        for r, key, c in self._ul_streams():
            for part in ("prev", "cur"):
                state[f"{key}/{part}"] = zeros(1, wp // 2**r + 1, c)
            state[key + "/left"] = zeros(1, 1, c)
        for r in range(self.levels - 1):  # transposed convs into resolution r
            state[f"u/r{r}/double"] = zeros(2, 2 * self.sizes[r + 1][1], f)
            state[f"ul/r{r}/double/last"] = zeros(2, 2, f)
            for part in ("prev", "cur"):
                state[f"ul/r{r}/double/{part}"] = zeros(1, wp // 2**r, f)
        return state

    # ------------------------------------------------------------------ u stream (rows)
    def _u_resnet_row(self, block, state, key, x, aux, h):
        """The next row of a down-shifted gated resnet's output; x, aux: [N, 1, Wr, *]."""
        c = self._linear(block.conv1, self._row_window(state, key + "/c1", concat_elu(x)))
        if aux is not None:
            c = c + self._linear(block.nin_aux, concat_elu(aux))
        # (dropout is the identity at training=False)
        c = self._linear(block.conv2, self._row_window(state, key + "/c2", concat_elu(c)))
        return block.gate(x, c, h)

    def _new_row(self, i, top: int, state, h):
        """Everything due at the start of image row i, where i % 2**top == 0 (top static).

        Computes row i / 2**r of every u-type tensor at resolutions r = 0..top, starts a
        new row in the ul position streams of those resolutions and in the image stream.
        Returns the resnets' output rows, padded to Wp_r columns, for the ul stream.
        """
        model = self.model
        wp = self.padded_hw[1]
        width = model.image_shape[1]
        # u = down_shift(first_u(x)): row i is first_u's row i - 1, which reads image rows
        # i - 2, i - 1 (zeros above the image; u's row 0 is zeros).
        window = tf.concat([state["x/prev"], state["x/cur"]], axis=1)[:, :, : width + 2]
        state["x/prev"], state["x/cur"] = state["x/cur"], state["x/prev"]
        first = self._linear(model.first_u, window)
        first = tf.where(i > 0, first, tf.zeros_like(first))

        rows, skips, halved = {}, {}, {}
        for r in range(top + 1):  # first half ("up pass")
            level = model.level("up", r)
            u = first if r == 0 else self._linear(model.level("up", r - 1).halve_u, halved[r - 1])
            skips[r] = [u]
            for k, block in enumerate(level.u):
                u = self._u_resnet_row(block, state, f"u/r{r}/up{k}", u, None, h)
                rows[r, "up", k] = u
                skips[r].append(u)
            if r + 1 < self.levels:
                # Stride-2 conv: row a' of r + 1 reads padded rows 2a' - 1, 2a' of r.
                halved[r] = self._row_window(state, f"u/r{r}/halve", u)
        for r in range(top, -1, -1):  # second half ("down pass")
            level = model.level("down", r)
            if r + 1 < self.levels:
                # Rows 2a', 2a' + 1 of the transposed conv's output came from row a' of
                # r + 1: computed just now on even rows (r < top), one row earlier on odd.
                parity = 0 if r < top else 1
                u = state[f"u/r{r}/double"][:, parity : parity + 1, : self.sizes[r][1]]
            else:
                u = skips[r].pop()
            for k, block in enumerate(level.u):
                u = self._u_resnet_row(block, state, f"u/r{r}/down{k}", u, skips[r].pop(), h)
                rows[r, "down", k] = u
            assert not skips[r], "every u skip connection must be consumed"
            if r > 0:
                state[f"u/r{r - 1}/double"] = self._linear(level.double_u, u)

        for (r, part, k), row in rows.items():
            extra = wp // 2**r - row.shape[2]
            rows[r, part, k] = tf.pad(row, [[0, 0], [0, 0], [0, extra], [0, 0]])
        for r, key, _ in self._ul_streams():
            if r <= top:
                state[key + "/prev"], state[key + "/cur"] = (
                    state[key + "/cur"],
                    state[key + "/prev"],
                )
        for r in range(min(top + 1, self.levels - 1)):
            prev, cur = f"ul/r{r}/double/prev", f"ul/r{r}/double/cur"
            state[prev], state[cur] = state[cur], state[prev]
        return rows

    # ------------------------------------------------------------------ ul stream (positions)
    def _ul_resnet_pos(self, block, state, prev, key, b, x, aux, h):
        """Position b (current row) of a down-right gated resnet; x, aux: [N, 1, 1, *]."""
        window = self._pos_window(state, prev, key + "/c1", b, concat_elu(x))
        c = self._linear(block.conv1, window) + self._linear(block.nin_aux, concat_elu(aux))
        c = self._linear(block.conv2, self._pos_window(state, prev, key + "/c2", b, concat_elu(c)))
        return block.gate(x, c, h)

    def _pixel(self, i, j, t: int, top: int, state, prev, rows, h):
        """The ul-type values due at pixel (i, j); returns the network's last ul [N, 1, 1, F].

        ``top`` is row i's level (static) and t = j mod 2**top (static), so the pixel's
        level is ``top`` for t = 0, else tz(t). ``prev`` and ``rows`` are read only.
        """
        model = self.model
        level = top if t == 0 else _trailing_zeros(t)
        skips, halved = {}, {}
        ul = None
        for r in range(level + 1):  # first half
            b = j // 2**r
            if r == 0:
                # ul = down_shift(first_ul_above(x)) + right_shift(first_ul_left(x)):
                # first_ul_above's (i - 1, j) reads image row i - 1, columns j - 1..j + 1;
                # first_ul_left's (i, j - 1) reads image (i - 1, j - 1) and (i, j - 1).
                above = self._window(prev["x/prev"], 0, j, 1, 3)
                left = tf.concat([self._window(prev["x/prev"], 0, j, 1, 1), state["x/left"]], 1)
                above = self._linear(model.first_ul_above, above)
                left = self._linear(model.first_ul_left, left)
                ul = tf.where(i > 0, above, tf.zeros_like(above)) + tf.where(
                    j > 0, left, tf.zeros_like(left)
                )
            else:
                halve_ul = model.level("up", r - 1).halve_ul
                ul = self._linear(halve_ul, halved[r - 1])  # [N, 1, 1, F]
            skips[r] = [ul]
            for k, block in enumerate(model.level("up", r).ul):
                aux = self._window(rows[r, "up", k], 0, b, 1, 1)
                ul = self._ul_resnet_pos(block, state, prev, f"ul/r{r}/up{k}", b, ul, aux, h)
                skips[r].append(ul)
            if r + 1 < self.levels:
                halved[r] = self._pos_window(state, prev, f"ul/r{r}/halve", b, ul)
        for r in range(level, -1, -1):  # second half
            b = j // 2**r
            down = model.level("down", r)
            if r + 1 < self.levels:
                # Output (a, b) of the transposed conv from r + 1 is input (a // 2, b // 2)
                # times tap (a % 2, b % 2). Even a (r < top): the latest block, b % 2 =
                # (t >> r) % 2. Odd a: the bottom row stored while computing row a - 1.
                if r < top:
                    q = (t >> r) % 2
                    ul = state[f"ul/r{r}/double/last"][:, :1, q : q + 1]
                else:
                    ul = self._window(prev[f"ul/r{r}/double/prev"], 0, b, 1, 1)
            else:
                ul = skips[r].pop()
            for k, block in enumerate(down.ul):
                u_row = self._window(rows[r, "down", k], 0, b, 1, 1)
                aux = tf.concat([u_row, skips[r].pop()], axis=-1)
                ul = self._ul_resnet_pos(block, state, prev, f"ul/r{r}/down{k}", b, ul, aux, h)
            assert not skips[r], "every ul skip connection must be consumed"
            if r > 0:
                doubled = self._linear(down.double_ul, ul)  # [N, 2, 2, F]
                state[f"ul/r{r - 1}/double/last"] = doubled
                cur = f"ul/r{r - 1}/double/cur"
                state[cur] = self._put(state[cur], doubled[:, 1:], 0, 2 * b)
        return ul

    # ------------------------------------------------------------------ the loops
    def generate(self, labels, mix_u, logistic_u, known_x, mask):
        """The whole cached generation; returns int32 [N, H, W, C] in [0, 2**bits)."""
        channels, bits = self.model.image_shape[2], self.model.num_bits
        hp, wp = self.padded_hw
        height, width, _ = self.model.image_shape
        pad = [[0, 0], [0, hp - height], [0, wp - width], [0, 0]]
        # Phantom positions get harmless noise (0.5) and no known pixels.
        mix_u = tf.pad(mix_u, pad, constant_values=0.5)
        logistic_u = tf.pad(logistic_u, pad, constant_values=0.5)
        known_x = tf.pad(known_x, pad)
        mask = tf.pad(mask, pad[:3])

        def emit(i, j, params):
            value = likelihood.sample_with_noise(
                params, channels, bits, mix_u[:, i, j], logistic_u[:, i, j]
            )  # float32 [N, C] on the grid
            return tf.where(mask[:, i, j, None], known_x[:, i, j], value)

        return self.run(labels, mix_u.shape[0], emit, zero=mix_u[0, 0, 0, 0] * 0.0)

    def run(self, labels, n: int, emit, zero):
        """The cached generation loops around a per-pixel choice of value.

        ``emit(i, j, params)`` gets the network's output at pixel (i, j), float32
        [N, P], and returns the pixel's value, float32 [N, C] on the grid in [-1, 1]
        (sampled, known, or decoded by ``pixelcnn.codec``); it is called in raster order,
        for phantom positions too (i >= H or j >= W: any value, it is discarded).
        ``zero``: a scalar 0 that is not a compile-time constant (``initial_state``).
        Returns int32 [N, H, W, C] in [0, 2**bits), the emitted values.
        """
        model = self.model
        height, width, channels = model.image_shape
        hp, wp = self.padded_hw
        bits = model.num_bits
        self._weights = {
            id(layer): (
                tf.cast(layer.weight_normed_kernel(), self.dtype),
                tf.cast(layer.b, self.dtype),
            )
            for layer in model.convolutions()
        }
        h = model.one_hot(labels)
        read_only = ("/prev",)

        def sample(i, j, ul, state):
            params = tf.cast(self._linear(model.out_nin, tf.nn.elu(ul)), tf.float32)
            value = emit(i, j, params[:, 0, 0])
            state["out"] = self._put(state["out"], value[:, None, None, :], i, j)
            ones = tf.ones([n, 1], self.dtype)
            pixel = tf.concat([tf.cast(value, self.dtype), ones], -1)[:, None, None, :]
            real = tf.logical_and(i < height, j < width)
            pixel = tf.where(real, pixel, tf.zeros_like(pixel))
            state["x/cur"] = self._put(state["x/cur"], pixel, 0, j + 1)
            state["x/left"] = pixel

        def row_block(rb, state):
            state = dict(state)
            for s in range(self.block):
                i = rb * self.block + s
                top = self.levels - 1 if s == 0 else _trailing_zeros(s)
                rows = self._new_row(i, top, state, h)
                span = 2**top
                count = tf.where(i < height, -(-width // span), 0)
                prev = {k: v for k, v in state.items() if k.endswith(read_only)}
                carried = {k: v for k, v in state.items() if k not in prev and k[:2] != "u/"}

                def col_block(c, carried, s=s, top=top, span=span, rows=rows, prev=prev):
                    carried = dict(carried)
                    i = rb * self.block + s
                    for t in range(span):
                        j = c * span + t
                        ul = self._pixel(i, j, t, top, carried, prev, rows, h)
                        sample(i, j, ul, carried)
                    return c + 1, carried

                _, carried = tf.while_loop(
                    lambda c, _, count=count: c < count, col_block, (tf.constant(0), carried)
                )
                state.update(carried)
            return rb + 1, state

        _, state = tf.while_loop(
            lambda rb, _: rb < hp // self.block,
            row_block,
            (tf.constant(0), self.initial_state(n, zero)),
        )
        return likelihood.to_integers(state["out"][:, :height, :width], bits)


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
    and updates the caches in place, so it compiles more slowly but runs 1.5-4x faster;
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
