"""Per-image preprocessing of the streaming input (flaxcnn.data.streaming), on the host, in
its workers: images of any size to the model's (H, W, C).

Two modes (`config.input_crop`):

- "resize": every image resized to (H, W) by `image_folder.to_array`, in training and
  evaluation alike: the pixels the in-memory path decodes, so both paths train the same.
- "random_resized": training takes the standard ImageNet augmentation, a random box of
  8%-100% of the image's area with aspect ratio 3/4-4/3 (`random_resized_box`) resized to
  (H, W); evaluation, predict and export resize and take the centre crop (`centre_box`, the
  box's side `CENTRE_FRACTION` of the largest box of the output's aspect ratio).

The random box of an example is a pure function of its generator, which the stream seeds
with (seed, epoch, example index): no worker, position or resume changes it.
"""

import math

import numpy as np
from PIL import Image, ImageOps

from flaxcnn.data import image_folder

CROPS = ("resize", "random_resized")
SCALE = (0.08, 1.0)  # Fraction of the image's area a random box covers.
RATIO = (3 / 4, 4 / 3)  # Width / height of a random box.
ATTEMPTS = 10
CENTRE_FRACTION = 0.875  # Resize to size / 0.875, centre crop to size: the ImageNet habit.

Box = tuple[int, int, int, int]  # (top, left, height, width)


def random_resized_box(
    height: int, width: int, rng: np.random.Generator, scale=SCALE, ratio=RATIO
) -> Box:
    """A box of `scale` of the area and aspect ratio in `ratio` (log-uniform) at a uniform
    position; after `ATTEMPTS` boxes that do not fit, the centre box of the ratio clamped
    into `ratio` (as torchvision's RandomResizedCrop does)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, min(width, round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def centre_box(height: int, width: int, out_height: int, out_width: int) -> Box:
    """The centred box that "resize the image so that (out_height, out_width) is
    `CENTRE_FRACTION` of it, then crop the centre" reads, in the image's own pixels."""
    fit = min(height / out_height, width / out_width)  # Largest box of the output's ratio.
    h = max(1, min(height, round(out_height * fit * CENTRE_FRACTION)))
    w = max(1, min(width, round(out_width * fit * CENTRE_FRACTION)))
    return (height - h) // 2, (width - w) // 2, h, w


def centre_crop(image: Image.Image, image_shape: tuple[int, int, int]) -> np.ndarray:
    """The evaluation view of "random_resized": `centre_box` of the image (in its displayed
    orientation) resized to `image_shape` by `image_folder.to_array`."""
    image = ImageOps.exif_transpose(image)  # Boxes are in the displayed orientation.
    top, left, h, w = centre_box(image.height, image.width, *image_shape[:2])
    return image_folder.to_array(image.crop((left, top, left + w, top + h)), image_shape)


def evaluation_view(crop: str) -> image_folder.View:
    """How evaluation, prediction and export read an image under `crop`: the whole image
    resized (`image_folder.to_array`) for "resize", `centre_crop` for "random_resized".
    Module-level functions, so decoding processes can take them."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROPS)}")
    return image_folder.to_array if crop == "resize" else centre_crop


def preprocess(
    image: Image.Image,
    image_shape: tuple[int, int, int],
    crop: str,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """`image` as an (H, W, C) uint8 array of `image_shape`: with `rng`, a training view
    (a random box under "random_resized"), without, the evaluation view."""
    view = evaluation_view(crop)  # Checks `crop`.
    if rng is None or crop == "resize":
        return view(image, image_shape)
    image = ImageOps.exif_transpose(image)  # Boxes are in the displayed orientation.
    top, left, h, w = random_resized_box(image.height, image.width, rng)
    return image_folder.to_array(image.crop((left, top, left + w, top + h)), image_shape)
