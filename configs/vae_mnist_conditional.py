"""The class-conditional VAE on full MNIST: `configs/vae_mnist.py` with the label one-hot
beside the encoder's features and the decoder's latent, q(z|x, y) and p(x|z, y).

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/cvae \
        --config configs/vae_mnist_conditional.py
    python -m flaxcnn.sample --workdir runs/cvae --label 3
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
    config.conditional = True
    return config
