"""flaxcnn's CIFAR-10 fast recipe (`configs/cifar10_fast.py`) in Keras 3 as a user writes it,
from the shell to the printed test accuracy:

    python scripts/peers/keras_cifar.py --data /path/to/cifar10 [--epochs 15] [--batch-size 512]
        [--seed 0] [--max-steps K] [--out results.json]

`--data` is the image folder flaxcnn reads (`--config.dataset=folder:ROOT`): ROOT/train/CLASS/*
and ROOT/test/CLASS/*. The same 1,000 training images are held out for the per-epoch
validation as flaxcnn's `train[98%:]`: each split's files sorted, permuted with the folder
reader's fixed seed, and each class cut at 98% (`flaxcnn/data/image_folder.py`). Decoded once
by a tf.data pipeline (`tf.io.decode_jpeg` with the accurate DCT: the same pixels as PIL's),
kept in memory as uint8.

The net is flaxcnn's `FastResNet` (cifar10_fast's model_kwargs) of standard Keras layers: a
2x2 Conv2D whose kernel is fitted to the data, the whitened principal components of 2x2
patches (and their negatives) of 5,000 normalised training images, and not trained (its bias
is), then relu; three stages of [3x3 Conv2D (no bias), 2x2 MaxPooling2D, BatchNormalization,
ReLU] plus one residual [Conv2D, BatchNormalization, ReLU] added back; GlobalMaxPooling2D; a
Dense without bias whose logits are scaled by 0.125. He-normal convolutions (truncated, as
Flax's) with dirac (identity) first filters; the Dense LeCun-normal; batch norm momentum 0.9,
epsilon 1e-5, as Flax's.

The recipe: `fit` on batches of 512 (the last partial batch of each epoch dropped), SGD with
Nesterov momentum 0.9, learning rate 0.4 on optax's `cosine_onecycle_schedule` (30% warm-up
from 0.4/25, down to 0.4/25e4), L2 5e-4 as flaxcnn's 0.5 * l2 * sum(w^2) on the kernels
(`kernel_regularizer=L2(2.5e-4)`: Keras's L2 has no 0.5), label smoothing 0.2, random crops of
4-pixel reflected padding and horizontal flips (batched tf ops in the tf.data pipeline),
per-channel normalisation by the training split's mean and std, the "mixed_bfloat16" policy,
and evaluation (per-epoch validation and the test) averaged over 10 views: the image, its
mirror, and both shifted by 1 pixel up, down, left and right (zeros entering).

One difference Keras's SGD makes: it keeps the learning rate inside its momentum buffer
(v = 0.9 v - lr g), where optax (and PyTorch) apply the current rate to the accumulated
gradients; with a changing rate the updates differ slightly.

KERAS_BACKEND picks the backend (default tensorflow); the input pipeline is tf.data on any.
"""

import argparse
import json
import math
import os
import resource
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cifar_data  # noqa: E402  (scripts/peers/cifar_data.py, beside this script)
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

# The recipe (configs/cifar10_fast.py); the benchmark's tests compare these with flaxcnn's.
STEM, WIDTHS, RESIDUAL = 24, (64, 256, 256), (1, 1, 1)
LOGIT_SCALE = 0.125
BN_MOMENTUM = 0.9  # Keras's and Flax's: the weight of the old statistics.
BN_EPS = 1e-5  # Flax's default.
LEARNING_RATE = 0.4
MOMENTUM = 0.9
L2 = 5e-4
LABEL_SMOOTHING = 0.2
CROP = 4
TTA_SHIFT = 1
EVAL_BATCH_SIZE = 100  # Images per evaluation batch (x 10 views), flaxcnn's CPU default.


# --- The data: decoded the Keras (tf.data) way. ---


def decode(paths: list[str]) -> np.ndarray:
    """(N, H, W, 3) uint8: every image decoded by a parallel tf.data pipeline."""
    import tensorflow as tf

    def read(path):
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")

    pipeline = tf.data.Dataset.from_tensor_slices(paths)
    pipeline = pipeline.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return np.concatenate([batch.numpy() for batch in pipeline.batch(1000)])


def load(root: str) -> dict:
    """The training, validation and test images (uint8 NHWC) and labels."""
    return cifar_data.splits(root, decode)


# --- The model. ---


class DiracHeNormal(keras.initializers.Initializer):
    """He-normal (truncated, as Flax's) with the first min(C, F) filters the identity: a
    centred 1 on their own input channel (flaxcnn's `dirac_init`)."""

    def __init__(self, seed=None):
        self.base = keras.initializers.HeNormal(seed)

    def __call__(self, shape, dtype=None):
        height, width, channels, features = shape
        n = min(channels, features)
        identity = np.zeros((height, width, channels, n), np.float32)
        identity[height // 2, width // 2, np.arange(n), np.arange(n)] = 1.0
        kernel = self.base(shape, dtype)
        return ops.concatenate([ops.convert_to_tensor(identity, kernel.dtype), kernel[..., n:]], -1)


def conv_bn(x, width: int, pool: bool = False):
    x = layers.Conv2D(
        width,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer=DiracHeNormal(),
        kernel_regularizer=keras.regularizers.L2(L2 / 2),
    )(x)
    if pool:
        x = layers.MaxPooling2D(2)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPS)(x)
    return layers.ReLU()(x)


def fast_resnet(num_classes: int = 10, stem=STEM, widths=WIDTHS, residual=RESIDUAL):
    """flaxcnn's FastResNet with whiten=True, dirac=True; the stem's kernel is fixed, to be
    set by `fit_whitening`."""
    inputs = keras.Input((32, 32, 3))
    whiten = layers.Conv2D(stem, 2, name="whiten")
    x = layers.ReLU()(whiten(inputs))
    whiten.kernel.trainable = False  # Fitted to the data, not trained (its bias is).
    for width, extra in zip(widths, residual):
        x = conv_bn(x, width, pool=True)
        if extra:
            y = x
            for _ in range(extra):
                y = conv_bn(y, width)
            x = layers.Add()([x, y])
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(
        num_classes,
        use_bias=False,
        kernel_initializer="lecun_normal",
        kernel_regularizer=keras.regularizers.L2(L2 / 2),
    )(x)
    outputs = layers.Rescaling(LOGIT_SCALE, dtype="float32")(x)  # float32 logits.
    return keras.Model(inputs, outputs, name="fast_resnet")


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 images standardised per channel, in float32 (as the pipeline does)."""
    x = images.astype(np.float32) / np.float32(255)
    return (x - mean.astype(np.float32)) / std.astype(np.float32)


def fit_whitening(net: keras.Model, images: np.ndarray) -> None:
    """The stem's kernel from normalised (N, H, W, 3) images."""
    kernel = net.get_layer("whiten").kernel
    kernel.assign(cifar_data.whitening_kernel(images, kernel.shape[-1]))


def views(x, shift: int = TTA_SHIFT) -> list:
    """The test-time views of an NHWC batch: it and its mirror, each also shifted by `shift`
    pixels down, up, right and left (zeros entering)."""
    images = [x, ops.flip(x, axis=2)]
    height, width = x.shape[1:3]
    out, s = list(images), shift
    for image in images:
        padded = ops.pad(image, ((0, 0), (s, s), (s, s), (0, 0)))
        for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s)):
            out.append(padded[:, s - dy : s - dy + height, s - dx : s - dx + width])
    return out


class ViewAveraged(keras.Model):
    """`net` in training; in inference (evaluate, predict, fit's validation) its logits
    averaged over `views`."""

    def __init__(self, net: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.net = net

    def call(self, x, training=False):
        if training:
            return self.net(x, training=True)
        all_views = views(x)
        logits = self.net(ops.concatenate(all_views, axis=0), training=False)
        return ops.mean(ops.reshape(logits, (len(all_views), -1, logits.shape[-1])), axis=0)


def trainable_parameters(model: keras.Model) -> int:
    """Parameters the optimizer trains (the whitening kernel and batch norm's moving
    statistics are not: flaxcnn keeps both in `batch_stats`)."""
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# --- The recipe. ---


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """optax.cosine_onecycle_schedule(total_steps, peak, pct_start=warm-up / total_steps) as
    flaxcnn builds it (warm-up 30% of the run): cosine from peak/25 up to peak, then down to
    peak/25e4, which it keeps from the last step on."""

    def __init__(self, total_steps: int, peak: float = LEARNING_RATE):
        warmup = max(1, round(0.3 * total_steps))
        self.total_steps, self.peak = total_steps, peak
        self.bounds = (0, int(warmup / total_steps * total_steps), int(total_steps))
        self.values = (peak / 25, peak, peak / 25 / 1e4)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        rate = ops.convert_to_tensor(self.values[-1], "float32")
        for i in (1, 0):
            lo, hi = self.bounds[i], self.bounds[i + 1]
            start, end = self.values[i], self.values[i + 1]
            pct = (step - lo) / max(hi - lo, 1)
            cosine = end + (start - end) / 2 * (ops.cos(math.pi * pct) + 1)
            rate = ops.where((step >= lo) & (step < hi), cosine, rate)
        return rate

    def get_config(self):
        return {"total_steps": self.total_steps, "peak": self.peak}


def compiled(num_classes: int, total_steps: int) -> ViewAveraged:
    """The net in the mixed_bfloat16 policy, wrapped for test-time views, compiled with the
    recipe's loss and optimizer."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = ViewAveraged(fast_resnet(num_classes))
    model.compile(
        optimizer=keras.optimizers.SGD(OneCycle(total_steps), momentum=MOMENTUM, nesterov=True),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=LABEL_SMOOTHING
        ),
        metrics=["accuracy"],
    )
    return model


def pipelines(data: dict, mean, std, batch_size: int, seed: int) -> dict:
    """tf.data pipelines: training shuffled each epoch in full batches, normalised and
    augmented per batch; validation and test normalised; one-hot labels."""
    import tensorflow as tf  # The input pipeline, whatever the backend.

    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    num_classes = len(data["classes"])

    def normalize(images, labels):
        x = (tf.cast(images, tf.float32) / 255 - mean) / std
        return x, tf.one_hot(labels, num_classes)

    def augment(images, labels):
        x, y = normalize(images, labels)
        batch, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
        padded = tf.pad(x, [[0, 0], [CROP, CROP], [CROP, CROP], [0, 0]], mode="REFLECT")
        offsets = tf.random.uniform((batch, 2), 0, 2 * CROP + 1, tf.int32)
        rows = offsets[:, :1] + tf.range(height)
        cols = offsets[:, 1:] + tf.range(width)
        x = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
        flip = tf.random.uniform((batch,)) < 0.5
        return tf.where(flip[:, None, None, None], tf.reverse(x, [2]), x), y

    x_train, y_train = data["train"]
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    train = train.shuffle(len(y_train), seed=seed).batch(batch_size, drop_remainder=True)
    out = {"train": train.map(augment, num_parallel_calls=tf.data.AUTOTUNE)}
    for name in ("validation", "test"):
        split = tf.data.Dataset.from_tensor_slices(data[name]).batch(EVAL_BATCH_SIZE)
        out[name] = split.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
    return {name: pipeline.prefetch(tf.data.AUTOTUNE) for name, pipeline in out.items()}


class Progress(keras.callbacks.Callback):
    """Seconds of each epoch's training (its validation excluded), the validation accuracy,
    printed; stops at `total_steps`."""

    def __init__(self, total_steps: int, batch_size: int):
        super().__init__()
        self.total_steps, self.batch_size, self.done = total_steps, batch_size, 0
        self.train_s, self.steps, self.validation = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.first_step = time.perf_counter(), self.done

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done >= self.total_steps:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):  # fit's validation: the epoch's training is done.
        self.train_s.append(time.perf_counter() - self.start)
        self.steps.append(self.done - self.first_step)

    def on_epoch_end(self, epoch, logs=None):
        self.validation.append(float(logs["val_accuracy"]))
        rate = self.steps[-1] * self.batch_size / self.train_s[-1]
        print(
            f"epoch {epoch + 1}: validation accuracy {self.validation[-1]:.4f}, loss "
            f"{logs['loss']:.4f}, {rate:.0f} training examples/s",
            flush=True,
        )


def train(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    data = load(args.data)
    load_s = time.perf_counter() - start
    x_train, y_train = data["train"]
    print(
        f"data loaded in {load_s:.1f} s: {len(y_train)} training, "
        f"{len(data['validation'][1])} validation, {len(data['test'][1])} test images"
    )
    mean, std = cifar_data.channel_stats(x_train)
    steps_per_epoch = len(y_train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"batch size {args.batch_size} exceeds the {len(y_train)} images")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    model = compiled(len(data["classes"]), total_steps)
    sample = x_train[cifar_data.whitening_sample(len(y_train), args.seed)]
    fit_whitening(model.net, normalize(sample, mean, std))
    data_pipelines = pipelines(data, mean, std, args.batch_size, args.seed)
    progress = Progress(total_steps, args.batch_size)
    loop_start = time.perf_counter()
    model.fit(
        data_pipelines["train"],
        epochs=math.ceil(total_steps / steps_per_epoch),
        validation_data=data_pipelines["validation"],
        callbacks=[progress],
        verbose=0,
        shuffle=False,  # The pipeline shuffles.
    )
    loop_s = time.perf_counter() - loop_start
    metrics = model.evaluate(data_pipelines["test"], verbose=0, return_dict=True)
    steps = sum(progress.steps)
    examples = steps * args.batch_size
    return {
        "test_accuracy": float(metrics["accuracy"]),
        "num_test_examples": len(data["test"][1]),
        "validation_accuracy": progress.validation,
        "train_examples_per_s": examples / sum(progress.train_s),
        "loop_examples_per_s": examples / loop_s,
        "last_epoch_examples_per_s": progress.steps[-1] * args.batch_size / progress.train_s[-1],
        "load_data_s": load_s,
        "train_time_s": sum(progress.train_s),
        "steps": steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "parameters": trainable_parameters(model),
        "backend": keras.backend.backend(),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ROOT of ROOT/train/CLASS/*.jpg, ROOT/test")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after K steps (smoke)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    results = train(args)
    print(
        f"training examples/s {results['train_examples_per_s']:.0f} (validation excluded; "
        f"{results['loop_examples_per_s']:.0f} with it)"
    )
    print(f"test accuracy {results['test_accuracy']:.4f} ({results['num_test_examples']} examples)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
