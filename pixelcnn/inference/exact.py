"""An entropy model that every machine computes bit for bit: the network in integer
arithmetic, made from the trained weights by post-training quantisation, and the
likelihood's tables in integers (``pixelcnn.inference.codec``'s format 2).

Why it is exact. Range decoding needs the encoder's probabilities to the last bit
(Ballé, Johnston and Minnen 2019), and a float network's outputs move in their last bits
with the summation order: another CPU's instruction set, oneDNN or not, the thread
count, a GPU. Here every number the probabilities depend on is an integer, and every
operation on integers is exact in any order:

* Weights. Each effective kernel g v / ||v|| is computed in float64 from the float32
  variables with correctly rounded operations only (squares of float32 values are exact
  in float64, ``math.fsum`` rounds the sum of squares once, then sqrt, division and
  product are IEEE-rounded), then scaled by a power of two per layer (max |w| < 2^15)
  and rounded to integers; biases at the scale of the layer's output. So the integer
  weights are a pure function of the checkpoint's bytes.
* Activations are integers at scale 2^FRACTION_BITS (x = q / 2^12), clipped to
  |q| <= 2^ACTIVATION_BITS. A convolution or matrix product of such integers by integer
  weights has every partial sum below 2^53 (checked per layer when quantising), so
  TensorFlow computes it exactly in float64 whatever kernel, blocking, order, thread
  count or device it uses; requantising (a product by a power of two, a floor) is
  exact too.
* Nonlinearities (elu, sigmoid; and exp, tanh, the logistic CDF in the likelihood) are
  tables of integers made with Python's ``decimal`` (correctly rounded, the same on
  every machine), read with exact integer linear interpolation.
* The likelihood's per-value probabilities are int64 NumPy arithmetic (bin edges, means
  and observed values at 2^-18, finer than the network's grid, as a bin may be narrower
  than a component's scale), handed to constriction as float64 (an exactly defined
  conversion); constriction's quantisation of a table is itself exact for equal inputs.

The price is the quantisation: activations at 2^-12 and interpolated tables change the
model's probabilities slightly (benchmarks/codec.py measures the coded size against the
float model's likelihood).
"""

from __future__ import annotations

import decimal
import functools
import math

import numpy as np
import tensorflow as tf

from pixelcnn import checks, likelihood
from pixelcnn.inference.generation import CachedGeneration

FRACTION_BITS = 12  # activations, means, log scales and coefficients: q / 2^12
LIKELIHOOD_BITS = 18  # bin edges, means and observed values in the likelihood: q / 2^18
ACTIVATION_BITS = 20  # |q| <= 2^20: |x| <= 256
WEIGHT_BITS = 15  # |w_q| < 2^15 per layer
EXACT = 2.0**53  # every partial sum of a layer stays below this

# The tables: (step 2^-S in x, x range, scale of the values)
ELU_STEP, ELU_RANGE = 6, 16  # exp(x) - 1 on [-16, 0], values at 2^12
GATE_STEP, GATE_RANGE = 6, 16  # sigmoid on [-16, 16], values at 2^12
CDF_STEP, CDF_RANGE, CDF_BITS = 8, 32, 30  # the logistic CDF on [-32, 32], values at 2^30
INV_STEP, INV_LOW, INV_HIGH, INV_BITS = 8, -7, 16, 24  # exp(-s), s in [-7, 16], at 2^24
EXP_STEP, EXP_RANGE, WEIGHT_SCALE_BITS = 8, 32, 20  # exp(-t), t in [0, 32], at 2^20
TANH_STEP, TANH_RANGE = 8, 8  # tanh on [-8, 8], values at 2^LIKELIHOOD_BITS
FLOOR = 2**20  # added to every value's probability (~1e-9 of the table's total)

# What a file of format 2 was coded with: decoding checks that these agree.
SETTINGS = {
    "fraction_bits": FRACTION_BITS,
    "likelihood_bits": LIKELIHOOD_BITS,
    "activation_bits": ACTIVATION_BITS,
    "weight_bits": WEIGHT_BITS,
    "tables": [
        [ELU_STEP, ELU_RANGE],
        [GATE_STEP, GATE_RANGE],
        [CDF_STEP, CDF_RANGE, CDF_BITS],
        [INV_STEP, INV_LOW, INV_HIGH, INV_BITS],
        [EXP_STEP, EXP_RANGE, WEIGHT_SCALE_BITS],
        [TANH_STEP, TANH_RANGE],
    ],
    "floor": FLOOR,
}


# ----------------------------------------------------------------------------- tables
def _table(fn, low: int, high: int, step_bits: int, value_bits: int) -> np.ndarray:
    """round(fn(x) * 2^value_bits) at x = low, low + 2^-step_bits, ..., high, int64,
    computed in decimal arithmetic (correctly rounded: the same on every machine)."""
    context = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    scale = decimal.Decimal(2) ** value_bits
    step = decimal.Decimal(2) ** -step_bits
    count = (high - low) * 2**step_bits + 1
    values = []
    for i in range(count):
        x = context.add(decimal.Decimal(low), context.multiply(step, decimal.Decimal(i)))
        v = context.multiply(fn(x, context), scale)
        values.append(int(v.to_integral_value(rounding=decimal.ROUND_HALF_EVEN)))
    return np.array(values, np.int64)


def _sigmoid(x, c):
    return c.divide(1, c.add(1, c.exp(c.minus(x))))


@functools.cache
def tables() -> dict[str, np.ndarray]:
    """Every table, built once per process (under a second)."""
    f = FRACTION_BITS
    return {
        "elu": _table(lambda x, c: c.subtract(c.exp(x), 1), -ELU_RANGE, 0, ELU_STEP, f),
        "gate": _table(_sigmoid, -GATE_RANGE, GATE_RANGE, GATE_STEP, f),
        "cdf": _table(_sigmoid, -CDF_RANGE, CDF_RANGE, CDF_STEP, CDF_BITS),
        "inv_scale": _table(lambda x, c: c.exp(c.minus(x)), INV_LOW, INV_HIGH, INV_STEP, INV_BITS),
        "exp": _table(lambda x, c: c.exp(c.minus(x)), 0, EXP_RANGE, EXP_STEP, WEIGHT_SCALE_BITS),
        "tanh": _table(
            lambda x, c: c.divide(
                c.subtract(c.exp(c.multiply(2, x)), 1), c.add(c.exp(c.multiply(2, x)), 1)
            ),
            -TANH_RANGE,
            TANH_RANGE,
            TANH_STEP,
            LIKELIHOOD_BITS,
        ),
    }


def interpolate(table: np.ndarray, q: np.ndarray, low: int, step_bits: int, q_bits: int):
    """The table's function at q / 2^q_bits (int64 NumPy), linearly interpolated
    between entries and held at the ends, rounded to an integer: exact integer
    arithmetic. ``low``: the x of entry 0; entries 2^-step_bits apart."""
    shift = q_bits - step_bits
    last = len(table) - 1
    # q's offset from entry 0, held to [0, last]: entry index and fraction by shifts
    offset = np.asarray(q, np.int64) - (low << q_bits)
    np.maximum(offset, 0, out=offset)
    np.minimum(offset, last << shift, out=offset)
    index = offset >> shift
    offset &= (1 << shift) - 1  # the fraction, in units of 2^-shift
    slope = np.append(np.diff(table), 0)  # entry ``last`` has slope 0: the end held
    offset *= slope[index]
    offset += 1 << (shift - 1)
    offset >>= shift
    offset += table[index]
    return offset


def _interpolate_tf(table: tf.Tensor, q: tf.Tensor, low: int, step_bits: int) -> tf.Tensor:
    """``interpolate`` in TensorFlow on float64 tensors holding integers (activations at
    2^FRACTION_BITS): every step is exact (integers below 2^53, products by powers of
    two, floors)."""
    shift = FRACTION_BITS - step_bits
    unit = 2.0**shift
    offset = q - float(low * 2**FRACTION_BITS)
    index = tf.floor(offset / unit)
    index_c = tf.clip_by_value(index, 0.0, float(table.shape[0] - 2))
    frac = tf.clip_by_value(offset - index_c * unit, 0.0, unit)  # 0 / 1 beyond the ends
    i = tf.cast(index_c, tf.int32)
    lo, hi = tf.gather(table, i), tf.gather(table, i + 1)
    return lo + tf.floor(((hi - lo) * frac + unit / 2.0) / unit)


def fixed_inputs(levels, num_bits: int, fraction_bits: int = FRACTION_BITS):
    """Integer levels v in [0, 2^b) -> the fixed-point input x = 2 v / (2^b - 1) - 1 at
    2^fraction_bits, rounded to nearest (halves up): floor(((2 v - top) 2^(F + 1) + top) /
    (2 top)), for
    NumPy integers and float64 tensors holding integers alike (the quotient of two
    integers below 2^40 is never within a rounding of an integer it is not)."""
    top = 2**num_bits - 1
    numerator = (2 * levels - top) * 2 ** (fraction_bits + 1) + top
    if isinstance(levels, np.ndarray | np.integer | int):
        return numerator // (2 * top)
    return tf.floor(numerator / (2.0 * top))


# ----------------------------------------------------------------------------- weights
def _effective_kernel(layer) -> np.ndarray:
    """g v / ||v|| in float64 with correctly rounded operations only (see the module)."""
    v = layer.v.numpy().astype(np.float64)
    g = layer.g.numpy().astype(np.float64)
    out_axis = layer.OUTPUT_AXIS
    moved = np.moveaxis(v, out_axis, 0).reshape(v.shape[out_axis], -1)
    norms = np.array([math.sqrt(math.fsum(row * row)) for row in moved])
    shape = [1, 1, 1, 1]
    shape[out_axis] = -1
    return v * (g / norms).reshape(shape)


def _quantise_layer(layer, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(integer kernel, integer bias at the output's scale, the kernel's exponent)."""
    kernel = _effective_kernel(layer)
    top = float(np.max(np.abs(kernel)))
    exponent = WEIGHT_BITS - math.frexp(top)[1] if top > 0 else 0  # |kernel| 2^e < 2^15
    kernel_q = np.rint(kernel * 2.0**exponent)
    bias_q = np.rint(layer.b.numpy().astype(np.float64) * 2.0 ** (exponent + FRACTION_BITS))
    terms = kernel.size // kernel.shape[layer.OUTPUT_AXIS]
    bound = terms * 2.0 ** (WEIGHT_BITS + ACTIVATION_BITS + 1) + float(np.max(np.abs(bias_q)))
    if bound >= EXACT:
        raise ValueError(
            f"layer {name}: its sums could reach {bound:.3g}, beyond float64's exact "
            f"integers (2^53); the exact entropy model does not fit this layer"
        )
    return kernel_q, bias_q, exponent


class IntegerWeights:
    """A model's weights quantised for ``ExactGeneration`` (one per model, cached in
    ``model.programs``)."""

    def __init__(self, model):
        self.layers = {}
        for layer in model.convolutions():
            kernel, bias, exponent = _quantise_layer(layer, layer.name)
            self.layers[id(layer)] = (tf.constant(kernel), tf.constant(bias), exponent)
        self.labels = {}  # id(gated resnet) -> its label projection, integer at 2^12
        for block in model.layers_by_name().values():
            if getattr(block, "label_proj", None) is not None:
                w = block.label_proj.kernel.numpy().astype(np.float64)
                self.labels[id(block)] = tf.constant(np.rint(w * 2.0**FRACTION_BITS))
        t = tables()
        self.elu = tf.constant(t["elu"].astype(np.float64))
        self.gate = tf.constant(t["gate"].astype(np.float64))


# ----------------------------------------------------------------------------- network
class ExactGeneration(CachedGeneration):
    """The cached generation loop (``generation.CachedGeneration``) on integers: the
    same schedule and caches, every value a float64 holding an integer at
    2^FRACTION_BITS, the linear maps exact and requantised, the nonlinearities tables.
    ``run``'s ``emit`` gets the network's output as such integers, float64 [N, P]."""

    def __init__(self, model, weights: IntegerWeights):
        super().__init__(model, jit=False)
        self.dtype = tf.float64
        self.integers = weights
        self.unit = float(2**FRACTION_BITS)
        self.clip = float(2**ACTIVATION_BITS)

    def _layer_weights(self, model) -> dict:
        return {k: (kernel, bias) for k, (kernel, bias, _) in self.integers.layers.items()}

    def _requantise(self, y, exponent: int):
        """y at 2^(exponent + F) -> the nearest integer at 2^F, clipped."""
        y = tf.floor(y * 2.0**-exponent + 0.5)
        return tf.clip_by_value(y, -self.clip, self.clip)

    def _linear(self, layer, x):
        y = super()._linear(layer, x)
        return self._requantise(y, self.integers.layers[id(layer)][2])

    def _elu(self, x):
        x = tf.clip_by_value(x, -self.clip, self.clip)
        negative = _interpolate_tf(self.integers.elu, tf.minimum(x, 0.0), -ELU_RANGE, ELU_STEP)
        return tf.where(x >= 0.0, x, negative)

    def _concat_elu(self, x):
        return tf.concat([self._elu(x), self._elu(-x)], axis=-1)

    def _gate(self, block, x, c, h):
        if h is not None and id(block) in self.integers.labels:
            c = (
                c
                + tf.matmul(tf.cast(h, tf.float64), self.integers.labels[id(block)])[
                    :, None, None, :
                ]
            )
        p, q = tf.split(c, 2, axis=-1)
        q = tf.clip_by_value(q, -self.clip, self.clip)
        s = _interpolate_tf(self.integers.gate, q, -GATE_RANGE, GATE_STEP)
        out = x + tf.floor(p * s / self.unit + 0.5)
        return tf.clip_by_value(out, -self.clip, self.clip)

    def _params(self, y):
        return y

    def _pixel_input(self, value):
        levels = tf.round(checks.to_levels(tf.cast(value, tf.float64), self.model.num_bits))
        return fixed_inputs(levels, self.model.num_bits)

    def _one(self) -> float:
        return self.unit


# ----------------------------------------------------------------------------- likelihood
def _edges(num_bits: int) -> np.ndarray:
    """The 2^b - 1 inner bin edges (2 k + 1) / (2^b - 1) - 1 at 2^LIKELIHOOD_BITS,
    rounded to nearest (finer than the network's grid: a bin may be narrower than a
    scale)."""
    top = 2**num_bits - 1
    k = np.arange(top, dtype=np.int64)
    return ((2 * k + 1 - top) * 2 ** (LIKELIHOOD_BITS + 1) + top) // (2 * top)


class PixelTables:
    """The integer distribution of one pixel's channels, one channel at a time: what
    ``codec``'s format 2 codes with.

    params: int64 [N, P], the network's output at 2^FRACTION_BITS. ``table(c)`` gives
    channel c's unnormalised probabilities over the 2^b values, float64 [N, 2^b] holding
    integers, given the values of channels < c passed to ``observe`` before.
    """

    def __init__(self, params: np.ndarray, channels: int, mixtures: int, bits: int):
        f, t = FRACTION_BITS, tables()
        p = np.asarray(params, np.int64)
        self.c, self.k, self.bits = channels, mixtures, bits
        parts = {
            name: p[:, start:stop].reshape(len(p), *shape)
            for name, start, stop, shape in likelihood.param_layout(channels, mixtures)
        }
        logits = parts["logits"]
        gap = logits.max(axis=1, keepdims=True) - logits  # >= 0
        self.w = interpolate(t["exp"], gap, 0, EXP_STEP, f)  # [N, K] at 2^20
        self.means = parts["means"] << (LIKELIHOOD_BITS - f)
        low = int(likelihood.MIN_LOG_SCALE) << f  # the authors' clamp at -7
        log_scales = np.maximum(parts["log_scales"], low)
        self.inv = interpolate(t["inv_scale"], log_scales, INV_LOW, INV_STEP, f)  # at 2^24
        self.coeffs = interpolate(t["tanh"], parts["coeffs"], -TANH_RANGE, TANH_STEP, f)
        self.edges = _edges(bits)
        self.x = np.zeros((len(p), channels), np.int64)  # observed values at 2^L
        self._masses = None

    def table(self, ch: int) -> np.ndarray:
        bits = LIKELIHOOD_BITS
        mu = self.means[:, ch].copy()  # [N, K] at 2^L
        for j in range(ch):
            coupling = self.coeffs[:, likelihood.coeff_index(ch, j)] * self.x[:, j, None]
            mu += (coupling + (1 << (bits - 1))) >> bits  # 2^(2 L) -> 2^L
        d = self.edges[None, None, :] - mu[..., None]  # [N, K, V - 1] at 2^L, < 2^27
        z = d * self.inv[:, ch, :, None]  # at 2^(L + 24), < 2^62
        cdf = interpolate(tables()["cdf"], z, -CDF_RANGE, CDF_STEP, LIKELIHOOD_BITS + INV_BITS)
        n, k = mu.shape
        zeros, ones = np.zeros((n, k, 1), np.int64), np.full((n, k, 1), 1 << CDF_BITS, np.int64)
        self._masses = np.diff(np.concatenate([zeros, cdf, ones], axis=2), axis=2)  # >= 0
        table = np.einsum("nk,nkv->nv", self.w, self._masses) + FLOOR
        return table.astype(np.float64)

    def observe(self, ch: int, values: np.ndarray) -> None:
        """Channel ch took ``values`` (int [N]): reweight the components by their mass
        of it (renormalised to at most 2^20 by a shift) and note it for the coupling."""
        mass = self._masses[np.arange(len(values)), :, values]  # [N, K]
        w = self.w * mass  # < 2^50
        exponent = np.frexp(w.max(axis=1).astype(np.float64))[1]  # exact for the float
        shift = np.maximum(exponent - WEIGHT_SCALE_BITS, 0)
        self.w = w >> shift[:, None]
        self.x[:, ch] = fixed_inputs(np.asarray(values, np.int64), self.bits, LIKELIHOOD_BITS)
