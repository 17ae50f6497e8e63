"""Ablations of the training recipe: each technique on and off at the same budget.

    TFDS_DATA_DIR=../shared/data/tfds python scripts/ablations.py [--out ablations.md]

Every line trains `configs/seed_fast.py` (SeedCNN, 8 epochs of full MNIST) with one change
and reports the test accuracy, so each technique's worth is measured against the same
base. Runs one after the other in this process; about a minute each on a 2-core CPU.
"""

import argparse
import importlib.util
import os
import tempfile

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (technique, setting, overrides of the base config)
ABLATIONS = [
    ("base: seed_fast", "all on", {}),
    ("augmentation", "off", {"augment.rotation": 0.0, "augment.translation": 0.0}),
    ("moving average (EMA)", "off", {"ema_decay": 0.0}),
    ("schedule", "constant 1e-3", {"lr_schedule": "constant", "learning_rate": 1e-3}),
    ("L2 penalty", "l2 = 1e-4", {"l2": 1e-4}),
    ("weight decay", "adamw, 0.05", {"optimizer": "adamw", "weight_decay": 0.05}),
    ("gradient clipping", "global norm 1", {"grad_clip_norm": 1.0}),
]


def base_config():
    path = os.path.join(REPO, "configs", "seed_fast.py")
    spec = importlib.util.spec_from_file_location("seed_fast", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ablations.md")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    from flaxcnn import train

    lines = ["| technique | setting | test accuracy |", "| --- | --- | --- |"]
    for technique, setting, overrides in ABLATIONS:
        config = base_config()
        for key, value in overrides.items():
            *parents, name = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = value
        with tempfile.TemporaryDirectory() as workdir:
            results = train.train_and_evaluate(config, workdir)
        lines.append(f"| {technique} | {setting} | {results['test_accuracy']:.2%} |")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
