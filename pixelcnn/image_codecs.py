"""General-purpose image codecs: PNGs that hold a model's integers unscaled, and the
lossless compressors the OOD complexity score and the codec benchmark compare with.

No TensorFlow here (the command line lists ``COMPRESSORS`` in its help)."""

from __future__ import annotations

import io

import numpy as np


def png_mode(channels: int, num_bits: int) -> tuple[str, type]:
    """Pillow's mode and dtype for PNGs that hold the integers unscaled (8-bit, or
    16-bit grey); ValueError where no PNG fits."""
    if num_bits <= 8 and channels in (1, 3, 4):
        return {1: "L", 3: "RGB", 4: "RGBA"}[channels], np.uint8
    if channels == 1:
        return "I;16", np.uint16
    raise ValueError(
        f"{channels}-channel images of {num_bits} bits do not make a PNG here (1, 3 or 4 "
        "channels of up to 8 bits, or 1 channel of up to 16): use the .npz"
    )


COMPRESSORS = ("png", "webp", "jpegxl", "jpeg2000")  # general-purpose lossless codecs


def lossless_encoder(compressor: str, channels: int, num_bits: int):
    """fn(image int [H, W, C]) -> the bytes of a lossless file at the codec's strongest
    setting: "png" through Pillow (zlib level 9), "webp" (grey as RGB: WebP takes only
    colour), "jpegxl" and "jpeg2000" (a bare J2K codestream, reversible) through
    imagecodecs (``pip install imagecodecs``, or the ``bench`` extra)."""
    from PIL import Image

    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
    mode, dtype = png_mode(channels, num_bits)
    if compressor == "png":

        def png(img):
            out = io.BytesIO()
            Image.fromarray(_plane(img.astype(dtype)), mode=mode).save(out, "PNG", compress_level=9)
            return out.getvalue()

        return png
    try:
        import imagecodecs
    except ImportError as e:
        raise ImportError(
            f"the {compressor} compressor needs imagecodecs: pip install imagecodecs"
        ) from e
    return {
        "webp": lambda x: imagecodecs.webp_encode(
            np.repeat(x, 3, -1) if x.shape[-1] == 1 else x, level=100, lossless=True, method=6
        ),
        "jpegxl": lambda x: imagecodecs.jpegxl_encode(_plane(x), lossless=True, effort=9),
        "jpeg2000": lambda x: imagecodecs.jpeg2k_encode(
            _plane(x), level=0, reversible=True, codecformat="J2K"
        ),
    }[compressor]


def _plane(img: np.ndarray) -> np.ndarray:
    """[H, W, 1] -> [H, W]; other channel counts as they are."""
    return img[..., 0] if img.shape[-1] == 1 else img
