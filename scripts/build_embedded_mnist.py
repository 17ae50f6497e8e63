"""Builds the embedded MNIST subset shipped inside the package.

    python scripts/build_embedded_mnist.py [--npz ../shared/data/mnist/mnist.npz]

Takes 10,000 images from the official train split (1,000 per class) and 2,000 from the
official test split (200 per class), chosen with a fixed seed so the file is reproducible
byte for byte, and writes flaxcnn/data/embedded_mnist.npz.
"""

import argparse
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "flaxcnn/data/embedded_mnist.npz"


def stratified_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` indices of each label, drawn without replacement, in ascending order."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default="../shared/data/mnist/mnist.npz")
    args = parser.parse_args()
    mnist = np.load(args.npz)
    train = stratified_indices(mnist["y_train"], 1000, seed=0)
    test = stratified_indices(mnist["y_test"], 200, seed=1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        x_train=mnist["x_train"][train],
        y_train=mnist["y_train"][train],
        x_test=mnist["x_test"][test],
        y_test=mnist["y_test"][test],
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {len(train)} train, {len(test)} test")


if __name__ == "__main__":
    main()
