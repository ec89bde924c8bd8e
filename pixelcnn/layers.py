"""Building blocks of PixelCNN++: weight-normalised shifted convolutions and gated resnets.

Every convolution here is weight-normalised (Salimans & Kingma 2016): the kernel is
``g * v / ||v||`` with the norm taken per output unit, and a bias ``b`` is added. A call
with ``init=True`` performs the data-dependent initialisation of the authors' code: it
sets ``g`` and ``b`` so that, on the batch given, each output unit's pre-activation has
mean 0 and standard deviation ``init_scale``.

Shifts keep the network causal in raster order (rows top to bottom, pixels left to right):

* ``"down"``: the output at (i, j) sees input rows <= i (kernel [2, 3] in the paper):
  pad ``kh - 1`` rows on top and ``(kw - 1) // 2`` columns on each side, VALID conv.
* ``"down_right"``: the output at (i, j) sees rows < i and row i up to column j
  (kernel [2, 2]): pad ``kh - 1`` rows on top and ``kw - 1`` columns on the left.
* ``None``: no padding (the 1x1 "network in network" layers).

Tensors are NHWC. Variables are float32; computation runs in the layer's compute dtype
(float32 or bfloat16 under a Keras mixed-precision policy).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from pixelcnn import checks


# Crops use tf.slice rather than Python slicing (StridedSlice): the gradient of Slice
# is a Pad rather than a generic strided copy (benchmarks/speed_ab.py times it).
def crop(x: tf.Tensor, begin, size) -> tf.Tensor:
    """``x[:, r0 : r0 + rows, c0 : c0 + cols]`` for begin = (r0, c0), size = (rows, cols)."""
    return tf.slice(x, [0, begin[0], begin[1], 0], [-1, size[0], size[1], -1])


def _hw(x: tf.Tensor) -> tuple:
    """(H, W) of an NHWC tensor: static where known (keeps shapes known downstream)."""
    dynamic = tf.shape(x)
    return tuple(x.shape[i] if x.shape[i] is not None else dynamic[i] for i in (1, 2))


def down_shift(x: tf.Tensor) -> tf.Tensor:
    """Moves a [B, H, W, C] map one row down, filling the top row with zeros."""
    h, w = _hw(x)
    return tf.pad(crop(x, (0, 0), (h - 1, w)), [[0, 0], [1, 0], [0, 0], [0, 0]])


def right_shift(x: tf.Tensor) -> tf.Tensor:
    """Moves a [B, H, W, C] map one column right, filling the left column with zeros."""
    h, w = _hw(x)
    return tf.pad(crop(x, (0, 0), (h, w - 1)), [[0, 0], [0, 0], [1, 0], [0, 0]])


def concat_elu(x: tf.Tensor) -> tf.Tensor:
    """elu(concat(x, -x)) on the channel axis: doubles the channel count."""
    y = tf.concat([x, -x], axis=-1)
    if x.dtype == tf.bfloat16:
        # TensorFlow's bfloat16 Elu rounds exp(z) to bfloat16 before subtracting 1, so
        # small negative z lose most of their digits; in float32, rounded once at the
        # end, the error is one bfloat16 rounding (tested).
        return tf.cast(tf.nn.elu(tf.cast(y, tf.float32)), x.dtype)
    return tf.nn.elu(y)


def _concat_elu_grad(dy: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """The gradient of ``concat_elu`` with respect to x, from its output y: one EluGrad
    over both halves (d elu(z) / dz = 1 if z > 0 else elu(z) + 1), then d_pos - d_neg."""
    pos, neg = tf.split(tf.raw_ops.EluGrad(gradients=dy, outputs=y), 2, axis=-1)
    return pos - neg


# Dropout masks use 16 random bits per unit, half of what a float32 uniform draw costs
# (the random bits were the most expensive part of dropout); the rate is rounded to a
# multiple of 2**-16 and the kept units are scaled by 1 / (1 - that rate), so the
# layer stays an unbiased dropout at a rate within 8e-6 of the one asked for.
_MASK_LEVELS = 1 << 16


def dropout_keep_mask(shape, rate: float, seed) -> tuple[tf.Tensor, float]:
    """A stateless random keep-mask of ``shape`` (last axis even) and its scale.

    Returns (keep: bool tensor, scale = 1 / P(keep)); ``seed`` is a [2] int tensor.
    """
    threshold = round(rate * _MASK_LEVELS)
    shape = tf.convert_to_tensor(shape)
    words = tf.random.stateless_uniform(
        tf.concat([shape[:-1], shape[-1:] // 2], 0), seed, minval=None, maxval=None, dtype=tf.uint32
    )
    bits = tf.reshape(tf.bitcast(words, tf.uint16), shape)
    keep = (
        bits >= tf.constant(threshold, tf.uint16)
        if threshold < _MASK_LEVELS
        else tf.zeros(shape, tf.bool)
    )
    return keep, _MASK_LEVELS / max(_MASK_LEVELS - threshold, 1)


def concat_elu_dropout(x: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """``concat_elu(x)`` where ``keep``, 0 elsewhere; differentiable in ``x``.

    Unscaled: the caller multiplies by the dropout scale, or better folds it into the
    kernel of the linear map that follows (``WeightNormConv2D.conv_of_activation``),
    which saves a pass over the tensor each way. The gradient is computed from the
    output (which the next convolution keeps anyway) and the boolean mask, so the
    network does not also keep the elu's output.
    """

    @tf.custom_gradient
    def forward(x):
        zero = tf.zeros([], x.dtype)
        y = tf.where(keep, concat_elu(x), zero)
        return y, lambda dy: _concat_elu_grad(tf.where(keep, dy, zero), y)

    return forward(x)


class ConcatEluDropout(keras.layers.Layer):
    """concat_elu followed by dropout at ``rate`` when training (concat_elu otherwise).

    Same result as ``keras.layers.Dropout(rate)(concat_elu(x))`` up to the random
    draw, with half the random bits and less memory kept for the backward pass
    (see ``concat_elu_dropout``).

    Masks: with a ``seed`` ([2] ints; training passes one derived from the run's seed,
    the step and the replica) the mask is a pure function of that seed and this layer's
    ``index`` (its place in the network), so a resumed run draws exactly the masks of
    the uninterrupted one and nothing needs checkpointing. Without one (a direct call
    with ``training=True``) a Keras SeedGenerator draws fresh masks.
    """

    def __init__(self, rate: float, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rate = checks.check_fraction(rate, "dropout rate", zero=True)
        self.index = int(index)
        if self.rate > 0:
            self.seed_generator = keras.random.SeedGenerator()
        self.built = True  # nothing depends on the input shape

    def activation(self, x, training=False, seed=None):
        """``(f, scale)``: dropout(concat_elu(x)) is ``scale * f(x)`` for this ``x``.

        The mask is drawn here, outside ``f``, so ``f`` is pure and can be recomputed
        in the backward pass; ``scale`` (1 / P(keep) when training, else 1) is left to
        the caller to fold into the next linear map (see
        ``WeightNormConv2D.conv_of_activation``).
        """
        if not training or self.rate == 0:
            return concat_elu, 1.0
        if seed is None:
            seed = tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1)
        else:
            seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), self.index)
        shape = tf.concat([tf.shape(x)[:-1], 2 * tf.shape(x)[-1:]], 0)
        keep, scale = dropout_keep_mask(shape, self.rate, tf.cast(seed, tf.int64))
        return (lambda x: concat_elu_dropout(x, keep)), scale

    def call(self, x, training=False, seed=None):
        f, scale = self.activation(x, training, seed)
        y = f(x)
        return y if scale == 1.0 else y * tf.constant(scale, y.dtype)


def shift_padding(shift: str | None, kernel_size: tuple[int, int]) -> list[list[int]]:
    """The NHWC padding that makes a VALID convolution with this kernel causal."""
    kh, kw = kernel_size
    if shift == "down":
        if kw % 2 != 1:
            raise ValueError(f"a down-shifted conv needs an odd kernel width, got {kernel_size}")
        return [[0, 0], [kh - 1, 0], [(kw - 1) // 2, (kw - 1) // 2], [0, 0]]
    if shift == "down_right":
        return [[0, 0], [kh - 1, 0], [kw - 1, 0], [0, 0]]
    if shift is None:
        if (kh, kw) != (1, 1):
            raise ValueError(f"an unshifted conv must be 1x1, got {kernel_size}")
        return [[0, 0], [0, 0], [0, 0], [0, 0]]
    raise ValueError(f"shift must be 'down', 'down_right' or None, got {shift!r}")


class _WeightNorm(keras.layers.Layer):
    """Shared weight-norm machinery: direction ``v``, per-unit scale ``g``, bias ``b``.

    Subclasses define ``OUTPUT_AXIS`` (the kernel's output-unit axis: ``v`` is
    normalised over the others), ``linear_map(x, kernel)`` (the map without bias, on an
    input already padded) and ``weight_normed_kernel()`` (g * v / ||v||); the fast
    sampler applies ``linear_map`` to its cached windows.
    """

    OUTPUT_AXIS: int

    def __init__(self, filters: int, init_scale: float = 1.0, **kwargs):
        # No autocast: the kernel is normalised in float32 and cast once to the compute
        # dtype, rather than normalised in bfloat16 under a mixed policy.
        super().__init__(autocast=False, **kwargs)
        self.filters = int(filters)
        self.init_scale = float(init_scale)

    def _make_weights(self, v_shape: tuple[int, ...]) -> None:
        self.v = self.add_weight(
            name="v",
            shape=v_shape,
            initializer=keras.initializers.RandomNormal(0.0, 0.05),
        )
        self.g = self.add_weight(name="g", shape=(self.filters,), initializer="ones")
        self.b = self.add_weight(name="b", shape=(self.filters,), initializer="zeros")

    def _unit_kernel(self) -> tf.Tensor:
        """v / ||v||, each output unit's slice normalised."""
        v = tf.convert_to_tensor(self.v)
        norm_axes = [a for a in range(4) if a != self.OUTPUT_AXIS]
        return v * tf.math.rsqrt(tf.reduce_sum(tf.square(v), axis=norm_axes, keepdims=True))

    def preactivation(self, x: tf.Tensor) -> tf.Tensor:
        """The layer's output on an already padded/windowed input (no padding here)."""
        kernel = tf.cast(self.weight_normed_kernel(), self.compute_dtype)
        y = self.linear_map(tf.cast(x, self.compute_dtype), kernel)
        return y + tf.cast(self.b, self.compute_dtype)

    def _initialise(self, x: tf.Tensor, select=lambda t: t) -> tf.Tensor:
        """Data-dependent init on this batch; returns the initialised output.

        ``select`` picks the outputs the network uses, so the statistics are theirs.
        """
        t = select(self.linear_map(tf.cast(x, self.v.dtype), self._unit_kernel()))
        mean, var = tf.nn.moments(t, axes=list(range(len(t.shape) - 1)))
        # Units that do not depend on the data (row 0 of the u stream sees only padding,
        # and at a one-row resolution that is the whole map) keep g = init_scale:
        # dividing by a zero variance would amplify rounding noise without bound.
        scale = tf.where(var > 1e-8, self.init_scale * tf.math.rsqrt(var + 1e-10), self.init_scale)
        self.g.assign(scale)
        self.b.assign(-mean * scale)
        return tf.cast((t - mean) * scale, self.compute_dtype)


class WeightNormConv2D(_WeightNorm):
    """A weight-normalised conv with causal padding chosen by ``shift``.

    Args:
      filters: output channels.
      kernel_size: (kh, kw).
      shift: "down", "down_right" or None (1x1 only), see the module docstring.
      strides: 1 or 2 (2 halves H and W, rounding up).
      init_scale: std of the pre-activations after data-dependent init.
    """

    OUTPUT_AXIS = 3  # kernel [kh, kw, in, out]

    def __init__(
        self,
        filters: int,
        kernel_size: tuple[int, int] = (1, 1),
        shift: str | None = None,
        strides: int = 1,
        init_scale: float = 1.0,
        **kwargs,
    ):
        super().__init__(filters, init_scale, **kwargs)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.shift = shift
        self.strides = int(strides)
        self.padding = shift_padding(shift, self.kernel_size)

    def build(self, input_shape):
        self._make_weights((*self.kernel_size, int(input_shape[-1]), self.filters))

    def weight_normed_kernel(self) -> tf.Tensor:
        """g * v / ||v||: the kernel the layer applies (float32, the variables' dtype)."""
        return self._unit_kernel() * self.g

    def linear_map(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        """The convolution by ``kernel`` of an already padded x (no bias, VALID)."""
        if self.kernel_size == (1, 1) and self.strides == 1:
            return tf.einsum("bhwc,cf->bhwf", x, kernel[0, 0])
        return tf.nn.conv2d(x, kernel, strides=self.strides, padding="VALID")

    def pad(self, x: tf.Tensor) -> tf.Tensor:
        if self.shift is None:
            return x
        return tf.pad(x, self.padding)

    def call(self, x: tf.Tensor, init: bool = False) -> tf.Tensor:
        x = self.pad(x)
        if init:
            return self._initialise(x)
        return self.preactivation(x)

    def conv_of_activation(
        self, f, x, init: bool = False, scale: float = 1.0, recompute: bool = True
    ) -> tf.Tensor:
        """This convolution of an activation, ``self(scale * f(x))`` for an elementwise
        ``f``, computed without forming ``scale * f(x)``.

        Args:
          f: the elementwise function.
          x: its input.
          init: data-dependent initialisation (see ``_WeightNorm._initialise``).
          scale: multiplies the kernel, far smaller than ``f(x)``, instead of ``f(x)``
            (the dropout's 1 / P(keep): a pass over the tensor less each way).
          recompute: do not keep ``f(x)`` for backprop. The convolution's backward
            pass needs its input, and when that input is ``concat_elu(x)`` it is twice
            the size of ``x``. Only ``x`` is kept and ``f(x)`` is recomputed in the
            backward pass: a lower peak memory for a little more time
            (benchmarks/README.md has both).
        """
        if init or not self.built:
            y = f(x)
            return self(y if scale == 1.0 else y * tf.constant(scale, y.dtype), init=init)
        dtype = self.compute_dtype

        def forward(x, kernel, bias):
            return self.linear_map(self.pad(f(x)), kernel) + bias

        @tf.custom_gradient
        def run(x, kernel, bias):
            def grad(dy):
                # The control dependency makes the recomputation wait for dy and keeps
                # graph optimisation from merging it with the forward pass (which
                # would keep f(x) alive after all).
                with tf.control_dependencies([dy]):
                    again = tf.identity(x)
                with tf.GradientTape() as tape:
                    tape.watch([again, kernel, bias])
                    # Only the gradients are used: graph pruning drops the recomputed
                    # convolution itself, the elementwise f is what is recomputed.
                    y = forward(again, kernel, bias)
                return tape.gradient(y, [again, kernel, bias], output_gradients=dy)

            return forward(x, kernel, bias), grad

        x = tf.cast(x, dtype)
        kernel = self.weight_normed_kernel()
        if scale != 1.0:
            kernel = kernel * scale
        kernel, bias = tf.cast(kernel, dtype), tf.cast(self.b, dtype)
        return (run if recompute else forward)(x, kernel, bias)


class WeightNormConv2DTranspose(_WeightNorm):
    """A weight-normalised stride-2 transposed conv that doubles H and W causally.

    The output is cropped as in the authors' code (drop the last ``kh - 1`` rows; for
    "down" drop ``(kw - 1) // 2`` columns each side, for "down_right" the last
    ``kw - 1`` columns) and then to ``target_hw``, so odd sizes invert the stride-2
    convs that round up.
    """

    OUTPUT_AXIS = 2  # kernel [kh, kw, out, in]

    def __init__(
        self,
        filters: int,
        kernel_size: tuple[int, int],
        shift: str,
        init_scale: float = 1.0,
        **kwargs,
    ):
        super().__init__(filters, init_scale, **kwargs)
        if shift not in ("down", "down_right"):
            raise ValueError(f"a transposed conv must be shifted, got shift={shift!r}")
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.shift = shift

    def build(self, input_shape):
        # conv2d_transpose kernels are [kh, kw, out, in].
        self._make_weights((*self.kernel_size, self.filters, int(input_shape[-1])))

    def weight_normed_kernel(self) -> tf.Tensor:
        return self._unit_kernel() * self.g[:, None]

    def linear_map(self, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
        """The stride-2 transposed convolution by ``kernel``, uncropped (no bias)."""
        kh, kw = self.kernel_size
        h, w = _hw(x)
        out_shape = tf.stack([tf.shape(x)[0], 2 * h + kh - 1, 2 * w + kw - 1, self.filters])
        y = tf.nn.conv2d_transpose(x, kernel, out_shape, strides=2, padding="VALID")
        left = (kw - 1) // 2 if self.shift == "down" else 0
        return crop(y, (0, left), (2 * h, 2 * w))

    def call(self, x: tf.Tensor, target_hw: tuple[int, int], init: bool = False) -> tf.Tensor:
        def to_target(y):
            return crop(y, (0, 0), target_hw)

        if init:
            return self._initialise(x, to_target)
        return to_target(self.preactivation(x))


class GatedResnet(keras.layers.Layer):
    """The authors' gated resnet block.

    c = conv(f(x)); c += nin(f(a)) if a is given; c = f(c); dropout(c);
    c = conv(c, 2 * filters, init_scale=0.1); c += W h if h is given;
    return x + c[..., :F] * sigmoid(c[..., F:]), with f = concat_elu.

    ``shift`` selects the conv: "down" (kernel [2, 3], the u stream) or "down_right"
    (kernel [2, 2], the ul stream). With ``recompute``, the convs keep their inputs
    x, a and c for the backward pass instead of f(x), f(a) and dropout(f(c)), half the
    size, and recompute f there (see ``WeightNormConv2D.conv_of_activation``).
    """

    def __init__(
        self,
        filters: int,
        shift: str,
        has_aux: bool,
        num_classes: int | None,
        dropout_rate: float,
        recompute: bool = True,
        index: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        kernel = (2, 3) if shift == "down" else (2, 2)
        self.filters = int(filters)
        self.recompute = bool(recompute)
        policy = self.dtype_policy
        self.conv1 = WeightNormConv2D(filters, kernel, shift, dtype=policy, name="conv1")
        self.nin_aux = WeightNormConv2D(filters, dtype=policy, name="nin_aux") if has_aux else None
        self.dropout = ConcatEluDropout(dropout_rate, index, dtype=policy, name="dropout")
        self.conv2 = WeightNormConv2D(
            2 * filters, kernel, shift, init_scale=0.1, dtype=policy, name="conv2"
        )
        # The authors project the label with a plain matrix (no weight norm, no bias).
        self.label_proj = (
            keras.layers.Dense(
                2 * filters,
                use_bias=False,
                kernel_initializer=keras.initializers.RandomNormal(0.0, 0.05),
                dtype=policy,
                name="label_proj",
            )
            if num_classes
            else None
        )

    def convolutions(self) -> list:
        return [c for c in (self.conv1, self.nin_aux, self.conv2) if c is not None]

    def call(self, x, a=None, h=None, training=False, init=False, seed=None):
        """x: the stream; a: the auxiliary input; h: the one-hot label; seed: the
        dropout seed of the step ([2] ints, see ``ConcatEluDropout``)."""
        c = self.conv1.conv_of_activation(concat_elu, x, init, recompute=self.recompute)
        if self.nin_aux is not None:
            c = c + self.nin_aux.conv_of_activation(concat_elu, a, init, recompute=self.recompute)
        f, scale = self.dropout.activation(c, training, seed)
        c = self.conv2.conv_of_activation(f, c, init, scale, self.recompute)
        return self.gate(x, c, h)

    def gate(self, x, c, h=None):
        """x + p * sigmoid(q) where (p, q) = c (+ W h) split on channels."""
        if self.label_proj is not None:
            c = c + self.label_proj(h)[:, None, None, :]
        p, q = tf.split(c, 2, axis=-1)
        return x + p * tf.sigmoid(q)
