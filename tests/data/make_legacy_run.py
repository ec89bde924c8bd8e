"""Writes tests/data/legacy_run: a run directory saved by the code of commit 95eb8d9,
whose checkpoints hold every layer as an attribute of the model (the layout before the
per-resolution levels), for tests/test_train.py::test_a_checkpoint_of_the_old_layout_loads.
Run from the repository root at that commit: python tests/data/make_legacy_run.py
"""

import json
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from pixelcnn import codec
from pixelcnn import train as training
from pixelcnn.model import PixelCNNPP

out = Path("tests/data/legacy_run")
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
arch = dict(
    image_shape=(5, 6, 1),
    residual_blocks=3,
    residual_layers_per_block=1,
    filters=4,
    num_mixtures=2,
    dropout_rate=0.0,
    num_classes=2,
)
strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
trainer = training.Trainer(
    strategy,
    lambda dtype: PixelCNNPP(**arch, dtype=dtype),
    2e-3,
    0.999995,
    0.95,
    0.9995,
    0.9,
    "float32",
)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (4, 5, 6, 1)).astype(np.int32)
labels = np.array([0, 1, 1, 0], np.int32)
x = tf.constant(2.0 * images / 255.0 - 1.0, tf.float32)
trainer.initialize(x, labels)
for _ in range(3):
    trainer.train_step({"images": x, "labels": tf.constant(labels)})
(out / "model.json").write_text(
    json.dumps(trainer.model.config_summary() | {"precision": "float32"}, indent=2) + "\n"
)
ckpts = training._Checkpoints(trainer, out, strategy, keep=2, every_minutes=10)
print(ckpts.save("fixture"))
slots = {}
for v, m, vel in zip(
    trainer.model.trainable_variables, trainer.optimizer._momentums, trainer.optimizer._velocities
):
    slots["momentum:" + v.path] = m.numpy()
    slots["velocity:" + v.path] = vel.numpy()
np.savez_compressed(
    out / "expected.npz",
    images=images,
    labels=labels,
    log_prob_ema=trainer.ema.log_prob(images, labels).numpy(),
    log_prob_model=trainer.model.log_prob(images, labels).numpy(),
    step=int(trainer.step.numpy()),
    ema_fingerprint=codec.weights_fingerprint(trainer.ema),
    **slots,
)
print(int(trainer.step.numpy()), trainer.ema.log_prob(images, labels).numpy())
