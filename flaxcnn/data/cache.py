"""Decoded splits kept on disk, so that tfds (and TensorFlow, which it imports) decodes a
split once per machine rather than on every run.

An entry is `images.npy` (N, H, W, C uint8), `labels.npy` (N,) int32 and `meta.json` in
`$XDG_CACHE_HOME/flaxcnn/splits/<key hash>/` (`~/.cache/...` by default; the
`FLAXCNN_SPLIT_CACHE` environment variable names another folder, or `off`). The key is what
was asked for (dataset name, split, data_dir, image_size, color_mode, the crop of
`flaxcnn.data.crops` its images were read with) and what decodes it
(the tfds and Pillow versions, the decoding code's own text, this format's version). The
entry records the prepared tfds folder it was decoded from and a fingerprint of that
folder's files (names, sizes, modification times): an entry whose folder has changed or
gone is not used. Images are memory-mapped when read: the pages a run touches come from the
OS's file cache.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import logging

FORMAT_VERSION = 1
CACHE_ENV = "FLAXCNN_SPLIT_CACHE"
IMAGES, LABELS, META = "images.npy", "labels.npy", "meta.json"


def cache_root() -> str | None:
    """The cache's folder, or None when `$FLAXCNN_SPLIT_CACHE` is `off`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return None if configured.lower() in ("off", "0", "false") else configured
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "flaxcnn", "splits")


def split_key(
    name: str,
    split: str,
    data_dir: str,
    image_size: Sequence[int] | None,
    color_mode: str | None,
    crop: str = "resize",
) -> dict:
    """What identifies a decoded split, before its source is known (`crop`: the evaluation
    view of `config.input_crop` its images are read with)."""
    return {
        "format": FORMAT_VERSION,
        "dataset": name,
        "split": split,
        "data_dir": os.path.abspath(os.path.expanduser(data_dir)),
        "image_size": list(image_size) if image_size else None,
        "color_mode": color_mode,
        "crop": crop,
        "tfds": _version("tensorflow-datasets"),
        "pillow": _version("pillow"),
        "decoder": _decoder_hash(),
    }


# The modules whose code turns stored files into the cached arrays.
DECODERS = ("input_pipeline.py", "image_folder.py", "crops.py")


def _decoder_hash() -> str:
    digest = hashlib.sha256()
    for name in DECODERS:
        with open(os.path.join(os.path.dirname(__file__), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _version(distribution: str) -> str:
    """An installed distribution's version, without importing it (tfds's picks a dataset's
    version; Pillow's its resizing)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def fingerprint(folder: str) -> list[list] | None:
    """[name, size, mtime_ns] of every file under `folder`, and [name/, 0, 0] of every
    folder (an image folder's new empty class counts), sorted; None if it is missing."""
    if not os.path.isdir(folder):
        return None
    files = []
    for root, folders, names in os.walk(folder):
        files += [[os.path.relpath(os.path.join(root, f), folder) + "/", 0, 0] for f in folders]
        for file_name in names:
            stat = os.stat(os.path.join(root, file_name))
            relative = os.path.relpath(os.path.join(root, file_name), folder)
            files.append([relative, stat.st_size, stat.st_mtime_ns])
    return sorted(files)


def _entry_dir(root: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(root, digest)


def read_entry(key: dict) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(images memory-mapped, labels, meta) of the entry of `key`, or None when there is no
    entry or its source folder has changed since it was written."""
    root = cache_root()
    if root is None:
        return None
    entry = _entry_dir(root, key)
    try:
        with open(os.path.join(entry, META)) as f:
            meta = json.load(f)
        if meta["key"] != key or fingerprint(meta["source"]) != meta["fingerprint"]:
            return None
        images = np.load(os.path.join(entry, IMAGES), mmap_mode="r")
        labels = np.load(os.path.join(entry, LABELS))
    except (OSError, ValueError, KeyError):
        return None
    if len(images) != len(labels):
        return None
    return images, labels, meta


def save(key: dict, source: str, images: np.ndarray, labels: np.ndarray, **info) -> None:
    """Writes the entry of `key`, decoded from the prepared folder `source`, with `info`
    (JSON values) in its meta. A cache that cannot be written is logged and skipped."""
    root = cache_root()
    if root is None or fingerprint(source) is None:
        return
    entry = _entry_dir(root, key)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        np.save(os.path.join(tmp, IMAGES), np.ascontiguousarray(images, np.uint8))
        np.save(os.path.join(tmp, LABELS), np.asarray(labels, np.int32))
        meta = {"key": key, "source": source, "fingerprint": fingerprint(source), **info}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f)
        _replace_dir(tmp, entry)
    except OSError as e:
        logging.warning("Cannot cache the decoded split in %s: %s", root, e)
        return
    _prune_orphans(root)


def _replace_dir(tmp: str, entry: str) -> None:
    """Moves the complete `tmp` to `entry` (a stale entry is removed first; when another
    process has just written the entry, its copy is kept)."""
    if os.path.isdir(entry):
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune_orphans(root: str) -> None:
    """Removes entries whose source folder is gone (e.g. temporary tfds folders of tests)."""
    for name in os.listdir(root):
        entry = os.path.join(root, name)
        try:
            with open(os.path.join(entry, META)) as f:
                source = json.load(f)["source"]
        except (OSError, ValueError, KeyError):
            continue
        if not os.path.isdir(source):
            shutil.rmtree(entry, ignore_errors=True)
