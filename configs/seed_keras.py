"""The classic Keras MNIST CNN on full MNIST, as the Keras example trains it.

Conv2D(32, 3x3, relu) -> MaxPool(2) -> Flatten -> Dense(10, softmax); Adam 1e-3, batch 32,
5 epochs, the last 10% of the training set held out for validation.

    python -m flaxcnn.main --workdir runs/seed --config configs/seed_keras.py
    # offline, with a prepared tfds directory:
    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/seed \
        --config configs/seed_keras.py
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = "SeedCNN"
    config.num_epochs = 5
    config.batch_size = 32
    return config
