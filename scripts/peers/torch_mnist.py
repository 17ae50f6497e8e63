"""The Keras MNIST CNN in PyTorch as a user writes it, from the shell to the printed test
accuracy:

    python scripts/peers/torch_mnist.py --npz mnist.npz [--batch-size 32] [--epochs 3]

Conv2d(1, 32, 3) -> ReLU -> MaxPool(2) -> Flatten -> Linear(5408, 10), Adam 1e-3, cross
entropy; a shuffling DataLoader over the first 90% of the training set, the last 10% evaluated
after every epoch, then the test set. The peer of `python -m flaxcnn.main --config
configs/seed_keras.py` in `scripts/benchmark.py`'s whole-command table.
"""

import argparse

import numpy as np
import torch
from torch import nn

EVAL_BATCH_SIZE = 1000


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y), in batches."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), EVAL_BATCH_SIZE):
            logits = model(x[start : start + EVAL_BATCH_SIZE])
            labels = y[start : start + EVAL_BATCH_SIZE]
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="MNIST as x_train, y_train, x_test, y_test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with np.load(args.npz) as data:
        x = torch.from_numpy(data["x_train"][:, None].astype(np.float32) / 255)
        y = torch.from_numpy(data["y_train"].astype(np.int64))
        x_test = torch.from_numpy(data["x_test"][:, None].astype(np.float32) / 255)
        y_test = torch.from_numpy(data["y_test"].astype(np.int64))
    n_train = len(y) * 9 // 10
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:n_train], y[:n_train]),
        batch_size=args.batch_size,
        shuffle=True,
    )
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5408, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        val_loss, val_accuracy = evaluate(model, x[n_train:], y[n_train:])
        print(f"epoch {epoch + 1}: validation accuracy {val_accuracy:.4f} loss {val_loss:.4f}")
    loss, accuracy = evaluate(model, x_test, y_test)
    print(f"test accuracy {accuracy:.4f} ({len(y_test)} examples), loss {loss:.4f}")


if __name__ == "__main__":
    main()
