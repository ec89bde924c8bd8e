"""Data: what a ``train.dataset_fn`` returns (``contract``), the built-in datasets
(``datasets``: embedded MNIST, MNIST, CIFAR-10, image folders, .npz files, each a gin
configurable) and TensorFlow Datasets (``tfds``, an optional dependency).

The built-in datasets' names are importable from here: ``pixelcnn.data.embedded_mnist``.
"""

from pixelcnn.data.datasets import (
    Datasets,
    cifar10,
    embedded_mnist,
    embedded_mnist_split,
    image_folder,
    load_cifar_batch,
    load_embedded_mnist,
    load_npz,
    make_datasets,
    mnist,
    mutate,
    npz,
    npz_has_labels,
    pad_images,
    split_arrays,
    split_datasets,
    split_indices,
)

__all__ = [
    "Datasets",
    "cifar10",
    "embedded_mnist",
    "embedded_mnist_split",
    "image_folder",
    "load_cifar_batch",
    "load_embedded_mnist",
    "load_npz",
    "make_datasets",
    "mnist",
    "mutate",
    "npz",
    "npz_has_labels",
    "pad_images",
    "split_arrays",
    "split_datasets",
    "split_indices",
]
