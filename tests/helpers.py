"""Shared set-up of the tests: the tiny model and Trainer, batches of random images,
gin bindings, and local multi-worker clusters. Imported by test files (``from helpers
import ...``) and by the worker scripts they start."""

import functools
import json
import os
import socket
from pathlib import Path

import gin
import numpy as np
import tensorflow as tf

from pixelcnn.model import PixelCNNPP
from pixelcnn.training.trainer import Trainer, TrainerOptions

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (6, 6, 1)
TINY = dict(
    image_shape=SHAPE,
    # one resolution: tracing is most of a training test's time; test_model covers more
    residual_blocks=1,
    residual_layers_per_block=1,
    filters=8,
    num_mixtures=2,
    dropout_rate=0.0,
)


@functools.cache
def initialized_model(shape, bits=8, classes=None, seed=0):
    """A tiny model after data-dependent init on random images (random weights, realistic
    scales), one per argument set and process."""
    import keras

    from pixelcnn.likelihood import to_unit_range

    keras.utils.set_random_seed(seed)
    m = PixelCNNPP(
        image_shape=shape,
        residual_blocks=2,
        residual_layers_per_block=1,
        filters=8,
        num_mixtures=3,
        dropout_rate=0.0,
        num_classes=classes,
        num_bits=bits,
    )
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 2**bits, (8, *shape))
    m.initialize(to_unit_range(images, bits), rng.integers(0, classes, 8) if classes else None)
    return m


def tiny_model(dtype=None):
    return PixelCNNPP(**TINY, dtype=dtype)


def make_batches(n_batches=2, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n_batches * batch, *SHAPE)).astype(np.uint8)


def make_trainer(strategy, **options):
    """A Trainer of the tiny model; options: TrainerOptions fields besides the rate."""
    return Trainer(strategy, tiny_model, TrainerOptions(learning_rate=2e-3, **options))


def set_weights(trainer, weights):
    """Gives the trainer's model and its EMA copy the same given weights."""
    for model in (trainer.model, trainer.ema):
        for v, w in zip(model.trainable_variables, weights, strict=True):
            v.assign(w)


def run_steps(trainer, images, batch=8):
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch)
    ds = ds.map(lambda x: {"images": tf.cast(x, tf.float32) * (2 / 255) - 1})
    losses = []
    dist = trainer.strategy.experimental_distribute_dataset(ds)
    trainer.trace_for(train_spec=dist.element_spec)
    for b in dist:
        losses.append(float(trainer.train_step(b)[0]))
    return losses


def initial_weights():
    model = tiny_model()
    images = make_batches()
    model.initialize(tf.constant(images[:8], tf.float32) * (2 / 255) - 1)
    return [w.numpy() for w in model.trainable_variables]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_env(workers, index):
    """The environment of worker ``index`` of a local cluster at ``workers``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    )
    return env


def bind_tiny(extra=()):
    gin.parse_config(
        [f"PixelCNNPP.{k} = {v!r}" for k, v in TINY.items()]
        + ["train.images_to_log = 0", "train.learning_rate = 2e-3"]
        + list(extra)
    )


def random_images(n, seed=0):
    """n uint8 images of SHAPE, uniform over the 8-bit grid."""
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE)).astype(np.uint8)


def plain(train_images, test_images):
    """A dataset_fn over two arrays, batched, nothing else."""

    def fn(batch_size):
        return (
            tf.data.Dataset.from_tensor_slices(train_images).batch(batch_size),
            tf.data.Dataset.from_tensor_slices(test_images).batch(batch_size),
        )

    return fn


def summary_values(run_dir, split):
    """(step, tag, value) of every summary in the event files of a run's ``split``
    (``train``, ``eval``, ``eval_raw``); value is the ``Summary.Value`` proto."""
    for path in sorted(Path(run_dir, split).glob("events.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                yield event.step, value.tag, value


def array_dataset_fn(images):
    def fn(batch_size):
        x = tf.data.Dataset.from_tensor_slices(images)
        return x.batch(batch_size), x.take(8).batch(batch_size)

    return fn
