"""A DCGAN (Radford et al., 2015): a generator of images from Gaussian latent vectors and a
discriminator scoring images as real or generated, held in one module as two submodules with
separate parameter trees ("generator", "discriminator")."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxcnn.models.layers import ConvTranspose2x


class Generator(nn.Module):
    """Latent (B, latent_dim) [and labels (B,)] -> image (B, H, W, C) in [0, 1].

    Dense -> reshape to (H / 2^k, W / 2^k, widths[0]) -> batch norm, relu -> for each further
    width a 4x4 stride-2 transposed convolution, batch norm, relu -> a last 4x4 stride-2
    transposed convolution to C channels -> sigmoid, with k = len(widths) doublings in all.
    Sizes not divisible by 2^k are generated a little larger and centre-cropped. With
    `num_classes` > 0 the generator is conditional: the label, one-hot, joins the latent (the
    first Dense then adds a learned row per label, looked up rather than multiplied, so
    thousands of labels cost no more than ten). `bn_momentum` 0 makes a training-mode call
    store its batch's statistics exactly.
    """

    image_shape: tuple[int, int, int]
    widths: Sequence[int] = (128, 64)
    num_classes: int = 0
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        if not self.widths:
            raise ValueError("the generator needs at least one width")
        height, width, channels = self.image_shape
        scale = 2 ** len(self.widths)
        base_h, base_w = math.ceil(height / scale), math.ceil(width / scale)

        def norm_relu(x):
            x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
            return nn.relu(x)

        x = self._project(z, labels, base_h * base_w * self.widths[0])
        x = norm_relu(x.reshape(z.shape[0], base_h, base_w, self.widths[0]))
        for i, features in enumerate(self.widths[1:]):
            x = ConvTranspose2x(features, use_bias=False, name=f"ConvTranspose_{i}")(x)
            x = norm_relu(x)
        x = ConvTranspose2x(channels, name=f"ConvTranspose_{len(self.widths) - 1}")(x)
        top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
        x = x[:, top : top + height, left : left + width, :]
        return nn.sigmoid(x)

    def _project(self, z: jax.Array, labels: jax.Array | None, features: int) -> jax.Array:
        """Dense([z, one_hot(labels)]) without bias, as z's rows times z plus the label's row;
        both parts drawn as LeCun's initialisation of the whole kernel would draw them."""
        fan_in = z.shape[-1] + self.num_classes
        x = nn.Dense(features, use_bias=False, kernel_init=_lecun_part(z.shape[-1], fan_in))(z)
        if not self.num_classes:
            return x
        if labels is None:
            raise ValueError("a class-conditional GAN needs labels")
        rows = nn.Embed(
            self.num_classes,
            features,
            embedding_init=_lecun_part(self.num_classes, fan_in),
            name="label_rows",
        )
        return x + rows(labels)


def _lecun_part(rows: int, fan_in: int) -> nn.initializers.Initializer:
    """LeCun's normal initialisation of `rows` of a kernel with `fan_in` rows in all."""
    return nn.initializers.variance_scaling(rows / fan_in, "fan_in", "truncated_normal")


class Discriminator(nn.Module):
    """Image (B, H, W, C) [and labels (B,)] -> logit (B,) of "real": 4x4 stride-2
    convolutions of `widths` channels with leaky relu (0.2), then a dense logit. No batch norm,
    so real and generated batches are scored independently of each other. With `num_classes`
    > 0, a projection discriminator (Miyato & Koyama, 2018): the logit adds the inner product
    of the features with an embedding of the label; with `class_head` also, a classifier of the
    label on the same features (AC-GAN, Odena et al., 2017): `with_head` returns (logit, class
    logits (B, num_classes)). `class_head_dim`, when set, maps the features to that many
    numbers before the class head, whose cost then grows with it, not with the features."""

    widths: Sequence[int] = (64, 128)
    num_classes: int = 0
    class_head: bool = False
    class_head_dim: int = 0

    @nn.compact
    def __call__(
        self, x: jax.Array, labels: jax.Array | None = None, with_head: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        for features in self.widths:
            x = nn.Conv(features, (4, 4), strides=(2, 2))(x)
            x = nn.leaky_relu(x, 0.2)
        x = x.reshape(x.shape[0], -1)
        logit = nn.Dense(1)(x)[:, 0]
        if self.num_classes:
            if labels is None:
                raise ValueError("a class-conditional GAN needs labels")
            embedding = nn.Embed(self.num_classes, x.shape[-1], name="label_projection")
            logit = logit + jnp.sum(embedding(labels) * x, axis=-1)
        if not with_head:
            return logit
        if not (self.class_head and self.num_classes):
            raise ValueError(
                "class_head needs a conditional GAN (config.conditional or config.num_clusters)"
            )
        if self.class_head_dim:
            x = nn.Dense(self.class_head_dim, name="class_features")(x)
        return logit, nn.Dense(self.num_classes, name="class_head")(x)


class DCGAN(nn.Module):
    """The generator and the discriminator of images of `image_shape` (H, W, C), both
    conditioned on the class label when `num_classes` > 0, or on one of `num_clusters` clusters
    of the data (an unconditional GAN that conditions itself; see flaxcnn.data.clusters);
    `class_head` adds a classifier of the label or cluster to the discriminator (AC-GAN), on
    `class_head_dim` numbers computed from its features (0: on the features themselves).

    `__call__` (used to initialise both) scores generated images, D(G(z)); `generate` and
    `discriminate` apply one submodule, and need only that submodule's variables.
    """

    image_shape: tuple[int, int, int] = (28, 28, 1)
    latent_dim: int = 64
    generator_widths: Sequence[int] = (128, 64)
    discriminator_widths: Sequence[int] = (64, 128)
    num_classes: int = 0
    bn_momentum: float = 0.9
    class_head: bool = False
    num_clusters: int = 0
    class_head_dim: int = 0

    @property
    def num_conditions(self) -> int:
        """How many classes or clusters both networks are conditioned on (0: none)."""
        return self.num_classes or self.num_clusters

    def setup(self):
        if self.num_classes and self.num_clusters:
            raise ValueError(
                "a GAN is conditioned on classes (config.conditional) or on clusters "
                "(config.num_clusters), not both"
            )
        self.generator = Generator(
            tuple(self.image_shape),
            tuple(self.generator_widths),
            self.num_conditions,
            self.bn_momentum,
        )
        self.discriminator = Discriminator(
            tuple(self.discriminator_widths),
            self.num_conditions,
            self.class_head,
            self.class_head_dim,
        )

    def __call__(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        images = self.generator(z, labels, train)
        if self.class_head:  # Initialises the head too.
            return self.discriminator(images, labels, with_head=True)[0]
        return self.discriminator(images, labels)

    def generate(
        self, z: jax.Array, labels: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        return self.generator(z, labels, train)

    def discriminate(
        self, images: jax.Array, labels: jax.Array | None = None, with_head: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        return self.discriminator(images, labels, with_head)
