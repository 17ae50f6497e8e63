"""Image folders as datasets: layouts, deterministic stratified slicing, colour and size
conversion, clear errors, and RGB images trained end to end through the loop."""

import json
import os

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from flaxcnn import inference
from flaxcnn.cli import evaluate, predict
from flaxcnn.data import image_folder, input_pipeline
from flaxcnn.training import loop

CLASSES = ("horizontal", "vertical")


def stripes(label: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """An RGB (H, W, 3) picture of coloured stripes, horizontal for class 0, vertical for 1."""
    height, width = size
    rng = np.random.default_rng(seed)
    lines = (np.arange(height if label == 0 else width) // 2) % 2
    mask = lines[:, None] if label == 0 else lines[None, :]
    mask = np.broadcast_to(mask, (height, width))
    color = rng.integers(128, 256, 3)
    return (mask[..., None] * color).astype(np.uint8)


def save(array: np.ndarray, path, mode: str) -> None:
    image = Image.fromarray(array)
    image = image.convert("P") if mode == "P" else image.convert(mode)
    image.save(path)


MODES = ("L", "RGB", "RGBA", "P")


def make_folder(root, per_class: int, sizes=((16, 16),), splits=("train",), seed=0) -> str:
    """`root/<split>/<class>/*.png` (or `root/<class>/` with splits=(None,)), cycling through
    colour modes and sizes."""
    count = 0
    for split in splits:
        for label, name in enumerate(CLASSES):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = sizes[i % len(sizes)]
                mode = MODES[i % len(MODES)]
                save(stripes(label, size, seed + count), folder / f"{i:03d}.png", mode)
                count += 1
    return f"folder:{root}"


def test_flat_folder_loads_converted_sorted_classes(tmp_path):
    name = make_folder(tmp_path, per_class=8, sizes=((12, 20), (30, 30), (16, 16)), splits=[None])
    split = input_pipeline.load_split(name, "train", image_size=(16, 16), color_mode="rgb")
    assert split.images.shape == (16, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.class_names == list(CLASSES) and split.num_classes == 2
    np.testing.assert_array_equal(np.bincount(split.labels), [8, 8])
    # Stripes survive the resize: class 0 varies down the rows, class 1 across the columns.
    gray = split.images.astype(float).mean(-1)
    across_columns, down_rows = gray.var(axis=2).mean(axis=1), gray.var(axis=1).mean(axis=1)
    np.testing.assert_array_equal(across_columns > down_rows, split.labels == 1)
    gray_split = input_pipeline.load_split(
        name, "train", image_size=(8, 10), color_mode="grayscale"
    )
    assert gray_split.images.shape == (16, 8, 10, 1)
    np.testing.assert_array_equal(gray_split.labels, split.labels)


def test_loading_is_deterministic_and_percent_slices_are_stratified_partitions(tmp_path):
    name = make_folder(tmp_path, per_class=10, splits=[None])
    whole = input_pipeline.load_split(name, "train")
    again = input_pipeline.load_split(name, "train")
    np.testing.assert_array_equal(whole.images, again.images)
    np.testing.assert_array_equal(whole.labels, again.labels)
    assert not np.array_equal(whole.labels[:10], np.sort(whole.labels[:10]))  # Shuffled.

    head = input_pipeline.load_split(name, "train[:70%]")
    tail = input_pipeline.load_split(name, "train[70%:]")
    np.testing.assert_array_equal(np.bincount(head.labels), [7, 7])
    np.testing.assert_array_equal(np.bincount(tail.labels), [3, 3])
    flat = lambda s: {x.tobytes() for x in s.images}  # noqa: E731
    assert flat(head) | flat(tail) == flat(whole) and not flat(head) & flat(tail)

    first = input_pipeline.load_split(name, "train[:5]")
    np.testing.assert_array_equal(first.images, whole.images[:5])
    joined = input_pipeline.load_split(name, "train[:5]+train[-3:]")
    np.testing.assert_array_equal(
        joined.labels, np.concatenate([whole.labels[:5], whole.labels[-3:]])
    )


def test_split_layout_and_its_errors(tmp_path):
    name = make_folder(tmp_path, per_class=4, splits=("train", "test"))
    test = input_pipeline.load_split(name, "test")
    assert test.num_examples == 8 and test.class_names == list(CLASSES)
    with pytest.raises(input_pipeline.DataError, match="has no split 'validation'"):
        input_pipeline.load_split(name, "validation")
    (tmp_path / "test" / "extra").mkdir()
    with pytest.raises(input_pipeline.DataError, match="class folders not in .*: extra"):
        input_pipeline.load_split(name, "test")


@pytest.mark.parametrize(
    "split, kwargs, message",
    [
        ("test", {}, "is flat .* its only split is 'train'; .* train\\[90%:\\]"),
        ("train", {}, "differ in size .* set config.image_size"),
        ("train[:50%:]", {}, "bad split"),
        ("train[:5%]", {}, "has no images"),
        ("train", {"color_mode": "cmyk"}, "unknown color_mode 'cmyk'"),
        ("train", {"image_size": (0, 4)}, "image_size must be"),
    ],
)
def test_bad_folder_settings_are_clear_errors(tmp_path, split, kwargs, message):
    name = make_folder(tmp_path, per_class=4, sizes=((16, 16), (8, 8)), splits=[None])
    with pytest.raises(input_pipeline.DataError, match=message):
        input_pipeline.load_split(name, split, **kwargs)


def test_unreadable_image_and_missing_folder_are_named(tmp_path):
    name = make_folder(tmp_path, per_class=2, splits=[None])
    bad = tmp_path / CLASSES[0] / "broken.png"
    bad.write_text("not a png")
    with pytest.raises(input_pipeline.DataError, match=f"{bad}: not an image"):
        input_pipeline.load_split(name, "train")
    with pytest.raises(input_pipeline.DataError, match="does not exist"):
        input_pipeline.load_split(f"folder:{tmp_path}/nope", "train")
    with pytest.raises(input_pipeline.DataError, match="image folder, not a tfds dataset"):
        input_pipeline.get_builder(name, None)


def test_to_array_converts_every_mode_as_pil_does(tmp_path):
    rgb = stripes(1, (6, 8), seed=3)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    for mode in ("RGB", "RGBA", "P", "L", "LA"):
        image = Image.fromarray(rgb).convert(mode)
        gray = image_folder.to_array(image, (6, 8, 1))
        color = image_folder.to_array(image, (6, 8, 3))
        assert gray.shape == (6, 8, 1) and color.shape == (6, 8, 3)
        expected = np.asarray(image.convert("L"))
        np.testing.assert_array_equal(gray[..., 0], expected)
        if mode in ("RGB", "RGBA"):
            np.testing.assert_array_equal(color, rgb)
            np.testing.assert_array_equal(gray[..., 0], luma)
    # 16-bit grayscale is scaled to 8 bits, not clipped at 255 as PIL's own conversion does.
    path = tmp_path / "deep.png"
    Image.fromarray(luma.astype(np.uint16) * 257).save(path)
    deep = image_folder.open_image(str(path))
    assert deep.mode.startswith("I")
    np.testing.assert_array_equal(image_folder.to_array(deep, (6, 8, 1))[..., 0], luma)
    resized = image_folder.to_array(Image.fromarray(rgb), (3, 4, 3))
    expected = np.asarray(Image.fromarray(rgb).resize((4, 3), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resized, expected)


def test_tfds_images_convert_with_the_same_options(data_dir):
    split = input_pipeline.load_split(
        "embedded_mnist", "test[:4]", data_dir, image_size=(14, 14), color_mode="rgb"
    )
    plain = input_pipeline.load_split("embedded_mnist", "test[:4]", data_dir)
    assert split.images.shape == (4, 14, 14, 3) and split.class_names[:3] == ["0", "1", "2"]
    expected = image_folder.to_array(Image.fromarray(plain.images[0, :, :, 0]), (14, 14, 3))
    np.testing.assert_array_equal(split.images[0], expected)


def folder_config(name: str, **overrides):
    return tiny_config(
        None,
        dataset=name,
        num_train_steps=6,
        batch_size=8,
        eval_batch_size=8,
        log_every_steps=3,
        **overrides,
    )


def test_rgb_folder_trains_evaluates_and_predicts_end_to_end(tmp_path):
    """Mixed colour modes (L, RGB, RGBA, P) of one size: read as RGB by default, trained
    through the loop, then restored, evaluated and used for prediction."""
    name = make_folder(tmp_path / "data", per_class=12, splits=("train", "test"))
    workdir = str(tmp_path / "run")
    results = loop.train_and_evaluate(folder_config(name), workdir)
    assert results["num_test_examples"] == 24 and results["steps"] == 6

    run = inference.load_run(workdir)
    assert run.image_shape == (16, 16, 3) and run.class_names == list(CLASSES)
    kernel = run.variables["params"]["Conv_0"]["kernel"]
    assert kernel.shape[2] == 3  # The CNN's first layer takes three channels.

    assert evaluate.main(["--workdir", workdir]) == 0
    with open(os.path.join(workdir, "eval_test.json")) as f:
        report = json.load(f)
    assert report["count"] == 24 and set(report["per_class_accuracy"]) == set(CLASSES)
    assert report["accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)

    image = tmp_path / "big.jpg"
    Image.fromarray(stripes(1, (64, 48), seed=99)).save(image)
    predictions, errors = predict.predict_files(run, [str(image)], k=2)
    assert not errors
    assert {c["class"] for c in predictions[0]["top_k"]} == set(CLASSES)


@pytest.mark.parametrize("color_mode, channels", [("rgb", 3), ("grayscale", 1)])
def test_folder_of_three_sizes_trains_with_image_size_and_color_mode(
    tmp_path, color_mode, channels
):
    sizes = ((12, 20), (30, 30), (16, 16))
    name = make_folder(tmp_path / "data", per_class=12, sizes=sizes, splits=("train", "test"))
    config = folder_config(name, image_size=(16, 16), color_mode=color_mode)
    workdir = str(tmp_path / "run")
    results = loop.train_and_evaluate(config, workdir)
    assert results["num_test_examples"] == 24
    run = inference.load_run(workdir)
    assert run.image_shape == (16, 16, channels)
    assert run.variables["params"]["Conv_0"]["kernel"].shape[2] == channels
