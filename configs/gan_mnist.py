"""A DCGAN on full MNIST that conditions itself on 1,000 k-means clusters of its training
images (no labels used): Adam 2e-3 with b1 0, batch 64, 10 epochs, non-saturating generator
loss, R1 on the discriminator.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/gan \
        --config configs/gan_mnist.py

Every epoch writes a grid of samples of fixed latents to `runs/gan/pictures/` and TensorBoard;
at the end, 10,000 samples are scored under a small CNN classifier of MNIST, trained once
(about 2 min on CPUs) into `~/.cache/flaxcnn/scorers/mnist`.

On a 2-core CPU (10 epochs, 8,430 steps, R1 every 16 steps) the run takes 8 min 38 s, of
which 19 s loading and clustering and 8 min 5 s training: inception score 9.39 (MNIST's own
train images: 9.70), Frechet distance 7.80 (train images to test: 4.23); the configs table
of README.md names the machine. Samples: python -m flaxcnn.sample --workdir runs/gan.
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.task = "gan"
    config.model = "DCGAN"
    config.model_kwargs = ml_collections.ConfigDict(
        dict(latent_dim=64, generator_widths=(64, 32), discriminator_widths=(32, 64))
    )
    config.optimizer = "adam"
    # Ten times DCGAN's 2e-4, without momentum (b1 0, as in StyleGAN2), with R1: in 6,000
    # steps it goes further than 2e-4 (b1 0.5) in 10,000; 4e-3 diverges.
    config.learning_rate = 2e-3
    config.adam_b1 = 0.0
    config.d_learning_rate = 2e-3
    config.lr_schedule = "constant"
    config.batch_size = 64
    config.num_epochs = 10  # 8,430 steps; 12 score no better (docs/recipes.md).
    config.log_every_steps = 200
    # Samples are drawn with a moving average of the generator's parameters (0: the live ones).
    config.g_ema_decay = 0.99  # 0.999 lagged behind the live generator in 8,000 steps.
    # R1 (Mescheder et al., 2018): D's gradient at real images penalised with weight 1, on
    # every 16th step only (16 times heavier then, as in StyleGAN2): 16.7 steps/s against
    # 14.7 on every 4th step, with the same scores.
    config.r1_gamma = 1.0
    config.r1_every = 16
    config.conditional = False  # True: generator and discriminator take the class label.
    # Self-conditioning: both networks take one of 1,000 k-means clusters of the training
    # images (about 54 images each; the labels are not used). Samples draw each cluster with
    # its share of the data.
    config.num_clusters = 1000
    # Quality scores of the final generator (0: off) and where their classifier is kept.
    config.score_samples = 10_000
    config.scorer_dir = "~/.cache/flaxcnn/scorers"
    return config
