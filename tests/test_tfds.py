"""pixelcnn.data.tfds against TFDS's offline stand-in data, and its box average."""

import numpy as np
import pytest
import tensorflow as tf
from test_train import mock_tfds

from pixelcnn.data import contract
from pixelcnn.data import tfds as tfds_data


def test_box_downsample_is_the_rounded_block_mean():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 12, 9, 2)).astype(np.uint8)
    images[0, :3, :3, 0] = [[0, 1, 0], [0, 0, 0], [0, 0, 1]]  # mean 2/9: rounds down
    images[0, :3, :3, 1] = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]  # mean 5/9: rounds up
    got = tfds_data.box_downsample(tf.constant(images), 3).numpy()
    blocks = images.astype(np.float64).reshape(3, 4, 3, 3, 3, 2).mean(axis=(2, 4))
    np.testing.assert_array_equal(got, np.floor(blocks + 0.5))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 3, 2)
    assert got[0, 0, 0, 0] == 0 and got[0, 0, 0, 1] == 1
    # halves round up, in 16 bits too
    half = tf.constant([[[[1], [2]], [[1], [2]]]], tf.uint16)  # mean 1.5
    assert tfds_data.box_downsample(half, 2).numpy().item() == 2


def test_tfds_mnist_batches_pass_the_checks():
    with mock_tfds(num_examples=10):
        train, test = tfds_data.tfds(4, name="mnist", seed=3)
        images, labels = next(iter(train))
    assert images.shape == (4, 28, 28, 1) and images.dtype == tf.uint8
    assert labels.dtype == tf.int32 and labels.shape == (4,)
    contract.check_batch((images, labels), (28, 28, 1), 8, num_classes=10)
    assert sum(int(tf.shape(b[0])[0]) for b in test) == 10  # the whole split, last batch kept


def test_tfds_crops_pads_and_downsamples_images_of_varying_size():
    name = "downsampled_imagenet/32x32"  # declared (None, None, 3); the stand-in varies
    with mock_tfds(num_examples=6):
        with pytest.raises(ValueError, match="crop_or_pad_to"):
            tfds_data.tfds(2, name=name, label_key=None, test_split="validation")
        with pytest.raises(ValueError, match="label_key = None"):
            tfds_data.tfds(2, name=name, crop_or_pad_to=(32, 32), test_split="validation")
        with pytest.raises(ValueError, match="multiple"):
            tfds_data.tfds(2, name=name, label_key=None, crop_or_pad_to=(30, 30), downsample=4)
        train, test = tfds_data.tfds(
            2, name=name, label_key=None, test_split="validation", crop_or_pad_to=(32, 32),
            downsample=2,
        )  # fmt: skip
        images, labels = next(iter(test))
        assert images.shape == (2, 16, 16, 3) and labels.numpy().tolist() == [0, 0]
        # what the crop and box average make of the first validation image
        builder = __import__("tensorflow_datasets").builder(name)
        first = next(iter(builder.as_dataset(split="validation")))["image"]
        expected = tfds_data.box_downsample(tf.image.resize_with_crop_or_pad(first, 32, 32), 2)
        np.testing.assert_array_equal(images[0].numpy(), expected.numpy())
