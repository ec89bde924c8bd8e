"""Datasets and the dataset contract: element formats, built-in loaders, batch checks."""

import hashlib
import os
import pickle

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pixelcnn import data
from pixelcnn.data import contract
from pixelcnn.data.contract import check_batch, infer_image_shape, to_model_input


def grid(levels, num_bits=8):
    """Integer levels -> the float grid values 2 v / (2**b - 1) - 1 (float64 reference)."""
    return 2.0 * np.asarray(levels, np.float64) / (2**num_bits - 1) - 1.0


def run_everywhere(element, num_bits=8):
    """to_model_input eagerly and inside tf.function; both results as NumPy."""
    eager = to_model_input(element, num_bits)
    graph = tf.function(lambda e: to_model_input(e, num_bits))(element)
    out = []
    for images, labels in (eager, graph):
        out.append((images.numpy(), None if labels is None else labels.numpy()))
    return out


def run_in_map(structure, num_bits=8, batch=3):
    """to_model_input inside tf.data.map over a dataset with the given element structure."""
    ds = tf.data.Dataset.from_tensor_slices(structure).batch(batch)
    images, labels = next(iter(ds.map(lambda *e: to_model_input(e, num_bits))))
    return images.numpy(), None if labels is None else labels.numpy()


def image_hashes(dataset):
    return sorted(
        hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()
        for images, _ in dataset
        for img in images.numpy()
    )


# ------------------------------------------------------------------- element formats
@pytest.fixture
def levels(rng):
    return rng.integers(0, 256, size=(3, 4, 5, 2)).astype(np.uint8)


@pytest.fixture
def labels():
    return np.array([2, 0, 1], np.int64)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.uint16])
def test_integer_images(levels, dtype):
    want = grid(levels)
    for images, lab in run_everywhere(tf.constant(levels.astype(dtype))):
        assert images.dtype == np.float32 and lab is None
        np.testing.assert_allclose(images, want, atol=1e-6)
    images, lab = run_in_map(levels.astype(dtype))
    assert lab is None
    np.testing.assert_allclose(images, want, atol=1e-6)


def test_integer_images_other_bit_depth(rng):
    levels = rng.integers(0, 32, size=(2, 3, 3, 1)).astype(np.uint8)
    for images, _ in run_everywhere(levels, num_bits=5):
        np.testing.assert_allclose(images, grid(levels, 5), atol=1e-6)
        assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_images_pass_through(levels, dtype):
    x = grid(levels).astype(dtype)
    for images, lab in run_everywhere(tf.constant(x)):
        assert images.dtype == np.float32 and lab is None
        np.testing.assert_array_equal(images, x.astype(np.float32))
    images, _ = run_in_map(x)
    np.testing.assert_array_equal(images, x.astype(np.float32))


def test_tuple_and_list(levels, labels):
    for element in [(levels, labels), [tf.constant(levels), tf.constant(labels)]]:
        for images, lab in run_everywhere(element):
            np.testing.assert_allclose(images, grid(levels), atol=1e-6)
            assert lab.dtype == np.int32
            np.testing.assert_array_equal(lab, labels)
    images, lab = run_in_map((levels, labels))
    np.testing.assert_allclose(images, grid(levels), atol=1e-6)
    np.testing.assert_array_equal(lab, labels)
    # a single-item tuple holds images only
    (images, lab), _ = run_everywhere((tf.constant(levels),))
    assert lab is None


def test_keras_style_labels_are_squeezed(levels, labels):
    for _, lab in run_everywhere((levels, labels[:, None].astype(np.uint8))):
        assert lab.shape == (3,) and lab.dtype == np.int32
        np.testing.assert_array_equal(lab, labels)


@pytest.mark.parametrize("keys", [("image", "label"), ("images", "labels"), ("image", None)])
def test_dicts(levels, labels, keys):
    image_key, label_key = keys
    element = {image_key: levels, "extra": np.zeros([3], np.float32)}
    if label_key:
        element[label_key] = labels
    for images, lab in run_everywhere(element):
        np.testing.assert_allclose(images, grid(levels), atol=1e-6)
        if label_key:
            np.testing.assert_array_equal(lab, labels)
        else:
            assert lab is None
    images, lab = run_in_map(element)
    np.testing.assert_allclose(images, grid(levels), atol=1e-6)
    assert (lab is None) == (label_key is None)


def test_as_model_input(levels, labels):
    ds = tf.data.Dataset.from_tensor_slices({"image": levels, "label": labels}).batch(2)
    batch = next(iter(contract.as_model_input(ds, 8, levels.shape[1:])))
    np.testing.assert_allclose(batch["images"].numpy(), grid(levels[:2]), atol=1e-6)
    np.testing.assert_array_equal(batch["labels"].numpy(), labels[:2])


def test_to_model_input_rejects(levels):
    with pytest.raises(ValueError, match=r"images\[\.\.\., None\]"):
        to_model_input(levels[..., 0], 8)
    with pytest.raises(ValueError, match="tuple of 3 items"):
        to_model_input((levels, levels, levels), 8)
    with pytest.raises(ValueError, match="without an image key"):
        to_model_input({"pixels": levels}, 8)
    with pytest.raises(ValueError, match="dtype string"):
        to_model_input(tf.fill([1, 2, 2, 1], "x"), 8)
    with pytest.raises(ValueError, match="num_bits"):
        to_model_input(levels, 0)


# ------------------------------------------------------------------- embedded MNIST
def test_embedded_mnist_split_and_shapes():
    all_images, all_labels = data.load_embedded_mnist()
    assert all_images.shape == (5000, 28, 28, 1) and np.bincount(all_labels).tolist() == [500] * 10
    train, test = data.embedded_mnist(500)
    assert infer_image_shape(train) == (28, 28, 1)
    sizes, test_labels = [], []
    for images, lab in test:
        assert images.dtype == tf.uint8 and lab.dtype == tf.int32
        sizes.append(len(images))
        test_labels.append(lab.numpy())
    assert sum(sizes) == 500
    assert np.bincount(np.concatenate(test_labels)).tolist() == [50] * 10  # stratified
    train_labels = np.concatenate([lab.numpy() for _, lab in train])
    assert len(train_labels) == 4500 and set(train_labels) == set(range(10))
    # train + test is exactly the embedded set: no image lost, none in both splits
    assert sorted(image_hashes(train) + image_hashes(test)) == image_hashes(
        [(tf.constant(all_images), None)]
    )
    check_batch(train, (28, 28, 1), 8, num_classes=10)
    check_batch(test, (28, 28, 1), 8, num_classes=10, split="test")


def test_embedded_mnist_split_is_what_the_datasets_yield():
    (train_images, train_labels), (test_images, test_labels) = data.embedded_mnist_split(
        300, pad_to=32, seed=1
    )
    assert train_images.shape == (4700, 32, 32, 1) and test_images.shape == (300, 32, 32, 1)
    train, test = data.embedded_mnist(64, 300, pad_to=32, seed=1)
    yielded_images, yielded_labels = zip(*[(x.numpy(), y.numpy()) for x, y in test])
    np.testing.assert_array_equal(np.concatenate(yielded_images), test_images)
    np.testing.assert_array_equal(np.concatenate(yielded_labels), test_labels)
    assert image_hashes(train) == image_hashes([(tf.constant(train_images), None)])
    assert np.bincount(train_labels).tolist() == [470] * 10


def test_split_indices_disjoint_and_stratified():
    labels = np.repeat(np.arange(10), 500)
    train_idx, test_idx = data.split_indices(labels, 500, seed=0)
    assert len(train_idx) == 4500 and len(test_idx) == 500
    assert not set(train_idx) & set(test_idx)
    assert sorted(np.concatenate([train_idx, test_idx])) == list(range(5000))
    assert np.bincount(labels[test_idx]).tolist() == [50] * 10
    again, _ = data.split_indices(labels, 500, seed=0)
    np.testing.assert_array_equal(again, train_idx)
    other, _ = data.split_indices(labels, 500, seed=1)
    assert not np.array_equal(other, train_idx)


def test_embedded_mnist_padding_keeps_the_digit():
    _, test = data.embedded_mnist(100)
    _, padded = data.embedded_mnist(100, pad_to=32)
    assert infer_image_shape(padded) == (32, 32, 1)
    (small, lab), (big, lab_big) = next(iter(test)), next(iter(padded))
    small, big = small.numpy(), big.numpy()
    assert big.shape == (100, 32, 32, 1) and big.dtype == np.uint8
    np.testing.assert_array_equal(lab.numpy(), lab_big.numpy())
    np.testing.assert_array_equal(big[:, 2:30, 2:30], small)  # same pixels, same place
    border = np.ones([32, 32], bool)
    border[2:30, 2:30] = False
    assert (big[:, border] == 0).all() and small.max() == 255
    check_batch(big, (32, 32, 1), 8)


def test_embedded_mnist_shuffling_is_seeded_and_per_epoch():
    def first_labels(dataset):
        return next(iter(dataset))[1].numpy()

    train, _ = data.embedded_mnist(64)
    epoch1, epoch2 = first_labels(train), first_labels(train)
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    train_again, _ = data.embedded_mnist(64)
    np.testing.assert_array_equal(first_labels(train_again), epoch1)  # same seed, same order
    np.testing.assert_array_equal(first_labels(train_again), epoch2)
    train_other, _ = data.embedded_mnist(64, seed=5)
    assert not np.array_equal(first_labels(train_other), epoch1)


def test_partial_batches_are_kept():
    train, test = data.embedded_mnist(1000)
    assert [len(x) for x, _ in test] == [500]
    assert [len(x) for x, _ in train] == [1000] * 4 + [500]


def test_embedded_mnist_bad_arguments():
    with pytest.raises(ValueError, match="test_size"):
        data.embedded_mnist(8, test_size=5000)
    with pytest.raises(ValueError, match="pad_to"):
        data.embedded_mnist(8, pad_to=20)
    with pytest.raises(ValueError, match="batch_size"):
        data.embedded_mnist(0)


def test_number_checks_name_the_setting_and_the_range():
    from pixelcnn import checks

    assert checks.check_fraction(0.25, "fpr") == 0.25
    assert checks.check_fraction(0, "rate", zero=True) == 0.0
    for bad in (0, 1, 1.5, -0.1, float("nan"), "x", None, True):
        with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\), got"):
            checks.check_fraction(bad, "fpr")
    for bad in (1, 1.0, -1e-9, float("inf")):
        with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got"):
            checks.check_fraction(bad, "rate", zero=True)
    assert checks.check_fraction(1, "decay", one=True) == 1.0
    for bad in (0, 1.0001, float("nan")):
        with pytest.raises(ValueError, match=r"decay must be in \(0, 1\], got"):
            checks.check_fraction(bad, "decay", one=True)
    assert checks.check_positive(2, "train.clip_norm") == 2.0
    assert checks.check_positive(None, "train.max_minutes", optional=True) is None
    for bad in (0, -1, float("nan"), "2", True):
        with pytest.raises(ValueError, match=r"clip_norm must be positive \(or None\), got"):
            checks.check_positive(bad, "train.clip_norm", optional=True)
    with pytest.raises(ValueError, match=r"must be positive, got None"):
        checks.check_positive(None, "train.clip_norm")


def test_gin_binding():
    try:
        gin.parse_config("embedded_mnist.pad_to = 32\nembedded_mnist.test_size = 100")
        _, test = data.embedded_mnist(16)
        assert infer_image_shape(test) == (32, 32, 1)
        assert sum(len(x) for x, _ in test) == 100
        with pytest.raises(ValueError):
            gin.parse_config("embedded_mnist.pad = 32")  # misspelt: no **kwargs to hide it
    finally:
        gin.clear_config()


# ------------------------------------------------------------------- image folders
def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_rgb_classes(tmp_path, rng):
    written = {}
    for label, name in enumerate(["ant", "bee"]):  # sorted order gives the labels
        for i in range(5):
            img = rng.integers(0, 256, size=(6, 5, 3)).astype(np.uint8)
            write_png(tmp_path / name / "sub" / f"{i}.PNG", img)
            written[img.tobytes()] = label
    train, test = data.image_folder(4, str(tmp_path), test_fraction=0.2)
    assert infer_image_shape(train) == (6, 5, 3)
    seen = {}
    for images, lab in list(train) + list(test):
        assert images.dtype == tf.uint8
        for img, y in zip(images.numpy(), lab.numpy(), strict=True):
            seen[img.tobytes()] = int(y)
    assert seen == written  # every image exactly once, pixels unchanged, right label
    assert sum(len(x) for x, _ in test) == 2
    assert sorted(int(y) for _, lab in test for y in lab) == [0, 1]  # stratified


def test_image_folder_grayscale_flat_and_crop(tmp_path, rng):
    imgs = [rng.integers(0, 256, size=(8, 9)).astype(np.uint8) for _ in range(4)]
    for i, img in enumerate(imgs):
        write_png(tmp_path / f"{i}.png", img)
    train, test = data.image_folder(8, str(tmp_path), test_fraction=0.25)
    images = np.concatenate([x.numpy() for x, _ in list(train) + list(test)])
    labels = np.concatenate([y.numpy() for _, y in list(train) + list(test)])
    assert images.shape == (4, 8, 9, 1) and (labels == 0).all()
    # center crop 8x9 -> 4x5: rows 2..5, columns 2..6
    _, test = data.image_folder(8, str(tmp_path), image_shape=(4, 5, 1), test_fraction=0.25)
    crop = next(iter(test))[0].numpy()[0, ..., 0]
    assert any(np.array_equal(crop, img[2:6, 2:7]) for img in imgs)
    with pytest.raises(ValueError, match="smaller than image_shape"):
        data.image_folder(8, str(tmp_path), image_shape=(10, 9))
    with pytest.raises(ValueError, match="channels are never converted"):
        data.image_folder(8, str(tmp_path), image_shape=(4, 5, 3))


def test_image_folder_rgba_and_errors(tmp_path, rng):
    write_png(tmp_path / "a.png", rng.integers(0, 256, size=(4, 4, 4)).astype(np.uint8))
    write_png(tmp_path / "b.png", rng.integers(0, 256, size=(4, 4, 4)).astype(np.uint8))
    train, _ = data.image_folder(2, str(tmp_path), test_fraction=0.5)
    assert infer_image_shape(train) == (4, 4, 4)
    write_png(tmp_path / "c.png", rng.integers(0, 256, size=(5, 4, 4)).astype(np.uint8))
    with pytest.raises(ValueError, match=r"4x4x4: 2, 5x4x4: 1.*image_folder.image_shape"):
        data.image_folder(2, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.image_folder(2, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg files"):
        data.image_folder(2, str(tmp_path / "empty"))


# ------------------------------------------------------------------- npz
def test_npz(tmp_path, rng):
    images = rng.integers(0, 256, size=(20, 5, 6)).astype(np.uint8)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    train, test = data.npz(8, str(tmp_path / "d.npz"), test_fraction=0.2)
    assert infer_image_shape(train) == (5, 6, 1)
    test_labels = np.concatenate([y.numpy() for _, y in test])
    assert len(test_labels) == 4 and sorted(test_labels) == [0, 1, 2, 3]
    assert sorted(image_hashes(train) + image_hashes(test)) == image_hashes(
        [(tf.constant(images[..., None]), None)]
    )
    # separate test file; other keys; labels absent -> zeros
    np.savez(tmp_path / "t.npz", x=images[:3, ..., None].astype(np.int32))
    np.savez(tmp_path / "tr.npz", x=images[..., None])
    train, test = data.npz(
        8, str(tmp_path / "tr.npz"), images_key="x", test_path=str(tmp_path / "t.npz")
    )
    x, y = next(iter(test))
    assert x.dtype == tf.uint8  # int32 levels that fit in 8 bits
    np.testing.assert_array_equal(x.numpy(), images[:3, ..., None])
    assert (y.numpy() == 0).all() and sum(len(x) for x, _ in train) == 20
    train, test = data.npz(8, str(tmp_path / "d.npz"), test_fraction=0.0)  # all to train
    assert sum(len(x) for x, _ in train) == 20 and not list(test)
    with pytest.raises(ValueError, match="test_fraction"):
        data.npz(8, str(tmp_path / "d.npz"), test_fraction=1.0)
    with pytest.raises(ValueError, match=r"no key 'images'.*npz.images_key"):
        data.npz(8, str(tmp_path / "t.npz"))
    np.savez(tmp_path / "f.npz", images=images.astype(np.float32))
    with pytest.raises(ValueError, match="integer levels"):
        data.npz(8, str(tmp_path / "f.npz"))


# ------------------------------------------------------------------- MNIST and CIFAR-10
def test_mnist_local_file(tmp_path, rng):
    x_train = rng.integers(0, 256, size=(12, 28, 28)).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    y_train, y_test = (np.arange(12) % 10).astype(np.uint8), np.arange(5).astype(np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for path in [tmp_path / "mnist.npz", tmp_path]:  # the file, or the folder holding it
        train, test = data.mnist(4, path=str(path), pad_to=32)
        x = np.concatenate([b.numpy() for b, _ in test])
        y = np.concatenate([b.numpy() for _, b in test])
        np.testing.assert_array_equal(x[:, 2:30, 2:30, 0], x_test)  # test order is kept
        np.testing.assert_array_equal(y, y_test)
        assert sum(len(b) for b, _ in train) == 12
    with pytest.raises(FileNotFoundError, match="mnist.npz"):
        data.mnist(4, path=str(tmp_path / "nope.npz"))


def test_mnist_offline_error(monkeypatch):
    def fail():
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
            "mnist.npz: None -- [Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(keras.datasets.mnist, "load_data", fail)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)URL fetch failure.*mnist\.path.*@embedded_mnist"
    ):
        data.mnist(4)


def write_cifar_batch(path, images_chw, labels):
    batch = {
        b"batch_label": b"fake",
        b"labels": list(map(int, labels)),
        b"data": images_chw.reshape(len(images_chw), 3072),
        b"filenames": [b"x.png"] * len(labels),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_local_folder(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    chw = rng.integers(0, 256, size=(12, 3, 32, 32)).astype(np.uint8)
    labels = np.arange(12) % 10
    for i in range(5):
        write_cifar_batch(
            folder / f"data_batch_{i + 1}", chw[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2]
        )
    write_cifar_batch(folder / "test_batch", chw[10:], labels[10:])
    # a known pixel: image 10 (the first test image), row 3, column 7, green
    chw[10, 1, 3, 7] = 123
    chw[10, 0, 3, 7], chw[10, 2, 3, 7] = 7, 250
    write_cifar_batch(folder / "test_batch", chw[10:], labels[10:])
    for path in [folder, tmp_path]:  # the folder, or its parent
        train, test = data.cifar10(4, path=str(path))
        x, y = next(iter(test))
        x = x.numpy()
        assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
        assert x[0, 3, 7].tolist() == [7, 123, 250]
        np.testing.assert_array_equal(x, chw[10:].transpose(0, 2, 3, 1))
        np.testing.assert_array_equal(y.numpy(), labels[10:])
        assert sum(len(b) for b, _ in train) == 10
        check_batch(test, (32, 32, 3), 8, num_classes=10, split="test")
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.cifar10(4, path=str(folder))


def test_cifar10_offline_error(monkeypatch):
    def fail():
        raise Exception("URL fetch failure on https://www.cs.toronto.edu/: no network")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", fail)
    with pytest.raises(
        FileNotFoundError, match=r"(?s)cifar10\.path.*cifar-10-batches-py.*embedded"
    ):
        data.cifar10(4)


# ------------------------------------------------------------------- check_batch
SHAPE = (4, 4, 1)


@pytest.fixture
def good(rng):
    return rng.integers(0, 256, size=(2, *SHAPE)).astype(np.uint8)


def test_check_batch_accepts(good):
    check_batch(good, SHAPE, 8)
    check_batch(tf.constant(grid(good), tf.float32), SHAPE, 8)
    check_batch(tf.constant(grid(good % 2, 1), tf.bfloat16), SHAPE, 1)  # exact in bfloat16
    check_batch((good, np.array([0, 9])), SHAPE, 8, num_classes=10)
    check_batch({"image": good, "label": np.array([[1], [2]])}, SHAPE, 8, num_classes=10)
    check_batch(tf.data.Dataset.from_tensor_slices(good).batch(2), SHAPE, 8)
    check_batch(good // 8, SHAPE, 5)


def test_check_batch_structure_and_shape(good):
    with pytest.raises(ValueError, match=r"train dataset.*rank 3.*images\[\.\.\., None\]"):
        check_batch(good[..., 0], SHAPE, 8)
    with pytest.raises(ValueError, match="single image: batch the dataset"):
        check_batch(good[0], SHAPE, 8)
    with pytest.raises(ValueError, match="rank 5"):
        check_batch(good[None], SHAPE, 8)
    with pytest.raises(ValueError, match=r"\(4, 4, 3\).*PixelCNNPP.image_shape = \(4, 4, 1\)"):
        check_batch(good, (4, 4, 3), 8)
    with pytest.raises(ValueError, match=r"PixelCNNPP.image_shape.*pad_to = 32"):
        check_batch(np.zeros([1, 28, 28, 1], np.uint8), (32, 32, 1), 8)
    with pytest.raises(ValueError, match="tuple of 3 items"):
        check_batch((good, good, good), SHAPE, 8)
    with pytest.raises(ValueError, match=r"dict with keys \['x'\] without an image key"):
        check_batch({"x": good}, SHAPE, 8)
    with pytest.raises(ValueError, match="a str"):
        check_batch("images.png", SHAPE, 8)
    with pytest.raises(ValueError, match=r"test dataset is empty.*drop_remainder"):
        check_batch(tf.data.Dataset.from_tensor_slices(good).batch(3, True), SHAPE, 8, split="test")
    with pytest.raises(ValueError, match="empty batch"):
        check_batch(good[:0], SHAPE, 8)


def test_check_batch_dtypes_and_values(good):
    with pytest.raises(ValueError, match=r"non-numeric dtype.*decode"):
        check_batch(tf.fill([1, *SHAPE], "x"), SHAPE, 8)
    with pytest.raises(ValueError, match="bool dtype"):
        check_batch(good > 3, SHAPE, 8)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*\[0, 255\] stored as floats"):
        check_batch(good.astype(np.float32), SHAPE, 8)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*got values in \[-3"):
        check_batch(np.full([1, *SHAPE], -3.0, np.float32), SHAPE, 8)
    with pytest.raises(ValueError, match=r"not on the 8-bit grid.*x = 2 v / 255 - 1.*bilinear"):
        check_batch(grid(good) * 0.999, SHAPE, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\] \(x / 255\)"):
        check_batch(good.astype(np.float32) / 255, SHAPE, 8)
    with pytest.raises(ValueError, match="on the 8-bit grid: bind PixelCNNPP.num_bits = 8"):
        check_batch(grid(np.arange(32).reshape(2, 4, 4, 1) * 7), SHAPE, 5)
    # a real bilinear resize of on-grid data moves it off the grid
    big = np.kron(good[..., 0], np.ones([2, 2]))[..., None]
    resized = tf.image.resize(tf.constant(grid(big), tf.float32), [4, 4], "bilinear")
    resized = tf.image.resize(resized, [3, 3], "bilinear")
    with pytest.raises(ValueError, match="bilinear"):
        check_batch(resized, (3, 3, 1), 8)
    with pytest.raises(ValueError, match=r"\[0, 32\).*num_bits = 8.*v >> 3"):
        check_batch(np.full([1, *SHAPE], 255, np.uint8), SHAPE, 5)
    with pytest.raises(ValueError, match=r"\[0, 256\).*\[-1, "):
        check_batch(np.full([1, *SHAPE], -1, np.int32), SHAPE, 8)


def test_check_batch_labels(good):
    with pytest.raises(ValueError, match=r"without labels.*num_classes = 10"):
        check_batch(good, SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match=r"without labels"):
        check_batch({"image": good}, SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match=r"\[0, 10\).*got labels in \[3, 10\]"):
        check_batch((good, np.array([3, 10])), SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match=r"got labels in \[-1, 0\]"):
        check_batch((good, np.array([-1, 0])), SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match="one-hot"):
        check_batch((good, np.eye(10, dtype=np.int32)[:2]), SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match="integer class indices"):
        check_batch((good, np.array([0.0, 1.0])), SHAPE, 8, num_classes=10)
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        check_batch((good, np.array([0, 1, 2])), SHAPE, 8, num_classes=10)
    check_batch((good, np.array([0.5, 99.0])), SHAPE, 8)  # unconditional: labels ignored


# ------------------------------------------------------------------- infer_image_shape
def test_infer_image_shape(good):
    def gen():
        yield good, np.array([0, 1])

    spec = (tf.TensorSpec([None, None, None, 1], tf.uint8), tf.TensorSpec([None], tf.int64))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    assert infer_image_shape(ds) == SHAPE  # unknown in the spec: read from a batch
    assert infer_image_shape({"images": good}) == SHAPE
    with pytest.raises(ValueError, match=r"images\[\.\.\., None\]"):
        infer_image_shape(tf.data.Dataset.from_tensor_slices(good[..., 0]).batch(2))
    with pytest.raises(ValueError, match="empty"):
        infer_image_shape(ds.filter(lambda x, y: False))
