"""The dds selector in a plain PyTorch training loop: no dds trainer, no re-sharding.

A TensorDataset-like dataset is built from the Fashion-MNIST IDX files; every epoch the selector
plans which samples are trained on (``PlanSampler``), with which loss weight (``weighted_mean``)
and which are strongly augmented (``plan.aug``, read by the dataset below), and it observes the
per-sample losses.

Without scores it runs policies that need none (``random``, ``infobatch``, ``ucb``, ``full``)::

    python examples/plain_loop.py --policy infobatch --limit 2000 --epochs 4

With a dds workspace (``dds shard fashion-mnist``, ``dds embed``, ``dds index``) it reads the
scores table and can run ``dds``: the keys ``train-0000042`` name the position in the IDX file::

    python examples/plain_loop.py --policy dds --workspace dds-work --dataset fashion-mnist --encoder lite0-minilm
"""
from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dds.pipeline.sources import parse_idx
from dds.selector import SampleInfo, Selector, encode_regions
from dds.selector.torch import PlanSampler, weighted_mean

ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(split: str, root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of ``train`` or ``test`` (``t10k``)."""
    stem = "train" if split == "train" else "t10k"
    images = parse_idx(gzip.decompress((root / f"{stem}-images-idx3-ubyte.gz").read_bytes()), "images")
    labels = parse_idx(gzip.decompress((root / f"{stem}-labels-idx1-ubyte.gz").read_bytes()), "labels")
    return images, labels.astype(np.int64)


class Images(Dataset):
    """``ds[i] -> (x float (1, 28, 28), label)``; samples marked in ``strong`` get TrivialAugmentWide."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool) -> None:
        self.x, self.y, self.train = torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels), train
        self.strong = np.zeros(len(labels), dtype=bool)  # set from plan.aug every epoch
        self.base = v2.Compose([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
        self.heavy = v2.Compose([v2.TrivialAugmentWide(), self.base])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.train:
            x = self.heavy(x) if self.strong[i] else self.base(x)
        return (x.float() / 255.0 - 0.286) / 0.353, self.y[i]


def scores_info(workspace: str, dataset: str, encoder: str, limit: int) -> tuple[np.ndarray, SampleInfo]:
    """IDX positions and SampleInfo of the first ``limit`` scored samples (labels as dds trained them)."""
    import pyarrow.parquet as pq

    from dds.workspace import Workspace

    ws = Workspace.resolve(workspace)
    scores = pq.read_table(ws.index_dir(dataset, encoder) / "scores.parquet").to_pandas()
    scores = scores.sort_values("key").head(limit)
    positions = scores["key"].str.split("-").str[1].astype(int).to_numpy()  # train-0000042 -> 42
    info = SampleInfo(labels=scores["label"].to_numpy(), num_classes=10, density=scores["density"].to_numpy(),
                      consistency=scores["consistency"].to_numpy(), joint=scores["joint"].to_numpy(),
                      region=encode_regions(scores["region"].to_numpy()))
    return positions, info


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


@torch.inference_mode()
def accuracy(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == t).sum().item() for x, t in DataLoader(ds, batch_size=512))
    return correct / len(ds)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="random", help="random, infobatch, ucb, full; dds needs --workspace")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=5000, help="first N train (and N // 5 test) images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workspace", help="a dds workspace with scores (optional)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--encoder", default="lite0-minilm")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = read_idx("train")
    if args.workspace:  # the scored samples, with the labels dds trains on
        positions, info = scores_info(args.workspace, args.dataset, args.encoder, args.limit)
        train = Images(images[positions], info.labels, train=True)
    else:
        info = SampleInfo(labels=labels[:args.limit], num_classes=10)
        train = Images(images[:args.limit], labels[:args.limit], train=True)
    test_x, test_y = read_idx("test")
    test = Images(test_x[:max(1, args.limit // 5)], test_y[:max(1, args.limit // 5)], train=False)

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sel = Selector(args.policy, info, epochs=args.epochs, budget=args.budget, seed=args.seed)
    B = args.batch_size
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        plan = sel.plan(epoch)                                   # indices (shuffled), weights, aug
        train.strong[:] = False
        train.strong[plan.indices[plan.aug == 1]] = True         # per-sample strong augmentation
        model.train()
        loader = DataLoader(train, sampler=PlanSampler(plan), batch_size=B)
        for b, (x, t) in enumerate(loader):
            per_sample = F.cross_entropy(model(x), t, reduction="none")
            weighted_mean(per_sample, plan.weights[b * B:(b + 1) * B]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sel.observe(plan.indices[b * B:(b + 1) * B], per_sample.detach())
        acc = accuracy(model, test)
        print(f"epoch {epoch + 1}/{args.epochs}: {len(plan.indices)} samples ({int(plan.aug.sum())} strong), "
              f"test acc {acc:.4f}, {time.perf_counter() - t0:.1f} s")
    print(f"budget spent {sel.spent() / (args.epochs * info.n):.3f} of {args.budget}")
    return acc


if __name__ == "__main__":
    main()
