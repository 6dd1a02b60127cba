"""Train the bundled Fashion-MNIST models from the full training set.

    python examples/fashion_mnist/train.py                       # fddaq:fashion_resnet -> model.pth
    python examples/fashion_mnist/train.py --model mobilenet     # fddaq:fashion_mobilenet -> mobilenet.pth
    python examples/fashion_mnist/train.py --subsets-only        # calib/ and val/

Seeded and single-threaded-deterministic on CPU: the same command gives the same weights.
It reports test accuracy on the full 10,000-image test set.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fmnist  # noqa: E402

from fddaq.zoo import ZOO  # noqa: E402


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return (x - fmnist.MEAN) / fmnist.STD


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel translation (reflect padding) and horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx = torch.randint(0, 5, (n,), generator=generator)
    dy = torch.randint(0, 5, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum().item() for i in range(0, len(x), 1000)
    )
    return 100.0 * correct / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(fmnist.MODELS), default="resnet")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--subsets-only", action="store_true", help="only write calib/ and val/")
    args = parser.parse_args()

    train_images, train_labels = fmnist.read_split("train")
    test_images, test_labels = fmnist.read_split("t10k")
    if args.subsets_only:
        fmnist.write_image_folder(train_images, train_labels, fmnist.first_per_class(train_labels, 10), args.out / "calib")
        fmnist.write_image_folder(test_images, test_labels, fmnist.first_per_class(test_labels, 200), args.out / "val")
        return

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, y_train = to_tensor(train_images), torch.from_numpy(train_labels)
    x_test, y_test = to_tensor(test_images), torch.from_numpy(test_labels)

    weights, arch = fmnist.MODELS[args.model]
    model = ZOO[arch].factory()
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=total, pct_start=0.15)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[batch], generator)), y_train[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  "
              f"test top-1 {accuracy(model, x_test, y_test):.2f}%  {time.perf_counter() - start:.0f}s", flush=True)

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / weights)
    print(f"float test top-1 on the full {len(x_test)}-image test set: {accuracy(model, x_test, y_test):.2f}%")
    print(f"wrote {args.out / weights}")


if __name__ == "__main__":
    main()
