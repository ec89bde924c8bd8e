"""Training: ``train``, the gin-configurable entry point behind ``pixelcnn single |
multigpu | multiworker``.

It checks its bindings, builds the model for the data, then hands over to the loop
(``pixelcnn.training.loop``): restore or initialise, epochs of steps with evaluations
(EMA and raw weights), checkpoints, summaries and sample grids. The run directory is
``pixelcnn.rundir``; checkpoints while training, ``training.saver``; what the run
reports, ``training.reporting``; signals, preemption and the time budget,
``training.faults``; devices and strategies, ``pixelcnn.distribute``.

The bindings of ``train``, gathered into the typed options they configure:
  dataset_fn: see ``pixelcnn.data.contract``; the images' (H, W, C) decide the model's
    image_shape unless ``PixelCNNPP.image_shape`` is bound (then they must match).
  ``trainer.TrainerOptions`` (how the weights are optimised and averaged):
    learning_rate, beta_1, beta_2: Adam, the authors' defaults; schedule: the rate's
    course ("exponential", the authors': times learning_rate_decay every step;
    "cosine" or "linear": down to learning_rate_floor times the rate at the run's end,
    taken from max_steps, max_epoch or the time budget, whichever comes first,
    ``loop.Progress``); warmup_steps: the rate ramped up linearly over the first steps;
    clip_norm: the global norm each batch's gradient is clipped to (None: not clipped);
    ema_decay, ema_warmup: Polyak averaging, min(ema_decay, (1 + t) / (ema_warmup + t))
    at step t (``trainer.ema_decay_at``: 10, TensorFlow's warm-up, averages about the
    last tenth of the steps until the cap; lower, longer); l2_weight: a likelihood
    ratio's background model (0 for an ordinary model); precision: "float32",
    "bfloat16" or "float16" (mixed: weights, EMA, optimizer state and the likelihood
    stay float32; float16 scales the loss dynamically and skips a step whose gradient
    overflows, counted in TensorBoard as train/skipped_steps) or "auto"
    (``distribute.choose_precision``); evaluations are float32 whatever it is;
    jit_compile: the model's passes in the training and evaluation steps compiled by
    XLA; seed: initial weights, dropout masks, data perturbation and samples.
  ``loop.LoopOptions`` (what the loop does around the steps):
    batch_size: global, over all replicas; init_batch_size: images of the data-dependent
    init (once, never on resume). max_epoch, max_steps, max_minutes: where to stop; the
    time budget includes the final evaluation, checkpoint and sample grid of the final
    weights, counted from ``started`` (a ``time.time()``: the CLI passes its process's
    start) or else from the call. chkpt_to_keep, checkpoint_every_minutes: checkpoints,
    also written every epoch, at the end and on SIGINT/SIGTERM. eval_every_steps:
    evaluations besides each epoch's; raw_eval_every: the raw (training) weights are
    scored at every that-many-th evaluation and the last (the EMA weights at every one).
    images_to_log every log_images_every epochs, and of the final weights at the end:
    sample grids (0: none). mutation_rate: a background model's data perturbation
    (``data.mutate``). progress: the progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import gin
import keras
import tensorflow as tf

from pixelcnn import distribute
from pixelcnn.data import contract
from pixelcnn.model import PixelCNNPP
from pixelcnn.training import faults
from pixelcnn.training.loop import Loop, LoopOptions
from pixelcnn.training.trainer import Trainer, TrainerOptions


@gin.configurable(denylist=["run_dir", "strategy", "started"])
def train(
    run_dir: str | os.PathLike,
    strategy: tf.distribute.Strategy,
    dataset_fn=gin.REQUIRED,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    schedule: str = "exponential",
    learning_rate_decay: float = 0.999995,
    learning_rate_floor: float = 0.0,
    beta_1: float = 0.95,
    beta_2: float = 0.9995,
    ema_decay: float = 0.9995,
    ema_warmup: float = 10.0,
    warmup_steps: int = 0,
    clip_norm: float | None = None,
    max_epoch: int = 100,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    chkpt_to_keep: int = 5,
    checkpoint_every_minutes: float = 10.0,
    eval_every_steps: int | None = None,
    raw_eval_every: int = 1,
    images_to_log: int = 16,
    log_images_every: int = 1,
    init_batch_size: int = 16,
    precision: str = "float32",
    jit_compile: bool = False,
    seed: int = 0,
    mutation_rate: float = 0.0,
    l2_weight: float = 0.0,
    progress: bool = True,
    started: float | None = None,
) -> dict:
    """Trains a PixelCNNPP (built from the gin bindings of PixelCNNPP) on
    ``dataset_fn(batch_size) -> (train, test)``; a ``run_dir`` with checkpoints resumes.
    Every argument after ``strategy`` is a gin binding (the module docstring says what
    each does). Returns {"step", "epoch", "train_bits_per_dim", "test_bits_per_dim"
    (EMA), "test_bits_per_dim_raw", "evaluations", "samples", "stopped"}, as in
    metrics.json (a resumed run's earlier evaluations and grids first). The data's
    iterators stay alive until the process exits (``training.passes``).
    """
    arguments = dict(locals())
    start = time.monotonic() - (0.0 if started is None else max(0.0, time.time() - started))
    if dataset_fn is gin.REQUIRED or dataset_fn is None:
        raise ValueError("bind train.dataset_fn, e.g. `train.dataset_fn = @embedded_mnist`")
    trainer_options = _options(TrainerOptions, arguments)
    loop_options = _options(LoopOptions, arguments)
    # Every binding is checked before any data is read: one clear error, no lost work.
    trainer_options.check()
    loop_options.check(strategy.num_replicas_in_sync)
    trainer, train_ds, test_ds, init = _build(strategy, dataset_fn, trainer_options, batch_size)
    loop = Loop(trainer, os.fspath(run_dir), test_ds, loop_options, start)
    try:
        loop.set_up(init)
        with faults.StopRequested() as stop, faults.stopping(strategy, loop.saver, stop) as ends:
            stopped = loop.run(train_ds, stop, ends)
        return loop.finish(stopped)
    except faults.TrainingInterrupted:
        loop.interrupted()
        raise
    finally:
        loop.close()


def _options(cls, arguments: dict):
    """The options ``cls`` from train()'s arguments: each of its fields is the binding
    of the same name."""
    return cls(**{field.name: arguments[field.name] for field in dataclasses.fields(cls)})


def _build(strategy, dataset_fn, options: TrainerOptions, batch_size: int):
    """The Trainer for the data's image shape (the precision resolved for the hardware)
    and the checked, converted datasets. Returns (trainer, train_ds, test_ds, (images,
    labels or None) of the first batch)."""
    options = dataclasses.replace(
        options, precision=distribute.resolve_precision(options.precision)
    )
    keras.utils.set_random_seed(options.seed)
    train_ds, test_ds = dataset_fn(batch_size)
    first = contract.first_batch(train_ds, "train")
    model_fn = functools.partial(PixelCNNPP, image_shape=_image_shape(first))
    trainer = Trainer(strategy, model_fn, options)
    model = trainer.model
    # Validate the data before any work: one clear error instead of a wasted run.
    contract.check_batch(first, model.image_shape, model.num_bits, model.num_classes, "train")
    contract.check_batch(test_ds, model.image_shape, model.num_bits, model.num_classes, "test")
    train_ds = contract.as_model_input(train_ds, model.num_bits, model.image_shape)
    test_ds = contract.as_model_input(test_ds, model.num_bits, model.image_shape)
    return trainer, train_ds, test_ds, contract.to_model_input(first, model.num_bits)


def _image_shape(batch) -> tuple[int, int, int]:
    """PixelCNNPP.image_shape as bound in gin, else the (H, W, C) of the data's images."""
    try:
        bound = gin.query_parameter("PixelCNNPP.image_shape")
    except ValueError:  # not bound
        bound = None
    if bound is not None:
        return tuple(bound)
    return contract.infer_image_shape(batch)
