"""Data augmentation: identity when off, geometry against references, determinism, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import default_config
from flaxcnn.data import augment, preprocess

ALL_ON = dict(rotation=15.0, translation=0.1, scale=0.1, elastic=34.0, noise=0.05)


def random_images(batch=8, height=28, width=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random((batch, height, width, channels), np.float32))


def blob_images(batch=4, size=28, centre=(13.0, 14.0), sigma=2.5):
    """Gaussian blobs well inside the frame, so shifts of a few pixels lose no mass."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    blob = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
    return jnp.asarray(np.broadcast_to(blob[None, :, :, None], (batch, size, size, 1)), jnp.float32)


def centre_of_mass(images):
    images = np.asarray(images)[..., 0]
    rows, cols = np.meshgrid(*map(np.arange, images.shape[1:]), indexing="ij")
    mass = images.sum(axis=(1, 2))
    return np.stack(
        [(images * rows).sum(axis=(1, 2)) / mass, (images * cols).sum(axis=(1, 2)) / mass], -1
    )


def test_all_strengths_zero_return_the_input_itself():
    images = random_images()
    assert augment.augment(images, jax.random.key(0)) is images
    zeros = dict(rotation=0, translation=0, scale=0, noise=0)
    assert augment.augment(images, jax.random.key(0), **zeros) is images
    assert not augment.enabled(zeros) and augment.enabled({**zeros, "noise": 0.1})


@pytest.mark.parametrize("name", augment.AUGMENTATIONS)
def test_each_augmentation_alone_changes_the_images(name):
    images = random_images()
    out = augment.augment(images, jax.random.key(0), **{name: ALL_ON[name]})
    assert float(jnp.max(jnp.abs(out - images))) > 0.05


def test_turning_on_noise_keeps_the_geometric_draws():
    images, rng = random_images(), jax.random.key(0)
    geometric = augment.augment(images, rng, rotation=15.0, translation=2.0)
    noisy = augment.augment(images, rng, rotation=15.0, translation=2.0, noise=0.01)
    # Only the noise differs: small everywhere, not a different rotation or shift.
    assert 0 < float(jnp.max(jnp.abs(noisy - geometric))) < 0.06


def test_elastic_fields_are_smooth_random_displacements_of_the_strength_asked():
    fields = augment.elastic_displacements(jax.random.key(0), (64, 28, 28), 34.0, 4.0)
    assert fields.shape == (64, 2, 28, 28)
    np.testing.assert_array_equal(
        fields, augment.elastic_displacements(jax.random.key(0), (64, 28, 28), 34.0, 4.0)
    )
    # Uniform noise of variance 1/3 smoothed by a 2-D Gaussian of unit mass keeps
    # 1 / (4 pi sigma^2) of it away from the border: alpha * 0.041 pixels at sigma 4.
    inner = np.asarray(fields)[:, :, 10:18, 10:18]
    assert np.std(inner) == pytest.approx(34.0 * np.sqrt(1 / 3 / (4 * np.pi * 16)), rel=0.25)
    # Smooth: neighbours move alike, unlike the noise they come from.
    steps = np.abs(np.diff(np.asarray(fields), axis=-1)).mean()
    assert steps < 0.2 * np.abs(np.asarray(fields)).mean()
    np.testing.assert_allclose(augment.gaussian_blur_matrix(28, 4.0).sum(axis=1), 1, rtol=1e-6)


def test_elastic_moves_pixels_by_its_fields_and_keeps_the_affine_draws():
    images, rng = blob_images(), jax.random.key(0)
    affine = augment.augment(images, rng, rotation=15.0, translation=2.0)
    both = augment.augment(images, rng, rotation=15.0, translation=2.0, elastic=2.0)
    # A mild field moves the blob a little from where the same rotation and shift put it.
    moved = np.abs(centre_of_mass(both) - centre_of_mass(affine))
    assert 0 < moved.max() < 1.0
    # A uniform field of (1, -2) pixels is a translation by (-1, 2).
    field = jnp.broadcast_to(jnp.array([1.0, -2.0])[None, :, None, None], (4, 2, 28, 28))
    identity = augment.sampling_matrices(jnp.zeros(4), jnp.ones(4), jnp.zeros((4, 2)))
    shifted = augment.affine_transform(images, identity, field)
    np.testing.assert_allclose(
        centre_of_mass(shifted), centre_of_mass(images) + np.array([-1.0, 2.0]), atol=1e-3
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtype_and_range_hold(channels):
    images = random_images(channels=channels, height=20, width=24)
    out = augment.augment(images, jax.random.key(0), **ALL_ON)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(jnp.max(jnp.abs(out - images))) > 0.1


def test_same_key_same_output_different_keys_differ():
    images = random_images()
    a = augment.augment(images, jax.random.key(1), **ALL_ON)
    b = augment.augment(images, jax.random.key(1), **ALL_ON)
    c = augment.augment(images, jax.random.key(2), **ALL_ON)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 0.1


def test_images_of_a_batch_get_different_transforms():
    images = jnp.broadcast_to(random_images(batch=1), (4, 28, 28, 1))
    out = augment.augment(images, jax.random.key(0), rotation=30.0)
    assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 0.1


def test_jit_equals_eager():
    images, rng = random_images(), jax.random.key(3)
    jitted = jax.jit(functools.partial(augment.augment, **ALL_ON))
    np.testing.assert_allclose(
        jitted(images, rng), augment.augment(images, rng, **ALL_ON), atol=1e-5
    )


@pytest.mark.parametrize("angle, turns", [(90, 1), (180, 2), (-90, 3), (270, 3)])
def test_rotation_by_quarter_turns_matches_np_rot90(angle, turns):
    images = random_images(batch=2, channels=3)
    rotated = augment.rotate(images, jnp.full((2,), angle))
    expected = np.rot90(np.asarray(images), k=turns, axes=(1, 2))
    np.testing.assert_allclose(rotated, expected, atol=1e-5)


def test_rotation_by_zero_and_identity_matrices_are_exact():
    images = random_images()
    np.testing.assert_array_equal(augment.rotate(images, 0.0), images)
    identity = jnp.broadcast_to(jnp.eye(2, 3), (8, 2, 3))
    np.testing.assert_array_equal(augment.affine_transform(images, identity), images)


def test_rotation_is_about_the_centre():
    images = blob_images(centre=(13.5, 13.5))
    rotated = augment.rotate(images, jnp.array([10.0, 45.0, 130.0, -70.0]))
    np.testing.assert_allclose(centre_of_mass(rotated), 13.5, atol=1e-3)


@pytest.mark.parametrize("shift", [(3.0, -2.0), (-1.5, 2.25), (0.0, 4.0)])
def test_translation_moves_the_centre_of_mass_by_the_shift(shift):
    images = blob_images()
    moved = augment.translate(images, jnp.array(shift))
    np.testing.assert_allclose(
        centre_of_mass(moved) - centre_of_mass(images), np.broadcast_to(shift, (4, 2)), atol=1e-3
    )


def test_integer_translation_shifts_pixels_and_fills_zeros():
    images = random_images(batch=1)
    moved = np.asarray(augment.translate(images, jnp.array([2.0, -3.0])))[0, ..., 0]
    source = np.asarray(images)[0, ..., 0]
    np.testing.assert_allclose(moved[2:, :-3], source[:-2, 3:], atol=1e-6)
    assert np.all(moved[:2] == 0) and np.all(moved[:, -3:] == 0)


@pytest.mark.parametrize("translation, limit", [(3.0, 3.0), (0.1, 2.8)])
def test_random_translation_stays_within_its_limit(translation, limit):
    images = blob_images(batch=64)
    moved = augment.augment(images, jax.random.key(0), translation=translation)
    shifts = centre_of_mass(moved) - centre_of_mass(images)
    assert np.all(np.abs(shifts) <= limit + 1e-3)
    assert np.max(np.abs(shifts)) > 0.6 * limit  # The draws spread over the range.


def test_zoom_scales_the_content_about_the_centre():
    images = blob_images(centre=(13.5, 13.5), sigma=2.5)
    matrices = augment.sampling_matrices(jnp.zeros(4), jnp.full((4,), 1.5), jnp.zeros((4, 2)))
    zoomed = augment.affine_transform(images, matrices)
    # A Gaussian blob zoomed by 1.5 is the blob with 1.5x its width (up to the bilinear
    # interpolation's error, a few percent of the peak).
    expected = blob_images(centre=(13.5, 13.5), sigma=1.5 * 2.5)
    np.testing.assert_allclose(zoomed, expected, atol=0.04)
    assert float(jnp.max(jnp.abs(zoomed - images))) > 0.2


def test_noise_has_the_requested_standard_deviation():
    images = jnp.full((16, 28, 28, 1), 0.5, jnp.float32)
    out = augment.augment(images, jax.random.key(0), noise=0.05)
    np.testing.assert_allclose(float(jnp.std(out)), 0.05, rtol=0.05)
    np.testing.assert_allclose(float(jnp.mean(out)), 0.5, atol=0.005)


def test_noise_is_clipped_to_the_unit_range():
    images = jnp.concatenate([jnp.zeros((2, 8, 8, 1)), jnp.ones((2, 8, 8, 1))])
    out = augment.augment(images, jax.random.key(0), noise=0.5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_augment_batch_changes_images_and_keeps_labels_and_mask():
    batch = {
        "image": random_images(),
        "label": jnp.arange(8, dtype=jnp.int32),
        "mask": jnp.ones(8, bool),
    }
    out = jax.jit(functools.partial(augment.augment_batch, **ALL_ON))(batch, jax.random.key(0))
    assert set(out) == set(batch)
    np.testing.assert_array_equal(out["label"], batch["label"])
    np.testing.assert_array_equal(out["mask"], batch["mask"])
    assert float(jnp.max(jnp.abs(out["image"] - batch["image"]))) > 0.1


def test_from_config_reads_the_strengths():
    config = default_config.get_config()
    off = augment.from_config(config)
    assert off == {
        **dict.fromkeys(augment.AUGMENTATIONS, 0.0),
        "elastic_sigma": 4.0,
        "crop": 0,
        "crop_mode": "reflect",
        "flip_horizontal": False,
        "flip_vertical": False,
        "mean": None,
        "std": None,
    }
    assert not augment.enabled(off)
    config.augment.rotation = 10.0
    config.augment.noise = 0.1
    strengths = augment.from_config(config)
    assert strengths["rotation"] == 10.0 and strengths["noise"] == 0.1
    assert augment.enabled(strengths)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"rotation": -1.0}, "rotation"),
        ({"noise": -0.1}, "noise"),
        ({"scale": 1.0}, "scale"),
        ({"elastic": -1.0}, "elastic"),
        ({"elastic_sigma": 0.0}, "elastic_sigma"),
        ({"crop": -2}, "crop"),
        ({"crop_mode": "wrap"}, "crop_mode"),
    ],
)
def test_bad_strengths_raise_value_error(settings, message):
    config = default_config.get_config()
    config.augment.update(settings)
    with pytest.raises(ValueError, match=message):
        augment.from_config(config)
    with pytest.raises(ValueError, match=message):
        augment.augment(random_images(), jax.random.key(0), **settings)


# --- Random crop and flips ---------------------------------------------------------------

CROP_FLIP = dict(crop=3, flip_horizontal=True, flip_vertical=True)


def numpy_crop(images, offsets, pad, mode):
    """The reference: np.pad, then a slice at each image's offset."""
    images = np.asarray(images)
    height, width = images.shape[1:3]
    padded = np.pad(
        images,
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
        mode="reflect" if mode == "reflect" else "constant",
    )
    return np.stack(
        [p[r : r + height, c : c + width] for p, (r, c) in zip(padded, np.asarray(offsets))]
    )


@pytest.mark.parametrize("mode", augment.CROP_MODES)
@pytest.mark.parametrize("pad", [1, 4])
def test_random_crop_matches_numpy_at_the_offsets_drawn(mode, pad):
    images, rng = random_images(batch=16, height=10, width=12, channels=3), jax.random.key(5)
    out = augment.augment(images, rng, crop=pad, crop_mode=mode)
    crop_rng = augment.crop_flip_keys(rng)[0]
    offsets = augment.crop_offsets(crop_rng, 16, pad)
    np.testing.assert_array_equal(out, numpy_crop(images, offsets, pad, mode))
    # The draws cover both extremes and the middle of [0, 2 * pad].
    drawn = set(np.asarray(augment.crop_offsets(rng, 512, pad)).ravel().tolist())
    assert drawn == set(range(2 * pad + 1))


def test_a_crop_moves_a_known_pixel_by_pad_minus_the_offset():
    pad, (row, col) = 4, (10, 20)
    images = np.zeros((8, 32, 32, 1), np.float32)
    images[:, row, col] = 1.0
    rng = jax.random.key(1)
    out = np.asarray(augment.augment(jnp.asarray(images), rng, crop=pad, crop_mode="zero"))
    offsets = np.asarray(augment.crop_offsets(augment.crop_flip_keys(rng)[0], 8, pad))
    for image, (r, c) in zip(out[..., 0], offsets):
        assert image.sum() == 1.0 and image[row + pad - r, col + pad - c] == 1.0
    assert len({tuple(o) for o in offsets}) > 1  # Each image its own offset.


def test_flips_match_numpy_exactly():
    images, rng = random_images(batch=32, channels=3), jax.random.key(2)
    _, horizontal_rng, vertical_rng = augment.crop_flip_keys(rng)
    left_right = np.asarray(augment.flip_mask(horizontal_rng, 32))
    upside_down = np.asarray(augment.flip_mask(vertical_rng, 32))
    assert 0 < left_right.sum() < 32 and 0 < upside_down.sum() < 32
    x = np.asarray(images)
    expected = np.where(left_right[:, None, None, None], x[:, :, ::-1], x)
    np.testing.assert_array_equal(augment.augment(images, rng, flip_horizontal=True), expected)
    expected = np.where(upside_down[:, None, None, None], expected[:, ::-1], expected)
    both = augment.augment(images, rng, flip_horizontal=True, flip_vertical=True)
    np.testing.assert_array_equal(both, expected)


def test_flip_probability_is_one_half():
    flips = np.asarray(augment.flip_mask(jax.random.key(0), 10_000))
    assert abs(flips.mean() - 0.5) < 0.02


def test_crop_and_flips_same_key_same_output_and_jit_equals_eager():
    images, rng = random_images(channels=3), jax.random.key(4)
    eager = augment.augment(images, rng, **CROP_FLIP)
    np.testing.assert_array_equal(eager, augment.augment(images, rng, **CROP_FLIP))
    jitted = jax.jit(functools.partial(augment.augment, **CROP_FLIP))(images, rng)
    np.testing.assert_array_equal(jitted, eager)
    other = augment.augment(images, jax.random.key(5), **CROP_FLIP)
    assert float(jnp.max(jnp.abs(other - eager))) > 0.1


def test_crop_and_flips_leave_the_other_augmentations_draws_alone():
    """Turning flips on does not change what the noise draws: on flip-symmetric images the
    result is the same either way."""
    images, rng = random_images(), jax.random.key(0)
    symmetric = (images + images[:, :, ::-1] + images[:, ::-1] + images[:, ::-1, ::-1]) / 4
    before = augment.augment(symmetric, rng, noise=0.05)
    with_flips = augment.augment(
        symmetric, rng, noise=0.05, flip_horizontal=True, flip_vertical=True
    )
    np.testing.assert_allclose(with_flips, before, atol=1e-6)
    assert float(jnp.max(jnp.abs(before - symmetric))) > 0.05


@pytest.mark.parametrize(
    "settings", [{"flip_vertical": 1}, {"crop": 2.0}, {"crop": True}, {"flip_horizontal": "no"}]
)
def test_crop_and_flip_settings_of_the_wrong_type_raise_value_error(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        augment.augment(random_images(), jax.random.key(0), **settings)


def test_reflect_crop_larger_than_the_image_is_an_error():
    with pytest.raises(ValueError, match="crop=8"):
        augment.augment(random_images(height=8, width=8), jax.random.key(0), crop=8)


@pytest.mark.parametrize("settings", [CROP_FLIP, ALL_ON, {**CROP_FLIP, **ALL_ON}])
def test_normalised_images_are_augmented_as_their_unit_range_originals(settings):
    """With mean and std, the batch is standardised; augmenting it equals standardising
    the augmented [0, 1] images."""
    mean, std = (0.2, 0.5, 0.7), (0.1, 0.25, 0.3)
    images, rng = random_images(channels=3), jax.random.key(6)
    normalised = preprocess.to_model_input(images, mean, std)
    out = augment.augment(normalised, rng, **settings, mean=mean, std=std)
    expected = preprocess.to_model_input(augment.augment(images, rng, **settings), mean, std)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    assert augment.augment(normalised, rng, mean=mean, std=std) is normalised


def test_from_config_reads_crop_flips_and_the_resolved_normalisation():
    config = default_config.get_config()
    config.augment.update(crop=4, crop_mode="zero", flip_horizontal=True)
    config.normalize = ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    settings = augment.from_config(config)
    assert settings["crop"] == 4 and settings["crop_mode"] == "zero"
    assert settings["flip_horizontal"] and not settings["flip_vertical"]
    assert settings["mean"] == (0.5, 0.4, 0.3) and settings["std"] == (0.2, 0.2, 0.2)
    config.normalize = "dataset"  # Not resolved yet: no numbers to use.
    with pytest.raises(ValueError, match="dataset"):
        augment.from_config(config)


def test_from_config_of_a_config_saved_before_crops_and_flips():
    import ml_collections

    config = ml_collections.ConfigDict(
        {"augment": dict(rotation=1.0, translation=0.0, scale=0.0, noise=0.0)}
    )
    settings = augment.from_config(config)
    assert settings["crop"] == 0 and not settings["flip_horizontal"]
    assert settings["mean"] is None
