"""The device mesh: batches split over a `data` axis of every device, state replicated."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def create_mesh() -> Mesh:
    """A one-axis mesh over every device of every process. The axis is `Auto`: the steps
    are written for one device and XLA partitions them (GSPMD)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's slice of a global batch into arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()
    }
