"""Export a trained classifier for serving without flaxcnn:

    python -m flaxcnn.export --workdir W --out DIR [--which latest|best] [--platforms cpu,cuda]

Both artifacts take uint8 images (B, H, W, C) with any batch size B, scale them to [0, 1]
and standardise them per channel (a run with `config.normalize`) as training did, and return
float32 class probabilities (B, num_classes) (the softmax of the model's logits):

- `DIR/model.stablehlo`: `jax.export` of the model with a symbolic batch dimension
  ("b, H, W, C"), serialized; the weights are constants inside it. Run it with
  `jax.export.deserialize(open(path, "rb").read()).call(images)`.
- `DIR/saved_model/`: a TensorFlow SavedModel made with `jax2tf.convert` (native
  serialization: the same StableHLO inside an XlaCallModule op, the weights as variables).
  Signature `serving_default`: `images` uint8 [None, H, W, C] -> `probabilities`; also the
  function `predict(images)`. Run it with `tf.saved_model.load(path)`.
- `DIR/export.json`: input shape, class names, checkpoint step and the preprocessing
  (with the normalisation's "mean" and "std", done inside the artifacts). An image reaches
  the artifacts as evaluation read it: `flaxcnn.inference.prepare_image(path,
  input_shape, export["input_crop"])` (the whole image resized, or, for a run with
  `config.input_crop="random_resized"`, its centre crop).

Both are lowered for `--platforms` (default cpu and cuda), so either runs on a CPU or an
NVIDIA GPU. Errors: `error: ...` on stderr, exit code 2.

A GAN or VAE run exports its generator instead: `DIR/generator.stablehlo` takes standard-
normal latents float32 (b, latent_dim) [and, for a class-conditional run, labels int32 (b,)]
and returns uint8 images (b, H, W, C), drawn with the weights `python -m flaxcnn.sample`
uses (a GAN's averaged generator and standing batch statistics); `DIR/export.json` says so.
"""

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import cpu
from flaxcnn.data import crops, input_pipeline, preprocess
from flaxcnn.inference import Run, load_config, load_run
from flaxcnn.tasks import get_task

STABLEHLO_FILE = "model.stablehlo"
GENERATOR_FILE = "generator.stablehlo"  # A GAN's or VAE's generator.
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "export.json"
SIGNATURE = "serving_default"
DEFAULT_PLATFORMS = ("cpu", "cuda")


def serving_fn(run: Run) -> Callable[[dict, jax.Array], jax.Array]:
    """(variables, uint8 images) -> probabilities: the model with its input scaling and
    normalisation (`preprocess.to_model_input`, the run's numbers compiled in)."""
    apply_fn = run.apply_fn

    def probabilities(variables: dict, images: jax.Array) -> jax.Array:
        x = preprocess.to_model_input(images, run.mean, run.std)
        with cpu.standard_layers():  # Exported programs run anywhere: no custom calls.
            return jax.nn.softmax(apply_fn(variables, x, train=False), axis=-1)

    return probabilities


def batch_polymorphic_shape(image_shape: Sequence[int]) -> str:
    height, width, channels = image_shape
    return f"b, {height}, {width}, {channels}"


def export_stablehlo(run: Run, platforms: Sequence[str] = DEFAULT_PLATFORMS):
    """The model as a `jax.export.Exported` taking uint8 images of any batch size."""
    fn = serving_fn(run)
    variables = run.variables
    spec = jax.ShapeDtypeStruct(
        jax.export.symbolic_shape(batch_polymorphic_shape(run.image_shape)), jnp.uint8
    )
    return jax.export.export(jax.jit(lambda images: fn(variables, images)), platforms=platforms)(
        spec
    )


def save_saved_model(run: Run, path: str, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
    """Writes the model as a TensorFlow SavedModel (see the module docstring)."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(
        serving_fn(run),
        polymorphic_shapes=[None, f"({batch_polymorphic_shape(run.image_shape)})"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    # Weights as variables (not graph constants), so any model size fits a SavedModel.
    module.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(np.asarray(x), trainable=False), run.variables
    )

    @tf.function(
        input_signature=[tf.TensorSpec([None, *run.image_shape], tf.uint8, name="images")],
        autograph=False,
    )
    def predict(images):
        return {"probabilities": converted(module.variables_tree, images)}

    module.predict = predict
    if os.path.exists(path):
        shutil.rmtree(path)
    tf.saved_model.save(module, path, signatures={SIGNATURE: predict})


def preprocessing_text(run: Run) -> str:
    """What is done to an image before and inside the artifacts, in words: the view of
    `crops.evaluation_view` (the run's `input_crop`), then the scaling and normalisation."""
    height, width, num_channels = run.image_shape
    convert = f"convert to {'L (grayscale)' if num_channels == 1 else 'RGB'} and resize to "
    convert += f"{height}x{width} with PIL BILINEAR"
    if run.input_crop == "random_resized":
        convert = (
            "apply the EXIF orientation; crop the centred box of "
            f"{crops.CENTRE_FRACTION:g} times the height and width of the largest box of "
            f"aspect ratio {height}:{width} that fits in the image (each side rounded, at "
            f"least 1 pixel); {convert} (flaxcnn.inference.prepare_image(path, "
            f"{tuple(run.image_shape)}, 'random_resized'))"
        )
    return (
        convert
        + "; the model scales uint8 to [0, 1] itself"
        + ("" if run.mean is None else " and standardises it by normalization's mean, std")
    )


def export_run(run: Run, out_dir: str, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes both artifacts and their metadata into `out_dir`; returns the metadata."""
    os.makedirs(out_dir, exist_ok=True)
    exported = export_stablehlo(run, platforms)
    with open(os.path.join(out_dir, STABLEHLO_FILE), "wb") as f:
        f.write(exported.serialize())
    save_saved_model(run, os.path.join(out_dir, SAVED_MODEL_DIR), platforms)
    metadata = {
        "workdir": os.path.abspath(run.workdir),
        "which": run.which,
        "step": run.step,
        "model": run.config.model,
        "input": {"dtype": "uint8", "shape": ["batch", *run.image_shape]},
        "output": {
            "name": "probabilities",
            "dtype": "float32",
            "shape": ["batch", run.num_classes],
        },
        "input_crop": run.input_crop,
        "preprocessing": preprocessing_text(run),
        "normalization": None if run.mean is None else {"mean": run.mean, "std": run.std},
        "class_names": run.class_names,
        "platforms": list(platforms),
        "stablehlo": STABLEHLO_FILE,
        "saved_model": SAVED_MODEL_DIR,
        "saved_model_signature": SIGNATURE,
        "jax_version": jax.__version__,
    }
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def export_generator(run: Run, platforms: Sequence[str] = DEFAULT_PLATFORMS):
    """A GAN's or VAE's generator as a `jax.export.Exported`: latents float32 (b, latent_dim)
    [and, conditional, labels int32 (b,)] -> uint8 images (b, H, W, C), for any batch size b,
    with the weights samples are drawn with (the task's `generator`) compiled in."""
    generator = get_task(run.config.task).generator(run.state)
    latent_dim, num_classes, decode = generator.latent_dim, generator.num_classes, generator.decode

    def images(z, labels=None):
        with cpu.standard_layers():
            return jnp.round(jnp.clip(decode(z, labels), 0.0, 1.0) * 255).astype(jnp.uint8)

    (b,) = jax.export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b, latent_dim), jnp.float32)]
    if num_classes:
        specs.append(jax.ShapeDtypeStruct((b,), jnp.int32))
    return jax.export.export(jax.jit(images), platforms=platforms)(*specs)


def export_generator_run(
    run: Run, out_dir: str, platforms: Sequence[str] = DEFAULT_PLATFORMS
) -> dict:
    """Writes `export_generator`'s artifact and its metadata into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    exported = export_generator(run, platforms)
    with open(os.path.join(out_dir, GENERATOR_FILE), "wb") as f:
        f.write(exported.serialize())
    latent_dim = int(exported.in_avals[0].shape[1])
    inputs = [{"name": "latents", "dtype": "float32", "shape": ["batch", latent_dim]}]
    if len(exported.in_avals) > 1:
        inputs.append({"name": "labels", "dtype": "int32", "shape": ["batch"]})
    metadata = {
        "workdir": os.path.abspath(run.workdir),
        "which": run.which,
        "step": run.step,
        "task": run.config.task,
        "model": run.config.model,
        "inputs": inputs,
        "latent_distribution": "standard normal",
        "output": {"name": "images", "dtype": "uint8", "shape": ["batch", *run.image_shape]},
        "class_names": run.class_names if len(inputs) > 1 else None,
        "platforms": list(platforms),
        "stablehlo": GENERATOR_FILE,
        "jax_version": jax.__version__,
    }
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flaxcnn.export",
        description="Export a trained run as StableHLO and a TensorFlow SavedModel.",
    )
    parser.add_argument("--workdir", required=True, help="The run's directory.")
    parser.add_argument("--out", required=True, help="Directory to write the artifacts to.")
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help="Comma-separated platforms to lower for (default: cpu,cuda).",
    )
    parser.add_argument("--data_dir", help="tfds data_dir of the run's dataset, if moved.")
    parser.add_argument("--verbose", action="store_true", help="Tracebacks of errors.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flaxcnn.cli.evaluate import quiet_tensorflow

    args = parse_args(argv)
    quiet_tensorflow()
    input_pipeline.import_tfds()  # The SavedModel needs TensorFlow: off the accelerators.
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    try:
        if not platforms:
            raise ValueError("--platforms names no platform")
        task = load_config(args.workdir).get("task", "classification")
        if hasattr(get_task(task), "generator"):  # A generator: latents in, images out.
            run = load_run(args.workdir, args.which, data_dir=args.data_dir, task_names=(task,))
            export_generator_run(run, args.out, platforms)
            print(f"exported the generator of {args.workdir} to {args.out}/{GENERATOR_FILE}")
            return 0
        run = load_run(args.workdir, args.which, data_dir=args.data_dir)
        export_run(run, args.out, platforms)
    except (ValueError, input_pipeline.DataError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    shape = "x".join(map(str, run.image_shape))
    print(
        f"exported {args.workdir} ({run.which} checkpoint, step {run.step}; uint8 [b, {shape}] "
        f"-> probabilities [b, {run.num_classes}]; {', '.join(platforms)}) to "
        f"{os.path.join(args.out, STABLEHLO_FILE)} and {os.path.join(args.out, SAVED_MODEL_DIR)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
