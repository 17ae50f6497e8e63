"""A trained classifier's evaluation outside the training loop, compiled and batched as the
loop evaluates (`flaxcnn.inference.Run.evaluate`, `python -m flaxcnn.evaluate`)."""

import jax
import numpy as np

from flaxcnn.data import device_data, input_pipeline, preprocess
from flaxcnn.runner import steps
from flaxcnn.tasks import classification


def evaluate_state(
    state,
    split: input_pipeline.Split,
    batch_size: int,
    normalization: preprocess.Normalization | None = None,
) -> dict:
    """Mean loss and accuracy over every example of `split`, their count and the
    "confusion" counts (true, predicted), evaluated as the training loop evaluates: the
    split on the device, padded and masked batches gathered there (standardised by
    `normalization`, the run's). `state` is on the default device (as `load_run` restores
    it)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    data = device_data.with_normalization(device_data.put_split(split, mesh), normalization, mesh)
    rng = jax.random.key(0)  # Unused by a classifier's evaluation.
    rows = range(split.num_examples)
    evaluate = steps.compile_evaluation(
        classification.eval_step, state, data, batch_size, mesh, rng, len(rows)
    )
    metrics, count = steps.evaluate(evaluate, state, data, rows, batch_size, mesh, rng)
    return {**metrics, "count": count}
