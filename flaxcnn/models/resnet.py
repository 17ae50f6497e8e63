"""Residual networks for 32x32 images (CIFAR-10), in plain `flax.linen`.

- `CifarResNet`: He et al. (2016), section 4.2: a 3x3 convolution of 16 channels, then three
  stages of `n` basic blocks (16, 32 and 64 channels, the last two starting at stride 2),
  global average pooling and a dense layer; depth 6n + 2 (`ResNet20`: n=3, `ResNet56`: n=9).
  Shortcuts that change shape are the paper's option A: subsampled and zero-padded, no
  parameters (ResNet-20: 269,722 parameters with batch norm's
  scales and offsets).
- `PreActResNet18`: He et al. (2016b), pre-activation basic blocks of 64 to 512 channels,
  the CIFAR stem (one 3x3 convolution, no pooling), 1x1 projection shortcuts.
- `FastResNet`: the kind of net that holds CIFAR-10's speed records (Page's ResNet-9,
  Jordan's airbench): a stem convolution, then per stage a convolution, 2x2 max-pooling, batch
  norm and activation, with `residual` more convolutions added back; global max-pooling and a
  dense layer whose logits are scaled down (`logit_scale`), which keeps early steps of high
  learning rates stable. `widths` sets the cost: (64, 128, 256) with residuals in the first and
  last stages is ResNet-9 at half width.

Every layer is a standard `nn.Conv` / `nn.BatchNorm` / `nn.Dense`, so a user's own copy of
one of these modules trains exactly as fast as the built-in (the CPU rewrite of
flaxcnn.cpu applies to both alike).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from flaxcnn.models.whitening import PatchWhitening

ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "gelu": nn.gelu}
HE_NORMAL = nn.initializers.he_normal()


def _batch_norm(train: bool, dtype, momentum: float = 0.9, **kwargs) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, dtype=dtype, **kwargs)


def _conv(
    features: int, dtype, strides: int = 1, kernel: int = 3, kernel_init: Callable = HE_NORMAL
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME" if kernel > 1 else "VALID",
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
    )


def dirac_init(base: Callable = HE_NORMAL) -> Callable:
    """A (kh, kw, C, F) kernel initialiser: the first min(C, F) filters pass their input
    channel through unchanged (a centred 1, as `torch.nn.init.dirac_`), the rest are
    `base`'s. A deep stack of such layers starts near the identity (airbench's init)."""

    def init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        kernel = base(key, shape, dtype)
        height, width, channels, features = shape
        n = min(channels, features)
        identity = np.zeros((height, width, channels, n), np.float32)
        identity[height // 2, width // 2, np.arange(n), np.arange(n)] = 1.0
        return kernel.at[..., :n].set(jnp.asarray(identity, dtype))

    return init


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to an option-A shortcut, then relu."""

    features: int
    strides: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.features, self.dtype, self.strides)(x)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = _conv(self.features, self.dtype)(y)
        y = _batch_norm(train, self.dtype)(y)
        shortcut = x
        if self.strides > 1 or x.shape[-1] != self.features:
            shortcut = x[:, :: self.strides, :: self.strides, :]
            extra = self.features - x.shape[-1]
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al.: depth 6 * `blocks_per_stage` + 2."""

    num_classes: int = 10
    blocks_per_stage: int = 3
    widths: Sequence[int] = (16, 32, 64)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(_batch_norm(train, self.dtype)(_conv(self.widths[0], self.dtype)(x)))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, strides, self.dtype)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class ResNet20(CifarResNet):
    """He et al.'s ResNet-20 (269,722 parameters)."""

    blocks_per_stage: int = 3


class ResNet56(CifarResNet):
    """He et al.'s ResNet-56 (853,018 parameters)."""

    blocks_per_stage: int = 9


class PreActBlock(nn.Module):
    """Batch norm and relu before each of two 3x3 convolutions; a 1x1 projection shortcut
    (from the activated input) where the shape changes."""

    features: int
    strides: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(_batch_norm(train, self.dtype)(x))
        shortcut = x
        if self.strides > 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, self.dtype, self.strides, kernel=1)(y)
        y = _conv(self.features, self.dtype, self.strides)(y)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = _conv(self.features, self.dtype)(y)
        return y + shortcut


class PreActResNet18(nn.Module):
    """The pre-activation ResNet-18 for 32x32 inputs (11,172,170 parameters)."""

    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.widths[0], self.dtype)(x)
        for stage, width in enumerate(self.widths):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                x = PreActBlock(width, strides, self.dtype)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class FastResNet(nn.Module):
    """A ResNet-9 / airbench-kind net: see the module docstring.

    `stem` channels in the first convolution; per stage of `widths`: convolution, max-pool,
    batch norm, activation, then `residual[i]` convolution-bn-activation layers added back to
    the stage's output. `bn_momentum` is Flax's (the weight of the old statistics);
    `logit_scale` multiplies the logits. airbench's initialisation: `whiten` makes the stem a
    2x2 `PatchWhitening` fitted to the training images (no batch norm after it; `stem` is at
    most 24 for RGB), `dirac` starts every other convolution's first filters as the
    identity; `bn_scale=False` fixes batch norm's scales at 1 (only its offsets train).
    """

    num_classes: int = 10
    stem: int = 32
    widths: Sequence[int] = (64, 128, 256)
    residual: Sequence[int] = (2, 0, 2)
    activation: str = "relu"
    bn_momentum: float = 0.9
    logit_scale: float = 0.125
    whiten: bool = False
    dirac: bool = False
    bn_scale: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"FastResNet activation must be one of {', '.join(ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if len(self.residual) != len(self.widths):
            raise ValueError("FastResNet needs one `residual` count per stage of `widths`")
        act = ACTIVATIONS[self.activation]

        init = dirac_init() if self.dirac else HE_NORMAL

        def conv_bn(y: jax.Array, width: int, pool: bool = False) -> jax.Array:
            y = _conv(width, self.dtype, kernel_init=init)(y)
            if pool:
                y = nn.max_pool(y, (2, 2), strides=(2, 2))
            norm = _batch_norm(train, self.dtype, self.bn_momentum, use_scale=self.bn_scale)
            return act(norm(y))

        if self.whiten:
            x = act(PatchWhitening(self.stem, dtype=self.dtype)(x))
        else:
            x = conv_bn(x, self.stem)
        for width, extra in zip(self.widths, self.residual):
            x = conv_bn(x, width, pool=True)
            if extra:
                y = x
                for _ in range(extra):
                    y = conv_bn(y, width)
                x = x + y
        x = jnp.max(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype)(x)
        return (logits * self.logit_scale).astype(jnp.float32)
