"""A convolutional variational autoencoder with a Bernoulli likelihood on pixel intensities."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.models.autoencoder import ConvDecoder, ConvEncoder, check_image_shape


class ConvVAE(nn.Module):
    """Encoder to a diagonal Gaussian q(z|x) (mean, log-variance) over `latent_dim` latents,
    a standard-normal prior, and a decoder to Bernoulli logits p(x|z) over the pixels.

    The reparameterised sample draws from the "sample" rng stream; without one (as in
    `init`), the posterior mean is decoded. `image_shape` (H, W, C) fixes the decoder's output,
    so `generate` needs no input image. `hidden` > 0 adds a dense relu layer of that width
    after the encoder and before the decoder. With `num_classes` > 0 the model is
    class-conditional, q(z|x, y) and p(x|z, y): the one-hot label joins the encoder's features
    and the latent; labels None stand for "no label" (zeros), as in `init`.
    """

    latent_dim: int = 16
    widths: Sequence[int] = (32, 64)
    image_shape: tuple[int, int, int] = (28, 28, 1)
    hidden: int = 0
    num_classes: int = 0

    def setup(self):
        self.encoder = ConvEncoder(self.widths)
        self.mean = nn.Dense(self.latent_dim)
        self.log_variance = nn.Dense(self.latent_dim)
        self.decoder = ConvDecoder(tuple(self.image_shape), self.widths)
        if self.hidden:
            self.encoder_hidden = nn.Dense(self.hidden)
            self.decoder_hidden = nn.Dense(self.hidden)

    def _condition(self, x: jax.Array, labels: jax.Array | None) -> jax.Array:
        if not self.num_classes:
            return x
        if labels is None:
            one_hot = jnp.zeros((x.shape[0], self.num_classes), x.dtype)
        else:
            one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)
        return jnp.concatenate([x, one_hot], axis=-1)

    def encode(self, x: jax.Array, labels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) -> the posterior's mean and log-variance, each (B, latent_dim)."""
        check_image_shape(x, self.image_shape)
        features = self._condition(self.encoder(x), labels)
        if self.hidden:
            features = nn.relu(self.encoder_hidden(features))
        return self.mean(features), self.log_variance(features)

    def decode_logits(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """(B, latent_dim) -> (B, H, W, C) Bernoulli logits."""
        z = self._condition(z, labels)
        if self.hidden:
            z = nn.relu(self.decoder_hidden(z))
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction logits of a posterior sample, and the posterior's mean and
        log-variance."""
        del train  # No dropout or batch norm here.
        mean, log_variance = self.encode(x, labels)
        z = mean
        if self.has_rng("sample"):
            noise = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * log_variance) * noise
        return self.decode_logits(z, labels), mean, log_variance

    def generate(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """Latents (B, latent_dim) [and labels] -> the Bernoulli means (B, H, W, C) in
        [0, 1]."""
        return nn.sigmoid(self.decode_logits(z, labels))
