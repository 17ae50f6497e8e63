"""The stronger `CNN` (2 stages of [conv-bn-relu] x2 + max-pool, dropout) on full MNIST.

    python -m flaxcnn.main --workdir runs/cnn --config configs/cnn_mnist.py
    # offline, with a prepared tfds directory:
    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/cnn \
        --config configs/cnn_mnist.py
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = "CNN"
    config.model_kwargs.widths = (16, 32)
    config.model_kwargs.dropout_rate = 0.3
    config.batch_size = 128
    config.num_epochs = 10
    config.lr_schedule = "cosine"
    return config
