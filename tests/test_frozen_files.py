"""Files written by the code of commit 3ff6dc9 (before the big refactor) still read the
same: tests/data/frozen, written by tests/data/make_frozen_files.py from the model of
tests/data/legacy_run (EMA weights)."""

import lzma
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import pixelcnn
from pixelcnn import codec

DATA = Path(__file__).resolve().parent / "data"
FROZEN = DATA / "frozen"


@pytest.fixture(scope="module")
def expected():
    with np.load(FROZEN / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def test_a_frozen_compressed_file_decodes_to_its_images(tmp_path, expected):
    run = tmp_path / "run"
    shutil.copytree(DATA / "legacy_run", run)
    model, _ = pixelcnn.load_for_inference(run)
    np.testing.assert_allclose(
        model.log_prob(expected["images"], expected["labels"]), expected["log_prob_ema"], rtol=1e-6
    )
    blob = (FROZEN / "images.pcnn").read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images, labels = codec.decode(model, blob)
        except codec.CodecError:
            # Exact decoding is promised on the stack that wrote the file (the header
            # records it); elsewhere the probabilities may differ, and then the decode
            # must fail its checksum, never return other images.
            assert any("another stack" in str(w.message) for w in caught)
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
