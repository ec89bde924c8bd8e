"""The exact entropy model (pixelcnn.inference.exact): its tables, interpolation and
fixed-point inputs against float64 / rational references, its integer likelihood
against the float one, and its network's sums inside float64's exact integers."""

from fractions import Fraction

import numpy as np
import pytest
from helpers import initialized_model

from pixelcnn import likelihood
from pixelcnn.inference import codec, exact


def test_tables_are_the_functions_rounded():
    t = exact.tables()
    f = 2**exact.FRACTION_BITS
    x = np.arange(len(t["elu"])) / 2**exact.ELU_STEP - exact.ELU_RANGE
    np.testing.assert_allclose(t["elu"], np.expm1(x) * f, atol=0.5 + 1e-9)
    x = np.arange(len(t["gate"])) / 2**exact.GATE_STEP - exact.GATE_RANGE
    np.testing.assert_allclose(t["gate"], f / (1 + np.exp(-x)), atol=0.5 + 1e-9)
    x = np.arange(len(t["cdf"])) / 2**exact.CDF_STEP - exact.CDF_RANGE
    np.testing.assert_allclose(t["cdf"], 2**exact.CDF_BITS / (1 + np.exp(-x)), atol=0.5 + 1e-6)
    x = np.arange(len(t["tanh"])) / 2**exact.TANH_STEP - exact.TANH_RANGE
    np.testing.assert_allclose(t["tanh"], np.tanh(x) * 2**exact.LIKELIHOOD_BITS, atol=0.5 + 1e-7)
    x = np.arange(len(t["exp"])) / 2**exact.EXP_STEP
    np.testing.assert_allclose(t["exp"], np.exp(-x) * 2**exact.WEIGHT_SCALE_BITS, atol=0.5 + 1e-9)
    assert np.all(np.diff(t["cdf"]) >= 0) and t["cdf"][0] >= 0


def test_interpolation_is_linear_between_entries_and_held_at_the_ends():
    rng = np.random.default_rng(0)
    table = np.cumsum(rng.integers(0, 1000, 65)).astype(np.int64)  # x = -4 ... 4, step 1/8
    q = rng.integers(-6 * 2**12, 6 * 2**12, 2000)
    got = exact.interpolate(table, q, -4, 3, 12)
    grid = np.arange(65) / 8 - 4
    want = np.interp(q / 2**12, grid, table)  # holds the end values outside
    assert np.max(np.abs(got - want)) <= 0.5 + 1e-9
    # the TensorFlow version gives the same integers
    import tensorflow as tf

    tf_got = exact._interpolate_tf(
        tf.constant(table.astype(np.float64)), tf.constant(q.astype(np.float64)), -4, 3
    )
    np.testing.assert_array_equal(tf_got.numpy(), got)


@pytest.mark.parametrize("bits", [1, 5, 8, 10, 16])
def test_fixed_inputs_round_the_grid_to_nearest_exactly(bits):
    top = 2**bits - 1
    levels = np.unique(np.linspace(0, top, 200).astype(np.int64))
    # the rational value rounded to nearest, halves up
    want = [
        ((Fraction(2 * int(v), top) - 1) * 2**exact.FRACTION_BITS + Fraction(1, 2)) // 1
        for v in levels
    ]
    np.testing.assert_array_equal(exact.fixed_inputs(levels, bits), want)
    import tensorflow as tf

    got = exact.fixed_inputs(tf.constant(levels.astype(np.float64)), bits).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("channels, mixtures, bits", [(1, 3, 8), (3, 2, 5), (2, 4, 8)])
def test_integer_tables_match_the_float_likelihood(channels, mixtures, bits):
    """The same parameters (on the 2^-12 grid) give the integer tables and format 1's
    float64 tables; their normalised distributions agree to 3e-4 in total variation
    (the price of interpolated exp, tanh and CDF tables), channel by channel, with the
    same observed values."""
    rng = np.random.default_rng(channels * 10 + mixtures)
    n = 64
    p = likelihood.num_params(channels, mixtures)
    params = rng.normal(0, 1.5, (n, p))
    for name, start, stop, _ in likelihood.param_layout(channels, mixtures):
        if name == "log_scales":
            params[:, start:stop] = rng.uniform(-5, 0, (n, stop - start))
    q = np.floor(params * 2**exact.FRACTION_BITS)
    ints = exact.PixelTables(q.astype(np.int64), channels, mixtures, bits)
    floats = codec._PixelTables(q / 2**exact.FRACTION_BITS, channels, mixtures, bits)
    for ch in range(channels):
        a, b = ints.table(ch), floats.table(ch)
        a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
        assert np.max(0.5 * np.abs(a - b).sum(1)) < 3e-4, np.max(0.5 * np.abs(a - b).sum(1))
        values = np.array([rng.choice(2**bits, p=row) for row in b])
        ints.observe(ch, values)
        floats.observe(ch, values)


def test_a_layer_whose_sums_could_leave_the_exact_integers_is_refused():
    m = initialized_model((4, 4, 1), 8)
    layer = m.convolutions()[0]
    saved = exact.ACTIVATION_BITS
    try:
        exact.ACTIVATION_BITS = 40  # 2^(15 + 40) per term: beyond 2^53
        with pytest.raises(ValueError, match="beyond float64's exact integers"):
            exact._quantise_layer(layer, layer.name)
    finally:
        exact.ACTIVATION_BITS = saved
