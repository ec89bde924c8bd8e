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
one batch eagerly before training. ``check_integer_images`` and ``check_labels`` are the
same checks for the arrays the library's functions take (scoring, sampling, completion).
The built-in loaders are in ``pixelcnn.data``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from pixelcnn import likelihood

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


def check_positive_int(value, name: str) -> int:
    """value as an int; ValueError naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_num_bits(num_bits) -> int:
    """num_bits as an int; ValueError unless it is an integer in [1, 16]."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise ValueError(f"num_bits must be an integer in [1, 16], got {num_bits!r}")
    if not 1 <= int(num_bits) <= 16:
        raise ValueError(f"num_bits must be an integer in [1, 16], got {num_bits!r}")
    return int(num_bits)


def _rank_message(shape, image_shape=None) -> str:
    shape = tuple(shape)
    text = (
        f"images have shape {shape} (rank {len(shape)}), but a batch of images must be "
        "[batch, height, width, channels]"
    )
    if len(shape) == 3:
        if image_shape is not None and shape == tuple(image_shape):
            return text + ("; this looks like a single image: batch the dataset (dataset.batch(n))")
        return text + (
            "; for grayscale images add a channel axis with images[..., None], e.g. "
            "dataset.map(lambda x, y: (x[..., None], y))"
        )
    return text


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
    num_bits = check_num_bits(num_bits)
    images, labels = split_element(element)
    images = tf.convert_to_tensor(images)
    if images.shape.rank is not None and images.shape.rank != 4:
        raise ValueError(_rank_message(images.shape))
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
        labels = tf.convert_to_tensor(labels)
        if labels.shape.rank == 2 and labels.shape[-1] == 1:
            labels = labels[:, 0]  # Keras-style [B, 1] labels
        labels = tf.cast(labels, tf.int32)
    return images, labels


def as_model_input(dataset: tf.data.Dataset, num_bits: int) -> tf.data.Dataset:
    """Maps ``to_model_input`` over a dataset: elements become (float32 images, labels)."""
    return dataset.map(
        lambda *element: to_model_input(element, num_bits),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


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


def _to_numpy(x, what: str, where: str) -> np.ndarray:
    """Eager tensor / array / nested list -> NumPy; floats of any width -> float64."""
    if isinstance(x, tf.RaggedTensor):
        raise ValueError(
            f"{where}: {what} are a RaggedTensor (items of different sizes); every item "
            "of a batch must have the same shape"
        )
    if isinstance(x, (tf.Tensor, tf.Variable)):
        if x.dtype.is_floating:  # bfloat16 has no plain NumPy dtype
            x = tf.cast(x, tf.float64)
        return x.numpy()
    return np.asarray(x)


def _grids_fitting(values: np.ndarray) -> list[int]:
    """Bit depths b in [1, 16] whose grid holds every value (floats in [-1, 1])."""
    fits = []
    for b in range(1, 17):
        top = float(2**b - 1)
        scaled = (values + 1.0) * (top / 2.0)
        if np.abs(scaled - np.round(scaled)).max() <= likelihood.grid_tolerance(b) * top:
            fits.append(b)
    return fits


def _check_float_images(arr: np.ndarray, num_bits: int, where: str) -> None:
    top = 2**num_bits - 1
    lo, hi = float(arr.min()), float(arr.max())
    grid = f"x = 2 v / {top} - 1 for integer levels v in [0, {top}]"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{where}: float images contain NaN or inf")
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        hint = ""
        if lo >= 0.0 and hi <= 255.0:
            hint = (
                " They look like pixel values in [0, 255] stored as floats: yield the "
                "integer levels instead (tf.cast(x, tf.uint8)) or scale them with "
                "2 * x / 255 - 1."
            )
        raise ValueError(
            f"{where}: float images must lie in [-1, 1] ({grid}), got values in "
            f"[{lo:.4g}, {hi:.4g}].{hint}"
        )
    scaled = (arr + 1.0) * (top / 2.0)
    off = np.abs(scaled - np.round(scaled)) > likelihood.grid_tolerance(num_bits) * top
    if off.any():
        example = float(arr[off].flat[0])
        hints = []
        fits = [b for b in _grids_fitting(arr.ravel()) if b != num_bits]
        if fits:
            hints.append(
                f"they lie on the {fits[0]}-bit grid: bind PixelCNNPP.num_bits = {fits[0]} "
                "or quantise the data to the model's bit depth"
            )
        if lo >= 0.0:
            hints.append(
                "all values are >= 0: were they scaled to [0, 1] (x / 255) instead of "
                "[-1, 1] (2 x / 255 - 1)?"
            )
        hint = (" " + "; ".join(hints) + ".") if hints else ""
        raise ValueError(
            f"{where}: float images are not on the {num_bits}-bit grid ({grid}, i.e. "
            f"-1, -1 + 2/{top}, ..., 1): {int(off.sum())} of {arr.size} values are off it "
            f"(e.g. {example:.6g}). The discretised likelihood is only defined on the grid. "
            "This usually means the images were resized with bilinear/bicubic "
            "interpolation (pad or crop instead; never interpolate), augmented with "
            "non-integer transforms, or scaled wrongly (another bit depth, [0, 1] instead "
            f"of [-1, 1]). Yielding the integer levels (uint8) avoids rounding issues.{hint}"
        )


def check_integer_levels(arr: np.ndarray, num_bits: int, where: str) -> None:
    """ValueError unless every integer in arr lies in [0, 2**num_bits), with a hint."""
    levels = 2**num_bits
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < levels:
        return
    if lo < 0:
        hint = (
            "integer images are levels 0 .. 2**num_bits - 1; signed or centred data must "
            "be shifted back to that range"
        )
    else:
        needed = max(1, math.ceil(math.log2(hi + 1)))
        hint = (
            f"bind PixelCNNPP.num_bits = {needed} to model them as they are, or quantise "
            f"them to {num_bits} bits with v >> {needed - num_bits}"
        )
    raise ValueError(
        f"{where}: integer images must lie in [0, {levels}) for num_bits={num_bits}, got "
        f"values in [{lo}, {hi}]: {hint}"
    )


def model_labels(num_classes: int | None, labels, n: int, where: str = "labels"):
    """The labels a model of ``num_classes`` takes for n images: None for an
    unconditional model (which must get None), else int32 [n] in [0, num_classes)."""
    if num_classes is None:
        if labels is not None:
            raise ValueError("this model is unconditional (num_classes=None): pass labels=None")
        return None
    if labels is None:
        raise ValueError(
            f"this model is class-conditional (num_classes={num_classes}): pass {where}, int [{n}]"
        )
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{where} must have shape [{n}] (one per image), got {arr.shape}")
    return check_labels(arr, n, num_classes, where)


def check_labels(labels, batch: int, num_classes: int, where: str) -> np.ndarray:
    """Labels int [batch] (or [batch, 1]) in [0, num_classes) -> int32 [batch].

    ValueError with what is wrong and how to fix it otherwise; ``where`` names the
    source in the message ("the train dataset", "labels").
    """
    if labels is None:
        raise ValueError(
            f"{where} has no labels, but the model is class-conditional (num_classes = "
            f"{num_classes}): give one label in [0, {num_classes}) per image"
        )
    arr = _to_numpy(labels, "labels", where)
    if arr.dtype.kind not in "ui":
        one_hot = " (one-hot? use tf.argmax(labels, -1))" if arr.ndim == 2 else ""
        raise ValueError(
            f"{where}: labels must be integer class indices in [0, {num_classes}), got "
            f"dtype {arr.dtype}{one_hot}"
        )
    if arr.ndim == 2 and arr.shape[-1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        one_hot = (
            "; they look one-hot: use tf.argmax(labels, -1)"
            if arr.ndim == 2 and arr.shape[-1] == num_classes
            else ""
        )
        raise ValueError(f"{where}: labels must have shape [batch], got {arr.shape}{one_hot}")
    if arr.shape[0] != batch:
        raise ValueError(
            f"{where}: {arr.shape[0]} labels for {batch} images; each image needs one label"
        )
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{where}: labels must lie in [0, {num_classes}) for num_classes = "
                f"{num_classes}, got labels in [{lo}, {hi}]; bind PixelCNNPP.num_classes to "
                "the number of classes (the largest label + 1) or remap the labels"
            )
    return arr.astype(np.int32)


def check_integer_images(images, image_shape, num_bits: int, what: str = "images") -> None:
    """ValueError unless images are integers [B, *image_shape] in [0, 2**num_bits).

    The values are checked when they are concrete (arrays, eager tensors); inside a
    tf.function only the static shape and dtype are.
    """
    shape = tuple(images.shape)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{what} must have shape [batch, {', '.join(map(str, image_shape))}] (the model's "
            f"image_shape), got {shape}"
        )
    dtype = tf.as_dtype(images.dtype)
    if not dtype.is_integer:
        raise ValueError(
            f"{what} must be integer levels in [0, {2**num_bits}), got dtype {dtype.name}; "
            "use pixelcnn.mixture_log_prob for floats in [-1, 1]"
        )
    if isinstance(images, np.ndarray) or tf.executing_eagerly():
        arr = np.asarray(images)
        if arr.size:
            check_integer_levels(arr, num_bits, what)


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
    num_bits = check_num_bits(num_bits)
    image_shape = tuple(int(d) for d in image_shape)
    where = f"the {split} dataset"
    if isinstance(element, tf.data.Dataset):
        element = first_batch(element, split)
    try:
        images, labels = split_element(element)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    arr = _to_numpy(images, "images", where)
    if arr.dtype.kind not in "uif":
        kind = "bool" if arr.dtype.kind == "b" else "non-numeric"
        decode = (
            " (decode encoded images first, e.g. tf.io.decode_png)"
            if arr.dtype.kind in "OSU"
            else ""
        )
        raise ValueError(
            f"{where}: images have {kind} dtype {arr.dtype}; they must be float in "
            f"[-1, 1] or integer levels in [0, {2**num_bits}){decode}"
        )
    if arr.ndim != 4:
        raise ValueError(f"{where}: " + _rank_message(arr.shape, image_shape))
    if arr.shape[0] == 0:
        raise ValueError(f"{where} yields an empty batch (shape {arr.shape})")
    if tuple(arr.shape[1:]) != image_shape:
        h, w, c = arr.shape[1:]
        hint = ""
        if (h, w) == (28, 28) and image_shape[:2] == (32, 32):
            hint = (
                " For MNIST, zero-pad 28 -> 32 with embedded_mnist.pad_to = 32 (or "
                "mnist.pad_to = 32)."
            )
        raise ValueError(
            f"{where} yields images of shape (H, W, C) = {(h, w, c)}, but the model's "
            f"image_shape is {image_shape}: bind PixelCNNPP.image_shape = {(h, w, c)} in "
            "gin to train on this data, or pad/crop the data to the model's size (never "
            f"resize with interpolation: it moves pixels off the {num_bits}-bit grid).{hint}"
        )
    if arr.dtype.kind == "f":
        _check_float_images(arr.astype(np.float64), num_bits, where)
    else:
        check_integer_levels(arr, num_bits, where)
    if num_classes is not None:
        if labels is None:
            raise ValueError(
                f"{where} yields images without labels, but the model is class-conditional "
                f"(PixelCNNPP.num_classes = {num_classes}): yield (images, labels) or a dict "
                "with a 'label' key, or unbind PixelCNNPP.num_classes to train an "
                "unconditional model"
            )
        check_labels(labels, arr.shape[0], num_classes, where)


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
                raise ValueError(f"{where}: " + _rank_message(shape.as_list()))
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
        raise ValueError(f"{where}: " + _rank_message(shape))
    return tuple(int(d) for d in shape[1:])
