"""Damaged checkpoints: each fails loudly, clearly, or safely."""

import glob
import logging
import os

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from flaxcnn.training import checkpointing
from flaxcnn.training.checkpointing import Checkpointer

# A restore that fails inside orbax leaves tensorstore coroutines behind, reported when they
# are collected after their event loop closed; harmless, and not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# --- Checkpoint integrity -------------------------------------------------------------------


@flax.struct.dataclass
class TinyState:
    step: jax.Array
    params: dict


def saved_state(step: int, scale: float = 1.0) -> TinyState:
    return TinyState(
        jnp.int32(step), {"w": jnp.arange(64.0) * scale * step, "b": jnp.full((3,), step * 1.0)}
    )


def save_steps(workdir, steps, max_to_keep=3, subdir="checkpoints"):
    checkpointer = Checkpointer(str(workdir), max_to_keep, subdir=subdir)
    for step in steps:
        checkpointer.save(saved_state(step))
    checkpointer.close()


def step_dir(workdir, step) -> str:
    return os.path.join(workdir, "checkpoints", str(step))


def truncate_arrays(path):
    for name in glob.glob(
        os.path.join(path, checkpointing.ITEM_DIR, "**", "d", "*"), recursive=True
    ):
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)


def delete_arrays(path):
    for name in glob.glob(
        os.path.join(path, checkpointing.ITEM_DIR, "**", "d", "*"), recursive=True
    ):
        os.remove(name)


DAMAGES = {
    "truncated arrays": truncate_arrays,
    "deleted arrays": delete_arrays,
    "no metadata": lambda path: os.remove(os.path.join(path, checkpointing.STEP_METADATA)),
    "no tree metadata": lambda path: os.remove(
        os.path.join(path, checkpointing.ITEM_DIR, checkpointing.ITEM_METADATA)
    ),
    "no commit marker": lambda path: os.remove(os.path.join(path, checkpointing.COMMIT_MARKER)),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    save_steps(tmp_path, [4, 8])
    DAMAGES[damage](step_dir(tmp_path, 8))

    checkpointer = Checkpointer(str(tmp_path), 3)
    with caplog.at_level(logging.WARNING):
        restored = checkpointer.restore_or(saved_state(0))
    assert int(restored.step) == 4
    assert float(restored.params["w"][1]) == 4.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint at step 8 is unusable" in w for w in warnings), warnings
    # Kept aside for inspection, invisible to orbax; the step can be saved again.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8.corrupt-1"]
    assert checkpointer.all_steps() == [4]
    assert checkpointer.save(saved_state(8, scale=2.0))
    checkpointer.close()
    again = Checkpointer(str(tmp_path), 3)
    assert again.all_steps() == [4, 8]
    assert float(again.restore_or(saved_state(0)).params["w"][1]) == 16.0
    again.close()


def test_second_damage_of_a_step_is_kept_under_a_new_name(tmp_path):
    save_steps(tmp_path, [4, 8])
    for n in (1, 2):
        delete_arrays(step_dir(tmp_path, 8))
        checkpointer = Checkpointer(str(tmp_path), 3)
        assert int(checkpointer.restore_or(saved_state(0)).step) == 4
        checkpointer.save(saved_state(8))
        checkpointer.close()
        assert os.path.isdir(tmp_path / "checkpoints" / f"8.corrupt-{n}")


def test_no_usable_checkpoint_is_a_clear_error_and_moves_nothing(tmp_path):
    save_steps(tmp_path, [4, 8])
    truncate_arrays(step_dir(tmp_path, 8))
    os.remove(os.path.join(step_dir(tmp_path, 4), checkpointing.COMMIT_MARKER))
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*step 8: .*step 4: "):
        Checkpointer(str(tmp_path), 3).restore_or(saved_state(0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def test_state_of_another_shape_is_an_error_not_a_fallback(tmp_path):
    save_steps(tmp_path, [4, 8])
    other = TinyState(jnp.int32(0), {"w": jnp.zeros(65), "b": jnp.zeros(3)})
    with pytest.raises(
        ValueError, match=r"no usable checkpoint.*\(steps 8, 4: .*shape: \(64,\)\.\)"
    ):
        Checkpointer(str(tmp_path), 3).restore_or(other)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def test_no_checkpoint_gives_the_state_back(tmp_path):
    state = saved_state(0)
    assert Checkpointer(str(tmp_path), 3).restore_or(state) is state


def test_a_save_still_in_flight_is_restored_not_rejected(tmp_path):
    """Restoring right after a background save (the best checkpoint of the last epoch,
    tested at once) waits for its commit instead of calling the step damaged."""
    checkpointer = Checkpointer(str(tmp_path), 1)
    big = TinyState(jnp.int32(7), {"w": jnp.ones((16, 1024, 1024))})  # 64 MB: a slow save.
    checkpointer.save(big)
    restored = checkpointer.restore_or(TinyState(jnp.int32(0), {"w": jnp.zeros((16, 1024, 1024))}))
    checkpointer.close()
    assert int(restored.step) == 7 and float(restored.params["w"].min()) == 1.0


def test_saving_a_saved_step_again_is_a_no_op(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), 3)
    assert checkpointer.save(saved_state(4))
    assert not checkpointer.save(saved_state(4, scale=5.0))
    checkpointer.close()
    assert float(Checkpointer(str(tmp_path), 3).restore_or(saved_state(0)).params["w"][1]) == 4.0


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    save_steps(tmp_path, [4], max_to_keep=1)

    async def fail_commit(self):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", fail_commit)
    checkpointer = Checkpointer(str(tmp_path), 1)
    checkpointer.save(saved_state(8))
    with pytest.raises(Exception, match="disk full"):
        checkpointer.close()
    monkeypatch.undo()
    assert "4" in os.listdir(tmp_path / "checkpoints")
    assert int(Checkpointer(str(tmp_path), 1).restore_or(saved_state(0)).step) == 4


def test_old_steps_go_only_after_the_new_one_is_committed(tmp_path, monkeypatch):
    """At the moment each save is committed (orbax's rename of the temporary directory), every
    older step is still on disk; only afterwards does the oldest go."""
    real_finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    seen_at_commit = []

    async def finalize(self, *args, **kwargs):
        if self.get_final().parent == tmp_path / "checkpoints":  # A step, not one of its items.
            steps = [name for name in os.listdir(self.get_final().parent) if name.isdigit()]
            seen_at_commit.append((self.get_final().name, sorted(steps, key=int)))
        return await real_finalize(self, *args, **kwargs)

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    save_steps(tmp_path, [4, 8, 12], max_to_keep=2)
    assert seen_at_commit == [("4", []), ("8", ["4"]), ("12", ["4", "8"])]
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["8", "12"]


def test_best_slot_lives_beside_the_newest(tmp_path):
    save_steps(tmp_path, [4, 8, 12])
    save_steps(tmp_path, [4, 12], max_to_keep=1, subdir="checkpoints_best")
    assert os.listdir(tmp_path / "checkpoints_best") == ["12"]
    best = Checkpointer(str(tmp_path), 1, subdir="checkpoints_best")
    assert int(best.restore_or(saved_state(0)).step) == 12
    assert Checkpointer(str(tmp_path), 3).all_steps() == [4, 8, 12]
