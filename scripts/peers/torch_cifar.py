"""flaxcnn's CIFAR-10 fast recipe (`configs/cifar10_fast.py`) in PyTorch as a user writes it,
from the shell to the printed test accuracy:

    python scripts/peers/torch_cifar.py --data /path/to/cifar10 [--epochs 15] [--batch-size 512]
        [--seed 0] [--max-steps K] [--out results.json]

`--data` is the image folder flaxcnn reads (`--config.dataset=folder:ROOT`): ROOT/train/CLASS/*
and ROOT/test/CLASS/*. The same 1,000 training images are held out for the per-epoch
validation as flaxcnn's `train[98%:]`: each split's files sorted, permuted with the folder
reader's fixed seed, and each class cut at 98% (`flaxcnn/data/image_folder.py`). Decoded
once with PIL (a DataLoader's worker processes), kept in memory as uint8.

The net is flaxcnn's `FastResNet` (cifar10_fast's model_kwargs), in torch.nn modules: a 2x2
convolution whose filters are the whitened principal components of 2x2 patches (and their
negatives) of 5,000 normalised training images, not trained (its bias is), then relu; three
stages of [3x3 convolution (no bias), 2x2 max-pool, batch norm, relu] plus one residual
[convolution, batch norm, relu] added back; global max-pool; a linear layer without bias whose
logits are scaled by 0.125. He-normal convolutions (truncated, as Flax's) with dirac
(identity) first filters; the linear layer LeCun-normal (truncated); batch norm momentum 0.1
(Flax's 0.9), eps 1e-5.

The recipe: batch 512 (the last partial batch of each epoch dropped), SGD with Nesterov
momentum 0.9, learning rate 0.4 on optax's `cosine_onecycle_schedule` (30% warm-up from
0.4/25, down to 0.4/25e4), L2 5e-4 on the kernels only (`weight_decay` of the kernels'
parameter group: 5e-4 * w joins the gradient, as flaxcnn's 0.5 * l2 * sum(w^2)), label
smoothing 0.2, random crops of 4-pixel reflected padding and horizontal flips (batched tensor
ops), per-channel normalisation by the training split's mean and std, bfloat16 compute
(torch.autocast) on channels-last tensors, and evaluation averaged over 10 views: the image,
its mirror, and both shifted by 1 pixel up, down, left and right (zeros entering).
"""

import argparse
import json
import math
import os
import resource
import time

import cifar_data  # scripts/peers/cifar_data.py, beside this script.
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

# The recipe (configs/cifar10_fast.py); the benchmark's tests compare these with flaxcnn's.
STEM, WIDTHS, RESIDUAL = 24, (64, 256, 256), (1, 1, 1)
LOGIT_SCALE = 0.125
BN_MOMENTUM = 0.1  # PyTorch's: the weight of the new batch's statistics (Flax's 0.9).
BN_EPS = 1e-5  # Flax's default.
LEARNING_RATE = 0.4
MOMENTUM = 0.9
L2 = 5e-4
LABEL_SMOOTHING = 0.2
CROP = 4
TTA_SHIFT = 1
EVAL_BATCH_SIZE = 100  # Images per evaluation batch (x 10 views), flaxcnn's CPU default.
# NHWC activations, as PyTorch's CPU performance guide advises for convolutional nets: a
# training step of this net 1.8x faster than in the default NCHW (2-core AMX machine).
MEMORY_FORMAT = torch.channels_last


# --- The data: decoded the PyTorch way. ---


class Images(torch.utils.data.Dataset):
    """Image files decoded by PIL as (H, W, 3) uint8 tensors."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8).copy())


def decode(paths: list[str]) -> torch.Tensor:
    """(N, 3, H, W) uint8: every image decoded by a DataLoader's worker processes."""
    workers = os.cpu_count() if len(paths) >= 5000 else 0  # Workers pay from 5,000 images.
    loader = torch.utils.data.DataLoader(Images(paths), batch_size=500, num_workers=workers)
    return torch.cat(list(loader)).permute(0, 3, 1, 2).contiguous()


def load(root: str) -> dict:
    """The training, validation and test images (uint8 NCHW tensors) and labels."""
    data = cifar_data.splits(root, decode)
    for split in ("train", "validation", "test"):
        images, labels = data[split]
        data[split] = (images, torch.from_numpy(labels))
    return data


# --- The model. ---


def truncated_normal_(weight: torch.Tensor, scale: float) -> None:
    """Flax's variance_scaling(scale, "fan_in", "truncated_normal"): a normal cut at two
    standard deviations, rescaled to variance scale / fan_in."""
    std = math.sqrt(scale / weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class ConvBN(nn.Module):
    """3x3 convolution (no bias; He-normal, its first filters the identity), an optional
    2x2 max-pool, batch norm, relu."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        with torch.no_grad():
            truncated_normal_(self.conv.weight, 2.0)
            nn.init.dirac_(self.conv.weight[: min(in_channels, out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.pool(self.conv(x))))


class Stage(nn.Module):
    """ConvBN with pooling, then `residual` ConvBNs added back to its output."""

    def __init__(self, in_channels: int, width: int, residual: int):
        super().__init__()
        self.first = ConvBN(in_channels, width, pool=True)
        self.residual = nn.Sequential(*[ConvBN(width, width) for _ in range(residual)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return x + self.residual(x) if len(self.residual) else x


class FastResNet(nn.Module):
    """flaxcnn's FastResNet with whiten=True, dirac=True."""

    def __init__(self, num_classes: int = 10, stem=STEM, widths=WIDTHS, residual=RESIDUAL):
        super().__init__()
        self.whiten = nn.Conv2d(3, stem, 2)  # Fitted to the data (`fit_whitening`), fixed.
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        channels = [stem, *widths]
        self.stages = nn.Sequential(
            *[Stage(c, w, r) for c, w, r in zip(channels, widths, residual)]
        )
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        with torch.no_grad():
            truncated_normal_(self.head.weight, 1.0)

    def fit_whitening(self, images: torch.Tensor) -> None:
        """The stem's filters from normalised (N, 3, H, W) images."""
        kernel = cifar_data.whitening_kernel(
            images.permute(0, 2, 3, 1).numpy(), self.whiten.out_channels
        )
        with torch.no_grad():
            self.whiten.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.whiten(x)))
        x = torch.amax(x, dim=(2, 3))
        return (self.head(x) * LOGIT_SCALE).float()


def trainable_parameters(model: nn.Module) -> int:
    """Parameters the optimizer trains (the whitening filters and batch norm's running
    statistics are not: flaxcnn keeps both in `batch_stats`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- The recipe. ---


def onecycle(step: int, total_steps: int, peak: float = LEARNING_RATE) -> float:
    """optax.cosine_onecycle_schedule(total_steps, peak, pct_start=warm-up / total_steps) at
    `step`, as flaxcnn builds it (warm-up 30% of the run): cosine from peak/25 up to peak,
    then down to peak/25e4, which it keeps from the last step on."""
    warmup = max(1, round(0.3 * total_steps))
    bounds = (0, int(warmup / total_steps * total_steps), int(total_steps))
    values = (peak / 25, peak, peak / 25 / 1e4)
    for i in range(2):
        if bounds[i] <= step < bounds[i + 1]:
            pct = (step - bounds[i]) / max(bounds[i + 1] - bounds[i], 1)
            return values[i + 1] + (values[i] - values[i + 1]) / 2 * (math.cos(math.pi * pct) + 1)
    return values[-1]


def optimizer(model: nn.Module, total_steps: int):
    """SGD with Nesterov momentum, L2 on the kernels only, and the one-cycle schedule."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": L2},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]
    sgd = torch.optim.SGD(groups, lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        sgd, lambda step: onecycle(step, total_steps) / LEARNING_RATE
    )
    return sgd, schedule


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of an NCHW batch padded by CROP mirrored pixels and cropped back at a random
    offset, then mirrored left-right with probability 0.5."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (CROP,) * 4, mode="reflect").permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * CROP + 1, (batch, 2), generator=generator)
    rows = (offsets[:, :1] + torch.arange(height))[:, :, None]
    cols = (offsets[:, 1:] + torch.arange(width))[:, None, :]
    crops = padded[torch.arange(batch)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def views(x: torch.Tensor, shift: int = TTA_SHIFT) -> list[torch.Tensor]:
    """The test-time views of an NCHW batch: it and its mirror, each also shifted by `shift`
    pixels down, up, right and left (zeros entering)."""
    images = [x, x.flip(3)]
    height, width = x.shape[2:]
    out, s = list(images), shift
    for image in images:
        padded = F.pad(image, (s, s, s, s))
        for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s)):
            out.append(padded[:, :, s - dy : s - dy + height, s - dx : s - dx + width])
    return out


def evaluate(model: nn.Module, images, labels, mean, std) -> float:
    """Accuracy of the logits averaged over `views`, in bfloat16."""
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            x = normalize(images[start : start + EVAL_BATCH_SIZE], mean, std)
            all_views = views(x)
            logits = model(torch.cat(all_views).contiguous(memory_format=MEMORY_FORMAT)).float()
            logits = logits.reshape(len(all_views), len(x), -1).mean(0)
            correct += (logits.argmax(1) == labels[start : start + len(x)]).sum().item()
    model.train()
    return correct / len(labels)


def train(args) -> dict:
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    data = load(args.data)
    load_s = time.perf_counter() - start
    x_train, y_train = data["train"]
    print(
        f"data loaded in {load_s:.1f} s: {len(y_train)} training, "
        f"{len(data['validation'][1])} validation, {len(data['test'][1])} test images"
    )
    mean, std = (
        torch.tensor(s, dtype=torch.float32)[:, None, None]
        for s in cifar_data.channel_stats(x_train.permute(0, 2, 3, 1).numpy())
    )

    model = FastResNet(len(data["classes"])).to(memory_format=MEMORY_FORMAT)
    sample = cifar_data.whitening_sample(len(y_train), args.seed)
    model.fit_whitening(normalize(x_train[sample], mean, std))
    steps_per_epoch = len(y_train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"batch size {args.batch_size} exceeds the {len(y_train)} images")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    sgd, schedule = optimizer(model, total_steps)

    step, train_s, validation, epoch_rates = 0, 0.0, [], []
    loop_start = time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(y_train), generator=generator)
        steps = min(steps_per_epoch, total_steps - step)
        for i in range(steps):
            rows = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(normalize(x_train[rows], mean, std), generator)
            x = x.contiguous(memory_format=MEMORY_FORMAT)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = F.cross_entropy(logits, y_train[rows], label_smoothing=LABEL_SMOOTHING)
            sgd.zero_grad(set_to_none=True)
            loss.backward()
            sgd.step()
            schedule.step()
        step += steps
        seconds = time.perf_counter() - epoch_start
        train_s += seconds
        epoch_rates.append(steps * args.batch_size / seconds)
        validation.append(evaluate(model, *data["validation"], mean, std))
        print(
            f"epoch {epoch + 1}: validation accuracy {validation[-1]:.4f}, loss "
            f"{loss.item():.4f}, {epoch_rates[-1]:.0f} training examples/s",
            flush=True,
        )
    loop_s = time.perf_counter() - loop_start
    accuracy = evaluate(model, *data["test"], mean, std)
    examples = step * args.batch_size
    return {
        "test_accuracy": accuracy,
        "num_test_examples": len(data["test"][1]),
        "validation_accuracy": validation,
        "train_examples_per_s": examples / train_s,
        "loop_examples_per_s": examples / loop_s,
        "last_epoch_examples_per_s": epoch_rates[-1],
        "load_data_s": load_s,
        "train_time_s": train_s,
        "steps": step,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "parameters": trainable_parameters(model),
        "threads": torch.get_num_threads(),
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ROOT of ROOT/train/CLASS/*.jpg, ROOT/test")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after K steps (smoke)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    results = train(args)
    print(
        f"training examples/s {results['train_examples_per_s']:.0f} (validation excluded; "
        f"{results['loop_examples_per_s']:.0f} with it)"
    )
    print(f"test accuracy {results['test_accuracy']:.4f} ({results['num_test_examples']} examples)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
