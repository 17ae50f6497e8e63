"""The task contract: what the training loop, evaluation and checkpoints need of a task.

A task is any object with these functions, usually a module of module-level functions (the
built-in tasks are modules; a class with static methods or an instance works as well). A
user's task written against this protocol alone runs through the same loop, checkpoints,
writers and early stopping as the built-in ones:

    python -m flaxcnn.main --workdir W --config.task=my_task.py --config.model=my_nets.py:Net

Conventions the loop relies on:
- `batch` holds "image" (B, H, W, C) float32 in [0, 1] and "label" (B,) int32; in evaluation
  also "mask" (B,) bool, False on padding examples, which must not count.
- Metrics are sums over the (unmasked) examples plus their "count"; the loop adds them up
  over batches and devices and divides by the count on the host. A "loss" metric is
  required: a non-finite training loss stops the run (see config.skip_nonfinite).
- The state is a pytree (e.g. `flaxcnn.training.state.TrainState`) with an integer `step`;
  it is checkpointed whole. `params` (if present) are counted in the log.
- `train_step` and `eval_step` are pure: the loop compiles them with `jax.jit`, runs several
  steps per dispatch under `lax.scan`, and shards batches over the devices. `rng` is the
  run's key: fold in `state.step` for per-step randomness.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import ml_collections

Batch = dict[str, Any]
Metrics = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    """The functions every task provides."""

    def create_state(
        self,
        config: ml_collections.ConfigDict,
        rng: Any,
        input_shape: tuple[int, int, int],
        num_classes: int,
        total_steps: int,
    ) -> Any:
        """The initial training state of `config.model` for inputs of `input_shape` (H, W, C)
        and `num_classes` classes, with an optimizer scheduled over `total_steps`."""

    def train_step(self, state: Any, batch: Batch, rng: Any, **step_kwargs: Any) -> tuple:
        """One update: (new state, metrics of the batch)."""

    def eval_step(self, state: Any, batch: Batch, rng: Any) -> Metrics:
        """Summed metrics of the examples of `batch` whose "mask" is set, and their count."""

    def step_kwargs(self, config: ml_collections.ConfigDict) -> dict:
        """Static keyword arguments of `train_step` taken from the config ({} for none)."""


class PicturesHook(Protocol):
    """Optional: pictures of a fixed batch of validation `images` (float32 in [0, 1]) after
    every epoch, written by the main process under `workdir/pictures/` and to `writer`."""

    def write_pictures(
        self, state: Any, images: Any, rng: Any, workdir: str, step: int, writer: Any
    ) -> None: ...


class ResultsHook(Protocol):
    """Optional: results added to `results.json` after the final test evaluation."""

    def extra_results(
        self, state: Any, config: ml_collections.ConfigDict, workdir: str, test_split: Any
    ) -> dict: ...


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a generative task's trained state draws, for the sample and export commands and
    the scores of its samples. Images are float32 (N, H, W, C) in [0, 1]."""

    latent_dim: int
    num_classes: int  # Of a class-conditional model; 0 for an unconditional one.
    decode: Callable[[Any, Any], Any]  # (latents (N, latent_dim), labels (N,) or None).
    draw: Callable[..., Any]  # (rng, num, labels=None): `num` samples of the prior.
    # `size` -> (size * size, latent_dim) latents tiling the prior (a 2-latent model's
    # manifold picture); None where the model has no such picture.
    manifold: Callable[[int], Any] | None = None


class GeneratorHook(Protocol):
    """Optional: the generator of a trained state (GAN, VAE): what `python -m flaxcnn.sample`
    draws, `python -m flaxcnn.export` exports and, with `config.score_samples`, the run's
    sample scores measure."""

    def generator(self, state: Any) -> Sampling: ...


class ReconstructHook(Protocol):
    """Optional: reconstructions (N, H, W, C) in [0, 1] of images (N, H, W, C) in [0, 1]
    (autoencoder, VAE), what `python -m flaxcnn.sample --images` draws."""

    def reconstruct(self, state: Any, images: Any) -> Any: ...


class DataHook(Protocol):
    """Optional: the initial state adjusted to the training split (`flaxcnn.data.
    input_pipeline.Split`: uint8 images and labels in memory), before the first step of a
    new run; a resumed run restores its result from the checkpoint instead."""

    def fit_to_data(
        self, state: Any, config: ml_collections.ConfigDict, train_split: Any
    ) -> Any: ...


class ValidateHook(Protocol):
    """Optional: raise ValueError (one line) for a training setting the task cannot honour
    (augmentation, microbatches, L2, clipping, EMA, skip_nonfinite: tasks whose step is
    `flaxcnn.training.gradient_step` honour them all). Called by `flaxcnn.config.validate`
    before any data is read."""

    def validate(self, config: ml_collections.ConfigDict) -> None: ...


REQUIRED = ("create_state", "train_step", "eval_step", "step_kwargs")
OPTIONAL = (
    "write_pictures", "extra_results", "fit_to_data", "validate", "generator", "reconstruct",
)  # fmt: skip


def check_task(task: Any, name: str) -> None:
    """Raises ValueError (one line) when `task` lacks a required function of the protocol."""
    missing = [f for f in REQUIRED if not callable(getattr(task, f, None))]
    if missing:
        raise ValueError(
            f"task {name!r} lacks {', '.join(missing)}: a task provides "
            f"{', '.join(REQUIRED)} (see flaxcnn/tasks/base.py)"
        )
