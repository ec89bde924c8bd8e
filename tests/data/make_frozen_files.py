"""Writes tests/data/frozen: files written by the code of commit 3ff6dc9
(3ff6dc910c1d3a86de1aa6f858c664e60713f9a1), before the big refactor, for
tests/test_frozen_files.py to prove that later code still reads them.

  images_v1.pcnn  5 random 5x6x1 images (labels 0/1) compressed by codec.encode (format 1)
                with the EMA weights of tests/data/legacy_run (written as images.pcnn, since
                renamed: images.pcnn is now format 2, by tests/data/make_frozen_codec.py)
  export/       pixelcnn.inference.serving.export of tests/data/legacy_run (EMA weights,
                sample_batch_size 4): export/1 is the SavedModel, except that its
                saved_model.pb (5.9 MB: the unrolled sampling graph) is stored
                xz-compressed as saved_model.pb.xz (about 0.1 MB); decompress it to load
  expected.npz  images, labels, log_prob_ema (model.log_prob, EMA weights), and what
                the export's signatures return: log_prob_export and bits_per_dim_export
                (log_prob of the images), params_export (params of the images),
                samples_export (sample with num_images=5, seed=[7, 11], sample_labels)

Run from the repository root at that commit (writes into tests/data/frozen, which must
not exist): python tests/data/make_frozen_files.py
"""

import lzma
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

import pixelcnn
from pixelcnn import rundir
from pixelcnn.inference import codec, sampling, serving

out = Path("tests/data/frozen")
if out.exists():
    raise SystemExit(f"{out} exists: remove it first")
out.mkdir(parents=True)
legacy = Path("tests/data/legacy_run")
print("pixelcnn from", pixelcnn.__file__)

with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"  # loading reads only, but keep the fixture untouched anyway
    shutil.copytree(legacy, run)
    model, ckpt = rundir.load_for_inference(run)
    print("loaded", ckpt)

    rng = np.random.default_rng(20240601)
    images = rng.integers(0, 2**model.num_bits, (5, *model.image_shape)).astype(np.int32)
    labels = np.array([0, 1, 1, 0, 1], np.int32)
    log_prob_ema = model.log_prob(images, labels).numpy()

    data = codec.encode(model, images, labels, batch_size=4, weights="tests/data/legacy_run EMA")
    (out / "images.pcnn").write_bytes(data)
    back, back_labels = codec.decode(model, data)
    assert np.array_equal(back, images) and np.array_equal(back_labels, labels)

    saved = serving.export(run, out / "export", sample_batch_size=4)
    # the README and model.json name the temporary run directory: name the fixture
    for name in ("README.txt", "model.json"):
        path = out / "export" / name
        path.write_text(path.read_text().replace(str(run), str(legacy)))

    loaded = tf.saved_model.load(str(saved))
    sig = loaded.signatures
    lp = sig["log_prob"](images=tf.constant(images), labels=tf.constant(labels))
    params = sig["params"](images=tf.constant(images), labels=tf.constant(labels))["params"]
    seed = np.array([7, 11], np.int32)
    sample_labels = np.array([1, 0, 1, 1, 0], np.int32)
    samples = sig["sample"](
        num_images=tf.constant(5, tf.int32),
        seed=tf.constant(seed),
        labels=tf.constant(sample_labels),
    )["images"].numpy()
    # sanity: the export samples as sample_fast does with the same batch size
    fast = sampling.sample_fast(model, 5, sample_labels, seed=(7, 11), batch_size=4).numpy()
    assert np.array_equal(samples, fast), "exported sample differs from sample_fast"
    np.testing.assert_allclose(lp["log_prob"].numpy(), log_prob_ema, rtol=1e-5)

    np.savez_compressed(
        out / "expected.npz",
        images=images,
        labels=labels,
        log_prob_ema=log_prob_ema,
        ema_fingerprint=codec.weights_fingerprint(model),
        log_prob_export=lp["log_prob"].numpy(),
        bits_per_dim_export=lp["bits_per_dim"].numpy(),
        params_export=params.numpy(),
        sample_num_images=np.int32(5),
        sample_seed=seed,
        sample_labels=sample_labels,
        samples_export=samples,
    )
    pb = saved / "saved_model.pb"
    pb.with_name(pb.name + ".xz").write_bytes(
        lzma.compress(pb.read_bytes(), preset=9 | lzma.PRESET_EXTREME)
    )
    pb.unlink()
    print("log_prob", log_prob_ema, "export", lp["log_prob"].numpy())
    print("samples", samples.reshape(5, -1))
