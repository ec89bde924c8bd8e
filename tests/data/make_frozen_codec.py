"""Writes tests/data/frozen/images.pcnn: the images and labels of expected.npz compressed
in codec format 2 (the exact entropy model) with the EMA weights of tests/data/legacy_run,
for tests/test_frozen_files.py to prove that every later pixelcnn, on any machine,
decodes it to the same images. (images_v1.pcnn holds the same images in format 1,
written by tests/data/make_frozen_files.py at commit 3ff6dc9.)

Run from the repository root (the file must not exist): python tests/data/make_frozen_codec.py
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np

from pixelcnn import rundir
from pixelcnn.inference import codec

frozen = Path("tests/data/frozen")
target = frozen / "images.pcnn"
if target.exists():
    raise SystemExit(f"{target} exists: remove it first")
with np.load(frozen / "expected.npz") as f:
    images, labels = f["images"], f["labels"]
with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"  # loading reads only, but keep the fixture untouched anyway
    shutil.copytree("tests/data/legacy_run", run)
    model, _ = rundir.load_for_inference(run)
    data = codec.encode(model, images, labels, batch_size=4, weights="tests/data/legacy_run EMA")
back, back_labels = codec.decode(model, data)
assert np.array_equal(back, images) and np.array_equal(back_labels, labels)
assert codec.read_header(data)["version"] == 2
target.write_bytes(data)
print(f"wrote {target}: {len(data)} bytes")
