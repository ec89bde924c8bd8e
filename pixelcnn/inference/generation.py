"""The cached generation engine (Ramachandran et al. 2017, arXiv 1704.06001) behind
``sampling.sample_fast``, the codec and the export's sampler.

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
"""

from __future__ import annotations

import weakref

import tensorflow as tf

from pixelcnn import internals, likelihood
from pixelcnn.layers import WeightNormConv2DTranspose, concat_elu

__all__ = ["CachedGeneration"]


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

    # ------------------------------------------------------------------ numerics
    # The network's arithmetic, in one place each: ``exact.ExactGeneration`` replaces
    # these to run the same schedule on integers.
    def _layer_weights(self, model) -> dict:
        """id(layer) -> (kernel, bias) in the program's dtype, computed once per run."""
        return {
            id(layer): (
                tf.cast(layer.weight_normed_kernel(), self.dtype),
                tf.cast(layer.b, self.dtype),
            )
            for layer in model.convolutions()
        }

    def _concat_elu(self, x):
        return concat_elu(x)

    def _elu(self, x):
        return tf.nn.elu(x)

    def _gate(self, block, x, c, h):
        return block.gate(x, c, h)

    def _params(self, y):
        """The output layer's result as ``emit`` gets it: float32."""
        return tf.cast(y, tf.float32)

    def _pixel_input(self, value):
        """A pixel's value (float32 [N, C] on the grid) as the image stream holds it."""
        return tf.cast(value, self.dtype)

    def _one(self) -> float:
        """The ones channel's value."""
        return 1.0

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
        c = self._linear(block.conv1, self._row_window(state, key + "/c1", self._concat_elu(x)))
        if aux is not None:
            c = c + self._linear(block.nin_aux, self._concat_elu(aux))
        # (dropout is the identity at training=False)
        c = self._linear(block.conv2, self._row_window(state, key + "/c2", self._concat_elu(c)))
        return self._gate(block, x, c, h)

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
        window = self._pos_window(state, prev, key + "/c1", b, self._concat_elu(x))
        c = self._linear(block.conv1, window) + self._linear(block.nin_aux, self._concat_elu(aux))
        c = self._linear(
            block.conv2, self._pos_window(state, prev, key + "/c2", b, self._concat_elu(c))
        )
        return self._gate(block, x, c, h)

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
        height, width, _ = model.image_shape
        hp = self.padded_hw[0]
        self._weights = self._layer_weights(model)
        h = model.one_hot(labels)
        read_only = ("/prev",)

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
                        self._emit(i, j, ul, carried, emit)
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
        return likelihood.to_integers(state["out"][:, :height, :width], model.num_bits)

    def _emit(self, i, j, ul, state, emit):
        """The network's output at pixel (i, j) from its last ul [N, 1, 1, F]; ``emit``
        chooses the value, which goes to the output and into the image stream."""
        model = self.model
        height, width, _ = model.image_shape
        n = ul.shape[0]
        params = self._params(self._linear(model.out_nin, self._elu(ul)))
        value = emit(i, j, params[:, 0, 0])
        state["out"] = self._put(state["out"], value[:, None, None, :], i, j)
        ones = tf.fill([n, 1], tf.constant(self._one(), self.dtype))
        pixel = tf.concat([self._pixel_input(value), ones], -1)[:, None, None, :]
        real = tf.logical_and(i < height, j < width)
        pixel = tf.where(real, pixel, tf.zeros_like(pixel))
        state["x/cur"] = self._put(state["x/cur"], pixel, 0, j + 1)
        state["x/left"] = pixel
