"""Orbax checkpoints under `workdir/<subdir>` (`checkpoints` by default; the loop may keep a
second slot, e.g. `checkpoints_best` with max_to_keep=1): save, keep the newest few, and
restore the newest *usable* one into the sharding of a freshly initialised state.

Integrity. Orbax writes a step into `<step>.orbax-checkpoint-tmp/`, adds `commit_success.txt`
and renames it to `<step>/`; only then does it delete the steps beyond `max_to_keep`, so a save
that dies half way never costs the last good checkpoint. A step directory can still be damaged
afterwards (a copy cut short, a disk error, files deleted by hand): before restoring, a step
must hold the commit marker and both metadata files, and its arrays must read back, with the
step number they were saved at. A damaged newest step is renamed to `<step>.corrupt-<n>` (kept
for inspection, never deleted; orbax ignores the name, and the step can be saved again) and
the previous step is used instead, with a warning. If no step is usable, restoring raises a
ValueError and renames nothing: the run must not silently start over, and a config whose state
does not fit the checkpoints (another model width, say) fails the same way on every step.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

COMMIT_MARKER = "commit_success.txt"  # Written by orbax just before the final rename.
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM_DIR = "default"  # Orbax's directory of the one unnamed item a StandardSave writes.
ITEM_METADATA = "_METADATA"
CORRUPT_TAG = ".corrupt-"


class Checkpointer:
    """Saves and restores a state pytree with an integer `step` field; saves run in the
    background and are committed before the next save or `close()`."""

    def __init__(self, workdir: str, max_to_keep: int, subdir: str = "checkpoints"):
        self.directory = os.path.join(os.path.abspath(workdir), subdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_or(self, state):
        """The newest usable checkpoint laid out like `state`, or `state` itself when there is
        no checkpoint at all. Damaged newer steps are moved aside with a warning."""
        self.manager.wait_until_finished()  # A save still in flight is not yet committed.
        problems: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            restored, reason = self._try_restore(step, state)
            reason = self._agree(reason)
            if reason is None:
                if problems:
                    self._move_aside([s for s, _ in problems])
                    logging.warning("Restored the checkpoint at step %d instead.", step)
                return restored
            logging.warning("The checkpoint at step %d is unusable: %s", step, reason)
            problems.append((step, reason))
        if problems:
            by_reason: dict[str, list[str]] = {}
            for step, reason in problems:
                by_reason.setdefault(reason, []).append(str(step))
            details = "; ".join(
                f"step{'s' if len(steps) > 1 else ''} {', '.join(steps)}: {reason}"
                for reason, steps in by_reason.items()
            )
            raise ValueError(
                f"no usable checkpoint in {self.directory} ({details}); if the config changed "
                "since they were saved, go back to it; else move the directory away to start over"
            )
        return state

    def _try_restore(self, step: int, state) -> tuple[object, str | None]:
        """The checkpoint at `step` laid out like `state` and None, or None and why it cannot
        be used."""
        path = os.path.join(self.directory, str(step))
        for name in (COMMIT_MARKER, STEP_METADATA, os.path.join(ITEM_DIR, ITEM_METADATA)):
            if not os.path.isfile(os.path.join(path, name)):
                return None, f"{name} is missing"
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  (tensorstore and orbax raise many types here)
            return None, _one_line(e)
        if int(restored.step) != step:
            return None, f"it holds step {int(restored.step)}"
        return restored, None

    def _agree(self, reason: str | None) -> str | None:
        """With several processes, a step is usable only if every process could read it."""
        if jax.process_count() == 1:
            return reason
        from jax.experimental import multihost_utils

        failed = multihost_utils.process_allgather(np.int32(reason is not None))
        if reason is None and np.any(failed):
            return f"process {int(np.flatnonzero(failed)[0])} could not read it"
        return reason

    def _move_aside(self, steps: list[int]) -> None:
        """Renames damaged steps to `<step>.corrupt-<n>` (first free n) on the main process."""
        if jax.process_index() == 0:
            for step in steps:
                n = 1
                while os.path.exists(self._aside_path(step, n)):
                    n += 1
                os.rename(os.path.join(self.directory, str(step)), self._aside_path(step, n))
                logging.warning("Moved the unusable checkpoint to %s", self._aside_path(step, n))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("flaxcnn:checkpoints_moved_aside")
        self.manager.reload()

    def _aside_path(self, step: int, n: int) -> str:
        return os.path.join(self.directory, f"{step}{CORRUPT_TAG}{n}")

    def save(self, state) -> bool:
        """Starts saving `state` at its step; False if that step is already saved (a stop
        requested right after a scheduled save saves nothing twice)."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state))

    def wait_until_finished(self) -> None:
        """Blocks until pending saves are committed (raises if one failed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves to be committed."""
        self.manager.wait_until_finished()
        self.manager.close()


def _one_line(error: Exception) -> str:
    """The gist of a restore error: its first line, without tensorstore's spec dump, cut to
    its first sentence when long."""
    lines = str(error).strip().splitlines()
    text = (lines[0] if lines else type(error).__name__).split(" [tensorstore_spec")[0]
    if len(text) > 150 and ". " in text:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= 300 else text[:297] + "..."
