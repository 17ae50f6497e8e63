"""The classic Keras MNIST CNN as a user runs it, from the shell to the printed test accuracy:

    python scripts/peers/keras_mnist.py --npz mnist.npz [--batch-size 32] [--epochs 3]

Conv2D(32, 3x3, relu) -> MaxPool(2) -> Flatten -> Dense(10, softmax), Adam 1e-3, `fit` with
the last 10% of the training set as validation (evaluated every epoch), then `evaluate` on the
test set. The peer of `python -m flaxcnn.main --config configs/seed_keras.py` in
`scripts/benchmark.py`'s whole-command table. KERAS_BACKEND picks the backend (default
tensorflow).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def keras_model() -> keras.Model:
    """The classic example's model, compiled as it compiles it."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="MNIST as x_train, y_train, x_test, y_test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    with np.load(args.npz) as data:
        x_train = data["x_train"][..., None].astype("float32") / 255
        x_test = data["x_test"][..., None].astype("float32") / 255
        y_train, y_test = data["y_train"], data["y_test"]
    model = keras_model()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy {accuracy:.4f} ({len(y_test)} examples), loss {loss:.4f}")


if __name__ == "__main__":
    main()
