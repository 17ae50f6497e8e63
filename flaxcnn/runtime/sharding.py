"""The device mesh: batches split over a `data` axis of every device, state replicated.

With several processes, each one loads only its share of every global batch: process p gets
the p-th contiguous block of `batch_size / process_count` examples (input_pipeline's
`_process_slice`). The mesh puts each process's devices in one contiguous block, in process
order, so that block is exactly the rows its devices hold, and `shard_batch` assembles the
global batch of `per-process batch * process_count` rows from the processes' slices without
moving data between hosts.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def create_mesh() -> Mesh:
    """A one-axis mesh over every device of every process. The axis is `Auto`: the steps
    are written for one device and XLA partitions them (GSPMD)."""
    devices = jax.make_mesh((jax.device_count(),), ("data",)).devices.ravel()
    # Stable sort: keeps make_mesh's topology-aware order within each process.
    devices = sorted(devices, key=lambda d: d.process_index)
    return Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """`tree` with every leaf replicated on the mesh; each process passes the same values
    (leaves already replicated stay as they are)."""
    target = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.make_array_from_process_local_data(target, np.asarray(x))

    return jax.tree.map(put, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over `data`."""
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's slice of a global batch into arrays sharded over the mesh;
    the global batch has `process_count` times the rows of the slice."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(
            sharding, value, (value.shape[0] * jax.process_count(), *value.shape[1:])
        )
        for key, value in batch.items()
    }
