"""CIFAR-10 fast: airbench's net (Jordan's CIFAR-10 speed record, a ResNet-9-kind
`FastResNet`) in bfloat16: a 2x2 whitened first layer fitted to the training images, stages
of 64, 256 and 256 channels each with one residual convolution, identity-initialised (dirac)
convolutions; batch 512, SGD with Nesterov momentum at a high one-cycle learning rate, L2
5e-4, label smoothing 0.2, random crops of 4-pixel reflected padding and horizontal flips,
per-channel normalisation, and test-time augmentation by flips and 1-pixel shifts. bfloat16
pays on CPUs with bfloat16 instructions (AMX, AVX-512 BF16) and on GPUs; elsewhere add
--config.compute_dtype=float32. Figures: docs/cifar10.md.

    python -m flaxcnn.main --workdir runs/cifar10_fast --config configs/cifar10_fast.py \
        --config.dataset=folder:/path/to/cifar10     # or tfds: --config.dataset=cifar10
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "cifar10"
    # All but 1,000 training images train; those 1,000 are the per-epoch check; the 10,000
    # test images are scored once, at the end.
    config.train_split = "train[:98%]"
    config.validation_split = "train[98%:]"
    config.test_split = "test"
    config.color_mode = "rgb"
    config.model = "FastResNet"
    config.model_kwargs.stem = 24
    config.model_kwargs.widths = (64, 256, 256)
    config.model_kwargs.residual = (1, 1, 1)
    config.model_kwargs.whiten = True  # The stem: 24 = both signs of 12 whitened components.
    config.model_kwargs.dirac = True
    config.batch_size = 512
    config.num_epochs = 15
    config.compute_dtype = "bfloat16"  # On AMX: 1.9x float32's examples/s (docs/cifar10.md).
    config.optimizer = "sgd"
    config.optimizer_kwargs.momentum = 0.9
    config.optimizer_kwargs.nesterov = True
    config.learning_rate = 0.4
    config.lr_schedule = "onecycle"
    config.warmup_steps = 0  # onecycle's default: 30% of the run.
    config.l2 = 5e-4
    config.label_smoothing = 0.2
    config.augment.crop = 4
    config.augment.crop_mode = "reflect"
    config.augment.flip_horizontal = True
    config.normalize = "dataset"
    config.test_time_augment.flip = True
    config.test_time_augment.shift = 1
    config.log_every_steps = 20
    return config
