"""Random data augmentation of image batches: random crop (pad, then crop back to size) and
horizontal and vertical flips; rotation, translation and scaling as one affine transform per
image, with an elastic distortion (Simard et al., 2003) added to it, all with bilinear sampling;
and additive Gaussian noise, in that order.

Pure functions of (images, key) on a (B, H, W, C) float32 batch in [0, 1], vectorised over
the batch, so they run inside a jitted train step. Each setting 0 (or False) turns its
augmentation off; with all of them off the images are returned unchanged. The same key gives
the same result, and each augmentation draws from its own subkey, so turning one on does not
change what the others draw. With `mean` and `std` (`config.normalize`), the batch holds
standardised model inputs: they are augmented in [0, 1] and standardised again.

Geometry: (row, col) pixel coordinates relative to the image centre ((H - 1) / 2,
(W - 1) / 2); positive angles turn the content counter-clockwise as displayed (row 0 at the
top), as `np.rot90` does; positive shifts move it down and right.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from flaxcnn.data import preprocess

AUGMENTATIONS = ("rotation", "translation", "scale", "elastic", "noise")  # Float strengths.
SWITCHES = ("crop", "flip_horizontal", "flip_vertical")  # Off when 0 / False.
CROP_MODES = ("reflect", "zero")
ELASTIC_SIGMA = 4.0  # Pixels: the elastic fields' smoothness unless set.


@jax.jit
def affine_transform(
    images: jax.Array, matrices: jax.Array, displacements: jax.Array | None = None
) -> jax.Array:
    """Resamples each image through its (2, 3) matrix: output pixel p (centre-relative
    (row, col)) takes the input's bilinear value at `matrices[b, :, :2] @ p + matrices[b, :, 2]`
    (plus `displacements[b, :, p]`, in pixels, when given: (B, 2, H, W) rows and cols), and 0
    where that falls outside the image.

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
    if displacements is not None:
        source = source + displacements.reshape(batch, 2, height * width).astype(jnp.float32)
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


def gaussian_blur_matrix(size: int, sigma: float) -> jax.Array:
    """(size, size) rows of Gaussian weights of standard deviation `sigma` pixels, each row
    renormalised to sum to 1 (the border sees only the weights inside the image)."""
    positions = jnp.arange(size, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * ((positions[:, None] - positions[None, :]) / sigma) ** 2)
    return weights / weights.sum(axis=1, keepdims=True)


def elastic_displacements(
    rng: jax.Array, shape: tuple[int, int, int], alpha: float, sigma: float
) -> jax.Array:
    """(B, 2, H, W) random displacement fields of `shape` (B, H, W) in pixels: uniform noise
    in [-1, 1] per pixel and axis, smoothed by a Gaussian of `sigma` pixels and scaled by
    `alpha` (Simard et al., 2003, used alpha 34 and sigma 4 on MNIST)."""
    batch, height, width = shape
    noise = jax.random.uniform(rng, (batch, 2, height, width), minval=-1.0, maxval=1.0)
    rows, cols = gaussian_blur_matrix(height, sigma), gaussian_blur_matrix(width, sigma)
    return alpha * jnp.einsum("ik,bakl,jl->baij", rows, noise, cols)


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


def crop_flip_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The subkeys of the crop offsets and the horizontal and vertical flips: from the key
    folded with 1, so that turning crops or flips on or off leaves the other augmentations'
    draws (`split(rng, 4)`) unchanged."""
    crop_rng, horizontal_rng, vertical_rng = jax.random.split(jax.random.fold_in(rng, 1), 3)
    return crop_rng, horizontal_rng, vertical_rng


def crop_offsets(rng: jax.Array, batch: int, pad: int) -> jax.Array:
    """(B, 2) int32 (row, col) corners, each uniform in [0, 2 * pad], of the crops that
    `random_crop` takes from the padded images: (pad, pad) is the image itself."""
    return jax.random.randint(rng, (batch, 2), 0, 2 * pad + 1, jnp.int32)


def pad_images(images: jax.Array, pad: int, mode: str = "reflect") -> jax.Array:
    """Pads height and width by `pad` pixels on each side: mirrored without repeating the
    edge ("reflect", as np.pad and torchvision do) or with zeros ("zero")."""
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jnp.pad(images, widths, mode="reflect" if mode == "reflect" else "constant")


def crop_at(images: jax.Array, offsets: jax.Array, pad: int, mode: str = "reflect") -> jax.Array:
    """Each image padded by `pad` (`pad_images`), then cropped back to its size with its
    top-left corner at `offsets[b]` (row, col) of the padded image."""
    padded = pad_images(images, pad, mode)
    size = images.shape[1:]
    return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), size))(
        padded, offsets
    )


def random_crop(images: jax.Array, rng: jax.Array, pad: int, mode: str = "reflect") -> jax.Array:
    """Pads each image by `pad` pixels and crops it back to its size at a random offset:
    a random shift of up to `pad` pixels per axis, the gap filled by `mode`."""
    return crop_at(images, crop_offsets(rng, images.shape[0], pad), pad, mode)


def flip_mask(rng: jax.Array, batch: int) -> jax.Array:
    """(B,) bool: which images to flip, each with probability 0.5."""
    return jax.random.bernoulli(rng, 0.5, (batch,))


def flip(images: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """The images where `mask` is set mirrored along `axis` (1: upside down, 2: left-right)."""
    return jnp.where(mask[:, None, None, None], jnp.flip(images, axis), images)


def validate(
    rotation: float = 0.0,
    translation: float = 0.0,
    scale: float = 0.0,
    elastic: float = 0.0,
    noise: float = 0.0,
    elastic_sigma: float = ELASTIC_SIGMA,
    crop: int = 0,
    crop_mode: str = "reflect",
    flip_horizontal: bool = False,
    flip_vertical: bool = False,
) -> None:
    """Raises ValueError for a setting that cannot work."""
    for name, value in zip(AUGMENTATIONS, (rotation, translation, scale, elastic, noise)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"augment.{name} must be a number >= 0, got {value!r}")
    if scale >= 1:
        raise ValueError(f"augment.scale is a relative zoom and must be < 1, got {scale}")
    if not isinstance(elastic_sigma, (int, float)) or not elastic_sigma > 0:
        raise ValueError(f"augment.elastic_sigma must be a number > 0, got {elastic_sigma!r}")
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 0:
        raise ValueError(f"augment.crop must be a whole number of pixels >= 0, got {crop!r}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"augment.crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    for name, value in (("flip_horizontal", flip_horizontal), ("flip_vertical", flip_vertical)):
        if not isinstance(value, bool):
            raise ValueError(f"augment.{name} must be True or False, got {value!r}")


def augment(
    images: jax.Array,
    rng: jax.Array,
    *,
    rotation: float = 0.0,
    translation: float = 0.0,
    scale: float = 0.0,
    elastic: float = 0.0,
    noise: float = 0.0,
    elastic_sigma: float = ELASTIC_SIGMA,
    crop: int = 0,
    crop_mode: str = "reflect",
    flip_horizontal: bool = False,
    flip_vertical: bool = False,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> jax.Array:
    """Randomly transforms each image of a (B, H, W, C) batch in [0, 1].

    crop: pad by this many pixels ("reflect": mirrored, "zero": zeros, `crop_mode`) and crop
        back to the image's size at a uniform random offset: a shift of up to `crop` pixels.
    flip_horizontal, flip_vertical: mirror each image left-right / upside down with
        probability 0.5.
    rotation: the largest angle in degrees; each image turns by uniform(-rotation, rotation).
    translation: the largest shift per axis in pixels, or as a fraction of the height and
        width when below 1; each axis moves by uniform(-max, max).
    scale: the largest relative zoom; each image is zoomed by uniform(1 - scale, 1 + scale).
    elastic: the strength (alpha, in pixels) of a smooth random displacement of each pixel
        (`elastic_displacements`, smoothed over `elastic_sigma` pixels), added to the affine
        transform's.
    noise: the standard deviation of Gaussian noise added to every pixel.
    mean, std: per-channel standardisation of `images` (`preprocess.to_model_input`), undone
        before and redone after augmenting; None: the images are in [0, 1].

    The settings are Python values (compiled in). Rotation, translation, scale, elastic and
    noise clip the result to [0, 1]; with every setting off it is `images` itself.
    """
    settings = dict(
        rotation=rotation,
        translation=translation,
        scale=scale,
        elastic=elastic,
        noise=noise,
        elastic_sigma=elastic_sigma,
        crop=crop,
        crop_mode=crop_mode,
        flip_horizontal=flip_horizontal,
        flip_vertical=flip_vertical,
    )
    validate(**settings)
    if not enabled(settings):
        return images
    images = preprocess.from_model_input(images, mean, std)
    images = _augment(images, rng, **settings)
    return images if mean is None else preprocess.to_model_input(images, mean, std)


@functools.partial(
    jax.jit, static_argnames=("crop", "crop_mode", "elastic_sigma") + AUGMENTATIONS + SWITCHES[1:]
)
def _augment(
    images: jax.Array,
    rng: jax.Array,
    rotation: float,
    translation: float,
    scale: float,
    elastic: float,
    noise: float,
    elastic_sigma: float,
    crop: int,
    crop_mode: str,
    flip_horizontal: bool,
    flip_vertical: bool,
) -> jax.Array:
    batch, height, width = images.shape[:3]
    if crop or flip_horizontal or flip_vertical:
        crop_rng, horizontal_rng, vertical_rng = crop_flip_keys(rng)
        if crop:
            if crop_mode == "reflect" and crop >= min(height, width):
                raise ValueError(
                    f"augment.crop={crop} with reflect padding needs images larger than "
                    f"{crop} pixels, got {height}x{width}"
                )
            images = random_crop(images, crop_rng, crop, crop_mode)
        if flip_horizontal:
            images = flip(images, flip_mask(horizontal_rng, batch), axis=2)
        if flip_vertical:
            images = flip(images, flip_mask(vertical_rng, batch), axis=1)
    rot_rng, shift_rng, zoom_rng, noise_rng = jax.random.split(rng, 4)
    if rotation or translation or scale or elastic:
        angles = jax.random.uniform(rot_rng, (batch,), minval=-1.0, maxval=1.0) * rotation
        zooms = 1.0 + jax.random.uniform(zoom_rng, (batch,), minval=-1.0, maxval=1.0) * scale
        max_shift = jnp.full((2,), translation, jnp.float32)
        if translation < 1:
            max_shift = translation * jnp.array([height, width], jnp.float32)
        shifts = jax.random.uniform(shift_rng, (batch, 2), minval=-1.0, maxval=1.0) * max_shift
        displacements = None
        if elastic:  # Its own subkey (folded with 2): the affine draws stay as they are.
            elastic_rng = jax.random.fold_in(rng, 2)
            displacements = elastic_displacements(
                elastic_rng, (batch, height, width), elastic, elastic_sigma
            )
        images = affine_transform(images, sampling_matrices(angles, zooms, shifts), displacements)
        # Bilinear weights can sum to a hair over 1 in float32.
        images = jnp.clip(images, 0.0, 1.0)
    if noise:
        gaussian = jax.random.normal(noise_rng, images.shape, jnp.float32)
        images = jnp.clip(images + noise * gaussian, 0.0, 1.0).astype(images.dtype)
    return images


def augment_batch(batch: dict, rng: jax.Array, **settings: Any) -> dict:
    """`batch` with its "image" augmented; every other entry ("label", "mask") unchanged."""
    return {**batch, "image": augment(batch["image"], rng, **settings)}


def from_config(config: Any) -> dict[str, Any]:
    """The settings in `config.augment`, as `augment`'s keyword arguments, with the
    resolved `config.normalize` as `mean` and `std` (None when off). Settings missing from a
    saved config read as off."""
    augment_config = config.augment
    settings = {name: float(augment_config.get(name, 0.0)) for name in AUGMENTATIONS}
    settings["elastic_sigma"] = float(augment_config.get("elastic_sigma", ELASTIC_SIGMA))
    settings["crop"] = augment_config.get("crop", 0)
    settings["crop_mode"] = augment_config.get("crop_mode", "reflect")
    for name in SWITCHES[1:]:
        settings[name] = augment_config.get(name, False)
    validate(**settings)
    normalization = preprocess.from_config(config)
    settings["mean"] = None if normalization is None else normalization.mean
    settings["std"] = None if normalization is None else normalization.std
    return settings


def enabled(settings: dict[str, Any]) -> bool:
    """Whether any augmentation is on (`crop_mode`, `mean` and `std` turn none on)."""
    return any(settings.get(name) for name in AUGMENTATIONS + SWITCHES)
