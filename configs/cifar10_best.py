"""CIFAR-10 best: `cifar10_fast`'s recipe (its whitened stem of 24 channels included) on Page's
ResNet-9 layout at half width (stages of 64, 128 and 256 channels, two residual
convolutions after the first and the last) for 24 epochs, with a moving average of the
parameters evaluated. Figures: docs/cifar10.md.

    python -m flaxcnn.main --workdir runs/cifar10_best --config configs/cifar10_best.py \
        --config.dataset=folder:/path/to/cifar10     # or tfds: --config.dataset=cifar10
"""

import importlib.util
import os

import ml_collections


def _fast_config() -> ml_collections.ConfigDict:
    """configs/cifar10_fast.py's config (configs are files, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10_fast.py")
    spec = importlib.util.spec_from_file_location("cifar10_fast", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _fast_config()
    config.model_kwargs.widths = (64, 128, 256)
    config.model_kwargs.residual = (2, 0, 2)
    config.num_epochs = 24
    config.ema_decay = 0.999
    return config
