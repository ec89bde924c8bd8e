"""Files written by earlier code still read the same: tests/data/frozen, written by
tests/data/make_frozen_files.py at commit 3ff6dc9 (before the big refactor) and
tests/data/make_frozen_codec.py (images.pcnn, codec format 2), from the model of
tests/data/legacy_run (EMA weights)."""

import lzma
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import pixelcnn
from pixelcnn.inference import codec

DATA = Path(__file__).resolve().parent / "data"
FROZEN = DATA / "frozen"


@pytest.fixture(scope="module")
def expected():
    with np.load(FROZEN / "expected.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory):
    run = tmp_path_factory.mktemp("legacy") / "run"
    shutil.copytree(DATA / "legacy_run", run)
    model, _ = pixelcnn.load_for_inference(run)
    return model


def test_a_frozen_compressed_file_decodes_to_its_images(legacy_model, expected):
    """Format 2 decodes exactly on every machine: no excuse for any stack."""
    np.testing.assert_allclose(
        legacy_model.log_prob(expected["images"], expected["labels"]),
        expected["log_prob_ema"],
        rtol=1e-6,
    )
    blob = (FROZEN / "images.pcnn").read_bytes()
    assert codec.read_header(blob)["version"] == 2
    images, labels = codec.decode(legacy_model, blob)
    np.testing.assert_array_equal(images, expected["images"])
    np.testing.assert_array_equal(labels, expected["labels"])


def test_a_frozen_file_of_format_1_decodes_or_says_why_not(legacy_model, expected):
    """Format 1 decodes exactly on the stack that wrote it; elsewhere it warns first and
    either decodes or fails its checksum with a message naming the format, never
    returning other images."""
    blob = (FROZEN / "images_v1.pcnn").read_bytes()
    assert codec.read_header(blob)["version"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images, labels = codec.decode(legacy_model, blob)
        except codec.CodecError as e:
            assert "a format-1 file's probabilities depend on the stack" in str(e)
            assert any("format version 1" in str(w.message) for w in caught)
            return
    np.testing.assert_array_equal(images, expected["images"])
    np.testing.assert_array_equal(labels, expected["labels"])


def test_a_frozen_export_gives_the_same_log_probs_and_samples(tmp_path, expected):
    export = tmp_path / "export"
    shutil.copytree(FROZEN / "export", export)
    packed = export / "1" / "saved_model.pb.xz"  # stored compressed (5.9 MB raw)
    (export / "1" / "saved_model.pb").write_bytes(lzma.decompress(packed.read_bytes()))
    packed.unlink()
    signatures = tf.saved_model.load(str(export / "1")).signatures

    images = tf.constant(expected["images"], tf.int32)
    labels = tf.constant(expected["labels"], tf.int32)
    out = signatures["log_prob"](images=images, labels=labels)
    np.testing.assert_allclose(out["log_prob"], expected["log_prob_export"], rtol=1e-6)
    np.testing.assert_allclose(out["bits_per_dim"], expected["bits_per_dim_export"], rtol=1e-6)
    params = signatures["params"](images=images, labels=labels)["params"]
    np.testing.assert_allclose(params, expected["params_export"], rtol=1e-5, atol=1e-6)

    samples = signatures["sample"](
        num_images=tf.constant(int(expected["sample_num_images"]), tf.int32),
        seed=tf.constant(expected["sample_seed"], tf.int32),
        labels=tf.constant(expected["sample_labels"], tf.int32),
    )["images"]
    np.testing.assert_array_equal(samples, expected["samples_export"])
