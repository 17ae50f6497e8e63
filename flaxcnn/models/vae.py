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
    so `generate` needs no input image.
    """

    latent_dim: int = 16
    widths: Sequence[int] = (32, 64)
    image_shape: tuple[int, int, int] = (28, 28, 1)

    def setup(self):
        self.encoder = ConvEncoder(self.widths)
        self.mean = nn.Dense(self.latent_dim)
        self.log_variance = nn.Dense(self.latent_dim)
        self.decoder = ConvDecoder(tuple(self.image_shape), self.widths)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) -> the posterior's mean and log-variance, each (B, latent_dim)."""
        check_image_shape(x, self.image_shape)
        features = self.encoder(x)
        return self.mean(features), self.log_variance(features)

    def decode_logits(self, z: jax.Array) -> jax.Array:
        """(B, latent_dim) -> (B, H, W, C) Bernoulli logits."""
        return self.decoder(z)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction logits of a posterior sample, and the posterior's mean and
        log-variance."""
        del train  # No dropout or batch norm here.
        mean, log_variance = self.encode(x)
        z = mean
        if self.has_rng("sample"):
            noise = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * log_variance) * noise
        return self.decode_logits(z), mean, log_variance

    def generate(self, z: jax.Array) -> jax.Array:
        """Latents (B, latent_dim) -> the Bernoulli means (B, H, W, C) in [0, 1]."""
        return nn.sigmoid(self.decode_logits(z))
