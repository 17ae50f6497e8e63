"""Pictures of images: a batch tiled into one grid, and PNG files.

Generative tasks show their samples this way, both as `workdir/pictures/*.png` files and as
TensorBoard images (which take the same (H, W, C) uint8 arrays).
"""

import math
import os

import numpy as np
from PIL import Image


def image_grid(
    images: np.ndarray, columns: int, separator: int = 2, separator_value: float = 0.5
) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one (H', W', C) uint8 picture of `columns` tiles a row.

    Tiles are row-major, framed and separated by `separator` pixels of `separator_value` (mid
    gray by default, visible between both dark and light images). Values outside [0, 1] are
    clipped; a last row with fewer than `columns` images is left blank on the right.
    """
    images = np.asarray(images)
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got {images.shape}")
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    if separator < 0:
        raise ValueError(f"separator must be non-negative, got {separator}")
    n, h, w, c = images.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = np.full(
        (rows * (h + separator) + separator, columns * (w + separator) + separator, c),
        separator_value,
        np.float32,
    )
    for i, image in enumerate(images):
        top = separator + (i // columns) * (h + separator)
        left = separator + (i % columns) * (w + separator)
        grid[top : top + h, left : left + w] = image
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    """Writes an (H, W, C) uint8 image (C = 1: grayscale, 3: RGB, 4: RGBA) to `path` as a PNG,
    creating its folder."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image must be an (H, W, 1|3|4) uint8 array, got {image.shape} {image.dtype}"
        )
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    pil = Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image)
    pil.save(path, format="PNG")
