"""Every input check of the package and its message, written once.

Each check raises ValueError saying what was wrong and how to fix it; ``where`` names
the source in the message ("the train dataset", "labels", "--npz FILE"). The grid is
the likelihood's: level v in [0, 2**b) <-> x = 2 v / (2**b - 1) - 1 in [-1, 1].
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


# --------------------------------------------------------------------- numbers
def check_int(value, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    """value as an int; ValueError naming ``name`` unless it is an integer (not a bool)
    in [minimum, maximum]."""
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def check_positive_int(value, name: str) -> int:
    """value as an int; ValueError unless it is an integer >= 1."""
    return check_int(value, name, 1)


def check_fraction(value, name: str, zero: bool = False, one: bool = False) -> float:
    """value as a float; ValueError naming ``name`` unless it is in (0, 1), with 0
    allowed where ``zero`` (a rate that may be off) and 1 where ``one`` (a factor that
    may leave things as they are)."""
    number = _number(value)
    interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
    above = 0.0 <= number if zero else 0.0 < number
    if not (above and (number <= 1.0 if one else number < 1.0)):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return number


def check_positive(value, name: str, optional: bool = False) -> float | None:
    """value as a float (None stays None where ``optional``); ValueError naming
    ``name`` unless it is a number above 0."""
    if value is None and optional:
        return None
    if not _number(value) > 0:
        raise ValueError(
            f"{name} must be positive{' (or None)' if optional else ''}, got {value!r}"
        )
    return float(value)


def check_above(value, name: str, bound: float, why: str = "") -> float:
    """value as a float; ValueError naming ``name`` (and ``why``) unless it is a number
    above ``bound``."""
    if not _number(value) > bound:
        raise ValueError(f"{name} must be a number above {bound:g}{why}, got {value!r}")
    return float(value)


def _number(value) -> float:
    """value as a float; NaN (which fails every range) for what is not a real number
    (a bool, a string, None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan
    return float(value)


def check_num_bits(num_bits) -> int:
    """num_bits as an int; ValueError unless it is an integer in [1, 16]."""
    return check_int(num_bits, "num_bits", 1, 16)


def check_architecture(config) -> tuple[tuple[int, int, int], float]:
    """A ``ModelConfig``'s fields; returns its (image_shape tuple, float dropout_rate)."""
    if config.image_shape is None:
        raise ValueError(
            "PixelCNNPP: image_shape is required, e.g. PixelCNNPP((28, 28, 1)); training "
            "takes it from the dataset unless PixelCNNPP.image_shape is bound in gin"
        )
    image_shape = tuple(config.image_shape)
    if len(image_shape) != 3:
        raise ValueError(
            f"PixelCNNPP: image_shape must be (height, width, channels), got {image_shape!r}; "
            "use (H, W, 1) for grayscale"
        )
    for axis, size in zip(("height", "width", "channels"), image_shape, strict=True):
        check_int(size, f"PixelCNNPP: image_shape {axis}")
    minimum = {
        "residual_blocks": 1,
        "residual_layers_per_block": 0,
        "filters": 1,
        "num_mixtures": 1,
    }
    for name, least in minimum.items():
        check_int(getattr(config, name), f"PixelCNNPP: {name}", least)
    check_int(config.num_bits, "PixelCNNPP: num_bits", 1, 16)
    if config.num_classes is not None:
        check_int(config.num_classes, "PixelCNNPP: num_classes")
    return image_shape, check_fraction(config.dropout_rate, "PixelCNNPP: dropout_rate", zero=True)


# --------------------------------------------------------------------- images
def rank_message(shape, image_shape=None) -> str:
    """What is wrong with images of a rank other than 4, and the likely fix."""
    shape = tuple(shape)
    text = (
        f"images have shape {shape} (rank {len(shape)}), but a batch of images must be "
        "[batch, height, width, channels]"
    )
    if len(shape) == 3:
        if image_shape is not None and shape == tuple(image_shape):
            return text + "; this looks like a single image: batch the dataset (dataset.batch(n))"
        return text + (
            "; for grayscale images add a channel axis with images[..., None], e.g. "
            "dataset.map(lambda x, y: (x[..., None], y))"
        )
    return text


def to_numpy(x, what: str, where: str) -> np.ndarray:
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


# ----------------------------------------------------------------- the level grid
def to_unit(levels, num_bits: int):
    """Levels v in [0, 2**b) -> x = 2 v / (2**b - 1) - 1 in [-1, 1]: the one map from the
    integer grid to the model's inputs (float NumPy arrays and tensors alike; the
    result has the argument's float dtype)."""
    return levels * (2.0 / (2**num_bits - 1)) - 1.0


def to_levels(x, num_bits: int):
    """x in [-1, 1] -> (x + 1) (2**b - 1) / 2, the unrounded level: ``to_unit``'s inverse."""
    return (x + 1.0) * ((2**num_bits - 1) / 2.0)


def grid_tolerance(num_bits: int) -> float:
    """Largest distance from the grid accepted for float inputs (float32 rounding)."""
    return 1e-3 / float(2**num_bits - 1)


def _off_grid(values: np.ndarray, num_bits: int) -> np.ndarray:
    """bool, where float values in [-1, 1] are off the b-bit grid."""
    scaled = to_levels(values, num_bits)
    return np.abs(scaled - np.round(scaled)) > grid_tolerance(num_bits) * (2**num_bits - 1)


def _grid_hints(arr: np.ndarray, num_bits: int, lo: float) -> str:
    """Why float images may be off the grid: another bit depth, or [0, 1] scaling."""
    hints = []
    fits = [b for b in range(1, 17) if b != num_bits and not _off_grid(arr, b).any()]
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
    return (" " + "; ".join(hints) + ".") if hints else ""


def check_float_grid(arr, num_bits: int, where: str) -> None:
    """ValueError unless float values lie in [-1, 1] on the b-bit grid, with hints."""
    arr = np.asarray(arr, np.float64)
    if arr.size == 0:
        return
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
    off = _off_grid(arr, num_bits)
    if off.any():
        raise ValueError(
            f"{where}: float images are not on the {num_bits}-bit grid ({grid}, i.e. "
            f"-1, -1 + 2/{top}, ..., 1): {int(off.sum())} of {arr.size} values are off it "
            f"(e.g. {float(arr[off].flat[0]):.6g}). The discretised likelihood is only "
            "defined on the grid. This usually means the images were resized with "
            "bilinear/bicubic interpolation (pad or crop instead; never interpolate), "
            "augmented with non-integer transforms, or scaled wrongly (another bit depth, "
            "[0, 1] instead of [-1, 1]). Yielding the integer levels (uint8) avoids "
            f"rounding issues.{_grid_hints(arr, num_bits, lo)}"
        )


def levels_rule(num_bits: int) -> str:
    """What integer images must be, in words (the checks here and the exported model's
    in-graph assertions say the same)."""
    return f"integer images must lie in [0, {2**num_bits}) for num_bits={num_bits}"


def labels_rule(num_classes: int) -> str:
    """What labels must be, in words (as ``levels_rule``)."""
    return f"labels must lie in [0, {num_classes}) for num_classes = {num_classes}"


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
    raise ValueError(f"{where}: {levels_rule(num_bits)}, got values in [{lo}, {hi}]: {hint}")


def check_image_dtype(arr: np.ndarray, num_bits: int, where: str) -> None:
    """Images must be floats or integers (not bool, strings or objects)."""
    if arr.dtype.kind not in "uif":
        kind = "bool" if arr.dtype.kind == "b" else "non-numeric"
        decode = " (decode encoded images first, e.g. tf.io.decode_png)"
        raise ValueError(
            f"{where}: images have {kind} dtype {arr.dtype}; they must be float in "
            f"[-1, 1] or integer levels in [0, {2**num_bits})"
            + (decode if arr.dtype.kind in "OSU" else "")
        )


def check_image_values(arr: np.ndarray, num_bits: int, where: str) -> None:
    """Float images on the grid in [-1, 1], or integer levels in [0, 2**num_bits)."""
    check_image_dtype(arr, num_bits, where)
    if arr.size == 0:
        return
    if arr.dtype.kind == "f":
        check_float_grid(arr, num_bits, where)
    else:
        check_integer_levels(arr, num_bits, where)


def check_image_shape(shape, image_shape, num_bits: int, where: str) -> None:
    """A batch's shape against the model's image_shape: rank, emptiness and size."""
    shape = tuple(shape)
    if len(shape) != 4:
        raise ValueError(f"{where}: " + rank_message(shape, image_shape))
    if shape[0] == 0:
        raise ValueError(f"{where} yields an empty batch (shape {shape})")
    if tuple(shape[1:]) != tuple(image_shape):
        h, w, c = shape[1:]
        hint = ""
        if (h, w) == (28, 28) and tuple(image_shape[:2]) == (32, 32):
            hint = (
                " For MNIST, zero-pad 28 -> 32 with embedded_mnist.pad_to = 32 (or "
                "mnist.pad_to = 32)."
            )
        raise ValueError(
            f"{where} yields images of shape (H, W, C) = {(h, w, c)}, but the model's "
            f"image_shape is {tuple(image_shape)}: bind PixelCNNPP.image_shape = "
            f"{(h, w, c)} in gin to train on this data, or pad/crop the data to the model's "
            f"size (never resize with interpolation: it moves pixels off the {num_bits}-bit "
            f"grid).{hint}"
        )


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


def empty(what: str = "dataset") -> ValueError:
    """The error for a source that yields no images: "the <what> is empty"."""
    return ValueError(f"the {what} is empty")


# --------------------------------------------------------------------- labels
def squeeze_labels(labels):
    """Labels [B, 1] (Keras style) -> [B]; any other shape as it is. For NumPy arrays
    and tensors alike (a graph tensor needs a known rank to be squeezed)."""
    known = getattr(labels.shape, "rank", 0) is not None  # a TensorShape of unknown rank
    if known and len(labels.shape) == 2 and labels.shape[-1] == 1:
        return labels[:, 0]
    return labels


def check_labels(labels, batch: int, num_classes: int | None, where: str) -> np.ndarray:
    """Labels int [batch] (or [batch, 1]) in [0, num_classes) -> int32 [batch]; with
    num_classes None (a loader that does not know the model) any integer >= 0."""
    if labels is None:
        raise ValueError(
            f"{where} has no labels, but the model is class-conditional (num_classes = "
            f"{num_classes}): give one label in [0, {num_classes}) per image"
        )
    arr = to_numpy(labels, "labels", where)
    classes = "" if num_classes is None else f" in [0, {num_classes})"
    if arr.dtype.kind not in "ui":
        one_hot = " (one-hot? use tf.argmax(labels, -1))" if arr.ndim == 2 else ""
        raise ValueError(
            f"{where}: labels must be integer class indices{classes}, got "
            f"dtype {arr.dtype}{one_hot}"
        )
    arr = squeeze_labels(arr)
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
        if num_classes is None and lo < 0:
            raise ValueError(f"{where}: labels must be class indices >= 0, got {lo}")
        if num_classes is not None and (lo < 0 or hi >= num_classes):
            raise ValueError(
                f"{where}: {labels_rule(num_classes)}, got labels in [{lo}, {hi}]; bind "
                "PixelCNNPP.num_classes to the number of classes (the largest label + 1) or "
                "remap the labels"
            )
    return arr.astype(np.int32)


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
