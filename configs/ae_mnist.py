"""A convolutional autoencoder on full MNIST: images through a 32-number bottleneck and back.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/ae \
        --config configs/ae_mnist.py

Validation and test report the cross-entropy ("loss", nats per image) and the mean squared
error per pixel ("mse"); `runs/ae/pictures/` holds a reconstruction grid every epoch.
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.task = "autoencoder"
    config.dataset = "mnist"
    config.model = "ConvAutoencoder"
    config.model_kwargs.latent_dim = 32
    config.batch_size = 128
    config.num_epochs = 10
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.early_stopping.metric = "loss"  # If turned on: there is no accuracy here.
    return config
