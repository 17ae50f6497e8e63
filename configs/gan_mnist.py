"""A DCGAN on full MNIST: Adam 2e-4 with b1 0.5, batch 64, 10 epochs, non-saturating
generator loss.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/gan \
        --config configs/gan_mnist.py

Every epoch writes a grid of samples of fixed latents to `runs/gan/pictures/` and TensorBoard;
at the end, 10,000 samples are scored under a small CNN classifier of MNIST, trained once
(about 2 min on CPUs) into `~/.cache/flaxcnn/scorers/mnist`.

On a 2-core CPU the run took 4.5 min (35 steps/s) before the moving average of the
generator: inception score 5.83 (MNIST's own test images: 9.68), Frechet distance 68.3.
DCGAN's default widths, (128, 64) and (64, 128), reach 6.07 and 59.4 in four times as long.
With the average (0.999), 8,000 steps: 5.75 and 73.5 (the live generator 5.85 and 70.0; see
the README's table). Samples: python -m flaxcnn.sample --workdir runs/gan.
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
    config.learning_rate = 2e-4
    config.adam_b1 = 0.5  # DCGAN's Adam: a short memory of past gradients steadies the game.
    config.d_learning_rate = 2e-4
    config.lr_schedule = "constant"
    config.batch_size = 64
    config.num_epochs = 10
    config.log_every_steps = 200
    # Samples are drawn with a moving average of the generator's parameters (0: the live ones).
    config.g_ema_decay = 0.99  # 0.999 lagged behind the live generator in 8,000 steps.
    # R1 (Mescheder et al., 2018): D's gradient at real images penalised with weight 1, on
    # every 4th step only (4 times heavier then), which costs a third of the step, not half.
    config.r1_gamma = 1.0
    config.r1_every = 4
    config.conditional = False  # True: generator and discriminator take the class label.
    # Quality scores of the final generator (0: off) and where their classifier is kept.
    config.score_samples = 10_000
    config.scorer_dir = "~/.cache/flaxcnn/scorers"
    return config
