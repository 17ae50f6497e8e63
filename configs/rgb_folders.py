"""32x32 RGB image folders, with the preprocessing every such recipe uses: random crops (pad
4 pixels by reflection, crop back to 32x32), horizontal flips, and per-channel normalisation
by the training split's mean and standard deviation (stored with the run, and applied by
predict and inside both exports).

The folder: `root/train/<class>/*.png`, `root/validation/<class>/...`, `root/test/<class>/...`
(images of any size are resized to 32x32 RGB). `scripts/rgb_patches.py` builds one offline
from photographs that ship with scikit-image:

    pip install scikit-image && python scripts/rgb_patches.py --out /tmp/rgb_patches
    python -m flaxcnn.main --workdir runs/rgb --config configs/rgb_folders.py \
        --config.dataset=folder:/tmp/rgb_patches

A flat folder (`root/<class>/*.png`) works too with `--config.train_split='train[:80%]'
--config.validation_split='train[80%:90%]' --config.test_split='train[90%:]'`.
"""

import ml_collections

from flaxcnn import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.dataset = "folder:/tmp/rgb_patches"
    config.train_split = "train"
    config.validation_split = "validation"
    config.test_split = "test"
    config.image_size = (32, 32)
    config.color_mode = "rgb"
    config.model = "CNN"
    config.model_kwargs.widths = (16, 32)
    config.model_kwargs.dropout_rate = 0.3
    config.batch_size = 64
    config.num_epochs = 15
    config.learning_rate = 2e-3
    config.lr_schedule = "warmup_cosine"
    config.augment.crop = 4
    config.augment.crop_mode = "reflect"
    config.augment.flip_horizontal = True
    config.normalize = "dataset"
    return config
