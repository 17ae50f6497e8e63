"""A DCGAN on full MNIST: Adam 2e-4 with b1 0.5, batch 64, non-saturating generator loss.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/gan \
        --config configs/gan_mnist.py

Every epoch writes a grid of samples of fixed latents to `runs/gan/pictures/` and TensorBoard;
at the end, 10,000 samples are scored (inception score and Frechet distance) under a small CNN
classifier of MNIST, trained once into `~/.cache/flaxcnn/scorers/mnist`.
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.task = "gan"
    config.model = "DCGAN"
    config.model_kwargs = ml_collections.ConfigDict(
        dict(latent_dim=64, generator_widths=(128, 64), discriminator_widths=(64, 128))
    )
    config.optimizer = "adam"
    config.learning_rate = 2e-4
    config.adam_b1 = 0.5  # DCGAN's Adam: a short memory of past gradients steadies the game.
    config.d_learning_rate = 2e-4
    config.lr_schedule = "constant"
    config.batch_size = 64
    config.num_epochs = 10
    config.log_every_steps = 200
    # Quality scores of the final generator (0: off) and where their classifier is kept.
    config.score_samples = 10_000
    config.scorer_dir = "~/.cache/flaxcnn/scorers"
    return config
