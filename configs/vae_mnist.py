"""A convolutional variational autoencoder with 16 latents on full MNIST.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/vae \
        --config configs/vae_mnist.py

Validation and test report the negative ELBO ("loss") and its reconstruction and KL terms,
in nats per image; `runs/vae/pictures/` holds reconstruction and prior-sample grids every
epoch. At the end, 10,000 prior samples are scored (inception score and Frechet distance)
under a small CNN classifier of MNIST, trained once into `~/.cache/flaxcnn/scorers/mnist`.
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.task = "vae"
    config.dataset = "mnist"
    config.model = "ConvVAE"
    config.model_kwargs.latent_dim = 16
    config.batch_size = 128
    config.num_epochs = 20
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.score_samples = 10_000  # Inception score and Frechet distance of the final model.
    config.early_stopping.metric = "loss"  # If turned on: there is no accuracy here.
    return config
