"""Generative adversarial training (DCGAN recipe) of `config.model` (a `DCGAN`).

Each train step first updates the discriminator on a real batch and a generated one (binary
cross-entropy), then the generator with the non-saturating loss -log D(G(z)) (it maximises
log D(G(z)) rather than minimising log(1 - D(G(z))), whose gradient vanishes while the
discriminator wins). Each update is a pure function of its own, touching only its network's
parameters, batch statistics and optimizer state, so each can be tested alone.

Both networks train with Adam (`config.optimizer` must be "adam") following
`config.lr_schedule`. Config keys of this task (defaults in flaxcnn/default_config.py):
`adam_b1` (0.5, DCGAN's value: Adam's first-moment decay), `d_learning_rate` (the
discriminator's learning rate; `learning_rate`), `g_ema_decay` (0: the moving average of the
generator's parameters that samples are drawn with; 0 keeps the live parameters),
`conditional` (False: both networks take the class label), `r1_gamma` (0, off: the weight
of the R1 penalty on the discriminator's gradient at real images), `r1_every` (1: the
penalty's period in steps, a lazy regulariser when above 1), `class_head_weight` (1: the
weight of AC-GAN's classification loss, for a conditional model with `model_kwargs.class_head`:
D's head learns the real images' labels, and G is trained to have its fakes classified as the
labels they were drawn for), `num_clusters` (0, off: an unconditional GAN conditioned on that
many k-means clusters of its training images, found before the first step; see
flaxcnn.data.clusters), `score_samples` (0, off: how many samples of `generator` the run
scores) and `scorer_dir` (where the scoring classifier is kept; see flaxcnn.scoring).

Samples (pictures, scores, `python -m flaxcnn.sample`, the generator export) are drawn with
`sampling_variables`: the averaged parameters and batch statistics of a fixed batch of latents
through them, so that a single latent gives the same image as in any batch.
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from flaxcnn import cpu, run_files
from flaxcnn.data import augment, clusters, input_pipeline
from flaxcnn.models import MODELS, create_model
from flaxcnn.models.gan import DCGAN
from flaxcnn.reporting import pictures
from flaxcnn.tasks.base import Sampling
from flaxcnn.training.gradient_step import keep_if_finite
from flaxcnn.training.state import SCHEDULES, model_kwargs

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

SAMPLE_GRID_COLUMNS = 8
NUM_PICTURE_SAMPLES = 64
# The sample pictures' latents come from key(0) folded with this, whatever the run's seed, so
# every epoch (and every run of a config) pictures the same latent vectors.
_FIXED_LATENT_FOLD = 0x6A4
# An update's augmentations draw from its key folded with this: its other draws stay as
# they are without augmentation.
_AUGMENT_FOLD = 0xA06
_STANDING_STATS_FOLD = 0x57A
_LABEL_FOLD = 0x1AB  # A conditional generator's labels: its latents' key folded with this.
# Latents whose batch statistics the sampling generator normalises with.
STANDING_STATS_SAMPLES = 2048


class GANState(struct.PyTreeNode):
    """Both networks' parameters and optimizer states, the generator's batch statistics, a
    moving average of the generator's parameters (what samples are drawn with), and the step:
    every leaf an array, so the loop jits and checkpoints it whole."""

    step: jax.Array
    params: dict[str, Any]  # {"generator": ..., "discriminator": ...}
    batch_stats: dict[str, Any]  # {"generator": ...}: the discriminator has none.
    g_opt_state: optax.OptState
    d_opt_state: optax.OptState
    g_ema: dict[str, Any]  # The generator's parameters, averaged with decay `g_ema_decay`.
    clusters: clusters.Clusters  # The data's clusters (config.num_clusters), or {}.
    model: DCGAN = struct.field(pytree_node=False)
    g_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    d_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    g_ema_decay: float = struct.field(pytree_node=False, default=0.0)


def _optimizer(
    config: ml_collections.ConfigDict, learning_rate: float, total_steps: int
) -> optax.GradientTransformation:
    """Adam with `learning_rate` following `config.lr_schedule`, and b1 = `config.adam_b1`,
    after clipping the gradients' global norm to `config.grad_clip_norm` (0: no clipping)."""
    if config.optimizer != "adam":
        raise ValueError(
            f"task 'gan' trains with optimizer 'adam' (b1 from config.adam_b1), "
            f"got {config.optimizer!r}"
        )
    if config.optimizer_kwargs:
        raise ValueError(
            "task 'gan' takes no config.optimizer_kwargs (its Adam's b1 is config.adam_b1)"
        )
    if config.lr_schedule not in SCHEDULES:
        raise ValueError(
            f"unknown schedule {config.lr_schedule!r}; valid: {', '.join(sorted(SCHEDULES))}"
        )
    schedule = SCHEDULES[config.lr_schedule](learning_rate, total_steps, config.warmup_steps)
    adam = optax.adam(schedule, b1=config.adam_b1)
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adam)
    return adam


def _d_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The discriminator's learning rate: `config.d_learning_rate`, -1 for the generator's."""
    return config.learning_rate if config.d_learning_rate < 0 else config.d_learning_rate


def create_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    input_shape: tuple[int, int, int],
    num_classes: int,
    total_steps: int,
) -> GANState:
    """`config.model` (a DCGAN) for images of `input_shape`, initialised, with an optimizer
    each; conditioned on the `num_classes` labels when `config.conditional` is set, or on
    `config.num_clusters` clusters (placeholders until `fit_to_data`)."""
    validate(config)
    model_class = MODELS.get(config.model)
    if not (isinstance(model_class, type) and issubclass(model_class, DCGAN)):
        raise ValueError(f"task 'gan' needs a GAN model (DCGAN), got {config.model!r}")
    kwargs = model_kwargs(config)
    if config.conditional:
        kwargs["num_classes"] = num_classes
    num_clusters = int(config.num_clusters)
    if num_clusters:
        kwargs["num_clusters"] = num_clusters
    model = create_model(config.model, image_shape=tuple(input_shape), **kwargs)
    decay = float(config.g_ema_decay)
    if not 0 <= decay < 1:
        raise ValueError(f"config.g_ema_decay must be in [0, 1), got {decay}")
    z = jnp.zeros((1, model.latent_dim), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if model.num_conditions else None
    variables = model.init(rng, z, labels, train=False)
    params = variables["params"]
    g_tx = _optimizer(config, config.learning_rate, total_steps)
    d_tx = _optimizer(config, _d_learning_rate(config), total_steps)
    return GANState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        g_opt_state=g_tx.init(params["generator"]),
        d_opt_state=d_tx.init(params["discriminator"]),
        # A copy, so that donating the state never donates one buffer twice.
        g_ema=jax.tree.map(jnp.copy, params["generator"]),
        clusters=clusters.empty(num_clusters, tuple(input_shape)) if num_clusters else {},
        model=model,
        g_ema_decay=decay,
        g_tx=g_tx,
        d_tx=d_tx,
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) for a training setting this task cannot honour. Its two
    updates honour `skip_nonfinite`, `grad_clip_norm` (each network's gradients) and
    `augment` (`diff_augment`); microbatches, L2 and the moving average of all parameters
    are refused."""
    if config.microbatch_size > 0:
        raise ValueError(
            "task 'gan' trains on whole batches (the generator's batch norm needs them): "
            f"set config.microbatch_size to 0 or -1, not {config.microbatch_size}"
        )
    if config.l2:
        raise ValueError(f"task 'gan' has no L2 penalty: set config.l2 to 0, not {config.l2}")
    if config.r1_gamma < 0 or int(config.r1_every) < 1:
        raise ValueError(
            "config.r1_gamma must be >= 0 and config.r1_every >= 1, got "
            f"{config.r1_gamma} and {config.r1_every}"
        )
    if config.num_clusters < 0 or (config.num_clusters and config.conditional):
        raise ValueError(
            "config.num_clusters conditions an unconditional GAN on clusters of its data: "
            f"set it to 0 or more, and config.conditional to False (got {config.num_clusters} "
            f"and {config.conditional})"
        )
    if config.ema_decay:
        raise ValueError(
            "task 'gan' averages only the generator's parameters: set config.g_ema_decay, "
            f"and config.ema_decay to 0 (not {config.ema_decay})"
        )


def fit_to_data(
    state: GANState, config: ml_collections.ConfigDict, train_split: input_pipeline.Split
) -> GANState:
    """The state with the k-means clusters of the training images (`config.num_clusters`;
    unchanged without): called once, before the first step."""
    if not state.model.num_clusters:
        return state
    num = state.model.num_clusters
    if num > train_split.num_examples:
        raise ValueError(
            f"config.num_clusters={num} is more than the {train_split.num_examples} training images"
        )
    fitted, purity = clusters.fit_clusters(train_split.images, train_split.labels, num, config.seed)
    logging.info(
        "k-means: %d clusters of the training images, %.1f%% pure in their labels "
        "(which the GAN does not see).",
        num,
        100 * purity,
    )
    return state.replace(clusters=fitted)


def step_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`train_step`'s static settings: whether to skip non-finite updates, and the
    augmentation of real and generated images."""
    validate(config)
    return {
        "skip_nonfinite": bool(config.skip_nonfinite),
        "augmentation": augment.from_config(config) if "augment" in config else None,
        "r1_gamma": float(config.r1_gamma),
        "r1_every": int(config.r1_every),
        "class_head_weight": float(config.class_head_weight),
    }


def latents(state: GANState, rng: jax.Array, num: int) -> jax.Array:
    """`num` standard-normal latent vectors of the generator's size."""
    return jax.random.normal(rng, (num, state.model.latent_dim), jnp.float32)


def random_labels(state: GANState, rng: jax.Array, num: int) -> jax.Array | None:
    """`num` labels drawn uniformly for a conditional GAN; None for an unconditional one."""
    if not state.model.num_classes:
        return None
    return jax.random.randint(rng, (num,), 0, state.model.num_classes, jnp.int32)


def latent_clusters(state: GANState, z: jax.Array) -> jax.Array | None:
    """The cluster each latent is drawn from (`clusters.of_latents`) for a GAN conditioned on
    clusters; None for any other."""
    if not state.model.num_clusters:
        return None
    return clusters.of_latents(state.clusters, z)


def generator_labels(state: GANState, z: jax.Array, rng: jax.Array) -> jax.Array | None:
    """What latents `z` are generated for: uniform classes drawn with `rng` (a conditional
    GAN), their clusters (`latent_clusters`), or None."""
    if state.model.num_clusters:
        return latent_clusters(state, z)
    return random_labels(state, rng, len(z))


def real_labels(state: GANState, batch: Batch) -> jax.Array | None:
    """What real images are conditioned on: their class (a conditional GAN), the cluster
    nearest them (one conditioned on clusters), or None."""
    if state.model.num_clusters:
        return clusters.nearest(state.clusters, batch["image"])
    return batch["label"] if state.model.num_classes else None


def fixed_latents(state: GANState, num: int = NUM_PICTURE_SAMPLES) -> jax.Array:
    """The same `num` latent vectors for every epoch and run: comparable sample pictures."""
    return latents(state, jax.random.fold_in(jax.random.key(0), _FIXED_LATENT_FOLD), num)


def fixed_labels(state: GANState, num: int = NUM_PICTURE_SAMPLES) -> jax.Array | None:
    """Labels 0, 1, ..., K-1, 0, ... for the pictures of a conditional GAN (None otherwise):
    with 8 columns, each class runs down a diagonal."""
    if not state.model.num_classes:
        return None
    return jnp.arange(num, dtype=jnp.int32) % state.model.num_classes


def _generate(state: GANState, params: Any, z: jax.Array, labels, train: bool):
    """G(z, labels), and in training mode (batch statistics) the updated batch statistics."""
    variables = {"params": {"generator": params}, "batch_stats": state.batch_stats}
    if not train:
        images = _apply(state)(variables, z, labels, method=DCGAN.generate)
        return images, state.batch_stats
    images, updates = _apply(state)(
        variables, z, labels, train=True, method=DCGAN.generate, mutable=["batch_stats"]
    )
    return images, updates["batch_stats"]


def _apply(state: GANState) -> Callable:
    """The model's `apply` for training: with the standard layers made fast on CPUs."""
    return cpu.for_this_backend(state.model.apply)


def _discriminate(state: GANState, params: Any, images: jax.Array, labels=None) -> jax.Array:
    return _apply(state)(
        {"params": {"discriminator": params}}, images, labels, method=DCGAN.discriminate
    )


def _discriminate_with_head(
    state: GANState, params: Any, images: jax.Array, labels=None
) -> tuple[jax.Array, jax.Array | None]:
    """D's logits of `images` and its class head's logits (None without a class head)."""
    if not state.model.class_head:
        return _discriminate(state, params, images, labels), None
    return _apply(state)(
        {"params": {"discriminator": params}}, images, labels, True, method=DCGAN.discriminate
    )


def class_head_loss(class_logits: jax.Array | None, labels: jax.Array | None) -> jax.Array:
    """AC-GAN's summed cross-entropy of the class head against `labels`; 0 without a head."""
    if class_logits is None:
        return jnp.zeros((), jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(class_logits, labels))


def sampling_variables(state: GANState, num: int = STANDING_STATS_SAMPLES) -> dict:
    """The generator's variables samples are drawn with: the moving average of its parameters
    and "standing" batch statistics, those of `num` fixed latents (uniform labels) passed
    through it in training mode. The running averages of training describe earlier
    parameters, not the averaged ones; fixed latents make the statistics deterministic."""
    rng = jax.random.fold_in(jax.random.key(0), _STANDING_STATS_FOLD)
    z = latents(state, rng, num)
    labels = fixed_labels(state, num)
    if labels is None:
        labels = latent_clusters(state, z)
    variables = {"params": {"generator": state.g_ema}, "batch_stats": state.batch_stats}
    _, updates = state.model.clone(bn_momentum=0.0).apply(
        variables, z, labels, train=True, method=DCGAN.generate, mutable=["batch_stats"]
    )
    return {"params": {"generator": state.g_ema}, "batch_stats": updates["batch_stats"]}


def generate_with(
    state: GANState, variables: dict, z: jax.Array, labels: jax.Array | None = None
) -> jax.Array:
    """G(z, labels) in evaluation mode with `variables` (see `sampling_variables`): (num, H,
    W, C) in [0, 1]. A GAN conditioned on clusters takes no labels: each latent's cluster."""
    if labels is None:
        labels = latent_clusters(state, z)
    return state.model.apply(variables, z, labels, method=DCGAN.generate)


def generate_from_latents(
    state: GANState, z: jax.Array, labels: jax.Array | None = None
) -> jax.Array:
    """G(z, labels) with the sampling variables: (num, H, W, C) in [0, 1]."""
    return generate_with(state, sampling_variables(state), z, labels)


def generate(
    state: GANState,
    rng: jax.Array,
    num: int,
    labels: jax.Array | None = None,
    variables: dict | None = None,
) -> jax.Array:
    """`num` images (num, H, W, C) in [0, 1] from fresh latents drawn with `rng`, of the given
    `labels` (a conditional GAN; uniform ones when None), with `variables` (by default
    `sampling_variables(state)`: pass them in when drawing several times)."""
    z_rng, label_rng = jax.random.split(rng)
    if labels is None:
        labels = random_labels(state, label_rng, num)
    variables = sampling_variables(state) if variables is None else variables
    return generate_with(state, variables, latents(state, z_rng, num), labels)


def discriminator_losses(
    real_logits: jax.Array, fake_logits: jax.Array, weights: jax.Array
) -> Metrics:
    """Summed per-example losses of both networks and D's mean probabilities, as sums.

    d_loss: -log D(x) - log(1 - D(G(z))); g_loss (non-saturating): -log D(G(z)).
    """
    d_loss = optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits))
    d_loss += optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits))
    g_loss = optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits))
    return {
        "d_loss": jnp.sum(d_loss * weights),
        "g_loss": jnp.sum(g_loss * weights),
        "d_real": jnp.sum(jax.nn.sigmoid(real_logits) * weights),
        "d_fake": jnp.sum(jax.nn.sigmoid(fake_logits) * weights),
        "count": jnp.sum(weights),
    }


def diff_augment(rng: jax.Array, augmentation: dict | None, *batches: jax.Array) -> list:
    """Each batch of images augmented (`augment.augment`'s `augmentation`) with its own key
    folded from `rng`; unchanged when `augmentation` is None or off. DiffAugment (Zhao et al.,
    2020): the discriminator sees real and generated images through the same kind of random
    transformations, and the generator's gradient passes through them (they are
    differentiable), so the generator is not taught to produce augmented images."""
    if not augmentation or not augment.enabled(augmentation):
        return list(batches)
    keys = jax.random.split(jax.random.fold_in(rng, _AUGMENT_FOLD), len(batches))
    return [augment.augment(images, k, **augmentation) for images, k in zip(batches, keys)]


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """Summed squared norms of D's gradient at each real image, sum_i |grad_x D(x_i)|^2: R1
    (Mescheder et al., 2018), which keeps the discriminator flat on the data so that the game
    converges instead of circling."""
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(real)
    return jnp.sum(jnp.square(grads))


def r1_gradients(
    state: GANState, real: jax.Array, labels: jax.Array | None, r1_gamma: float, r1_every: int
) -> Any:
    """The gradient of the mean R1 penalty, weighted `r1_gamma` / 2, as D's parameters take it;
    lazily (StyleGAN2): on every `r1_every`-th step only, `r1_every` times heavier, and zero on
    the others, which skip the double backward pass."""
    d_params = state.params["discriminator"]

    def penalty(params):
        d_fn = lambda x: _discriminate(state, params, x, labels)  # noqa: E731
        return r1_gamma / 2 * r1_every * r1_penalty(d_fn, real) / len(real)

    if r1_every == 1:
        return jax.grad(penalty)(d_params)
    zeros = lambda params: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return jax.lax.cond(state.step % r1_every == 0, jax.grad(penalty), zeros, d_params)


def discriminator_update(
    state: GANState,
    batch: Batch,
    rng: jax.Array,
    augmentation: dict | None = None,
    r1_gamma: float = 0.0,
    r1_every: int = 1,
    class_head_weight: float = 1.0,
) -> tuple[GANState, Metrics]:
    """One optimizer update of the discriminator on `batch` (real) and as many generated
    images (from latents drawn with `rng`), both through `diff_augment`, with the R1 penalty
    `r1_gamma` / 2 * |grad_x D(x)|^2 on the real images every `r1_every` steps (`r1_gradients`).
    The generator is applied in training mode, as in its own update, but its batch
    statistics are not updated here."""
    real = batch["image"]
    # A conditional GAN's fakes are drawn for the real batch's labels (or clusters).
    labels = real_labels(state, batch)
    z = latents(state, rng, len(real))
    fake, _ = _generate(state, state.params["generator"], z, labels, True)
    fake = jax.lax.stop_gradient(fake)
    real, fake = diff_augment(rng, augmentation, real, fake)

    def loss_fn(d_params):
        real_logits, class_logits = _discriminate_with_head(state, d_params, real, labels)
        metrics = discriminator_losses(
            real_logits,
            _discriminate(state, d_params, fake, labels),
            jnp.ones(len(real), jnp.float32),
        )
        # The class head learns the labels of real images only, so it cannot be taught to
        # call a poor fake a good one.
        head = class_head_loss(class_logits, labels)
        loss = (metrics["d_loss"] + class_head_weight * head) / len(real)
        return loss, {**metrics, "class_loss": head}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params["discriminator"])
    if r1_gamma:
        grads = jax.tree.map(jnp.add, grads, r1_gradients(state, real, labels, r1_gamma, r1_every))
    updates, d_opt_state = state.d_tx.update(
        grads, state.d_opt_state, state.params["discriminator"]
    )
    d_params = optax.apply_updates(state.params["discriminator"], updates)
    new_state = state.replace(
        params={**state.params, "discriminator": d_params}, d_opt_state=d_opt_state
    )
    keep = ["d_loss", "d_real", "d_fake", "count"]
    keep += ["class_loss"] if state.model.class_head else []
    return new_state, {k: metrics[k] for k in keep}


def generator_update(
    state: GANState,
    rng: jax.Array,
    batch_size: int,
    augmentation: dict | None = None,
    class_head_weight: float = 1.0,
) -> tuple[GANState, Metrics]:
    """One optimizer update of the generator on `batch_size` latents drawn with `rng`, with
    the non-saturating loss -log D(G(z)); updates its batch statistics and the moving average
    of its parameters too. A conditional GAN draws uniform labels with `rng`; one
    conditioned on clusters, each latent's cluster."""
    z = latents(state, rng, batch_size)
    labels = generator_labels(state, z, jax.random.fold_in(rng, _LABEL_FOLD))

    def loss_fn(g_params):
        fake, batch_stats = _generate(state, g_params, z, labels, train=True)
        # D judges the fakes through the augmentations of its own update (DiffAugment).
        (fake,) = diff_augment(rng, augmentation, fake)
        d_params = state.params["discriminator"]
        logits, class_logits = _discriminate_with_head(state, d_params, fake, labels)
        loss = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)))
        head = class_head_weight * class_head_loss(class_logits, labels)
        return (loss + head) / batch_size, (loss, batch_stats)

    grads, (g_loss, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params["generator"])
    updates, g_opt_state = state.g_tx.update(grads, state.g_opt_state, state.params["generator"])
    g_params = optax.apply_updates(state.params["generator"], updates)
    decay = state.g_ema_decay
    g_ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.g_ema, g_params)
    new_state = state.replace(
        params={**state.params, "generator": g_params},
        batch_stats=batch_stats,
        g_opt_state=g_opt_state,
        g_ema=g_ema,
    )
    return new_state, {"g_loss": g_loss}


def train_step(
    state: GANState,
    batch: Batch,
    rng: jax.Array,
    *,
    skip_nonfinite: bool = False,
    augmentation: dict | None = None,
    r1_gamma: float = 0.0,
    r1_every: int = 1,
    class_head_weight: float = 1.0,
) -> tuple[GANState, Metrics]:
    """A discriminator update, then a generator update against the updated discriminator.

    `rng` is the run's key; the step folds in `state.step`, so each step draws fresh latents
    and a resumed run draws the same ones. Metrics are sums over the batch plus "count";
    "loss" is the generator's loss (the one the loop watches and logs). With
    `skip_nonfinite`, a step whose losses or new parameters are not finite leaves both
    networks as they were (the step still counted) and is reported in "skipped" instead.
    With `augmentation`, both updates augment real and generated images (`diff_augment`);
    with `r1_gamma`, the discriminator's update adds the R1 penalty every `r1_every` steps.
    """
    d_rng, g_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    new_state, metrics = discriminator_update(
        state, batch, d_rng, augmentation, r1_gamma, r1_every, class_head_weight
    )
    batch_size = batch["image"].shape[0]
    new_state, g_metrics = generator_update(
        new_state, g_rng, batch_size, augmentation, class_head_weight
    )
    metrics = {**metrics, **g_metrics, "loss": g_metrics["g_loss"]}
    new_state = new_state.replace(step=state.step + 1)
    if not skip_nonfinite:
        return new_state, metrics
    finite = jnp.isfinite(metrics["d_loss"]) & jnp.isfinite(metrics["g_loss"])
    finite &= jnp.isfinite(optax.global_norm(new_state.params))
    return keep_if_finite(new_state, state, metrics, finite)


def eval_step(state: GANState, batch: Batch, rng: jax.Array | None = None) -> Metrics:
    """Both losses and D's mean probabilities on `batch` (real) and one generated image per
    example, summed over the examples whose `mask` is set. The generator runs in evaluation
    mode; `rng` draws its latents (a fixed key when None)."""
    if rng is None:
        rng = jax.random.key(0)
    real = batch["image"]
    weights = batch.get("mask", jnp.ones(len(real), bool)).astype(jnp.float32)
    labels = real_labels(state, batch)
    z = latents(state, rng, len(real))
    fake, _ = _generate(state, state.params["generator"], z, labels, False)
    metrics = discriminator_losses(
        _discriminate(state, state.params["discriminator"], real, labels),
        _discriminate(state, state.params["discriminator"], fake, labels),
        weights,
    )
    return {**metrics, "loss": metrics["g_loss"]}


_generate_jit = jax.jit(generate_from_latents)
_sampling_variables_jit = jax.jit(sampling_variables, static_argnums=1)
_sample_jit = jax.jit(generate, static_argnums=2)


def sampler(state: GANState) -> Callable[..., jax.Array]:
    """`draw(rng, num, labels=None)`: `generate` with the sampling variables computed once."""
    variables = _sampling_variables_jit(state, STANDING_STATS_SAMPLES)
    return lambda rng, num, labels=None: _sample_jit(state, rng, num, labels, variables)


def sample_grid(state: GANState, num: int = NUM_PICTURE_SAMPLES) -> np.ndarray:
    """The generator's images of the fixed latents (and, conditional, labels cycling through
    the classes), tiled: (H', W', C) uint8."""
    z, labels = fixed_latents(state, num), fixed_labels(state, num)
    images = np.asarray(jax.device_get(_generate_jit(state, z, labels)))
    return pictures.image_grid(images, SAMPLE_GRID_COLUMNS)


def write_pictures(
    state: GANState, images: np.ndarray, rng: jax.Array, workdir: str, step: int, writer
) -> None:
    """Samples of the fixed latents: `workdir/pictures/samples_step{step}.png` and the
    "samples" TensorBoard image. `images` and `rng` are unused: the samples depend only on
    the generator, so epochs compare."""
    del images, rng
    grid = sample_grid(state)
    pictures.save_png(
        grid,
        os.path.join(run_files.path(workdir, run_files.PICTURES), f"samples_step{step}.png"),
    )
    writer.write_image(step, "samples", grid)


def generator(state: GANState) -> Sampling:
    """The generator samples are drawn with (the averaged parameters and standing batch
    statistics, computed once): `draw` is `sampler`'s, `decode` maps given latents."""
    variables = _sampling_variables_jit(state, STANDING_STATS_SAMPLES)
    decode = jax.jit(lambda z, labels: generate_with(state, variables, z, labels))
    return Sampling(
        latent_dim=state.model.latent_dim,
        num_classes=state.model.num_classes,
        decode=decode,
        draw=lambda rng, num, labels=None: _sample_jit(state, rng, num, labels, variables),
    )
