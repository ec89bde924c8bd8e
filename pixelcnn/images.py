"""Image grids for people (PNG) and image files in: sample grids, completions, masks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

GRID_MIN_SIZE = 448  # pixels on a grid's long side: an image viewer shows it at full size


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


def save_png(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)
