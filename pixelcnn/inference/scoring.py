"""Scoring images with a trained model: integer batches of any dataset, per-image
log-likelihoods and bits/dim, split over a strategy's replicas. Where the images come
from (a .npz, a folder, a run's own split) is the command line's concern
(``pixelcnn.cli.sources``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pixelcnn import checks, distribute, likelihood
from pixelcnn.data import contract


def integer_batches(
    dataset: Iterable, image_shape, num_bits: int, num_classes: int | None, split: str
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Batches of a dataset in any accepted element format (``pixelcnn.contract``) as
    (images int32 [B, H, W, C] in [0, 2**num_bits), labels int32 [B] or None).

    The first batch is checked against the model (``contract.check_batch``: ValueError
    with what is wrong). Integer images pass through unchanged; float images on the
    grid become their levels.
    """
    for i, element in enumerate(dataset):
        if i == 0:
            contract.check_batch(element, image_shape, num_bits, num_classes, split)
        images, labels = contract.split_element(element)
        images = tf.convert_to_tensor(images)
        if images.dtype.is_integer:
            levels = tf.cast(images, tf.int32)
        else:
            levels = likelihood.to_integers(images, num_bits)
        if labels is not None:
            labels = checks.squeeze_labels(np.asarray(labels)).astype(np.int32)
        yield levels.numpy(), labels


def take(
    batches: Iterable[tuple[np.ndarray, np.ndarray | None]], n: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first n images (and labels) of ``integer_batches``; fewer if it runs out,
    all of them for n=None."""
    images, labels = [], []
    count = 0
    for x, y in batches:
        images.append(x)
        labels.append(y)
        count += len(x)
        if n is not None and count >= n:
            break
    if not images:
        raise checks.empty("dataset")
    return np.concatenate(images)[:n], None if labels[0] is None else np.concatenate(labels)[:n]


BATCH_SIZE = 64  # images per scoring batch (evaluate, ood, reading a source) by default


def array_batches(images: np.ndarray, labels: np.ndarray | None, size: int = BATCH_SIZE):
    """(images, labels) arrays as ``integer_batches``-style pairs of at most ``size``."""
    for i in range(0, len(images), size):
        yield images[i : i + size], None if labels is None else labels[i : i + size]


@dataclass
class Scores:
    """Per-image log-likelihoods of a scored dataset, in the source's order."""

    log_prob: np.ndarray  # float64 [N] nats
    labels: np.ndarray | None  # int32 [N], or None when the source has none
    image_shape: tuple

    @property
    def bits_per_dim(self) -> np.ndarray:
        """float64 [N] bits per sub-pixel of each image."""
        return likelihood.bits_per_dim(self.log_prob, self.image_shape)

    def csv(self) -> str:
        """One row per image: index, label (-1 without labels), log p in nats, bits/dim."""
        labels = self.labels if self.labels is not None else [-1] * len(self.log_prob)
        rows = zip(self.log_prob, labels, self.bits_per_dim, strict=True)
        lines = ["index,label,log_prob_nats,bits_per_dim"]
        lines += [f"{i},{int(y)},{s:.6f},{b:.6f}" for i, (s, y, b) in enumerate(rows)]
        return "\n".join(lines) + "\n"

    def summary(self) -> dict:
        """images, mean NLL per image (nats) and bits/dim of the whole set."""
        return {
            "images": int(len(self.log_prob)),
            "nll_nats": float(-self.log_prob.mean()),
            "bits_per_dim": float(likelihood.bits_per_dim(self.log_prob.mean(), self.image_shape)),
        }


def score(model, batches, strategy: tf.distribute.Strategy | None = None) -> Scores:
    """log p of every image of ``integer_batches`` under ``model``; the labels are
    used when the model is class-conditional. ValueError for an empty source."""
    log_prob = distribute.distributed_log_prob(strategy, model)
    scores, labels = [], []
    for images, y in batches:
        scores.append(log_prob(images, y if model.num_classes else None).numpy())
        labels.append(y)
    if not scores:
        raise checks.empty("dataset")
    has_labels = all(y is not None for y in labels)
    return Scores(
        np.concatenate(scores).astype(np.float64),
        np.concatenate(labels) if has_labels else None,
        tuple(model.image_shape),
    )
