"""The class-conditional DCGAN on full MNIST: `configs/gan_mnist.py` with the label one-hot
beside the generator's latent and a projection discriminator.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/cgan \
        --config configs/gan_mnist_conditional.py
    python -m flaxcnn.sample --workdir runs/cgan --label 7

results.json adds the scorer's accuracy on samples drawn for each class
("per_class_conditional_accuracy") and their mean ("conditional_accuracy").
"""

import importlib.util
import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gan_mnist.py")
    spec = importlib.util.spec_from_file_location("gan_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.conditional = True
    return config
