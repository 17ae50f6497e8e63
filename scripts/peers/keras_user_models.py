"""The Keras twins of the user models (`configs/user_cnn.py`, `user_flax_example.py`,
`user_keras_example.py`): the same architecture, data split, optimizer, batch size and
epochs, trained by `fit`, then tested; prints the training throughput.

    python scripts/peers/keras_user_models.py [--model user_cnn] [--batch-size 32] [--epochs 2]
        [--backend tensorflow] [--batch-norm]

Reads MNIST from ../shared/data/mnist/mnist.npz (x_train, y_train, x_test, y_test).
"""

import argparse
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NPZ = os.path.join(REPO, "..", "shared", "data", "mnist", "mnist.npz")


def user_cnn(keras, widths=(16, 32), dropout_rate=0.25, batch_norm=False):
    """Conv(16) -> Conv(32) (3x3 'valid', relu) -> MaxPool(2) -> Dropout -> Dense(10)."""
    layers = [keras.Input((28, 28, 1))]
    for width in widths:
        layers.append(keras.layers.Conv2D(width, 3))
        if batch_norm:
            layers.append(keras.layers.BatchNormalization(momentum=0.9))
        layers.append(keras.layers.ReLU())
    layers += [
        keras.layers.MaxPooling2D(2),
        keras.layers.Dropout(dropout_rate),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]
    return keras.Sequential(layers)


def flax_example(keras):
    """Conv(32) -> AvgPool(2) -> Conv(64) -> AvgPool(2) (3x3 'same', relu) -> Dense(256, relu)
    -> Dense(10)."""
    layers = [keras.Input((28, 28, 1))]
    for width in (32, 64):
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
            keras.layers.AveragePooling2D(2),
        ]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),
    ]
    return keras.Sequential(layers)


def keras_example(keras):
    """Conv(32) -> MaxPool(2) -> Conv(64) -> MaxPool(2) (3x3 'valid', relu) -> Dropout(0.5)
    -> Dense(10)."""
    layers = [keras.Input((28, 28, 1))]
    for width in (32, 64):
        layers += [
            keras.layers.Conv2D(width, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
        ]
    layers += [keras.layers.Flatten(), keras.layers.Dropout(0.5), keras.layers.Dense(10)]
    return keras.Sequential(layers)


# Each model's flaxcnn config (under configs/), Keras builder and optimizer.
MODELS = {
    "user_cnn": ("user_cnn.py", user_cnn, lambda keras: keras.optimizers.Adam(1e-3)),
    "flax_example": (
        "user_flax_example.py",
        flax_example,
        lambda keras: keras.optimizers.SGD(0.1, momentum=0.9),
    ),
    "keras_example": (
        "user_keras_example.py",
        keras_example,
        lambda keras: keras.optimizers.Adam(1e-3),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="user_cnn", choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax"])
    parser.add_argument("--batch-norm", action="store_true", help="user_cnn only")
    args = parser.parse_args()
    if args.batch_norm and args.model != "user_cnn":
        parser.error("--batch-norm applies to --model user_cnn only")
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    data = np.load(NPZ)
    x, y = data["x_train"][..., None].astype("float32") / 255, data["y_train"]
    x_test, y_test = data["x_test"][..., None].astype("float32") / 255, data["y_test"]
    _, build, optimizer = MODELS[args.model]
    model = build(keras, batch_norm=True) if args.batch_norm else build(keras)
    model.compile(
        optimizer=optimizer(keras),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epoch_times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.start)

    model.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_split=0.1,
        callbacks=[Timer()],
        verbose=0,
    )
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=100, verbose=0)
    train_examples = int(len(x) * 0.9)
    print(f"epoch times (s, with validation): {[round(t, 1) for t in epoch_times]}")
    print(f"examples/s (last epoch): {train_examples / epoch_times[-1]:.0f}")
    print(f"test accuracy {accuracy:.4f}, loss {loss:.4f}")


if __name__ == "__main__":
    main()
