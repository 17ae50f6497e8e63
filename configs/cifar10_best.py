"""CIFAR-10 best: `cifar10_fast`'s recipe (airbench's net in bfloat16, its whitened stem,
dirac init and test-time views included) on wider stages of 128, 256 and 512 channels
(airbench96's direction) for 20 epochs, with a moving average of the parameters evaluated.
Figures: docs/cifar10.md.

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
    config.model_kwargs.widths = (128, 256, 512)
    config.num_epochs = 20
    config.ema_decay = 0.999
    return config
