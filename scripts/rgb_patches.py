"""A small real RGB image folder, built offline: 32x32 patches of photographs that ship with
scikit-image (and matplotlib), one class per photograph, for `configs/rgb_folders.py`.

    pip install -e '.[scripts]'   # scikit-image and matplotlib: scripts only
    python scripts/rgb_patches.py --out /tmp/rgb_patches

Each photograph is scaled so that its shorter side is 240 pixels and cut into 48x48 blocks;
every block goes to train, validation or test (70/10/20%, a fixed shuffle per photograph),
and random 32x32 patches are cut from inside it (10 per training block, 5 otherwise). So no
test patch overlaps a training patch, and telling the photographs apart from a patch means
generalising to regions of them never seen in training. Writes OUT/<split>/<class>/*.png.
"""

import argparse
import os

import numpy as np
from PIL import Image

PHOTOS = {
    # class: (package, file) of an RGB photograph.
    "astronaut": ("skimage", "astronaut.png"),
    "cat": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "galaxies": ("skimage", "hubble_deep_field.jpg"),
    "tissue": ("skimage", "ihc.png"),
    "motorcycle": ("skimage", "motorcycle_left.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "retina": ("skimage", "retina.jpg"),
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
}
SHORT_SIDE, BLOCK, PATCH = 240, 48, 32
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
PATCHES_PER_BLOCK = {"train": 10, "validation": 5, "test": 5}


def photo_path(package: str, name: str) -> str:
    if package == "skimage":
        import skimage

        return os.path.join(os.path.dirname(skimage.__file__), "data", name)
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", name)


def load_photo(package: str, name: str) -> np.ndarray:
    """The photograph as uint8 RGB, its shorter side scaled to SHORT_SIDE."""
    image = Image.open(photo_path(package, name)).convert("RGB")
    scale = SHORT_SIDE / min(image.size)
    size = (round(image.size[0] * scale), round(image.size[1] * scale))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def split_blocks(num_blocks: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Block indices of each split: a shuffle cut at the FRACTIONS (each split gets one)."""
    order = rng.permutation(num_blocks)
    cuts = np.cumsum([0] + [round(f * num_blocks) for f in FRACTIONS.values()])
    cuts[-1] = num_blocks
    return {name: order[a:b] for name, a, b in zip(FRACTIONS, cuts[:-1], cuts[1:])}


def write_patches(out: str, seed: int = 0) -> dict[str, int]:
    """Writes every split's patches; returns the number written per split."""
    counts = dict.fromkeys(FRACTIONS, 0)
    for class_index, (label, (package, name)) in enumerate(sorted(PHOTOS.items())):
        photo = load_photo(package, name)
        rows, cols = photo.shape[0] // BLOCK, photo.shape[1] // BLOCK
        rng = np.random.default_rng([seed, class_index])
        for split, blocks in split_blocks(rows * cols, rng).items():
            folder = os.path.join(out, split, label)
            os.makedirs(folder, exist_ok=True)
            for block in blocks:
                top, left = (block // cols) * BLOCK, (block % cols) * BLOCK
                for i in range(PATCHES_PER_BLOCK[split]):
                    r, c = rng.integers(0, BLOCK - PATCH + 1, 2)
                    patch = photo[top + r : top + r + PATCH, left + c : left + c + PATCH]
                    Image.fromarray(patch).save(os.path.join(folder, f"{block:03d}_{i}.png"))
                    counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="The folder to write (split layout).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = write_patches(args.out, args.seed)
    print(f"{args.out}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))


if __name__ == "__main__":
    main()
