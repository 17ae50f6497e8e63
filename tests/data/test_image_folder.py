"""Image folders as datasets: layouts, deterministic stratified slicing, colour and size
conversion, clear errors, and RGB images trained end to end through the loop."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from flaxcnn import inference
from flaxcnn.cli import evaluate, predict
from flaxcnn.data import image_folder, input_pipeline
from flaxcnn.runner import loop

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


@pytest.fixture(scope="session")
def folder_config(tiny_config):
    def folder_config(name: str, **overrides):
        return tiny_config(
            data_dir=None,
            dataset=name,
            num_train_steps=6,
            batch_size=8,
            eval_batch_size=8,
            log_every_steps=3,
            **overrides,
        )

    return folder_config


@pytest.mark.slow
def test_rgb_folder_trains_evaluates_and_predicts_end_to_end(tmp_path, folder_config):
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
    # The same file computed independently: decoded and resized by PIL as the training images
    # were, through the model; the ranking, names, indices and probabilities must match.
    pixels = Image.open(image).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    model_input = inference.checked_model_input(
        np.asarray(pixels)[None], getattr(run, "mean", None), getattr(run, "std", None)
    )
    logits = run.apply_fn(run.variables, model_input, train=False)
    probabilities = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probabilities)
    top = predictions[0]["top_k"]
    assert [c["index"] for c in top] == order.tolist()
    assert [c["class"] for c in top] == [CLASSES[i] for i in order]
    np.testing.assert_allclose([c["probability"] for c in top], probabilities[order], rtol=1e-5)


@pytest.mark.parametrize(
    "color_mode, channels",
    [("rgb", 3), pytest.param("grayscale", 1, marks=pytest.mark.slow)],  # A training each.
)
def test_folder_of_three_sizes_trains_with_image_size_and_color_mode(
    tmp_path, color_mode, channels, folder_config
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


# --- Bad data and files ---------------------------------------------------------------------


def awkward_folder(root) -> str:
    """A flat folder of 2 classes holding what real folders hold besides plain PNGs."""
    horizontal, vertical = root / CLASSES[0], root / CLASSES[1]
    for folder in (horizontal, vertical, root / ".ipynb_checkpoints" / "x"):
        folder.mkdir(parents=True)
    save(stripes(0, (16, 16), 0), horizontal / "a.PNG", "RGB")  # Upper-case extensions.
    save(stripes(0, (16, 16), 1), horizontal / "b.JPG", "RGB")
    (horizontal / "2024").mkdir()  # Nested folders count.
    save(stripes(0, (16, 16), 2), horizontal / "2024" / "c.png", "L")
    # CMYK JPEG and 16-bit grayscale PNG.
    Image.fromarray(stripes(1, (16, 16), 3)).convert("CMYK").save(vertical / "cmyk.jpg")
    deep = stripes(1, (16, 16), 4)[..., 0].astype(np.uint16) * 257
    Image.fromarray(deep).save(vertical / "deep.png")
    # An EXIF-rotated photo: horizontal stripes stored, with a tag asking for a quarter turn.
    exif = Image.Exif()
    exif[image_folder.ORIENTATION_TAG] = 6  # Rotate 90 degrees clockwise to display.
    Image.fromarray(stripes(0, (16, 16), 5)).save(vertical / "rotated.jpg", exif=exif)
    # Ignored: hidden files and folders, other files.
    (horizontal / ".DS_Store").write_bytes(b"\0\1")
    (horizontal / "._a.png").write_bytes(b"AppleDouble")
    save(stripes(0, (16, 16), 6), root / ".ipynb_checkpoints" / "x" / "d.png", "RGB")
    (vertical / "notes.txt").write_text("not an image")
    (vertical / "Thumbs.db").write_bytes(b"\0" * 10)
    return f"folder:{root}"


def test_awkward_folder_loads_what_is_documented(tmp_path):
    split = input_pipeline.load_split(awkward_folder(tmp_path), "train")
    assert split.class_names == list(CLASSES)  # Not the hidden folder.
    np.testing.assert_array_equal(np.bincount(split.labels), [3, 3])
    assert split.images.shape == (6, 16, 16, 3)
    by_file = {
        name: image_folder.to_array(image_folder.open_image(str(tmp_path / name)), (16, 16, 3))
        for name in ("vertical/cmyk.jpg", "vertical/deep.png", "vertical/rotated.jpg")
    }
    images = {x.tobytes() for x in split.images}
    assert all(x.tobytes() in images for x in by_file.values())
    # The 16-bit image keeps its stripes (scaled, not clipped to white).
    assert len(np.unique(by_file["vertical/deep.png"])) > 1
    # The EXIF turn is applied: horizontal stripes stored, vertical ones seen (columns even).
    rotated = by_file["vertical/rotated.jpg"].astype(float).mean(-1)
    assert rotated.var(axis=1).mean() > 100 * rotated.var(axis=0).mean()


def test_exif_rotated_photo_of_another_shape_is_measured_as_shown(tmp_path):
    exif = Image.Exif()
    exif[image_folder.ORIENTATION_TAG] = 8
    path = tmp_path / "tall.jpg"
    Image.fromarray(stripes(0, (8, 16), 0)).save(path, exif=exif)  # Stored 8 high, 16 wide.
    image = image_folder.open_image(str(path))
    assert image_folder.oriented_size(image) == (16, 8)
    assert image_folder.to_array(image, (16, 8, 1)).shape == (16, 8, 1)


def test_empty_class_and_a_class_missing_from_the_test_split(tmp_path):
    name = make_folder(tmp_path, per_class=4, splits=("train", "test"))
    for path in (tmp_path / "test" / CLASSES[1]).iterdir():
        path.unlink()  # An empty class folder in test ...
    test = input_pipeline.load_split(name, "test")
    assert test.class_names == list(CLASSES) and test.labels.tolist() == [0] * 4
    (tmp_path / "test" / CLASSES[1]).rmdir()  # ... or none at all.
    test = input_pipeline.load_split(name, "test")
    assert test.num_classes == 2 and test.labels.tolist() == [0] * 4


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "text"])
def test_broken_image_is_one_error_naming_it(tmp_path, damage):
    name = make_folder(tmp_path, per_class=2, splits=[None])
    bad = tmp_path / CLASSES[1] / "000.png"
    data = bad.read_bytes()
    bad.write_bytes({"zero bytes": b"", "truncated": data[: len(data) // 2], "text": b"hi"}[damage])
    with pytest.raises(input_pipeline.DataError, match=f"^{bad}: not (an|a readable) image") as e:
        input_pipeline.load_split(name, "train")
    assert "\n" not in str(e.value)


@pytest.fixture(scope="session")
def tiny_run(tiny_config):
    def tiny_run(image_shape=(16, 16, 3)) -> inference.Run:
        """An untrained classifier of CLASSES as a Run, without a workdir."""
        from flaxcnn.tasks import classification

        config = tiny_config(data_dir=None, model="SeedCNN")
        state = classification.create_state(config, jax.random.key(0), image_shape, 2, 10)
        return inference.Run("unused", config, state, image_shape, 2, list(CLASSES), 0, "latest")

    return tiny_run


@pytest.mark.slow
def test_predict_on_directories_gifs_bombs_and_failures(tmp_path, monkeypatch, tiny_run):
    run = tiny_run()
    awkward_folder(tmp_path / "photos")
    gif = tmp_path / "animated.gif"
    frames = [Image.fromarray(stripes(i % 2, (20, 20), i)).convert("P") for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (200, 200)).save(bomb)  # 40,000 pixels: a bomb under the limit set below.
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)  # Warning at 15k, error at 30k.
    paths = [str(tmp_path / "photos"), str(gif), str(bomb), str(tmp_path / "empty")]
    paths.append(str(tmp_path / "missing.png"))
    predictions, errors = predict.predict_files(run, paths, k=1)
    predicted = [p["path"] for p in predictions]
    assert len(predicted) == 7 and predicted[-1] == str(gif)  # The folder's 6 images, the GIF.
    first_frame = np.asarray(frames[0].convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    expected = run.predict_proba(first_frame[None])[0].max()
    assert predictions[-1]["top_k"][0]["probability"] == pytest.approx(float(expected))
    assert set(errors) == {str(bomb), str(tmp_path / "empty"), str(tmp_path / "missing.png")}
    assert "decompression bomb" in errors[str(bomb)]
    assert "no image files" in errors[str(tmp_path / "empty")]
    assert all("\n" not in message for message in errors.values())

    Image.new("1", (100, 100)).save(bomb)  # 10,000 pixels: under the limit, predicted.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # Between 1x and 2x: PIL only warns.
    assert set(predict.predict_files(run, [str(bomb)], k=1)[1]) == {str(bomb)}


def test_predict_command_when_every_file_fails(tmp_path, monkeypatch, capsys, tiny_run):
    monkeypatch.setattr(predict, "load_run", lambda *args, **kwargs: tiny_run())
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.txt").write_text("text")
    status = predict.main(
        ["--workdir", "unused", "--json", str(tmp_path / "a.png"), str(tmp_path / "b.txt")]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert json.loads(captured.out)["predictions"] == []
    lines = captured.err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "error"]
    assert "Traceback" not in captured.err


def test_parallel_decoding_gives_the_serial_arrays_and_errors(tmp_path, monkeypatch):
    name = make_folder(tmp_path / "f", per_class=9, sizes=((16, 16), (12, 20)))
    monkeypatch.setenv(image_folder.WORKERS_ENV, "1")
    serial = image_folder.load_folder_split(name, "train", (16, 16), "rgb")
    monkeypatch.setenv(image_folder.WORKERS_ENV, "2")
    parallel = image_folder.load_folder_split(name, "train", (16, 16), "rgb")
    for a, b in zip(serial[:2], parallel[:2]):
        np.testing.assert_array_equal(a, b)
    # A worker's error reaches the caller as the one-line FolderError naming the file.
    with pytest.raises(image_folder.FolderError, match=r"differ in size .*set config.image_size"):
        image_folder.load_folder_split(name, "train")
    assert image_folder.decode_workers(10) == 2
    monkeypatch.delenv(image_folder.WORKERS_ENV)
    assert image_folder.decode_workers(image_folder.PARALLEL_FROM - 1) == 1
