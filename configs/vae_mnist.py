"""A convolutional variational autoencoder with 20 latents on full MNIST.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/vae \
        --config configs/vae_mnist.py
    python -m flaxcnn.sample --workdir runs/vae --interpolate

Validation and test report the negative ELBO ("loss") and its reconstruction and KL terms,
in nats per image; `runs/vae/pictures/` holds reconstruction and prior-sample grids every
epoch. At the end results.json adds the importance-weighted estimate of the test negative
log-likelihood ("test_iw_nll", `iw_samples` samples per image over the first `iw_examples`
test images), and the inception score and Frechet distance of 10,000 prior samples under the
MNIST scorer (python -m flaxcnn.cli.scorer --dataset mnist; the train command trains it
first when it is missing).
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.task = "vae"
    config.dataset = "mnist"
    config.model = "ConvVAE"
    config.model_kwargs.latent_dim = 20
    config.model_kwargs.widths = (32, 64)
    config.model_kwargs.hidden = 256
    config.conditional = False  # True: encoder and decoder take the class label.
    config.batch_size = 128
    config.num_epochs = 20
    config.learning_rate = 1e-3
    config.lr_schedule = "cosine"
    config.score_samples = 10_000  # Inception score and Frechet distance of the final model.
    config.iw_samples = 100  # Importance samples per test image for the log-likelihood (0: off).
    config.iw_examples = 2_000  # The first test images it is estimated on (0: all).
    config.early_stopping.metric = "loss"  # If turned on: there is no accuracy here.
    return config
