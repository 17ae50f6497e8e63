"""The caller's own end-of-epoch hooks: `flaxcnn.fit(..., hooks=[...])` runs each after the
built-in ones (validation, pictures, early stopping, checkpoint), every epoch, in order."""

import json
import os

import flaxcnn


def saved_steps(folder) -> list[int]:
    prefixes = (name.split(".")[0] for name in os.listdir(folder))
    return sorted({int(p) for p in prefixes if p.isdigit()})


def test_a_user_hook_writes_a_file_every_epoch_after_the_built_in_hooks(
    data_dir, tmp_path, tiny_config
):
    workdir = tmp_path / "run"
    log = tmp_path / "epochs.jsonl"

    def write_epoch(run, state) -> None:
        """The README's example hook, with the checkpoint the built-in hook saved first."""
        record = {
            "epoch": run.epoch,
            "step": int(state.step),
            "accuracy": run.validation_metrics["accuracy"],
            # Steps saved or being saved (an asynchronous save writes a temporary folder).
            "checkpoints": saved_steps(workdir / "checkpoints"),
        }
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")

    order = []
    # 64 training examples in batches of 32: 2 epochs of 2 steps.
    config = tiny_config(num_train_steps=-1, num_epochs=2, train_split="train[:64]")
    flaxcnn.fit(
        config=config,
        workdir=str(workdir),
        hooks=[write_epoch, lambda run, state: order.append(run.step)],
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4)]
    assert [r["checkpoints"][-1] for r in records] == [2, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert order == [2, 4]  # The second hook, after the first, every epoch.
