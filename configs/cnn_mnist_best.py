"""The best single MNIST model of this project: the `CNN` with wider stages and a dense
layer of 128, trained on all 60,000 training images with random rotations, shifts, zooms and
mild elastic distortions, AdamW with warm-up and cosine decay, and evaluation of the
parameters' moving average on each test image and its 1-pixel shifts.

    TFDS_DATA_DIR=../shared/data/tfds python -m flaxcnn.main --workdir runs/cnn_best \
        --config configs/cnn_mnist_best.py
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "mnist"
    config.model = "CNN"
    config.model_kwargs.widths = (32, 64)
    config.model_kwargs.dropout_rate = 0.3
    config.model_kwargs.hidden = 128
    config.batch_size = 128
    # Batch norm over microbatches of 32 ("ghost batches"): their noise regularises.
    config.microbatch_size = 32
    # All 60,000 training images: no validation split to watch, the test split says the rest.
    config.train_split = "train"
    config.validation_split = ""
    config.num_epochs = 10
    config.optimizer = "adamw"
    config.weight_decay = 0.05
    config.learning_rate = 3e-3
    config.lr_schedule = "warmup_cosine"
    config.augment.rotation = 10.0
    config.augment.translation = 2.0
    config.augment.scale = 0.1
    # Mild elastic distortion (displacements of about half a pixel) on top of the affine ones.
    config.augment.elastic = 16.0
    config.augment.elastic_sigma = 5.0
    config.ema_decay = 0.999
    config.test_time_augment.shift = 1
    return config
