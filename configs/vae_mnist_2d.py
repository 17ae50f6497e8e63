"""The VAE of `configs/vae_mnist.py` with 2 latents, for the latent-manifold picture:

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/vae2d \
        --config configs/vae_mnist_2d.py
    python -m flaxcnn.sample --workdir runs/vae2d --manifold
"""

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae_mnist.py")
    spec = importlib.util.spec_from_file_location("vae_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model_kwargs.latent_dim = 2
    config.num_epochs = 10
    return config
