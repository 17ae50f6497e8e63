"""Ablations of the training recipe: each technique on and off at the same budget.

    TFDS_DATA_DIR=../shared/data/tfds python scripts/ablations.py [--out ablations.md]

Every line trains a base config with one change and reports the test accuracy on full
MNIST, so each technique's worth is measured against the same base: `configs/seed_fast.py`
(SeedCNN, 8 epochs) for most, and `configs/cnn_mnist.py` cut to 3 epochs for the parts only
the `CNN` has. Runs one after the other in this process; 1-2 minutes each on a 2-core CPU.
"""

import argparse
import importlib.util
import os
import tempfile

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CNN_3_EPOCHS = {"num_epochs": 3}
# (base config, technique, setting, overrides of the base config)
ABLATIONS = [
    ("seed_fast", "base: seed_fast", "all on", {}),
    ("seed_fast", "augmentation", "off", {"augment.rotation": 0.0, "augment.translation": 0.0}),
    ("seed_fast", "moving average (EMA)", "off", {"ema_decay": 0.0}),
    ("seed_fast", "schedule", "constant 1e-3", {"lr_schedule": "constant", "learning_rate": 1e-3}),
    ("seed_fast", "L2 penalty", "l2 = 1e-4", {"l2": 1e-4}),
    ("seed_fast", "weight decay", "adamw, 0.05", {"optimizer": "adamw", "weight_decay": 0.05}),
    ("seed_fast", "gradient clipping", "global norm 1", {"grad_clip_norm": 1.0}),
    ("seed_fast", "early stopping", "patience 2", {"early_stopping.patience": 2}),
    ("cnn_mnist", "base: cnn_mnist, 3 epochs", "dropout 0.3, float32", CNN_3_EPOCHS),
    ("cnn_mnist", "dropout", "off", {**CNN_3_EPOCHS, "model_kwargs.dropout_rate": 0.0}),
    ("cnn_mnist", "mixed precision", "bfloat16", {**CNN_3_EPOCHS, "compute_dtype": "bfloat16"}),
]


def base_config(name: str):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="ablations.md")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    from flaxcnn.runner import loop

    lines = ["| technique | setting | test accuracy |", "| --- | --- | --- |"]
    for base, technique, setting, overrides in ABLATIONS:
        config = base_config(base)
        for key, value in overrides.items():
            *parents, name = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = value
        with tempfile.TemporaryDirectory() as workdir:
            results = loop.train_and_evaluate(config, workdir)
        lines.append(f"| {technique} | {setting} | {results['test_accuracy']:.2%} |")
        print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
