"""Built-in datasets: the embedded MNIST subset, MNIST, CIFAR-10, image folders, .npz.

Each is gin-configurable, takes the global batch size and returns ``(train, test)``
``tf.data`` datasets of ``(images uint8 [B, H, W, C], labels int32 [B])`` (uint16
where 16-bit files need it): integer levels rather than the original code's floats, so
nothing is rounded on the way and the host-to-device copies are 4x smaller. The train
split is shuffled (seeded, reshuffled every epoch) and its last partial batch is kept;
the test split is not shuffled. What a ``train.dataset_fn`` may yield in general, and
the checks, are in ``pixelcnn.contract``.
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import os
import pickle
import zipfile

import gin
import keras
import numpy as np
import tensorflow as tf

from pixelcnn import checks, files

logger = logging.getLogger(__name__)

Datasets = tuple[tf.data.Dataset, tf.data.Dataset]  # (train, test)


# --------------------------------------------------------------------- helpers
# Data paths go through tf.io.gfile: local files and the URLs TensorFlow's filesystems
# read (gs://, s3://, hdfs://, ram://).
def _is_file(path: str) -> bool:
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def _open(path: str):
    return tf.io.gfile.GFile(path, "rb")


def split_indices(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of range(N) into (train [N - n], test [n]) indices.

    The examples are shuffled with ``seed``, then interleaved so that every prefix holds
    each class in proportion; the first ``test_size`` form the test split. With all
    labels equal this is a plain seeded shuffle.
    """
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    position = np.empty(len(labels), np.float64)  # relative position within its class
    for value in np.unique(labels):
        members = np.flatnonzero(shuffled == value)
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    interleaved = order[np.argsort(position, kind="stable")]
    return interleaved[test_size:], interleaved[:test_size]


def _test_size(n: int, test_fraction: float, what: str) -> int:
    """Test images for a fraction in [0, 1): 0 -> none (everything trains, e.g. for
    scoring a folder with the CLI); otherwise at least 1 and at most n - 1."""
    if checks.check_fraction(test_fraction, f"{what}: test_fraction", zero=True) == 0.0:
        return 0
    if n < 2:
        raise ValueError(f"{what}: need at least 2 images to split off a test set, got {n}")
    return min(max(1, round(n * float(test_fraction))), n - 1)


def _as_nhwc(images: np.ndarray, what: str) -> np.ndarray:
    """Integer images [N, H, W] or [N, H, W, C] -> [N, H, W, C], uint8 when they fit."""
    images = np.asarray(images)
    if images.dtype.kind not in "ui":
        raise ValueError(
            f"{what}: images must be integer levels (e.g. uint8), got dtype {images.dtype}; "
            "store the integer pixel values, not floats"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{what}: images must be [N, H, W, C] or [N, H, W], got {images.shape}")
    if images.size and images.min() < 0:
        raise ValueError(f"{what}: images must be non-negative levels, got min {images.min()}")
    if images.dtype != np.uint8 and (images.size == 0 or images.max() <= 255):
        images = images.astype(np.uint8)
    return images


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    """Labels [N] or [N, 1] (any integer type) -> int32 [N]; None -> zeros."""
    if labels is None:
        return np.zeros([n], np.int32)
    return checks.check_labels(labels, n, None, what)


def pad_images(images: np.ndarray, pad_to: int | None) -> np.ndarray:
    """Zero-pads [N, H, W, C] to [N, pad_to, pad_to, C], centred (the extra pixel, if
    any, goes to the bottom/right). Pixel values are unchanged: no interpolation."""
    if pad_to is None:
        return images
    _, h, w, _ = images.shape
    pad_to = checks.check_int(pad_to, "pad_to (at least the image size)", minimum=max(h, w))
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return np.pad(images, [(0, 0), (top, pad_to - h - top), (left, pad_to - w - left), (0, 0)])


def make_datasets(train, test, batch_size: int, seed: int = 0) -> Datasets:
    """(train, test) tf.data pipelines from in-memory arrays.

    Args:
      train, test: pairs (images uint8 [N, H, W, C], labels int [N]).
      batch_size: the global batch size; the last partial batch is kept.
      seed: shuffle seed of the train split (reshuffled every epoch, same sequence of
        orders for the same seed).
    Returns:
      (train, test) datasets of (images [B, H, W, C], labels int32 [B]).
    """
    batch_size = checks.check_positive_int(batch_size, "batch_size")

    def pipeline(images, labels, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int32)))
        # No cache(): the arrays are already in memory, caching would only copy them.
        if shuffle:
            ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)

    return pipeline(*train, shuffle=True), pipeline(*test, shuffle=False)


def split_arrays(images, labels, test_size: int, seed: int):
    """In-memory images and labels [N] as ((train images, labels), (test images,
    labels)), ``test_size`` of them held out by ``split_indices`` (stratified, seeded)."""
    train, test = split_indices(labels, test_size, seed)
    return (images[train], labels[train]), (images[test], labels[test])


def split_datasets(images, labels, test_size: int, batch_size: int, seed: int) -> Datasets:
    """``make_datasets`` of ``split_arrays``."""
    return make_datasets(*split_arrays(images, labels, test_size, seed), batch_size, seed)


# --------------------------------------------------------------------- built-in datasets
def mutate(dataset: tf.data.Dataset, rate: float, num_bits: int, seed, epoch) -> tf.data.Dataset:
    """Each sub-pixel of {"images": float [B, H, W, C] in [-1, 1], ...} batches replaced,
    with probability ``rate``, by a uniform random level: the perturbation that trains
    a likelihood ratio's background model (Ren et al. 2019, arXiv 1906.02845).

    The draws of batch i of ``epoch`` are a function of (seed, epoch, i): another draw
    every epoch, and a run resumed mid-epoch (``dataset.skip`` after this) draws what the
    uninterrupted run drew.
    """
    levels = 2**num_bits

    def perturb(index, batch):
        key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
        key = tf.random.experimental.stateless_fold_in(key, index)
        where_key, value_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        images = batch["images"]
        shape = tf.shape(images)
        replaced = tf.random.stateless_uniform(shape, where_key) < rate
        noise = tf.random.stateless_uniform(shape, value_key, 0, levels, dtype=tf.int32)
        noise = tf.cast(noise, images.dtype) * (2.0 / (levels - 1)) - 1.0
        return batch | {"images": tf.where(replaced, noise, images)}

    return dataset.enumerate().map(perturb, num_parallel_calls=tf.data.AUTOTUNE)


def load_embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The packaged MNIST subset: (images uint8 [5000, 28, 28, 1], labels uint8 [5000]),
    500 per digit, stored sorted by label."""
    resource = importlib.resources.files("pixelcnn").joinpath("assets/mnist_5k.npz")
    with resource.open("rb") as f, np.load(io.BytesIO(f.read())) as data:
        return data["images"], data["labels"]


@gin.configurable
def embedded_mnist(
    batch_size: int, test_size: int = 500, pad_to: int | None = None, seed: int = 0
) -> Datasets:
    """5000 MNIST digits shipped with the package (works offline).

    Args:
      batch_size: global batch size.
      test_size: images held out for testing, stratified by digit (500 -> 50 per digit,
        4500 train).
      pad_to: zero-pad 28x28 to pad_to x pad_to (32 adds 2 pixels each side); pixels are
        never interpolated.
      seed: seed of the split and of the train shuffling.
    Returns:
      (train, test) datasets of (images uint8 [B, S, S, 1] in [0, 255], labels int32 [B]
      in [0, 10)), S = 28 or pad_to.
    """
    return make_datasets(*embedded_mnist_split(test_size, pad_to, seed), batch_size, seed)


def embedded_mnist_split(test_size: int = 500, pad_to: int | None = None, seed: int = 0):
    """The arrays behind ``embedded_mnist`` with the same arguments: ((train images,
    labels), (test images, labels)), images uint8 [N, S, S, 1], labels uint8 [N], the
    test images in the order its test dataset yields them (for scripts that score the
    split a run was evaluated on)."""
    images, labels = load_embedded_mnist()
    test_size = checks.check_int(test_size, "embedded_mnist: test_size", 1, len(images) - 1)
    # The file is sorted by label: split stratified after a seeded shuffle.
    return split_arrays(pad_images(images, pad_to), labels, test_size, seed)


def _offline_error(name: str, err: Exception, how: str) -> FileNotFoundError:
    # FileNotFoundError: the data file is what is missing, and callers that already
    # catch missing paths (the CLI) catch this too.
    return FileNotFoundError(
        f"could not load {name}: no local copy was given and the download failed "
        f"({type(err).__name__}: {err}). {how} The 5000-image MNIST subset shipped with "
        "pixelcnn works offline: bind `train.dataset_fn = @embedded_mnist` (with "
        "`embedded_mnist.pad_to = 32` for a 32x32 model)."
    )


@gin.configurable
def mnist(
    batch_size: int, path: str | None = None, pad_to: int | None = None, seed: int = 0
) -> Datasets:
    """Full MNIST: 60000 train and 10000 test digits.

    Args:
      batch_size: global batch size.
      path: a local ``mnist.npz`` as written by ``keras.datasets.mnist`` (keys x_train
        [N, 28, 28] uint8, y_train [N], x_test, y_test), or a folder holding one. None
        uses ``keras.datasets.mnist.load_data()`` (downloads unless cached).
      pad_to: zero-pad 28x28 to pad_to x pad_to (32 adds 2 pixels each side).
      seed: seed of the train shuffling.
    Returns:
      (train, test) datasets of (images uint8 [B, S, S, 1], labels int32 [B] in [0, 10)).

    Raises:
      FileNotFoundError: ``path`` is missing, or no path was given and the download
        failed (the message says how to provide the file or use ``embedded_mnist``).
    """
    if path is not None:
        path = os.path.expanduser(str(path))
        if tf.io.gfile.isdir(path):
            path = os.path.join(path, "mnist.npz")
        if not _is_file(path):
            raise FileNotFoundError(
                f"mnist: {path} does not exist; mnist.path must be the mnist.npz file of "
                "keras.datasets.mnist (keys x_train, y_train, x_test, y_test)"
            )
        with _open(path) as f, np.load(f, allow_pickle=False) as data:
            keys = ("x_train", "y_train", "x_test", "y_test")
            missing = [k for k in keys if k not in data]
            if missing:
                raise ValueError(
                    f"mnist: {path} lacks keys {missing} (has {sorted(data.files)}); expected "
                    "the keras.datasets.mnist file with x_train, y_train, x_test, y_test"
                )
            x_train, y_train, x_test, y_test = (data[k] for k in keys)
    else:
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        except Exception as err:  # Keras raises a bare Exception when the fetch fails
            raise _offline_error(
                "MNIST",
                err,
                "To use MNIST offline, copy the Keras file "
                "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz "
                "(keys x_train, y_train, x_test, y_test) to this machine and bind "
                "`mnist.path = '/path/to/mnist.npz'` in gin (or place it at "
                "~/.keras/datasets/mnist.npz).",
            ) from err
    x_train, x_test = _as_nhwc(x_train, "mnist"), _as_nhwc(x_test, "mnist")
    return make_datasets(
        (pad_images(x_train, pad_to), _as_labels(y_train, len(x_train), "mnist")),
        (pad_images(x_test, pad_to), _as_labels(y_test, len(x_test), "mnist")),
        batch_size,
        seed,
    )


def load_cifar_batch(file: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle of the python CIFAR-10 release -> (uint8 [N, 32, 32, 3], int32 [N]).

    Rows of b'data' are [3072] = R plane, G plane, B plane of 32x32 each (CHW order).
    The files are pickles: load only copies you trust.
    """
    with _open(file) as f:
        batch = pickle.load(f, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = np.asarray(batch["data"], np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> HWC
    return np.ascontiguousarray(images), np.asarray(batch["labels"], np.int32)


@gin.configurable
def cifar10(batch_size: int, path: str | None = None, seed: int = 0) -> Datasets:
    """CIFAR-10: 50000 train and 10000 test RGB images of 32x32.

    Args:
      batch_size: global batch size.
      path: the extracted ``cifar-10-batches-py`` folder of the python release
        (data_batch_1 .. data_batch_5, test_batch), or a folder containing it. None uses
        ``keras.datasets.cifar10.load_data()`` (downloads unless cached).
      seed: seed of the train shuffling.
    Returns:
      (train, test) datasets of (images uint8 [B, 32, 32, 3], labels int32 [B] in [0, 10)).

    Raises:
      FileNotFoundError: files missing under ``path``, or no path was given and the
        download failed (the message says how to provide the folder).
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if path is not None:
        folder = os.path.expanduser(str(path))
        if tf.io.gfile.isdir(os.path.join(folder, "cifar-10-batches-py")):
            folder = os.path.join(folder, "cifar-10-batches-py")
        missing = [n for n in names if not _is_file(os.path.join(folder, n))]
        if missing:
            raise FileNotFoundError(
                f"cifar10: {folder} lacks {missing}; cifar10.path must be the extracted "
                "cifar-10-batches-py folder of "
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
            )
        parts = [load_cifar_batch(os.path.join(folder, n)) for n in names]
        x_train = np.concatenate([p[0] for p in parts[:5]])
        y_train = np.concatenate([p[1] for p in parts[:5]])
        x_test, y_test = parts[5]
    else:
        try:
            (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        except Exception as err:  # Keras raises a bare Exception when the fetch fails
            raise _offline_error(
                "CIFAR-10",
                err,
                "To use CIFAR-10 offline, download "
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz elsewhere, extract "
                "it here and bind `cifar10.path = '/path/to/cifar-10-batches-py'` in gin.",
            ) from err
    return make_datasets(
        (_as_nhwc(x_train, "cifar10"), _as_labels(y_train, len(x_train), "cifar10")),
        (_as_nhwc(x_test, "cifar10"), _as_labels(y_test, len(x_test), "cifar10")),
        batch_size,
        seed,
    )


@gin.configurable
def image_folder(
    batch_size: int, path: str, image_shape=None, test_fraction: float = 0.1, seed: int = 0
) -> Datasets:
    """A folder of PNG/JPEG images, searched recursively.

    When every image lies in a first-level subfolder, each subfolder is a class and the
    labels are their indices in sorted name order; otherwise every label is 0. The images
    keep their channel count (grayscale 1, RGB 3, RGBA 4) and must all share one size and
    channel count.

    Args:
      batch_size: global batch size.
      path: the folder.
      image_shape: None, or (H, W) / (H, W, C): center-crop every image to H x W (images
        are never resized); C, if given, must match the files.
      test_fraction: fraction in [0, 1) held out for testing (stratified by class,
        seeded); 0 puts every image in train and leaves the test dataset empty.
      seed: seed of the split and of the train shuffling.
    Returns:
      (train, test) datasets of (images uint8 [B, H, W, C] (uint16 for 16-bit PNGs),
      labels int32 [B]).
    """
    images, labels = files.load_image_folder(path, image_shape)
    test_size = _test_size(len(images), test_fraction, "image_folder")
    return split_datasets(images, labels, test_size, batch_size, seed)


def npz_has_labels(path: str, labels_key: str = "labels") -> bool:
    """Whether the .npz at ``path`` holds ``labels_key`` (``load_npz`` gives zeros
    otherwise)."""
    with _open(os.path.expanduser(str(path))) as f, np.load(f, allow_pickle=False) as data:
        return labels_key in data.files


def load_npz(
    path: str, images_key: str = "images", labels_key: str | None = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """``npz``'s images and labels as arrays, in the file's order: (images [N, H, W, C],
    labels int32 [N], all 0 when the file has none)."""
    file = os.path.expanduser(str(path))
    if not _is_file(file):
        raise FileNotFoundError(f"npz: {file} does not exist")
    with _open(file) as f:
        if not zipfile.is_zipfile(f):  # np.load would call it "pickled data"
            raise ValueError(
                f"npz: {file} is not an .npz file (the zip archive numpy.savez writes, with "
                "the integer images under 'images')"
            )
    with _open(file) as f, np.load(f, allow_pickle=False) as data:
        if images_key not in data:
            raise ValueError(
                f"npz: {file} has no key {images_key!r} (keys: {sorted(data.files)}); bind "
                "npz.images_key"
            )
        images = _as_nhwc(data[images_key], f"npz {file}")
        if labels_key is not None and labels_key in data:
            labels = _as_labels(data[labels_key], len(images), f"npz {file}")
        else:
            logger.info("npz: %s has no labels key %r; labels are all 0", file, labels_key)
            labels = _as_labels(None, len(images), f"npz {file}")
    return images, labels


@gin.configurable
def npz(
    batch_size: int,
    path: str,
    images_key: str = "images",
    labels_key: str | None = "labels",
    test_fraction: float = 0.1,
    seed: int = 0,
    test_path: str | None = None,
) -> Datasets:
    """Images from a NumPy .npz file.

    Args:
      batch_size: global batch size.
      path: .npz with integer images [N, H, W, C] or [N, H, W] (a channel axis is added)
        under ``images_key`` and optional integer labels [N] under ``labels_key`` (all 0
        when the key is absent or None).
      test_fraction: fraction in [0, 1) held out for testing (stratified by label,
        seeded; 0 leaves the test dataset empty); unused when ``test_path`` is given.
      seed: seed of the split and of the train shuffling.
      test_path: optional .npz with the same keys holding the test split; all of
        ``path`` is then used for training.
    Returns:
      (train, test) datasets of (images [B, H, W, C] uint8 when the levels fit in 8
      bits, otherwise the file's integer dtype, labels int32 [B]).
    """
    images, labels = load_npz(path, images_key, labels_key)
    if test_path is not None:
        test_images, test_labels = load_npz(test_path, images_key, labels_key)
        if test_images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"npz: train images are {images.shape[1:]} but test images are "
                f"{test_images.shape[1:]}"
            )
        return make_datasets((images, labels), (test_images, test_labels), batch_size, seed)
    test_size = _test_size(len(images), test_fraction, "npz")
    return split_datasets(images, labels, test_size, batch_size, seed)
