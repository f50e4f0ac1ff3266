"""A plain PyTorch training loop with a timm model, on half the data chosen by ``dds.selector.DropIn``.

The lines marked ``# dds`` are all that differs from the same loop without selection (docs/dropin.md
counts them). Without scores ``dds`` selects by the training losses; ``--embeddings`` adds density,
kNN agreement and the label verdict from your own (N, D) image embeddings (a ``.npy`` file)::

    python examples/plain_loop.py                          # Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python examples/plain_loop.py --embeddings emb.npy     # row i = the embedding of train image i
    python examples/plain_loop.py --synthetic 256 --epochs 2   # tiny generated images, no files needed
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dds.pipeline.sources import parse_idx
from dds.selector import DropIn  # dds

ROOT = Path("/usr/share/datasets/fashion-mnist")


class Images(Dataset):
    """``ds[i] -> (x float (1, H, W) in [-1, 1], label)`` from uint8 images (N, H, W) and int labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.targets = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i].unsqueeze(0).float() / 127.5 - 1.0, self.targets[i]


def fashion_mnist(split: str, limit: int) -> Images:
    """The first ``limit`` images of the ``train`` or ``test`` IDX files under ``ROOT``."""
    stem = "train" if split == "train" else "t10k"

    def read(what: str, dims: int) -> np.ndarray:
        return parse_idx(gzip.decompress((ROOT / f"{stem}-{what}-idx{dims}-ubyte.gz").read_bytes()), what)[:limit]

    return Images(read("images", 3), read("labels", 1))


def synthetic(n: int, classes: int = 4, size: int = 16, seed: int = 0) -> Images:
    """``n`` noisy grey squares whose brightness says the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    pixels = rng.normal(40 + 180 * labels / (classes - 1), 30, (size, size, n)).T
    return Images(np.clip(pixels, 0, 255).astype(np.uint8), labels)


@torch.inference_mode()
def accuracy(model: torch.nn.Module, ds: Dataset) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(ds, batch_size=256))
    return correct / len(ds)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet10t", help="any timm model name")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of epochs x N sample-steps to spend")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=5000, help="first N Fashion-MNIST train (and N // 5 test) images")
    p.add_argument("--synthetic", type=int, metavar="N", help="train on N generated images instead")
    p.add_argument("--embeddings", type=Path, help="(N, D) .npy image embeddings of the train images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.synthetic:
        train, test = synthetic(args.synthetic), synthetic(max(1, args.synthetic // 4), seed=1)
    else:
        train, test = fashion_mnist("train", args.limit), fashion_mnist("test", max(1, args.limit // 5))
    classes = int(train.targets.max()) + 1
    model = timm.create_model(args.model, pretrained=False, num_classes=classes, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    scores = None if args.embeddings is None else np.load(args.embeddings)
    train = DropIn(train, "dds", epochs=args.epochs, budget=args.budget, scores=scores, seed=args.seed)  # dds
    loader = DataLoader(train, batch_size=args.batch_size, sampler=train.sampler)  # dds: sampler= for shuffle=True
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            per_sample = F.cross_entropy(model(x), y, reduction="none")  # dds: reduction="none"
            loss = train.update(per_sample)  # dds: the plan's weighted mean; the losses go to the selector
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = accuracy(model, test)
        print(f"epoch {epoch + 1}/{args.epochs}: test acc {acc:.4f}")
    spent = train.selector.spent() / (args.epochs * len(train))
    print(f"budget spent {spent:.3f} of {args.budget}")
    return {"test_acc": acc, "budget_spent": spent}


if __name__ == "__main__":
    main()
