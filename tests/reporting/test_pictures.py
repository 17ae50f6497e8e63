"""Image grids and PNG files."""

import numpy as np
import pytest
from PIL import Image

from flaxcnn.reporting import pictures


def test_grid_places_tiles_row_major_between_separators():
    images = np.zeros((5, 3, 4, 1), np.float32)
    for i in range(5):
        images[i] = i / 4  # Tile i is uniformly i/4.
    grid = pictures.image_grid(images, columns=3, separator=2)
    # 2 rows of 3 columns; 2-pixel borders and separators.
    assert grid.shape == (2 * 3 + 3 * 2, 3 * 4 + 4 * 2, 1) and grid.dtype == np.uint8
    for i in range(5):
        top, left = 2 + (i // 3) * 5, 2 + (i % 3) * 6
        np.testing.assert_array_equal(grid[top : top + 3, left : left + 4], round(i / 4 * 255))
    assert np.all(grid[:2] == 128) and np.all(grid[:, :2] == 128)  # Mid-gray separators.
    assert np.all(grid[7:10, 14:18] == 128)  # The missing sixth tile is left blank.


def test_grid_clips_and_keeps_channels():
    images = np.stack([np.full((2, 2, 3), -1.0), np.full((2, 2, 3), 2.0)])
    grid = pictures.image_grid(images, columns=4, separator=1)
    assert grid.shape == (4, 7, 3)  # Only as many columns as images.
    assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 4].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "images, columns",
    [(np.zeros((4, 4)), 2), (np.zeros((0, 2, 2, 1)), 2), (np.zeros((1, 2, 2, 1)), 0)],
)
def test_grid_rejects_bad_input(images, columns):
    with pytest.raises(ValueError):
        pictures.image_grid(images, columns)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_save_png_creates_folders_and_round_trips(tmp_path, channels, mode):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "picture.png"
    pictures.save_png(image, str(path))
    with Image.open(path) as png:
        assert png.mode == mode
        np.testing.assert_array_equal(np.asarray(png).reshape(image.shape), image)


def test_save_png_rejects_floats(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        pictures.save_png(np.zeros((2, 2, 1), np.float32), str(tmp_path / "x.png"))
