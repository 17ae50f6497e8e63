"""Someone else's model: the CNN of Flax's own MNIST example (`examples/mnist/train.py`),
as it is written there, with plain `flax.linen` layers: two 3x3 'SAME' convolutions with
relu and 2x2 average pooling, then dense layers of 256 and 10; SGD with momentum 0.9 at
0.1, the example's optimizer. Trained for 2 epochs of full MNIST; its Keras twin is
`scripts/peers/keras_user_models.py --model flax_example`.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/flax_example \
        --config configs/user_flax_example.py [--config.batch_size=32]
"""

import os

import ml_collections
from flax import linen as nn

from flaxcnn import default_config


class CNN(nn.Module):
    """A simple CNN model (Flax's MNIST example)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = f"{os.path.abspath(__file__)}:CNN"
    config.optimizer = "sgd"
    config.optimizer_kwargs.momentum = 0.9
    config.learning_rate = 0.1
    config.batch_size = 128
    config.num_epochs = 2
    return config
