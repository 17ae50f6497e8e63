"""Image folders as datasets: `config.dataset = "folder:/path/to/root"`.

Two layouts are recognised:

- **Split folders**: `root/train/<class>/*.png` and, optionally, `root/validation/<class>/...`
  and `root/test/<class>/...` (any subfolder name works as a split name). Used when
  `root/train` exists and holds class folders.
- **Flat**: `root/<class>/*.png`. Its one split is `train` (every image); validation and test
  are carved out of it by slicing, e.g. `train[:80%]`, `train[80%:90%]`, `train[90%:]`.

Classes are the sorted folder names (of `root/train` in the split layout), numbered from 0;
a class folder may be empty, and a split (e.g. `test`) may lack some classes' folders. Images
are the files ending in .png, .jpg or .jpeg (any case) in a class folder or any folder below
it; hidden files and folders (names starting with '.') and anything else are ignored. An
image that cannot be decoded (an empty or truncated file, not an image, one of more than
PIL's `Image.MAX_IMAGE_PIXELS` pixels: a possible decompression bomb) stops loading with an
error naming it. The first frame of an animated image is used.

Split strings follow tfds: `NAME`, `NAME[a%:b%]`, `NAME[i:j]` (negative bounds allowed), and
`+` to join several. Every split has one fixed order, independent of the run's seed: its
files sorted by path, then permuted with a constant seed. Percent slices are stratified:
each class is cut at the same fractions of its own images (boundaries rounded to nearest),
so `train[:90%]` and `train[90%:]` partition every class 90/10. Absolute slices cut the
fixed order itself. Loading the same folder and split always gives identical arrays.

Preprocessing (`to_array`), shared with prediction so that both see the same pixels: EXIF
orientation applied; colour converted with PIL to 'L' (1 channel, `color_mode="grayscale"`)
or 'RGB' (3 channels, `"rgb"`, the default for folders), alpha dropped, palettes expanded,
16-bit images scaled from 0..65535 to 0..255; then resized to `image_size` (H, W) with
PIL's BILINEAR filter (antialiased when shrinking) if the size differs. Without
`image_size`, every image must already have the same size.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")
COLOR_MODES = {"grayscale": 1, "rgb": 3}
RESAMPLE = Image.Resampling.BILINEAR
ORIENTATION_TAG = 0x0112
ORDER_SEED = 20240531  # The fixed order of a folder's files; never the run's seed.
# Splits of at least this many images are decoded by several processes (`decode_workers`):
# a process starts in about a second, in which one decodes about 5,000 CIFAR-size JPEGs.
PARALLEL_FROM = 5000
WORKERS_ENV = "FLAXCNN_DECODE_WORKERS"
# (image, (H, W, C)) -> (H, W, C) uint8: how a split's images are read (`to_array`, or a
# crop of flaxcnn.data.crops).
View = Callable[[Image.Image, tuple[int, int, int]], np.ndarray]
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<lo>-?\d+%?)?:(?P<hi>-?\d+%?)?\])?$")


class FolderError(ValueError):
    """An image folder that cannot be read or used as asked."""


def is_folder_dataset(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_root(name: str) -> str:
    """`folder:/path` -> `/path` (user and variables expanded)."""
    root = os.path.expandvars(os.path.expanduser(name[len(PREFIX) :]))
    if not root:
        raise FolderError(f"dataset {name!r} names no folder: use folder:/path/to/root")
    if not os.path.isdir(root):
        raise FolderError(f"image folder {root!r} does not exist")
    return root


def channels(color_mode: str | None) -> int:
    mode = color_mode or "rgb"
    if mode not in COLOR_MODES:
        raise FolderError(f"unknown color_mode {mode!r}; valid: {', '.join(COLOR_MODES)}")
    return COLOR_MODES[mode]


def check_image_size(image_size) -> tuple[int, int] | None:
    """`image_size` as (H, W) of positive ints, or None."""
    if image_size is None:
        return None
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(x, int) and x > 0 for x in size):
        raise FolderError(f"image_size must be (height, width) of positive ints, got {image_size}")
    return size


def to_array(image: Image.Image, image_shape: tuple[int, int, int]) -> np.ndarray:
    """A PIL image of any mode and size as an (H, W, C) uint8 array of `image_shape`, C being
    1 (grayscale) or 3 (RGB). The one preprocessing of folder datasets and of prediction."""
    height, width, num_channels = image_shape
    if num_channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, not {num_channels}")
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL's own conversion clips 16-bit values at 255; scale the range instead.
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257), 0, 255).astype(np.uint8))
    image = image.convert("L" if num_channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLE)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if num_channels == 1 else array


def open_image(path: str) -> Image.Image:
    """The image at `path`, decoded; FolderError naming the file if it is not a readable
    image."""
    try:
        with warnings.catch_warnings():
            # Over MAX_IMAGE_PIXELS PIL only warns (it raises from twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FolderError(f"{path}: refused, a possible decompression bomb ({e})") from None
    except FileNotFoundError:
        raise FolderError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FolderError(f"{path}: is a directory") from None
    except Image.UnidentifiedImageError:
        raise FolderError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FolderError(f"{path}: not a readable image ({reason})") from None


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) of `image` once its EXIF orientation is applied, as `to_array` does."""
    transposed = image.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)
    return (image.width, image.height) if transposed else (image.height, image.width)


def _subfolders(path: str) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(path)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def image_files(path: str) -> list[str]:
    """The image files under `path` (subfolders included; hidden files and folders skipped),
    as sorted paths relative to it."""
    found = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(folder, path)
        found += [
            os.path.normpath(os.path.join(relative, name))
            for name in names
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS)
        ]
    return sorted(found)


def _is_split_layout(root: str) -> bool:
    train = os.path.join(root, "train")
    return os.path.isdir(train) and bool(_subfolders(train))


def class_names(root: str) -> list[str]:
    """The sorted class folder names: of `root/train` in the split layout, else of `root`."""
    names = _subfolders(os.path.join(root, "train") if _is_split_layout(root) else root)
    if not names:
        raise FolderError(f"image folder {root!r} has no class subfolders")
    return names


@dataclasses.dataclass(frozen=True)
class _Files:
    paths: list[str]  # In the split's fixed order.
    labels: np.ndarray  # int32, aligned with `paths`.


def _split_files(root: str, split_name: str, classes: list[str]) -> _Files:
    """Every image of the named split, in its fixed order."""
    if _is_split_layout(root):
        base = os.path.join(root, split_name)
        if not os.path.isdir(base):
            present = ", ".join(_subfolders(root))
            raise FolderError(f"image folder {root!r} has no split {split_name!r} (has: {present})")
        unknown = sorted(set(_subfolders(base)) - set(classes))
        if unknown:
            raise FolderError(
                f"{base} has class folders not in {os.path.join(root, 'train')}: "
                f"{', '.join(unknown)}"
            )
    elif split_name == "train":
        base = root
    else:
        raise FolderError(
            f"image folder {root!r} is flat (root/<class>/*.png): its only split is 'train'; "
            f"carve {split_name!r} out of it by slicing, e.g. train[90%:]"
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(base, name)
        if os.path.isdir(folder):
            files = image_files(folder)
            paths += [os.path.join(folder, f) for f in files]
            labels += [label] * len(files)
    order = np.random.default_rng(ORDER_SEED).permutation(len(paths))
    return _Files([paths[i] for i in order], np.asarray(labels, np.int32)[order])


def _percent_bound(text: str | None, size: int, default: int) -> int:
    if text is None:
        return default
    percent = int(text[:-1])
    if not -100 <= percent <= 100:
        raise FolderError(f"percent {text} is outside [-100%, 100%]")
    return int(np.floor(size * percent / 100 + 0.5))  # Nearest, halves up.


def _select(files: _Files, lo: str | None, hi: str | None) -> np.ndarray:
    """Indices into `files` (in its fixed order) of the slice [lo:hi]."""
    units = {bound.endswith("%") for bound in (lo, hi) if bound is not None}
    if len(units) > 1:
        raise FolderError(f"slice [{lo}:{hi}] mixes percents and counts")
    if units != {True}:
        start, stop = (None if b is None else int(b) for b in (lo, hi))
        return np.arange(len(files.paths))[start:stop]
    keep = np.zeros(len(files.paths), bool)
    for label in np.unique(files.labels):  # Each class cut at the same fractions.
        members = np.flatnonzero(files.labels == label)
        n = len(members)
        keep[members[_percent_bound(lo, n, 0) : _percent_bound(hi, n, n)]] = True
    return np.flatnonzero(keep)


def parse_split(split: str) -> list[tuple[str, str | None, str | None]]:
    """'train[:90%]+test' -> [('train', None, '90%'), ('test', None, None)]."""
    parts = []
    for part in split.replace(" ", "").split("+"):
        match = _SPLIT.match(part)
        if not match:
            raise FolderError(
                f"bad split {split!r}: use NAME, NAME[a%:b%] or NAME[i:j], joined by '+'"
            )
        parts.append((match["name"], match["lo"], match["hi"]))
    return parts


def _reference_size(root: str, classes: list[str]) -> tuple[int, int]:
    """(H, W) of the first training image by path: the size of every split when no
    `image_size` is set."""
    files = _split_files(root, "train", classes)
    if not files.paths:
        raise FolderError(f"image folder {root!r} has no training images")
    return oriented_size(open_image(min(files.paths)))


def folder_info(
    name: str, image_size=None, color_mode: str | None = None
) -> tuple[tuple[int, int, int], list[str]]:
    """The (H, W, C) images of folder dataset `name` will have, and its class names, without
    decoding it all (without `image_size`, the size of its first training image)."""
    root = folder_root(name)
    classes = class_names(root)
    size = check_image_size(image_size) or _reference_size(root, classes)
    return (*size, channels(color_mode)), classes


def load_folder_split(
    name: str,
    split: str,
    image_size=None,
    color_mode: str | None = None,
    view: View | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, H, W, C) uint8, labels (N,) int32 and class names of `split` of the folder
    dataset `name` (`folder:/path/to/root`), each image read by `view` (default `to_array`;
    a centre crop: flaxcnn.data.crops)."""
    root = folder_root(name)
    num_channels = channels(color_mode)
    size = check_image_size(image_size)
    paths, labels, classes = split_paths(name, split)
    fixed_size = size is not None
    size = size or _reference_size(root, classes)
    images = _decode_all(root, paths, (*size, num_channels), fixed_size, view or to_array)
    return images, labels, classes


def split_paths(name: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """The image paths of `split` of the folder dataset `name` in the split's fixed order,
    their labels (int32) and the class names, without decoding anything."""
    root = folder_root(name)
    classes = class_names(root)
    paths, labels = [], []
    for split_name, lo, hi in parse_split(split):
        files = _split_files(root, split_name, classes)
        chosen = _select(files, lo, hi)
        paths += [files.paths[i] for i in chosen]
        labels.append(files.labels[chosen])
    if not paths:
        raise FolderError(f"split {split!r} of image folder {root!r} has no images")
    return paths, np.concatenate(labels), classes


def _decode(
    root: str,
    paths: list[str],
    image_shape: tuple[int, int, int],
    fixed_size: bool,
    view: View,
) -> np.ndarray:
    """The images at `paths` as one (N, H, W, C) uint8 array (one worker's share)."""
    images = np.empty((len(paths), *image_shape), np.uint8)
    for i, path in enumerate(paths):
        image = open_image(path)
        if not fixed_size and oriented_size(image) != image_shape[:2]:
            found, (h, w) = oriented_size(image), image_shape[:2]
            raise FolderError(
                f"images of {root!r} differ in size ({path} is {found[0]}x{found[1]}, "
                f"others {h}x{w}): set config.image_size=(H, W) to resize them"
            )
        images[i] = view(image, image_shape)
    return images


def decode_workers(num_images: int) -> int:
    """Processes that decode a split: one per core, or none (this process) for splits small
    enough that starting them costs more than it saves ($FLAXCNN_DECODE_WORKERS overrides)."""
    configured = os.environ.get(WORKERS_ENV)
    if configured:
        return max(int(configured), 1)
    if num_images < PARALLEL_FROM:
        return 1
    return max(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 1)


def _decode_all(
    root: str,
    paths: list[str],
    image_shape: tuple[int, int, int],
    fixed_size: bool,
    view: View,
) -> np.ndarray:
    """`_decode` of every path, spread over `decode_workers` processes in order-keeping
    chunks. PIL's per-image Python work holds the GIL, so threads would not run in parallel;
    the processes are spawned, not forked, as the parent may already run JAX's threads."""
    workers = decode_workers(len(paths))
    if workers == 1:
        return _decode(root, paths, image_shape, fixed_size, view)
    chunk = -(-len(paths) // (workers * 4))  # Several chunks a worker: even finish times.
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [(root, c, image_shape, fixed_size, view) for c in chunks]
        parts = pool.map(_decode, *zip(*jobs))
        return np.concatenate(list(parts))


def convert_images(
    images: np.ndarray,
    image_size=None,
    color_mode: str | None = None,
    view: View | None = None,
):
    """uint8 (N, H, W, C) arrays, C 1 or 3, through `view` (default `to_array`): the folder
    preprocessing applied to a decoded tfds split when `image_size`, `color_mode` or another
    view is set."""
    view = view or to_array
    if image_size is None and color_mode is None and view is to_array:
        return images
    size = check_image_size(image_size) or images.shape[1:3]
    num_channels = channels(color_mode) if color_mode else images.shape[3]
    if images.shape[3] not in (1, 3):
        raise FolderError(f"cannot convert images with {images.shape[3]} channels")
    shape = (*size, num_channels)
    squeeze = images.shape[3] == 1  # PIL takes grayscale as (H, W).
    return np.stack([view(Image.fromarray(x[:, :, 0] if squeeze else x), shape) for x in images])
