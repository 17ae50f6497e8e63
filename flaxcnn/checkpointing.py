"""Orbax checkpoints under `workdir/checkpoints`: save every N epochs, keep the newest few,
restore the newest into the sharding of a freshly initialised state."""

import os

import jax
import orbax.checkpoint as ocp

from flaxcnn.state import TrainState


class Checkpointer:
    """Saves and restores the `TrainState`; saves run in the background."""

    def __init__(self, workdir: str, max_to_keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_or(self, state: TrainState) -> TrainState:
        """The newest checkpoint laid out like `state`, or `state` itself when there is none."""
        step = self.manager.latest_step()
        if step is None:
            return state
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def save(self, state: TrainState) -> None:
        self.manager.save(int(state.step), args=ocp.args.StandardSave(state))

    def close(self) -> None:
        """Waits for pending saves to be committed."""
        self.manager.wait_until_finished()
        self.manager.close()
