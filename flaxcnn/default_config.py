"""Default config: the Keras MNIST CNN on the embedded offline MNIST subset.

python -m flaxcnn.main --workdir runs/default
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every setting, with its default; each section below says what its settings do."""
    config = ml_collections.ConfigDict()
    for section in (
        _data,
        _model,
        _optimisation,
        _augmentation,
        _steps,
        _generative,
        _evaluation,
        _preprocessing,
    ):
        section(config)
    return config


def _data(config: ml_collections.ConfigDict) -> None:
    """The data: which dataset and which of its splits."""
    # Data: any tfds image-classification dataset; splits in tfds's slicing syntax.
    config.dataset = "embedded_mnist"
    config.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR.
    config.train_split = "train[:90%]"  # Keras's validation_split=0.1 ...
    config.validation_split = "train[90%:]"  # ... keeps the last 10% of train.
    # An empty validation_split: no validation (e.g. train_split="train" trains on all of it;
    # early stopping then has nothing to watch and is refused).
    config.test_split = "test"
    # Where batches come from (flaxcnn/data/streaming.py, docs/streaming.md): "memory" decodes
    # each split once and keeps it on the devices; "stream" reads, decodes and crops batches
    # from disk in worker processes while the model trains (splits larger than memory);
    # "auto" streams a split whose decoded size exceeds input_memory_budget_mb.
    config.input = "memory"
    config.input_memory_budget_mb = 4096.0
    config.input_workers = 0  # Streaming: decoding processes (0: threads of this process).
    # Streaming: "resize" (every image to image_size, as the in-memory path does) or
    # "random_resized" (training: random 8%-100% crops resized; evaluation: centre crop).
    config.input_crop = "resize"


def _model(config: ml_collections.ConfigDict) -> None:
    """What to train: task, model and its arguments, compute dtype."""
    # What to train: a task (flaxcnn.tasks.TASKS) and a model (flaxcnn.models.MODELS) by
    # name, or your own by import path: "package.module:Name" or "path/to/file.py:Name"
    # (stored absolute); and the model's keyword arguments (any keys the model takes).
    config.task = "classification"
    config.model = "SeedCNN"
    config.model_kwargs = ml_collections.ConfigDict()
    # Modules (import paths or .py files) imported before the run, e.g. a tfds builder.
    config.imports = ()
    # "float32" or "bfloat16": the model's compute dtype (parameters stay float32).
    config.compute_dtype = "float32"


def _optimisation(config: ml_collections.ConfigDict) -> None:
    """The optimizer, its schedule and the regularisers."""
    # Optimisation.
    # "adam", "adamw", "sgd", any optax optimizer by name ("lion", "rmsprop", ...) or an
    # import path of a function(learning_rate, **optimizer_kwargs) -> optax optimizer.
    config.optimizer = "adam"
    config.optimizer_kwargs = ml_collections.ConfigDict()  # E.g. b1=0.95 (any the optimizer takes).
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"  # Or "cosine", "warmup_cosine", "onecycle".
    # Warm-up of "warmup_cosine" and "onecycle" (0: 5% and 30% of the run).
    config.warmup_steps = 0
    config.grad_clip_norm = 0.0  # Clip the gradients' global norm to this (0: off).
    config.l2 = 0.0  # Coefficient of 0.5 * sum of squared kernel weights added to the loss.
    config.weight_decay = 0.0  # Decoupled weight decay of kernels; needs optimizer "adamw".
    # Learning-rate multipliers of parameter groups: ((pattern, factor), ...), each pattern
    # an fnmatch of a parameter's '/'-joined path (e.g. "*BatchNorm_*/bias"); the first
    # match wins, 0 freezes; a pattern that matches no parameter is an error.
    config.lr_multipliers = ()
    # Classification: train on targets that give the true class 1 - label_smoothing and
    # spread label_smoothing evenly over all classes (0: off; e.g. 0.1).
    config.label_smoothing = 0.0
    config.ema_decay = 0.0  # Evaluate a moving average of the parameters (0: off; e.g. 0.999).


def _augmentation(config: ml_collections.ConfigDict) -> None:
    """Random augmentation of the training images."""
    # Random augmentation of training images; 0 turns each off. Rotation in degrees,
    # translation in pixels (< 1: a fraction of the size), scale a relative zoom, elastic the
    # strength in pixels of a smooth random displacement field (smoothed over elastic_sigma
    # pixels), noise the standard deviation of added Gaussian noise; crop pads by this many
    # pixels ("reflect": mirrored, "zero": zeros, crop_mode) and crops back to size at a random
    # offset; the flips mirror each image left-right / upside down with probability 0.5.
    config.augment = ml_collections.ConfigDict(
        dict(
            rotation=0.0,
            translation=0.0,
            scale=0.0,
            elastic=0.0,
            elastic_sigma=4.0,
            noise=0.0,
            crop=0,
            crop_mode="reflect",
            flip_horizontal=False,
            flip_vertical=False,
        )
    )


def _steps(config: ml_collections.ConfigDict) -> None:
    """How long and in which steps training runs."""
    config.batch_size = 32
    config.num_epochs = 10
    config.num_train_steps = -1  # > 0 overrides num_epochs.
    # Gradients are accumulated over microbatches of this many examples (0: whole batch).
    # -1: the task's choice (the classifier 32 on CPUs where XLA's own convolutions run,
    # whose smaller working sets run faster there, whatever the device count, and the whole
    # batch where oneDNN's do; the autoencoder and VAE the whole batch; 0 elsewhere).
    # The GAN trains on whole batches and refuses sizes > 0.
    config.microbatch_size = -1
    # Training steps (and evaluation batches) run per dispatch, a lax.scan over the data kept
    # on the device: fewer round trips to the host. -1: 16, except 1 on CPUs for models with
    # lax.conv convolutions, which XLA:CPU runs many times slower inside loops (SeedCNN has
    # none: its convolution is a matmul).
    config.steps_per_dispatch = -1
    # A step whose loss or gradients are not finite stops the run with an error naming the
    # step (False), or is skipped and counted in results.json's "skipped_steps" (True).
    config.skip_nonfinite = False
    config.seed = 0


def _generative(config: ml_collections.ConfigDict) -> None:
    """The generative tasks' settings: GAN, VAE, and scoring their samples."""
    # Generative tasks (vae, gan): how many samples to score at the end (0: none), and where
    # the scoring classifier of each dataset is kept (trained on first use).
    config.score_samples = 0
    config.scorer_dir = "~/.cache/flaxcnn/scorers"
    # Both networks of a GAN or VAE take the class label (False: unconditional).
    config.conditional = False
    # The GAN (flaxcnn/tasks/gan.py): Adam's first-moment decay (0.5, DCGAN's value), the
    # discriminator's learning rate (-1: config.learning_rate), the decay of the generator's
    # moving average that samples are drawn with (0: the live parameters), the weight of
    # the R1 penalty on the discriminator's gradient at real images (0: off) and its period
    # in steps, the weight of AC-GAN's class loss (a conditional model with
    # model_kwargs.class_head), and k-means clusters of the training images that an
    # unconditional GAN is conditioned on (0: off).
    config.adam_b1 = 0.5
    config.d_learning_rate = -1.0
    config.g_ema_decay = 0.0
    config.r1_gamma = 0.0
    config.r1_every = 1
    config.class_head_weight = 1.0
    config.num_clusters = 0
    # The VAE's importance-weighted estimate of the test log-likelihood: samples per test
    # image (0: off) over the first `iw_examples` test images (0: all).
    config.iw_samples = 0
    config.iw_examples = 0


def _evaluation(config: ml_collections.ConfigDict) -> None:
    """Evaluation, logging, checkpoints and early stopping."""
    # Evaluation, logging, checkpoints.
    # -1: 100 (small enough that a batch's activations stay in CPU caches: 1000 ran 10x
    # slower on XLA:CPU) on any device count (run whole on each device where the devices
    # cannot split it, so evaluation is the same on any count); raise it on GPUs.
    config.eval_batch_size = -1
    config.log_every_steps = 100
    config.checkpoint_every_epochs = 1
    config.keep_checkpoints = 3
    # Stop when the validation `metric` has not improved by more than `min_delta` for
    # `patience` epochs (0: off).
    config.early_stopping = ml_collections.ConfigDict(
        dict(metric="accuracy", patience=0, min_delta=0.0)
    )
    # Test-time augmentation of a classifier (flaxcnn/models/test_time.py): evaluation,
    # predict and export average the logits of each image, its mirror image (flip) and its
    # copies shifted by `shift` pixels up, down, left and right (0: none).
    config.test_time_augment = ml_collections.ConfigDict(dict(flip=False, shift=0))


def _preprocessing(config: ml_collections.ConfigDict) -> None:
    """How images are resized, converted and standardised."""
    # Image preprocessing (flaxcnn/data/image_folder.py), for image folders
    # (dataset "folder:/path/to/root", layout root/<class>/*.png or root/<split>/<class>/...)
    # and tfds datasets alike: resize to (H, W) with PIL's bilinear filter (None: keep the
    # size; a folder's images must then share one) and convert to "grayscale" (1 channel) or
    # "rgb" (3) (None: keep tfds images as they are; folders default to "rgb").
    config.image_size = ml_collections.config_dict.placeholder(tuple)
    config.color_mode = ml_collections.config_dict.placeholder(str)
    # Per-channel standardisation of the model's input, (x - mean) / std with x in [0, 1]:
    # "none", "dataset" (each channel's mean and std over the training split, computed once
    # and stored with the run) or (mean, std), e.g. ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).
    # Applied alike in training, evaluation, predict and export; classification only.
    config.normalize = ml_collections.FieldReference("none", field_type=object)
