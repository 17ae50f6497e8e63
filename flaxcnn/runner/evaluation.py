"""A trained classifier's evaluation outside the training loop, compiled and batched as the
loop evaluates (`flaxcnn.inference.Run.evaluate`, `python -m flaxcnn.evaluate`): a split in
memory, or streamed when the run's `config.input` streams it."""

import jax
import ml_collections
import numpy as np

from flaxcnn import cpu
from flaxcnn.data import device_data, input_pipeline, preprocess, sources, streaming
from flaxcnn.runner import steps, stream_input
from flaxcnn.tasks import classification


def read_split(
    config: ml_collections.ConfigDict, dataset: str, split: str, data_dir: str | None
) -> input_pipeline.Split | sources.StreamSplit:
    """`split` of `dataset` as the run's settings read it: a stream source under
    `config.input="stream"`, or "auto" when its decoded size exceeds the budget (a dataset
    that cannot stream stays in memory under "auto"); else decoded into memory, each image
    by the evaluation view of `config.input_crop`."""
    choice = config.get("input", "memory")
    image_size, color_mode = config.get("image_size"), config.get("color_mode")
    if choice != "memory":
        try:
            stream = sources.open_split(dataset, split, data_dir, image_size, color_mode)
        except input_pipeline.DataError:
            if choice == "stream":
                raise
        else:
            budget = config.input_memory_budget_mb
            if streaming.resolve_input(choice, stream.decoded_bytes, budget) == "stream":
                return stream
    crop = config.get("input_crop", "resize")
    return input_pipeline.load_split(dataset, split, data_dir, image_size, color_mode, crop)


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


def evaluate_stream(
    state,
    split: sources.StreamSplit,
    batch_size: int,
    config: ml_collections.ConfigDict,
    normalization: preprocess.Normalization | None = None,
) -> dict:
    """`evaluate_state`'s metrics over a streamed split, as a streamed run evaluates it
    (`stream_input.EvalFeed`, with the run's `input_crop` and `input_workers`)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    crop, workers = config.get("input_crop", "resize"), config.get("input_workers", 0)
    feed = stream_input.EvalFeed({"split": split}, batch_size, crop, workers, mesh, normalization)
    rng = jax.random.key(0)
    lowered = steps.lower_evaluation(
        classification.eval_step, state, feed.template, batch_size, mesh, rng, 1
    )
    evaluate_one = cpu.compile_for_this_backend(lowered)
    metrics, count = feed.evaluate(evaluate_one, state, "split", rng)
    return {**metrics, "count": count}
