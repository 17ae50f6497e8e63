"""Keras 3 twins of the zoo's families (CNN, RNN, autoencoder, VAE, GAN): the architecture,
loss, optimizer, learning-rate schedule and batch size of `configs/<family>_mnist.py`,
trained with `fit` (the VAE and the GAN through a `keras.Model` subclass's `train_step`, as
the Keras docs' VAE and DCGAN examples do), then evaluated on the test split.

    python scripts/peers/keras_families.py --family cnn [--epochs 1] [--npz mnist.npz]

Trains on the first 90% of the training images with the last 10% as validation (evaluated
every epoch), as flaxcnn's runs do; prints the examples/s of the last epoch and the test
metric. KERAS_BACKEND picks the backend (default tensorflow). `scripts/benchmark.py
--families` times these against `python -m flaxcnn.main --config configs/<family>_mnist.py`.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers, ops  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NPZ = os.path.join(REPO, "..", "shared", "data", "mnist", "mnist.npz")
IMAGE_SHAPE = (28, 28, 1)
# Each family's flaxcnn config and the training settings copied from it (the tests compare).
SETTINGS = {
    "cnn": dict(config="cnn_mnist", batch_size=128, learning_rate=1e-3, cosine=True),
    "rnn": dict(config="rnn_mnist", batch_size=128, learning_rate=2e-3, cosine=True, clip=1.0),
    "autoencoder": dict(config="ae_mnist", batch_size=128, learning_rate=1e-3, cosine=True),
    "vae": dict(config="vae_mnist", batch_size=128, learning_rate=1e-3, cosine=True),
    "gan": dict(config="gan_mnist", batch_size=64, learning_rate=2e-3, beta_1=0.0),
}


def cnn(widths=(16, 32), dropout_rate=0.3) -> keras.Model:
    """flaxcnn's `CNN`: per width two [3x3 'same' conv (no bias), batch norm, relu] and a 2x2
    max-pool; dropout; dense logits. Flax's batch norm: momentum 0.9, epsilon 1e-5."""
    model = keras.Sequential([keras.Input(IMAGE_SHAPE)])
    for width in widths:
        for _ in range(2):
            model.add(layers.Conv2D(width, 3, padding="same", use_bias=False))
            model.add(layers.BatchNormalization(momentum=0.9, epsilon=1e-5))
            model.add(layers.ReLU())
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dropout(dropout_rate))
    model.add(layers.Dense(10))
    return model


def rnn(hidden_size=128) -> keras.Model:
    """flaxcnn's `RNN`: an LSTM over the 28 rows (28 pixels each), dense logits of its last
    hidden state."""
    return keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            layers.Reshape(IMAGE_SHAPE[:1] + (IMAGE_SHAPE[1] * IMAGE_SHAPE[2],)),
            layers.LSTM(hidden_size),
            layers.Dense(10),
        ]
    )


def encoder(widths=(32, 64)) -> list:
    """flaxcnn's `ConvEncoder`: 3x3 stride-2 'same' convolutions with relu, flattened."""
    convs = [layers.Conv2D(w, 3, strides=2, padding="same", activation="relu") for w in widths]
    return [keras.Input(IMAGE_SHAPE), *convs, layers.Flatten()]


def decoder(input_dim: int, widths=(32, 64)) -> list:
    """flaxcnn's `ConvDecoder`: dense relu to the encoder's last map (7x7 for 28x28), 3x3
    stride-2 'same' transposed convolutions back (relu but the last), logits."""
    start = (IMAGE_SHAPE[0] // 2 ** len(widths), IMAGE_SHAPE[1] // 2 ** len(widths), widths[-1])
    stack = [keras.Input((input_dim,)), layers.Dense(int(np.prod(start)), activation="relu")]
    stack.append(layers.Reshape(start))
    for width in reversed(widths[:-1]):
        stack.append(layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu"))
    stack.append(layers.Conv2DTranspose(IMAGE_SHAPE[2], 3, strides=2, padding="same"))
    return stack


def autoencoder(latent_dim=32) -> keras.Model:
    """flaxcnn's `ConvAutoencoder`: encoder, dense to `latent_dim`, decoder (logits)."""
    latent = [layers.Dense(latent_dim)]
    return keras.Sequential(encoder() + latent + decoder(latent_dim)[1:])


def reconstruction_loss(images, logits):
    """Bernoulli cross-entropy summed over the pixels (nats per image), as flaxcnn's."""
    return ops.sum(ops.binary_crossentropy(images, logits, from_logits=True), axis=(1, 2, 3))


class VAE(keras.Model):
    """flaxcnn's `ConvVAE` with `hidden`: encoder, dense relu, dense mean and log-variance;
    a reparameterised sample; dense relu, decoder. Loss: the negative ELBO per image."""

    def __init__(self, latent_dim=20, hidden=256, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.Sequential(encoder() + [layers.Dense(hidden, activation="relu")])
        self.mean = layers.Dense(latent_dim)
        self.log_variance = layers.Dense(latent_dim)
        stack = decoder(hidden)
        self.decoder = keras.Sequential(
            [keras.Input((latent_dim,)), layers.Dense(hidden, activation="relu"), *stack[1:]]
        )
        for dense in (self.mean, self.log_variance):
            dense.build((None, hidden))  # Built now: the parameter count needs no call.
        self.seed = keras.random.SeedGenerator(0)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, images, training=False):
        features = self.encoder(images)
        mean, log_variance = self.mean(features), self.log_variance(features)
        noise = keras.random.normal(ops.shape(mean), seed=self.seed)
        return self.decoder(mean + ops.exp(0.5 * log_variance) * noise), mean, log_variance

    def negative_elbo(self, images):
        logits, mean, log_variance = self(images, training=True)
        kl = 0.5 * ops.sum(ops.exp(log_variance) + mean**2 - 1.0 - log_variance, axis=-1)
        return ops.mean(reconstruction_loss(images, logits) + kl)

    def train_step(self, images):
        import tensorflow as tf  # The TensorFlow backend's train step, as the Keras example.

        with tf.GradientTape() as tape:
            loss = self.negative_elbo(images)
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, images):
        self.loss_tracker.update_state(self.negative_elbo(images))
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def generator(latent_dim=64, widths=(64, 32)) -> keras.Model:
    """flaxcnn's `Generator`: dense (no bias) to 7x7, batch norm, relu; 4x4 stride-2 'same'
    transposed convolutions (no bias) with batch norm and relu; a last one to the image's
    channels; sigmoid."""
    size = IMAGE_SHAPE[0] // 2 ** len(widths)
    stack = [keras.Input((latent_dim,)), layers.Dense(size * size * widths[0], use_bias=False)]
    stack.append(layers.Reshape((size, size, widths[0])))
    stack += [layers.BatchNormalization(momentum=0.9, epsilon=1e-5), layers.ReLU()]
    for width in widths[1:]:
        stack.append(layers.Conv2DTranspose(width, 4, strides=2, padding="same", use_bias=False))
        stack += [layers.BatchNormalization(momentum=0.9, epsilon=1e-5), layers.ReLU()]
    stack.append(layers.Conv2DTranspose(IMAGE_SHAPE[2], 4, strides=2, padding="same"))
    return keras.Sequential([*stack, layers.Activation("sigmoid")])


def discriminator(widths=(32, 64)) -> keras.Model:
    """flaxcnn's `Discriminator`: 4x4 stride-2 'same' convolutions with leaky relu (0.2),
    a dense logit."""
    stack = [keras.Input(IMAGE_SHAPE)]
    for width in widths:
        stack += [layers.Conv2D(width, 4, strides=2, padding="same"), layers.LeakyReLU(0.2)]
    return keras.Sequential([*stack, layers.Flatten(), layers.Dense(1)])


def bce(logits, target: float):
    return ops.binary_crossentropy(ops.full_like(logits, target), logits, from_logits=True)


class GAN(keras.Model):
    """flaxcnn's `DCGAN` task step: a discriminator update on a real and a generated batch,
    then a generator update (non-saturating loss) on fresh latents against the updated
    discriminator, then the moving average of the generator's weights (`g_ema_decay`)."""

    def __init__(self, latent_dim=64, ema_decay=0.99, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim, self.ema_decay = latent_dim, ema_decay
        self.generator, self.discriminator = generator(latent_dim), discriminator()
        self.ema = [
            keras.Variable(w.numpy(), trainable=False) for w in self.generator.trainable_weights
        ]
        self.seed = keras.random.SeedGenerator(0)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("d_loss", "g_loss")}

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def latents(self, images):
        return keras.random.normal((ops.shape(images)[0], self.latent_dim), seed=self.seed)

    def train_step(self, real):
        import tensorflow as tf  # The TensorFlow backend's train step, as the Keras example.

        fake = self.generator(self.latents(real), training=True)
        with tf.GradientTape() as tape:
            real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
            d_loss = ops.mean(bce(real_logits, 1.0) + bce(fake_logits, 0.0))
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights), weights))
        with tf.GradientTape() as tape:
            logits = self.discriminator(self.generator(self.latents(real), training=True))
            g_loss = ops.mean(bce(logits, 1.0))
        weights = self.generator.trainable_weights
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights), weights))
        for average, weight in zip(self.ema, weights):
            average.assign(self.ema_decay * average + (1 - self.ema_decay) * weight)
        return self.track(d_loss, g_loss)

    def test_step(self, real):
        fake = self.generator(self.latents(real))
        real_logits, fake_logits = self.discriminator(real), self.discriminator(fake)
        d_loss = ops.mean(bce(real_logits, 1.0) + bce(fake_logits, 0.0))
        return self.track(d_loss, ops.mean(bce(fake_logits, 1.0)))

    def track(self, d_loss, g_loss) -> dict:
        self.trackers["d_loss"].update_state(d_loss)
        self.trackers["g_loss"].update_state(g_loss)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    @property
    def metrics(self):
        return list(self.trackers.values())


BUILDERS = {"cnn": cnn, "rnn": rnn, "autoencoder": autoencoder, "vae": VAE, "gan": GAN}


def optimizer(family: str, total_steps: int) -> keras.optimizers.Optimizer:
    """The config's Adam: its learning rate, cosine to 0 over the run where the config's
    schedule is cosine, its b1 and global-norm clipping."""
    settings = SETTINGS[family]
    rate = settings["learning_rate"]
    if settings.get("cosine"):
        rate = keras.optimizers.schedules.CosineDecay(rate, total_steps)
    return keras.optimizers.Adam(
        rate, beta_1=settings.get("beta_1", 0.9), global_clipnorm=settings.get("clip")
    )


def compiled(family: str, total_steps: int) -> keras.Model:
    """The family's twin, built and compiled with its loss and optimizer."""
    model = BUILDERS[family]()
    if family == "gan":
        model.compile(optimizer("gan", total_steps), optimizer("gan", total_steps))
    elif family == "vae":
        model.compile(optimizer(family, total_steps))
    elif family == "autoencoder":
        model.compile(optimizer(family, total_steps), loss=reconstruction_loss)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer(family, total_steps), loss=loss, metrics=["accuracy"])
    return model


def trainable_parameters(model: keras.Model) -> int:
    """Parameters an optimizer trains (batch norm's moving statistics are not: flaxcnn keeps
    them apart from the parameters too)."""
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def load(npz: str) -> tuple:
    """(x_train, y_train, x_test, y_test): images float32 in [0, 1], (N, 28, 28, 1)."""
    with np.load(npz) as data:
        x_train = data["x_train"][..., None].astype("float32") / 255
        x_test = data["x_test"][..., None].astype("float32") / 255
        return x_train, data["y_train"], x_test, data["y_test"]


def train(family: str, epochs: int, npz: str, examples: int | None = None) -> dict:
    """`epochs` epochs of `fit` with the last 10% as validation (or, with `examples`, of that
    many first training images and no validation: the throughput run), then the test split:
    the seconds of each epoch, examples/s of the last and the test metric."""
    x, y, x_test, y_test = load(npz)
    validation = 0.1
    if examples:
        x, y, validation = x[:examples], y[:examples], 0.0
    batch_size = SETTINGS[family]["batch_size"]
    train_examples = int(len(x) * (1 - validation))
    keras.utils.set_random_seed(0)
    model = compiled(family, epochs * -(-train_examples // batch_size))
    labelled = family in ("cnn", "rnn")
    target = y if labelled else x if family == "autoencoder" else None
    times = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda epoch, logs: times.append(time.perf_counter() - times.pop()),
    )
    model.fit(
        x, target, batch_size, epochs, verbose=0, callbacks=[timer], validation_split=validation
    )
    test_target = y_test if labelled else x_test if family == "autoencoder" else None
    metrics = model.evaluate(x_test, test_target, batch_size=100, verbose=0, return_dict=True)
    return {"epoch_s": times, "examples_per_s": train_examples / times[-1], "test": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=BUILDERS)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--npz", default=NPZ, help="MNIST as x_train, y_train, x_test, y_test")
    args = parser.parse_args()
    result = train(args.family, args.epochs, args.npz)
    print(f"epoch times (s, with validation): {[round(t, 1) for t in result['epoch_s']]}")
    print(f"examples/s (last epoch): {result['examples_per_s']:.0f}")
    test = result["test"]
    name = "accuracy" if "accuracy" in test else "g_loss" if "g_loss" in test else "loss"
    print(f"test {'accuracy' if name == 'accuracy' else 'loss'} {test[name]:.4f}, {test}")


if __name__ == "__main__":
    main()
