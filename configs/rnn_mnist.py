"""An LSTM reading each image row as one time step (28 steps of 28 pixels) on full MNIST.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/rnn \
        --config configs/rnn_mnist.py

`--config.model_kwargs.cell=gru` swaps in a GRU (61,706 parameters instead of 81,674, and
faster steps).
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.task = "classification"
    config.dataset = "mnist"
    config.model = "RNN"
    config.model_kwargs.cell = "lstm"
    config.model_kwargs.hidden_size = 128
    config.batch_size = 128
    config.num_epochs = 8
    config.learning_rate = 2e-3
    config.lr_schedule = "cosine"
    config.grad_clip_norm = 1.0  # Keeps the early recurrent gradients from spiking.
    return config
