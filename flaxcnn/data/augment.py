"""Random data augmentation of image batches: rotation, translation and scaling as one affine
transform per image with bilinear sampling, and additive Gaussian noise.

Pure functions of (images, key) on a (B, H, W, C) float32 batch in [0, 1], vectorised over
the batch, so they run inside a jitted train step. Each strength 0 turns its augmentation
off; with all of them 0 the images are returned unchanged. The same key gives the
same result, and each augmentation draws from its own subkey, so turning one on does not
change what the others draw.

Geometry: (row, col) pixel coordinates relative to the image centre ((H - 1) / 2,
(W - 1) / 2); positive angles turn the content counter-clockwise as displayed (row 0 at the
top), as `np.rot90` does; positive shifts move it down and right.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("rotation", "translation", "scale", "noise")


@jax.jit
def affine_transform(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Resamples each image through its (2, 3) matrix: output pixel p (centre-relative
    (row, col)) takes the input's bilinear value at `matrices[b, :, :2] @ p + matrices[b, :, 2]`,
    and 0 where that falls outside the image.

    Four gathers of neighbours from the image padded with a border of zeros, so that
    out-of-range neighbours read zeros without masks; channels first, so that each gather
    reads single values, which XLA:CPU does about twice as fast as rows of C.
    """
    batch, height, width, channels = images.shape
    centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    grid = jnp.stack([rows.ravel(), cols.ravel()]).astype(jnp.float32) - centre[:, None]
    matrices = matrices.astype(jnp.float32)
    source = jnp.einsum("bij,jn->bin", matrices[:, :, :2], grid) + matrices[:, :, 2:]
    y, x = source[:, 0] + centre[0], source[:, 1] + centre[1]  # (B, H * W) each.
    y0, x0 = jnp.floor(y), jnp.floor(x)
    wy, wx = y - y0, x - x0

    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    flat = jnp.moveaxis(padded, -1, 0).reshape(channels, -1)
    offsets = (jnp.arange(batch) * (height + 2) * (width + 2))[:, None]

    def gather(yi: jax.Array, xi: jax.Array) -> jax.Array:
        # Coordinates -1 and H (W) are the zero border; anything further out reads it too.
        yi = jnp.clip(yi, -1, height).astype(jnp.int32) + 1
        xi = jnp.clip(xi, -1, width).astype(jnp.int32) + 1
        return flat[:, offsets + yi * (width + 2) + xi]  # (C, B, H * W)

    out = (
        gather(y0, x0) * ((1 - wy) * (1 - wx))
        + gather(y0, x0 + 1) * ((1 - wy) * wx)
        + gather(y0 + 1, x0) * (wy * (1 - wx))
        + gather(y0 + 1, x0 + 1) * (wy * wx)
    )
    return jnp.moveaxis(out, 0, -1).reshape(images.shape).astype(images.dtype)


@jax.jit
def sampling_matrices(angles: jax.Array, zooms: jax.Array, shifts: jax.Array) -> jax.Array:
    """(B, 2, 3) matrices for `affine_transform` that zoom each image's content by `zooms`
    (B,) about the centre, turn it counter-clockwise by `angles` (B,) degrees, then move it by
    `shifts` (B, 2) pixels (rows, cols). Each is the inverse of that forward map."""
    radians = jnp.deg2rad(jnp.asarray(angles, jnp.float32))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    linear = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    linear = linear / jnp.asarray(zooms, jnp.float32)[:, None, None]
    offset = -jnp.einsum("bij,bj->bi", linear, jnp.asarray(shifts, jnp.float32))
    return jnp.concatenate([linear, offset[:, :, None]], axis=-1)


def rotate(images: jax.Array, angles: jax.Array) -> jax.Array:
    """Turns each image counter-clockwise by its angle in degrees about its centre."""
    angles = jnp.broadcast_to(jnp.asarray(angles, jnp.float32), images.shape[:1])
    ones = jnp.ones_like(angles)
    return affine_transform(images, sampling_matrices(angles, ones, jnp.zeros((len(ones), 2))))


def translate(images: jax.Array, shifts: jax.Array) -> jax.Array:
    """Moves each image's content by its (rows, cols) shift in pixels; 0 fills the gap."""
    shifts = jnp.broadcast_to(jnp.asarray(shifts, jnp.float32), (images.shape[0], 2))
    ones = jnp.ones(images.shape[:1], jnp.float32)
    return affine_transform(images, sampling_matrices(0 * ones, ones, shifts))


def validate(rotation: float, translation: float, scale: float, noise: float) -> None:
    """Raises ValueError for a strength that cannot work."""
    for name, value in zip(AUGMENTATIONS, (rotation, translation, scale, noise)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"augment.{name} must be a number >= 0, got {value!r}")
    if scale >= 1:
        raise ValueError(f"augment.scale is a relative zoom and must be < 1, got {scale}")


def augment(
    images: jax.Array,
    rng: jax.Array,
    *,
    rotation: float = 0.0,
    translation: float = 0.0,
    scale: float = 0.0,
    noise: float = 0.0,
) -> jax.Array:
    """Randomly transforms each image of a (B, H, W, C) batch in [0, 1].

    rotation: the largest angle in degrees; each image turns by uniform(-rotation, rotation).
    translation: the largest shift per axis in pixels, or as a fraction of the height and
        width when below 1; each axis moves by uniform(-max, max).
    scale: the largest relative zoom; each image is zoomed by uniform(1 - scale, 1 + scale).
    noise: the standard deviation of Gaussian noise added to every pixel.

    The strengths are Python numbers (settings, compiled in). The result is clipped to
    [0, 1]; with every strength 0 it is `images` itself.
    """
    validate(rotation, translation, scale, noise)
    if not enabled(dict(rotation=rotation, translation=translation, scale=scale, noise=noise)):
        return images
    return _augment(images, rng, rotation, translation, scale, noise)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _augment(
    images: jax.Array,
    rng: jax.Array,
    rotation: float,
    translation: float,
    scale: float,
    noise: float,
) -> jax.Array:
    batch, height, width = images.shape[:3]
    rot_rng, shift_rng, zoom_rng, noise_rng = jax.random.split(rng, 4)
    if rotation or translation or scale:
        angles = jax.random.uniform(rot_rng, (batch,), minval=-1.0, maxval=1.0) * rotation
        zooms = 1.0 + jax.random.uniform(zoom_rng, (batch,), minval=-1.0, maxval=1.0) * scale
        max_shift = jnp.full((2,), translation, jnp.float32)
        if translation < 1:
            max_shift = translation * jnp.array([height, width], jnp.float32)
        shifts = jax.random.uniform(shift_rng, (batch, 2), minval=-1.0, maxval=1.0) * max_shift
        images = affine_transform(images, sampling_matrices(angles, zooms, shifts))
        # Bilinear weights can sum to a hair over 1 in float32.
        images = jnp.clip(images, 0.0, 1.0)
    if noise:
        gaussian = jax.random.normal(noise_rng, images.shape, jnp.float32)
        images = jnp.clip(images + noise * gaussian, 0.0, 1.0).astype(images.dtype)
    return images


def augment_batch(batch: dict, rng: jax.Array, **strengths: float) -> dict:
    """`batch` with its "image" augmented; every other entry ("label", "mask") unchanged."""
    return {**batch, "image": augment(batch["image"], rng, **strengths)}


def from_config(config: Any) -> dict[str, float]:
    """The strengths in `config.augment`, as `augment`'s keyword arguments."""
    strengths = {name: float(config.augment[name]) for name in AUGMENTATIONS}
    validate(**strengths)
    return strengths


def enabled(strengths: dict[str, float]) -> bool:
    """Whether any augmentation is on."""
    return any(value != 0 for value in strengths.values())
