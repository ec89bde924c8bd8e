"""pixelcnn.inference.serving: the SavedModel export of a model in memory, loaded back
with TensorFlow alone in this process, against the package's own computations."""

import re

import numpy as np
import pytest
import tensorflow as tf
from helpers import initialized_model

from pixelcnn import checks, likelihood
from pixelcnn.inference import sampling, serving

SHAPE = (4, 5, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = initialized_model(SHAPE, classes=3)
    folder = tmp_path_factory.mktemp("export") / "model"
    path = serving.export(model, folder, sample_batch_size=2)
    return model, folder, tf.saved_model.load(path)


def test_log_prob_and_params_match_the_model(exported, rng):
    model, _, loaded = exported
    images = rng.integers(0, 256, (3, *SHAPE)).astype(np.int32)
    labels = np.array([0, 2, 1], np.int32)
    out = loaded.log_prob(tf.constant(images), tf.constant(labels))
    want = model.log_prob(images, labels).numpy()
    np.testing.assert_allclose(out["log_prob"].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(
        out["bits_per_dim"].numpy(), likelihood.bits_per_dim(want, SHAPE), rtol=1e-5
    )
    x = likelihood.to_unit_range(images, 8)
    params = loaded.params(tf.constant(images), tf.constant(labels))["params"].numpy()
    np.testing.assert_allclose(params, model(x, labels).numpy(), rtol=1e-5, atol=1e-5)


def test_sample_is_the_cached_samplers_images(exported):
    """The exported sampler lays out its batches as ``sample_fast`` does: the same seed
    and batch size give the same integers, for a count that fills no whole batch."""
    model, _, loaded = exported
    labels = np.array([1, 0, 2], np.int32)
    got = loaded.sample(tf.constant(3), tf.constant([0, 7]), tf.constant(labels))["images"]
    want = sampling.sample_fast(model, 3, labels=labels, seed=(0, 7), batch_size=2)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_bad_inputs_fail_in_the_graph_with_the_packages_rule(exported):
    _, _, loaded = exported
    fine = tf.zeros([2, *SHAPE], tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must lie in \[0, 256\)"):
        loaded.log_prob(fine + 256, tf.constant([0, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(checks.labels_rule(3))):
        loaded.log_prob(fine, tf.constant([0, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one label per image"):
        loaded.log_prob(fine, tf.constant([0]))


def test_the_folder_holds_model_json_and_a_readme(exported):
    model, folder, _ = exported
    assert (folder / "1" / "saved_model.pb").is_file()
    assert "class-conditional: yes, 3 classes" in (folder / "README.txt").read_text()
    assert '"sample_batch_size": 2' in (folder / "model.json").read_text()


def test_an_occupied_folder_and_an_unbuilt_model_are_refused(exported, tmp_path):
    model, folder, _ = exported
    with pytest.raises(FileExistsError, match="not an empty folder"):
        serving.export(model, folder)
    from pixelcnn.model import PixelCNNPP

    with pytest.raises(ValueError, match="no weights yet"):
        serving.export(PixelCNNPP(image_shape=SHAPE, filters=4), tmp_path / "new")
