"""Image classification: softmax cross-entropy on integer labels.

The steps take and return plain pytrees, so they run eagerly, under `jax.jit`, and over a mesh
unchanged. Metrics come back as sums with an example `count`, so that batches of any size
and padded evaluation batches (`mask`) average correctly on the host.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxcnn import cpu
from flaxcnn.data import preprocess, streaming
from flaxcnn.models import create_model, whitening
from flaxcnn.models.test_time import ViewAveraged
from flaxcnn.training import gradient_step
from flaxcnn.training.gradient_step import num_microbatches as num_microbatches
from flaxcnn.training.state import TrainState, create_optimizer, create_train_state, model_kwargs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def create_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    input_shape: tuple[int, int, int],
    num_classes: int,
    total_steps: int,
) -> TrainState:
    """`config.model` with `num_classes` outputs in `config.compute_dtype` (evaluated on
    `config.test_time_augment`'s views), and `config.optimizer`, initialised (with a moving
    average when `config.ema_decay` > 0)."""
    model = create_model(config.model, num_classes=num_classes, **model_kwargs(config))
    views = config.test_time_augment
    if views.flip or views.shift:
        model = ViewAveraged(model, flip=views.flip, shift=views.shift)
    tx = create_optimizer(config, total_steps)
    return create_train_state(model, tx, rng, input_shape, ema_decay=config.ema_decay)


def fit_to_data(state: TrainState, config: ml_collections.ConfigDict, train_split) -> TrainState:
    """The state with the model's `PatchWhitening` kernels fitted to a sample of the
    training images as the model sees them (normalised); unchanged without such a layer."""
    if not whitening.has_kernels(state.batch_stats):
        return state
    rows = whitening.sample_rows(train_split.num_examples, train_split.image_shape, config.seed)
    if hasattr(train_split, "images"):
        images = train_split.images[rows]
    else:  # Streamed: the sample decoded here.
        images = streaming.read_examples(train_split, rows, config.input_crop)
    stats = preprocess.from_config(config)
    sample = preprocess.to_model_input(images, *(stats or ()))
    return state.replace(batch_stats=whitening.fit_whitening(state.batch_stats, sample))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) for a setting this task cannot honour: it honours every
    training setting of `gradient_step`, and label smoothing in [0, 1)."""
    gradient_step.validate(config)
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing}")


def step_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`train_step`'s static settings from the config (`gradient_step.step_kwargs`). A
    microbatch size of -1 means the CPU backend's choice on CPUs
    (`flaxcnn.cpu.classifier_microbatch_size`), the whole batch elsewhere."""
    microbatch = cpu.classifier_microbatch_size()
    kwargs = gradient_step.step_kwargs(config, cpu_microbatch_size=microbatch)
    return {**kwargs, "label_smoothing": float(config.label_smoothing)}


def classification_metrics(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Metrics:
    """Summed cross-entropy and correct predictions over the examples with weight 1."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return {
        "loss": jnp.sum(losses * weights),
        "accuracy": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


def loss_fn(apply_fn, variables: dict, batch: Batch, rng: jax.Array, label_smoothing: float = 0.0):
    """The summed cross-entropy of `batch` in training mode (dropout from `rng`) against
    targets smoothed by `label_smoothing` (the true class keeps 1 - label_smoothing, every
    class gets label_smoothing / num_classes), with the metric sums (plain cross-entropy,
    so that training and evaluation losses compare) and the updated batch statistics."""
    logits, batch_stats = gradient_step.apply_training(
        apply_fn, variables, batch["image"], rngs={"dropout": rng}
    )
    labels = batch["label"]
    metrics = classification_metrics(logits, labels, jnp.ones_like(labels, jnp.float32))
    if not label_smoothing:
        return metrics["loss"], (metrics, batch_stats)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    loss = jnp.sum(optax.softmax_cross_entropy(logits, targets))
    return loss, (metrics, batch_stats)


def train_step(
    state: TrainState, batch: Batch, rng: jax.Array, *, label_smoothing: float = 0.0, **kwargs
) -> tuple[TrainState, Metrics]:
    """One optimizer update on the mean (smoothed) cross-entropy of a batch: the
    task-independent step (augmentation, microbatches, L2, skip_nonfinite: `kwargs`) around
    this task's `loss_fn`."""
    loss = functools.partial(loss_fn, label_smoothing=label_smoothing)
    return gradient_step.gradient_step(state, batch, rng, loss, **kwargs)


def eval_step(state: TrainState, batch: Batch, rng: jax.Array | None = None) -> Metrics:
    """Summed loss and accuracy over the examples of `batch` whose `mask` is set, and their
    "confusion" counts (true class, predicted class): the loop reports per-class accuracy
    and the confusion matrix from the same evaluation.

    `rng` is unused: evaluation of a classifier is deterministic."""
    del rng
    logits = state.apply_fn(state.eval_variables(), batch["image"], train=False)
    weights = batch.get("mask", jnp.ones_like(batch["label"], bool)).astype(jnp.float32)
    metrics = classification_metrics(logits, batch["label"], weights)
    num_classes = logits.shape[-1]
    predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes)
    true = jax.nn.one_hot(batch["label"], num_classes) * weights[:, None]
    return {**metrics, "confusion": true.T @ predicted}


def predict(state: TrainState, batch: Batch) -> jax.Array:
    """The predicted class of every example of `batch`."""
    logits = state.apply_fn(state.eval_variables(), batch["image"], train=False)
    return jnp.argmax(logits, axis=-1)
