"""The CIFAR-10 twins' data as flaxcnn reads an image folder (`flaxcnn/data/image_folder.py`,
`flaxcnn/data/preprocess.py`, `flaxcnn/models/whitening.py`), in numpy: each split's files in
flaxcnn's fixed order, the stratified validation holdout, per-channel statistics and the
whitened first layer's kernel. `scripts/peers/torch_cifar.py` and `keras_cifar.py` import it;
each decodes the images its own framework's way (`splits`' `decode`).
"""

import math
import os
from collections.abc import Callable

import numpy as np

VALIDATION_PERCENT = 2  # train[:98%] trains, train[98%:] validates.
# flaxcnn's image folders: the fixed order of a split's files, and the whitening sample.
ORDER_SEED = 20240531
EXTENSIONS = (".png", ".jpg", ".jpeg")
WHITENING_PIXELS = 5_000 * 32 * 32
WHITENING_EPS = 5e-4


def image_files(folder: str) -> list[str]:
    """The image files under `folder`, sorted relative paths (hidden ones skipped)."""
    found = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = os.path.relpath(parent, folder)
        found += [
            os.path.normpath(os.path.join(relative, name))
            for name in names
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS)
        ]
    return sorted(found)


def split_files(root: str, split: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """The paths and labels of ROOT/`split`, in flaxcnn's fixed order of the split."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, split, name)
        if os.path.isdir(folder):
            files = image_files(folder)
            paths += [os.path.join(folder, f) for f in files]
            labels += [label] * len(files)
    order = np.random.default_rng(ORDER_SEED).permutation(len(paths))
    return [paths[i] for i in order], np.asarray(labels, np.int64)[order]


def holdout(labels: np.ndarray, percent: int = VALIDATION_PERCENT) -> tuple:
    """(training rows, validation rows): each class's last `percent`% (rounded to nearest)
    validates, as flaxcnn's stratified `train[:98%]` / `train[98%:]`."""
    keep = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep[members[: int(np.floor(len(members) * (100 - percent) / 100 + 0.5))]] = True
    return np.flatnonzero(keep), np.flatnonzero(~keep)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 (N, H, W, C) images over every pixel, in
    [0, 1] units, from exact integer sums."""
    total = np.zeros(images.shape[-1], np.uint64)
    squares = np.zeros(images.shape[-1], np.uint64)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].astype(np.uint64)
        total += chunk.sum(axis=(0, 1, 2))
        squares += (chunk * chunk).sum(axis=(0, 1, 2))
    count = images.size // images.shape[-1]
    mean = [s / count / 255 for s in total.tolist()]
    std = [
        math.sqrt((count * q - s * s) / count**2) / 255
        for s, q in zip(total.tolist(), squares.tolist())
    ]
    return np.asarray(mean), np.asarray(std)


def whitening_kernel(images: np.ndarray, features: int, size: int = 2) -> np.ndarray:
    """(size, size, C, features) float32: the top features/2 whitened principal components of
    the size x size patches of normalised `images` (N, H, W, C), and their negatives."""
    channels = images.shape[-1]
    dim = size * size * channels
    total, outer, count = np.zeros(dim), np.zeros((dim, dim)), 0
    for start in range(0, len(images), 256):
        chunk = images[start : start + 256].astype(np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (size, size), axis=(1, 2))
        patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    eigenvalues, eigenvectors = np.linalg.eigh(outer / count - np.outer(mean, mean))
    order = np.argsort(eigenvalues)[::-1][: features // 2]
    scaled = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0) + WHITENING_EPS)
    kernel = np.concatenate([scaled, -scaled], axis=1)
    return kernel.reshape(size, size, channels, features).astype(np.float32)


def whitening_sample(num_examples: int, seed: int) -> np.ndarray:
    """The sorted training rows (at most 5,000 32x32 images) the whitening is fitted to."""
    count = min(num_examples, max(1, WHITENING_PIXELS // (32 * 32)))
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:count])


def splits(root: str, decode: Callable[[list[str]], np.ndarray]) -> dict:
    """The class names and the training, validation and test (images, labels) of ROOT, the
    images decoded by `decode(paths)` (N first) and the labels int64."""
    classes = sorted(
        e.name for e in os.scandir(os.path.join(root, "train")) if e.is_dir() and e.name[0] != "."
    )
    paths, labels = split_files(root, "train", classes)
    train, validation = holdout(labels)
    test_paths, test_labels = split_files(root, "test", classes)
    images = decode(paths)
    return {
        "classes": classes,
        "train": (images[train], labels[train]),
        "validation": (images[validation], labels[validation]),
        "test": (decode(test_paths), test_labels),
    }
