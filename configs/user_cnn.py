"""A user's own model, written with plain `flax.linen` layers only (no flaxcnn layers):
two 3x3 convolutions with relu, 2x2 max-pooling, dropout and a dense layer, on full MNIST
for 2 epochs. Its Keras twin is `scripts/peers/keras_user_models.py`.

The model is named by this file's path, as a user names their own:

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/user_cnn \
        --config configs/user_cnn.py [--config.batch_size=128]
"""

import os
from collections.abc import Sequence

import jax
import ml_collections
from flax import linen as nn

from flaxcnn import default_config


class UserCNN(nn.Module):
    """Conv(16, 3x3) -> relu -> Conv(32, 3x3) -> relu -> MaxPool(2) -> Dropout -> Flatten ->
    Dense(num_classes); `batch_norm` adds `nn.BatchNorm` after each convolution."""

    num_classes: int = 10
    widths: Sequence[int] = (16, 32)
    dropout_rate: float = 0.25
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for width in self.widths:
            x = nn.Conv(width, (3, 3), padding="VALID")(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = f"{os.path.abspath(__file__)}:UserCNN"
    config.batch_size = 32
    config.num_epochs = 2
    return config
