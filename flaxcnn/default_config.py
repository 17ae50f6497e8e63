"""Default config: the Keras MNIST CNN on the embedded offline MNIST subset.

python -m flaxcnn.main --workdir runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data: any tfds image-classification dataset; splits in tfds's slicing syntax.
    config.dataset = "embedded_mnist"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR.
    config.train_split = "train[:90%]"  # Keras's validation_split=0.1 ...
    config.validation_split = "train[90%:]"  # ... keeps the last 10% of train.
    config.test_split = "test"
    # Model: a name from flaxcnn.models.MODELS and its keyword arguments.
    config.model = "SeedCNN"
    config.model_kwargs = ml_collections.ConfigDict()
    # Optimisation.
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"  # Or "cosine": decays to 0 over the run.
    config.batch_size = 32
    config.num_epochs = 10
    config.num_train_steps = -1  # > 0 overrides num_epochs.
    # Gradients are accumulated over microbatches of this many examples (0: whole batch).
    # Smaller working sets run several times faster on CPUs; -1 picks 32 on CPU, 0 elsewhere.
    config.microbatch_size = -1
    config.seed = 0
    # Evaluation, logging, checkpoints.
    config.eval_batch_size = 1000
    config.log_every_steps = 100
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    return config
