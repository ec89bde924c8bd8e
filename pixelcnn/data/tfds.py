"""TensorFlow Datasets as a ``train.dataset_fn``: ``tfds.name = 'cifar10'`` and the rest
of ``tfds``'s bindings. An optional dependency (the ``tfds`` extra), imported only when
the function runs. Images are cropped or padded and box-averaged, never resampled, so
their levels stay integers; the batches are what ``pixelcnn.data``'s datasets yield.
"""

from __future__ import annotations

import dataclasses

import gin
import tensorflow as tf

from pixelcnn import checks
from pixelcnn.data.datasets import Datasets


def box_downsample(images: tf.Tensor, factor: int) -> tf.Tensor:
    """Integer images [..., H, W, C] -> [..., H / factor, W / factor, C]: the mean of each
    factor x factor block, rounded half up to an integer level (no interpolation, the
    levels stay on the grid). H and W must be multiples of factor."""
    if factor == 1:
        return images
    dtype, area = images.dtype, factor * factor
    x = tf.cast(images, tf.int64)
    shape = tf.shape(x)
    h, w, c = shape[-3], shape[-2], shape[-1]
    blocks = tf.reshape(
        x, tf.concat([shape[:-3], [h // factor, factor, w // factor, factor, c]], 0)
    )
    sums = tf.reduce_sum(blocks, axis=[-4, -2])
    return tf.cast((sums + area // 2) // area, dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Features:
    """Which features a split's examples give, and how its images are made one size."""

    image_key: str
    label_key: str | None  # None: every label 0
    crop_or_pad_to: tuple[int, int] | None  # (H, W), None: the dataset's own size
    downsample: int  # the box average's factor, 1: none


def _tfds_split(builder, split: str, features: _Features, seed: int, shuffle: bool):
    """One split of a TFDS builder as an unbatched tf.data.Dataset of (image, label)
    pairs, cropped or padded and box-averaged as ``features`` says."""
    import tensorflow_datasets

    read = tensorflow_datasets.ReadConfig(shuffle_seed=seed)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read)
    size, label_key = features.crop_or_pad_to, features.label_key

    def convert(example):
        image = example[features.image_key]
        if size is not None:  # centred: tf.image's crop where larger, zero pad where smaller
            image = tf.image.resize_with_crop_or_pad(image, *size)
        image = box_downsample(image, features.downsample)
        label = (
            tf.zeros([], tf.int32) if label_key is None else tf.cast(example[label_key], tf.int32)
        )
        return image, label

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_size(features, name, image_key, label_key, crop_or_pad_to, factor) -> tuple[int, int]:
    """The (H, W) ``tfds`` crops or pads to (or the dataset's fixed size); ValueError for
    a missing feature, images of varying size without a crop, or a size the box average
    cannot divide."""
    for key, binding in ((image_key, "image_key"), (label_key, "label_key")):
        if key is not None and key not in features:
            raise ValueError(
                f"tfds: {name} has no feature {key!r} (features: {sorted(features)}); bind "
                f"tfds.{binding}" + (" = None" if binding == "label_key" else "")
            )
    h, w = features[image_key].shape[:2]
    if crop_or_pad_to is not None:
        h, w = (checks.check_positive_int(s, "tfds.crop_or_pad_to") for s in crop_or_pad_to)
    elif h is None or w is None:
        raise ValueError(
            f"tfds: the images of {name} vary in size ({features[image_key].shape}); bind "
            "tfds.crop_or_pad_to = (H, W) to crop or pad them to one size"
        )
    if h % factor or w % factor:
        raise ValueError(
            f"tfds: images of {h}x{w} cannot be box-averaged by tfds.downsample = {factor}: "
            "crop or pad them to a multiple of it (tfds.crop_or_pad_to)"
        )
    return h, w


@gin.configurable
def tfds(
    batch_size: int,
    name: str = gin.REQUIRED,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str = "image",
    label_key: str | None = "label",
    data_dir: str | None = None,
    crop_or_pad_to=None,
    downsample: int = 1,
    shuffle_buffer: int = 10_000,
    download: bool = True,
    seed: int = 0,
) -> Datasets:
    """A TensorFlow Datasets dataset (``pip install -e ".[tfds]"``), e.g. ``mnist``,
    ``cifar10``, ``svhn_cropped``, ``celeb_a``, ``downsampled_imagenet/32x32``.

    Args:
      batch_size: global batch size.
      name: the TFDS name, with its config and version if wanted ("name/config:1.2.0").
      train_split, test_split: TFDS split strings ("train", "validation", "train[:90%]").
      image_key: the image feature; label_key: the class feature (int), or None (all
        labels 0, e.g. for datasets without classes).
      data_dir: where TFDS keeps its data (any tf.io.gfile path, gs:// included); None:
        TFDS's default (~/tensorflow_datasets, or $TFDS_DATA_DIR).
      crop_or_pad_to: None or (H, W): every image centre-cropped where larger and
        zero-padded where smaller (needed when the images' sizes vary).
      downsample: an integer factor: the mean of each factor x factor block, rounded to an
        integer level (``box_downsample``), after the crop; never a bilinear resize.
      shuffle_buffer: images in the train split's shuffle buffer (seeded, reshuffled
        every epoch; the files are shuffled too).
      download: let TFDS download and prepare the data if it is not in ``data_dir``.
      seed: seed of the train shuffling.
    Returns:
      (train, test) datasets of (images [B, H, W, C] in the feature's integer dtype,
      labels int32 [B]).
    """
    import tensorflow_datasets  # an optional dependency: the `tfds` extra

    batch_size = checks.check_positive_int(batch_size, "batch_size")
    factor = checks.check_positive_int(downsample, "tfds.downsample")
    if name is gin.REQUIRED or not name:
        raise ValueError("bind tfds.name, e.g. `tfds.name = 'downsampled_imagenet/32x32'`")
    builder = tensorflow_datasets.builder(name, data_dir=data_dir)
    # the features are known before any download: bad bindings fail before it
    size = _tfds_size(builder.info.features, name, image_key, label_key, crop_or_pad_to, factor)
    if download:
        builder.download_and_prepare()
    features = _Features(
        image_key=image_key,
        label_key=label_key,
        crop_or_pad_to=None if crop_or_pad_to is None else size,
        downsample=factor,
    )
    buffer = checks.check_positive_int(shuffle_buffer, "tfds.shuffle_buffer")
    train = _tfds_split(builder, train_split, features, seed, shuffle=True)
    train = train.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    test = _tfds_split(builder, test_split, features, seed, shuffle=False)
    return tuple(
        ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
        for ds in (train, test)
    )
