"""The dataset contract: what ``train.dataset_fn`` may yield, and the checks that say
what is wrong with a batch and how to fix it.

The training loop calls ``train, test = dataset_fn(batch_size)`` with the GLOBAL batch
size, as in the original TF2 code (JesseFarebro/PixelCNNPP), where ``train.dataset_fn``
is bound in gin to a function returning two ``tf.data.Dataset`` objects of batched
float images in [-1, 1]. Such functions keep working unchanged; every element format
below is accepted:

  * images alone: float [B, H, W, C] in [-1, 1] on the b-bit grid, or integer
    (uint8 / uint16 / int32 / int64 ...) [B, H, W, C] levels in [0, 2**b);
  * a tuple or list ``(images, labels)`` (or ``(images,)``), labels int [B] (or [B, 1]);
  * a dict with key ``image`` or ``images`` and optionally ``label`` or ``labels``.

The grid is the one of ``pixelcnn.likelihood``: level v in [0, 2**b) <-> x = 2 v /
(2**b - 1) - 1 in [-1, 1]. ``to_model_input`` turns any accepted element into what the
network takes (float32 images in [-1, 1], int32 labels or None); ``check_batch`` checks
one batch eagerly before training, with the checks of ``pixelcnn.checks``. The
built-in loaders are in ``pixelcnn.data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from pixelcnn import checks, likelihood

IMAGE_KEYS = ("image", "images")
LABEL_KEYS = ("label", "labels")

_ACCEPTED = (
    "a dataset element must be images [B, H, W, C] (float in [-1, 1] or integer levels in "
    "[0, 2**num_bits)), a tuple (images, labels), or a dict with key 'image'/'images' and "
    "optionally 'label'/'labels'"
)


# --------------------------------------------------------------------- element structure
def _is_leaf(x) -> bool:
    """A tensor, array, variable or TensorSpec (anything with a shape and a dtype)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _describe(element) -> str:
    if isinstance(element, Mapping):
        return f"a dict with keys {sorted(map(str, element))}"
    if isinstance(element, (tuple, list)):
        return f"a {type(element).__name__} of {len(element)} items"
    return f"a {type(element).__name__}"


def split_element(element) -> tuple:
    """(images, labels or None) of one element; works on tensors, arrays and TensorSpecs.

    Single-item tuples around a tuple or dict are unwrapped, so the ``*args`` a
    ``tf.data`` map function receives can be passed as they are.
    """
    while (
        isinstance(element, (tuple, list))
        and len(element) == 1
        and isinstance(element[0], (tuple, list, Mapping))
    ):
        element = element[0]
    if isinstance(element, Mapping):
        image_key = next((k for k in IMAGE_KEYS if k in element), None)
        if image_key is None:
            raise ValueError(f"got {_describe(element)} without an image key; {_ACCEPTED}")
        label_key = next((k for k in LABEL_KEYS if k in element), None)
        return element[image_key], (element[label_key] if label_key is not None else None)
    if isinstance(element, (tuple, list)):
        if len(element) == 1:
            return element[0], None
        if len(element) == 2:
            return element[0], element[1]
        raise ValueError(f"got {_describe(element)}; {_ACCEPTED}")
    if _is_leaf(element):
        return element, None
    raise ValueError(f"got {_describe(element)}; {_ACCEPTED}")


# --------------------------------------------------------------------- conversion
def to_model_input(element, num_bits: int) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Any accepted element -> (images float32 [B, H, W, C] in [-1, 1], labels or None).

    Graph-safe: works eagerly, inside ``tf.function`` and inside ``tf.data`` map
    functions (``dataset.map(lambda *e: to_model_input(e, num_bits))``). Float images are
    assumed to already be in [-1, 1] and are only cast to float32; integer images are
    levels v in [0, 2**num_bits) mapped to 2 v / (2**num_bits - 1) - 1. Nothing is
    validated here beyond structure, rank and dtype: run ``check_batch`` once first.

    Returns:
      images: float32 [B, H, W, C] in [-1, 1].
      labels: int32 [B] (a trailing axis of size 1 is squeezed), or None.
    """
    num_bits = checks.check_num_bits(num_bits)
    images, labels = split_element(element)
    images = tf.convert_to_tensor(images)
    if images.shape.rank is not None and images.shape.rank != 4:
        raise ValueError(checks.rank_message(images.shape))
    if images.dtype.is_floating:
        images = tf.cast(images, tf.float32)
    elif images.dtype.is_integer:
        images = likelihood.to_unit_range(images, num_bits, tf.float32)
    else:
        raise ValueError(
            f"images have dtype {images.dtype.name}; they must be float in [-1, 1] or "
            f"integer levels in [0, {2**num_bits})"
        )
    if labels is not None:
        labels = tf.cast(checks.squeeze_labels(tf.convert_to_tensor(labels)), tf.int32)
    return images, labels


def as_model_input(dataset: tf.data.Dataset, num_bits: int, image_shape) -> tf.data.Dataset:
    """Any accepted element format -> {"images": float32 [B, H, W, C] in [-1, 1],
    "labels": int32 [B] (when there are labels)}, prefetched: what the steps read.

    The image shape is set statically (check the first batch has it, ``check_batch``),
    so the steps compile for it even when the user's pipeline lost it (e.g. a
    py_function).
    """

    def convert(*element):
        images, labels = to_model_input(element[0] if len(element) == 1 else element, num_bits)
        images = tf.ensure_shape(images, [None, *image_shape])
        return {"images": images} if labels is None else {"images": images, "labels": labels}

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------- validation
def first_batch(dataset: tf.data.Dataset, split: str = "train") -> Any:
    """The first element of a dataset; ValueError if it has none."""
    for element in dataset.take(1):
        return element
    raise ValueError(
        f"the {split} dataset is empty: check the data path and any filters; note that "
        "batch(..., drop_remainder=True) drops everything when the data is smaller than "
        "one batch"
    )


def check_batch(
    element, image_shape, num_bits: int, num_classes: int | None = None, split: str = "train"
) -> None:
    """Checks one batch eagerly against the model before training; ValueError if unfit.

    Args:
      element: one batch in any accepted format (see the module docstring), or a
        ``tf.data.Dataset``, whose first batch is checked.
      image_shape: the model's (H, W, C).
      num_bits: the model's bits per sub-pixel b.
      num_classes: the model's class count if it is class-conditional; labels are then
        required and must lie in [0, num_classes). Labels are not checked otherwise.
      split: name of the dataset in messages ("train", "test").

    Raises ValueError with one message saying what is wrong and how to fix it: element
    structure, empty dataset or batch, rank, size against ``PixelCNNPP.image_shape``,
    dtype, float values outside [-1, 1] or off the b-bit grid, integers outside
    [0, 2**b), missing or out-of-range labels.
    """
    num_bits = checks.check_num_bits(num_bits)
    where = f"the {split} dataset"
    if isinstance(element, tf.data.Dataset):
        element = first_batch(element, split)
    try:
        images, labels = split_element(element)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    arr = checks.to_numpy(images, "images", where)
    checks.check_image_dtype(arr, num_bits, where)
    checks.check_image_shape(arr.shape, tuple(int(d) for d in image_shape), num_bits, where)
    checks.check_image_values(arr, num_bits, where)
    if num_classes is not None:
        if labels is None:
            raise ValueError(
                f"{where} yields images without labels, but the model is class-conditional "
                f"(PixelCNNPP.num_classes = {num_classes}): yield (images, labels) or a dict "
                "with a 'label' key, or unbind PixelCNNPP.num_classes to train an "
                "unconditional model"
            )
        checks.check_labels(labels, arr.shape[0], num_classes, where)


def infer_image_shape(dataset, split: str = "train") -> tuple[int, int, int]:
    """(H, W, C) of a dataset's images: from its element_spec, else from its first batch.

    ``dataset`` may also be a single batch. Raises ValueError for an unsupported element
    structure, a rank other than 4 or an empty dataset.
    """
    where = f"the {split} dataset"
    if isinstance(dataset, tf.data.Dataset):
        try:
            spec, _ = split_element(dataset.element_spec)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        shape = tf.TensorShape(spec.shape)
        if shape.rank is not None:
            if shape.rank != 4:
                raise ValueError(f"{where}: " + checks.rank_message(shape.as_list()))
            if all(d is not None for d in shape[1:]):
                return tuple(int(d) for d in shape[1:])
        batch = first_batch(dataset, split)
    else:
        batch = dataset
    try:
        images, _ = split_element(batch)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(f"{where}: " + checks.rank_message(shape))
    return tuple(int(d) for d in shape[1:])
