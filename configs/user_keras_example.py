"""Someone else's model: Keras's "Simple MNIST convnet" example (keras.io/examples/vision/
mnist_convnet), written with plain `flax.linen` layers: two 3x3 'VALID' convolutions of 32
and 64 with relu, each followed by 2x2 max-pooling, then dropout 0.5 and a dense layer;
Adam, batch 128, as there. Trained for 2 epochs of full MNIST; its Keras twin is
`scripts/peers/keras_user_models.py --model keras_example`.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/keras_example \
        --config configs/user_keras_example.py [--config.batch_size=32]
"""

import os

import jax
import ml_collections
from flax import linen as nn

from flaxcnn import default_config


class ConvNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = f"{os.path.abspath(__file__)}:ConvNet"
    config.batch_size = 128
    config.num_epochs = 2
    return config
