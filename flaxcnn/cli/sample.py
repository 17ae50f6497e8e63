"""Use a trained generative run:

    python -m flaxcnn.sample --workdir W [--out PATH] [--num 64] [--seed 0] [--label L]
                             [--interpolate] [--manifold] [--files] [--images FILE ...]

GAN and VAE runs draw `--num` samples into a grid PNG at PATH (default W/samples.png), or
with `--files` into PATH as a folder of `sample_0000.png`, ... A class-conditional run draws
class `--label` (without it, the classes in turn). `--interpolate`: each row walks in
`INTERPOLATION_STEPS` straight steps from one random latent to another (`--num` rows; a
GAN conditioned on clusters changes cluster where the first coordinate crosses a boundary);
`--manifold`: a VAE with 2 latents decodes a 20 x 20 grid of prior quantiles (the classic
latent-manifold picture). Autoencoder (and VAE) runs reconstruct the image files given with
`--images` (originals in the first row of each pair, reconstructions below). The same
`--seed` gives the same pictures. Bad input: `error: ...` on stderr, exit code 2.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import inference
from flaxcnn.cli.evaluate import quiet_tensorflow
from flaxcnn.data import image_folder
from flaxcnn.reporting import pictures
from flaxcnn.tasks import get_task
from flaxcnn.tasks.base import Sampling

USAGE_ERROR = 2
INTERPOLATION_STEPS = 10
GRID_COLUMNS = 8
MANIFOLD_SIZE = 20


class SampleError(ValueError):
    """Input the command cannot use; its message is the one line printed."""


def sample_labels(num_classes: int, label: int | None, num: int) -> jax.Array | None:
    """`num` labels: all `label`, or the classes in turn; None for an unconditional model."""
    if label is not None and not num_classes:
        raise SampleError("--label needs a class-conditional run (config.conditional)")
    if label is not None and not 0 <= label < num_classes:
        raise SampleError(f"--label must be in [0, {num_classes - 1}], got {label}")
    if not num_classes:
        return None
    if label is not None:
        return jnp.full((num,), label, jnp.int32)
    return jnp.arange(num, dtype=jnp.int32) % num_classes


def interpolation_latents(rng: jax.Array, rows: int, latent_dim: int) -> jax.Array:
    """`rows` x INTERPOLATION_STEPS latents: each row a straight walk between two draws."""
    start, end = jax.random.normal(rng, (2, rows, 1, latent_dim))
    t = jnp.linspace(0.0, 1.0, INTERPOLATION_STEPS)[None, :, None]
    return ((1 - t) * start + t * end).reshape(rows * INTERPOLATION_STEPS, latent_dim)


def generated_images(
    task_name: str, generator: Sampling, args: argparse.Namespace
) -> tuple[np.ndarray, int]:
    """(images (N, H, W, C) in [0, 1], grid columns) that `args` ask of a task's generator."""
    latent_dim, num_classes, decode = generator.latent_dim, generator.num_classes, generator.decode
    rng = jax.random.key(args.seed)
    if args.manifold:
        if generator.manifold is None:
            raise SampleError(
                f"--manifold needs a VAE with 2 latents; this run is a {task_name} with "
                f"{latent_dim}"
            )
        z = generator.manifold(MANIFOLD_SIZE)
        labels = sample_labels(num_classes, args.label, len(z))
        return np.asarray(decode(jnp.asarray(z), labels)), MANIFOLD_SIZE
    if args.interpolate:
        z = interpolation_latents(rng, args.num, latent_dim)
        if num_classes and args.label is None:  # One class per row.
            labels = jnp.repeat(jnp.arange(args.num) % num_classes, INTERPOLATION_STEPS)
        else:
            labels = sample_labels(num_classes, args.label, len(z))
        return np.asarray(decode(z, labels)), INTERPOLATION_STEPS
    z = jax.random.normal(rng, (args.num, latent_dim))
    labels = sample_labels(num_classes, args.label, args.num)
    return np.asarray(decode(z, labels)), GRID_COLUMNS


def reconstructions(
    task_name: str, task, state, paths: list[str], image_shape
) -> tuple[np.ndarray, int]:
    """(the image files at `paths` above their reconstructions, in [0, 1]; grid columns)."""
    if not hasattr(task, "reconstruct"):
        raise SampleError(
            f"--images needs an autoencoder or VAE run; a {task_name} run has no encoder"
        )
    originals = []
    for path in paths:
        try:
            originals.append(image_folder.to_array(image_folder.open_image(path), image_shape))
        except image_folder.FolderError as e:
            raise SampleError(str(e)) from None
    images = np.stack(originals).astype(np.float32) / np.float32(255)
    rebuilt = jax.jit(task.reconstruct)(state, images)
    columns = min(len(images), GRID_COLUMNS)
    rows = [
        part[i : i + columns]
        for i in range(0, len(images), columns)
        for part in (images, np.asarray(rebuilt))
    ]
    # Every pair of rows as wide as the grid (the last ones padded with blank tiles).
    rows = [np.pad(r, [(0, columns - len(r))] + [(0, 0)] * 3, constant_values=1.0) for r in rows]
    return np.concatenate(rows), columns


def write(images: np.ndarray, columns: int, out: str, as_files: bool) -> list[str]:
    """The grid PNG at `out`, or with `as_files` one PNG per image in the folder `out`."""
    if not as_files:
        pictures.save_png(pictures.image_grid(images, columns), out)
        return [out]
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(out, f"sample_{i:04d}.png")
        pictures.save_png(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), path)
        paths.append(path)
    return paths


def check_args(args: argparse.Namespace, task_name: str, task) -> None:
    """Raises SampleError where `args` ask what the run's task cannot draw: samples need a
    generator, --images a task that reconstructs (flaxcnn.tasks.base)."""
    if not (hasattr(task, "generator") or hasattr(task, "reconstruct")):
        raise SampleError(
            f"{args.workdir} holds a {task_name!r} run; sample needs a gan, vae or autoencoder run"
        )
    if args.num < 1:
        raise SampleError(f"--num must be positive, got {args.num}")
    if sum([args.interpolate, args.manifold, bool(args.images)]) > 1:
        raise SampleError("choose one of --interpolate, --manifold and --images")
    if not hasattr(task, "generator") and not args.images:
        raise SampleError(f"an {task_name} run draws no samples: give --images FILE ...")


def sample_images(args: argparse.Namespace) -> list[str]:
    config = inference.load_config(args.workdir)
    task_name = config.get("task", "classification")
    task = get_task(task_name)
    check_args(args, task_name, task)
    loaded = inference.load_run(args.workdir, args.which, task_names=(task_name,))
    if args.images:
        images, columns = reconstructions(
            task_name, task, loaded.state, args.images, loaded.image_shape
        )
        default = "reconstructions.png"
    else:
        images, columns = generated_images(task_name, task.generator(loaded.state), args)
        default = "samples" if args.files else "samples.png"
    return write(images, columns, args.out or os.path.join(args.workdir, default), args.files)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.sample", description="Draw from a trained generative run."
    )
    parser.add_argument("--workdir", required=True, help="The run's directory.")
    parser.add_argument("--out", default=None, help="The PNG (or, with --files, the folder).")
    parser.add_argument("--num", type=int, default=64, help="Samples (interpolation rows).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", type=int, default=None, help="Class (conditional runs).")
    parser.add_argument("--interpolate", action="store_true", help="Walk between latents.")
    parser.add_argument("--manifold", action="store_true", help="A 2-latent VAE's manifold.")
    parser.add_argument("--files", action="store_true", help="One PNG per image in --out.")
    parser.add_argument("--images", nargs="+", default=None, help="Files to reconstruct.")
    parser.add_argument("--which", choices=("latest", "best"), default="latest")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_tensorflow()
    try:
        paths = sample_images(args)
    except ValueError as e:  # SampleError, and a workdir without a run or checkpoint.
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return USAGE_ERROR
    print(paths[0] if len(paths) == 1 else f"{len(paths)} images in {os.path.dirname(paths[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
