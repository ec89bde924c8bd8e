"""Files in and out: image grids for people, PNGs, image files and masks read into
integer arrays, and the one atomic writer every command uses.

Paths are strings handled through ``tf.io.gfile`` (local folders, ``ram://``,
``gs://`` ...).
"""

from __future__ import annotations

import io
import logging
import math
import os
import uuid

import numpy as np
import tensorflow as tf

from pixelcnn.image_codecs import png_mode

logger = logging.getLogger(__name__)

GRID_MIN_SIZE = 448  # pixels on a grid's long side: an image viewer shows it at full size
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# --------------------------------------------------------------------- writing
def write_atomic(path: str | os.PathLike, content) -> None:
    """Writes ``content`` (str, bytes, or a function that writes into a binary file
    object) to a temporary file beside ``path``, then renames it into place: a reader
    never sees half a file. On object stores (gs://) the rename is a copy and a delete,
    so there a reader may find the temporary file, never a partial ``path``. OSError
    with the path when the folder cannot be made or written."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        parent = os.path.dirname(path)
        if parent:
            tf.io.gfile.makedirs(parent)
        if callable(content):  # in memory first: a writer may seek (zip files do)
            buffer = io.BytesIO()
            content(buffer)
            content = buffer.getvalue()
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except (OSError, tf.errors.OpError) as e:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise OSError(f"cannot write {path}: {getattr(e, 'message', e)}") from e


def make_grid(
    images: np.ndarray,
    num_bits: int,
    columns: int | None = None,
    pad: int = 1,
    min_size: int = GRID_MIN_SIZE,
) -> np.ndarray:
    """int [N, H, W, C] in [0, 2**b) -> uint8 [S*(rows*(H+pad)+pad), S*(cols*(W+pad)+pad),
    1 or 3] grid, grey borders between the images, enlarged by the smallest integer
    nearest-neighbour factor S that gives at least ``min_size`` pixels on the long side
    (the exact integers belong in an .npz beside it)."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    scaled = np.round(images.astype(np.float64) * 255.0 / (2**num_bits - 1)).astype(np.uint8)
    if c not in (1, 3):  # show the first channel of other channel counts
        scaled = scaled[..., :1]
    grid = np.full(
        (rows * (h + pad) + pad, columns * (w + pad) + pad, scaled.shape[-1]), 128, np.uint8
    )
    for k in range(n):
        r, col = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = scaled[k]
    factor = max(1, math.ceil(min_size / max(grid.shape[:2])))
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def completion_grid(images, mask, completions, num_bits: int) -> np.ndarray:
    """Three rows of a grid: the originals, their known pixels (the rest grey), the
    completions; images int [N, H, W, C], mask bool [H, W]."""
    shown = np.where(mask[None, :, :, None], images, (2**num_bits - 1) // 2)
    rows = np.concatenate([images, shown, completions])
    return make_grid(rows, num_bits, columns=len(images))


def save_png(grid: np.ndarray, path: str | os.PathLike) -> None:
    """A uint8 [H, W, 1 or 3] grid as a PNG, written atomically."""
    from PIL import Image

    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """Arrays as a compressed .npz, written atomically; None values are left out."""
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def folder_size(path: str) -> int:
    """Bytes of every file under a folder."""
    return sum(
        tf.io.gfile.stat(os.path.join(folder, name)).length
        for folder, _, names in tf.io.gfile.walk(path)
        for name in names
    )


def write_pngs(folder: str, images: np.ndarray, num_bits: int) -> None:
    """One PNG per image of int [N, H, W, C], named by its index, values unscaled."""
    from PIL import Image

    mode, dtype = png_mode(images.shape[-1], num_bits)
    digits = len(str(len(images) - 1))
    for i, img in enumerate(images.astype(dtype)):
        image = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img, mode=mode)
        write_atomic(
            os.path.join(folder, f"{i:0{digits}d}.png"),
            lambda f, image=image: image.save(f, format="PNG"),
        )


# --------------------------------------------------------------------- reading
def decode_image(file: str) -> np.ndarray:
    """PNG/JPEG -> integer [H, W, C], channel count kept (L 1, LA 2, RGB 3, RGBA 4)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with tf.io.gfile.GFile(file, "rb") as f, Image.open(f) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode.startswith("I;16"):
                im = im.convert("I;16")  # 16-bit grayscale keeps its levels
            elif mode not in ("L", "LA", "RGB", "RGBA"):
                raise ValueError(f"unsupported image mode {mode} in {file}")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, tf.errors.OpError) as err:
        raise ValueError(f"cannot decode {file}: {err}") from err
    if arr.dtype.kind not in "ui":
        raise ValueError(f"{file} decodes to dtype {arr.dtype}, not integers")
    return arr[..., None] if arr.ndim == 2 else arr


def read_images(paths, image_shape) -> np.ndarray:
    """Image files -> int32 [N, H, W, C]; ValueError for a file of another shape."""
    out = []
    for p in paths:
        img = decode_image(p)
        if img.shape != tuple(image_shape):
            raise ValueError(
                f"{p} has shape {img.shape}, but the model takes images of {tuple(image_shape)}"
            )
        out.append(img)
    return np.stack(out).astype(np.int32)


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """A .npy or image mask of known pixels [H, W] (nonzero = known) -> bool [H, W]."""
    if path.endswith(".npy"):
        with tf.io.gfile.GFile(path, "rb") as f:
            mask = np.load(f)
    else:
        mask = decode_image(path)[..., 0]
    if mask.shape != (height, width):
        raise ValueError(f"mask {path} has shape {mask.shape}, expected {(height, width)}")
    return mask != 0


def _center_crop(arr: np.ndarray, height: int, width: int, file: str) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < height or w < width:
        raise ValueError(
            f"{file} is {h}x{w}, smaller than image_shape {height}x{width}; "
            "images are only center-cropped, never resized"
        )
    top, left = (h - height) // 2, (w - width) // 2
    return arr[top : top + height, left : left + width]


def _folder_files(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """The image files under root in sorted path order, their labels (first-level
    subfolders as classes when every image lies in one, else 0) and the class names."""
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"image_folder: {root} is not a folder (image_folder.path)")
    found = []
    for dirpath, dirnames, filenames in tf.io.gfile.walk(root):
        dirnames.sort()
        found += [
            os.path.join(dirpath, n)
            for n in sorted(filenames)
            if n.lower().endswith(IMAGE_SUFFIXES)
        ]
    if not found:
        raise ValueError(f"image_folder: no {'/'.join(IMAGE_SUFFIXES)} files found under {root}")
    relative = [os.path.relpath(f, root).split(os.sep) for f in found]
    if all(len(parts) > 1 for parts in relative):
        classes = sorted({parts[0] for parts in relative})
        return found, np.array([classes.index(p[0]) for p in relative], np.int32), classes
    return found, np.zeros(len(found), np.int32), []


def _stack_same_shape(images: list[np.ndarray], root: str) -> np.ndarray:
    """The images as one array; ValueError naming the shapes when they differ."""
    shapes: dict[tuple, int] = {}
    for arr in images:
        shapes[arr.shape] = shapes.get(arr.shape, 0) + 1
    if len(shapes) > 1:
        found = ", ".join(
            f"{h}x{w}x{c}: {n}" for (h, w, c), n in sorted(shapes.items(), key=lambda s: -s[1])
        )
        if len({s[2] for s in shapes}) > 1:
            fix = "convert them to one channel count (all grayscale or all RGB)"
        else:
            fix = "bind image_folder.image_shape = (H, W) to center-crop them to one size"
        raise ValueError(
            f"image_folder: the images under {root} differ in shape (H x W x C: count): "
            f"{found}; {fix}"
        )
    if len({arr.dtype for arr in images}) > 1:
        raise ValueError(f"image_folder: the images under {root} mix 8-bit and 16-bit files")
    return np.stack(images)


def load_image_folder(path: str, image_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """``data.image_folder``'s images and labels as arrays, in sorted path order
    (subfolders first by name, then files by name): (images [N, H, W, C], labels int32
    [N]). ``image_shape`` (H, W) or (H, W, C) center-crops; images are never resized."""
    root = os.path.expanduser(os.fspath(path))
    found, labels, classes = _folder_files(root)
    if image_shape is not None:
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) not in (2, 3):
            raise ValueError(
                f"image_folder: image_shape must be (H, W) or (H, W, C), got {image_shape}"
            )
    images = []
    for file in found:
        try:
            arr = decode_image(file)
            images.append(arr if image_shape is None else _center_crop(arr, *image_shape[:2], file))
        except ValueError as err:
            raise ValueError(f"image_folder: {err}") from err
    images = _stack_same_shape(images, root)
    if image_shape is not None and len(image_shape) == 3 and images.shape[-1] != image_shape[2]:
        raise ValueError(
            f"image_folder: the images have {images.shape[-1]} channels, image_shape asks "
            f"for {image_shape[2]}; channels are never converted"
        )
    logger.info(
        "image_folder: %d images %s, classes %s", len(images), images.shape[1:], classes or "none"
    )
    return images, labels
