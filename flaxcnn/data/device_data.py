"""The dataset kept on the accelerator, and the batches gathered from it there.

The split goes to every device once, as uint8 (full MNIST is 42 MB). Each epoch the host
computes the example order (a pure function of seed and epoch, see
`batching.epoch_order`) and sends only indices; the jitted step gathers its batch and
scales it to [0, 1] float32 itself. That leaves no per-step host work but a dispatch, which
is what lets several steps run per dispatch (`lax.scan`). Evaluation does the same with the
validation and test splits, side by side in one array.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxcnn.data import input_pipeline, preprocess

DeviceSplit = dict[str, jax.Array]


def put_split(split: input_pipeline.Split, mesh: Mesh) -> DeviceSplit:
    """The split's images (uint8) and labels, replicated on every device of the mesh.

    Every process holds the whole split, so its local data is the global array."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "image": jax.make_array_from_process_local_data(replicated, split.images),
        "label": jax.make_array_from_process_local_data(replicated, split.labels),
    }


def put_splits(splits: list[input_pipeline.Split], mesh: Mesh) -> tuple[DeviceSplit, list[range]]:
    """Several splits side by side in one device array (`put_split`), and the rows of each:
    one compiled evaluation then serves them all."""
    starts = np.cumsum([0] + [split.num_examples for split in splits])
    joined = input_pipeline.Split(
        np.concatenate([split.images for split in splits]),
        np.concatenate([split.labels for split in splits]),
        splits[0].num_classes,
    )
    return put_split(joined, mesh), [range(a, b) for a, b in zip(starts[:-1], starts[1:])]


def index_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
    """How (steps, batch_size) indices lie on the devices: the batch split over `data`, or,
    when the devices cannot split it evenly (a default or a config file's batch size on an
    odd device count), whole on every device: the same results, without the speed-up."""
    if batch_size % mesh.shape["data"]:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def shard_indices(indices: np.ndarray, mesh: Mesh) -> jax.Array:
    """(steps, global_batch) indices as one array laid out by `index_sharding`; with the
    batch split, each process passes its contiguous share of every batch, as the host
    pipeline does."""
    sharding = index_sharding(mesh, indices.shape[1])
    if sharding.spec == PartitionSpec():
        return jax.make_array_from_process_local_data(sharding, indices, indices.shape)
    per_process = indices.shape[1] // jax.process_count()
    start = jax.process_index() * per_process
    return jax.make_array_from_process_local_data(
        sharding, indices[:, start : start + per_process], indices.shape
    )


def with_normalization(
    data: DeviceSplit, normalization: preprocess.Normalization | None, mesh: Mesh
) -> DeviceSplit:
    """`data` carrying the per-channel "mean" and "std" (float32 (C,), replicated) that
    `gather_batch` standardises its images with; `data` itself when `normalization` is None."""
    if normalization is None:
        return data
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        **data,
        **{
            key: jax.make_array_from_process_local_data(replicated, np.asarray(value, np.float32))
            for key, value in normalization._asdict().items()
        },
    }


def gather_batch(data: DeviceSplit, indices: jax.Array) -> dict[str, jax.Array]:
    """The batch at `indices`, its images as the model takes them
    (`preprocess.to_model_input`): scaled to [0, 1] float32, as the host pipeline makes
    them, and standardised when `data` carries "mean" and "std" (`with_normalization`)."""
    return {
        "image": preprocess.to_model_input(
            data["image"][indices], data.get("mean"), data.get("std")
        ),
        "label": data["label"][indices],
    }
