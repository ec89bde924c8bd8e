"""Scoring: integer batches from any element format, per-image log p against the model."""

import math

import numpy as np
import pytest
import tensorflow as tf

from pixelcnn import PixelCNNPP
from pixelcnn.inference import scoring


@pytest.fixture(scope="module")
def model():
    m = PixelCNNPP(
        (4, 5, 2), residual_blocks=1, residual_layers_per_block=1, filters=4, num_mixtures=2,
        num_bits=5, num_classes=3,
    )  # fmt: skip
    m(tf.zeros([1, 4, 5, 2]), tf.zeros([1], tf.int32))
    return m


def test_integer_batches_give_the_levels_of_every_element_format(model, rng):
    levels = rng.integers(0, 32, (7, 4, 5, 2))
    labels = rng.integers(0, 3, 7)
    x = 2.0 * levels / 31 - 1.0  # the float grid values of the same levels
    for element in [
        (levels.astype(np.uint8), labels),
        {"image": x.astype(np.float32), "label": labels},
    ]:
        ds = tf.data.Dataset.from_tensor_slices(element).batch(3)
        got = list(scoring.integer_batches(ds, model.image_shape, 5, 3, "test"))
        assert [len(b) for b, _ in got] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate([b for b, _ in got]), levels)
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels)
        assert got[0][0].dtype == np.int32
    bad = tf.data.Dataset.from_tensor_slices((levels + 32, labels)).batch(3)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        next(scoring.integer_batches(bad, model.image_shape, 5, 3, "test"))


def test_scores_are_the_models_log_prob_in_order(model, rng):
    levels = rng.integers(0, 32, (7, 4, 5, 2)).astype(np.int32)
    labels = rng.integers(0, 3, 7).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices((levels, labels)).batch(4)
    scores = scoring.score(model, scoring.integer_batches(ds, model.image_shape, 5, 3, "test"))
    expected = model.log_prob(levels, labels).numpy()
    np.testing.assert_allclose(scores.log_prob, expected, rtol=1e-6)
    np.testing.assert_array_equal(scores.labels, labels)
    dims = 4 * 5 * 2
    np.testing.assert_allclose(scores.bits_per_dim, -expected / (dims * math.log(2)), rtol=1e-6)
    summary = scores.summary()
    assert summary["images"] == 7
    assert summary["bits_per_dim"] == pytest.approx(-expected.mean() / (dims * math.log(2)))
    images, y = scoring.take(scoring.integer_batches(ds, model.image_shape, 5, 3, "test"), 5)
    np.testing.assert_array_equal(images, levels[:5])
    np.testing.assert_array_equal(y, labels[:5])
