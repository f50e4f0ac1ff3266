"""The dds selector in a plain PyTorch training loop: no dds trainer, no re-sharding.

The dataset returns each sample's index with the sample, so everything the plan says about a sample
is read by that index: its loss weight (``weights[idx]``), its augmentation (base or strong, the
transforms of ``dds.train.augment``) and, once per epoch, its observed loss. Nothing is sliced by
batch number, so any sampler or ``DataLoader`` setting keeps weights and samples together.

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

from dds.pipeline.sources import parse_idx
from dds.selector import SampleInfo, Selector, encode_regions
from dds.selector.torch import PlanSampler, weighted_mean
from dds.train.augment import Augmenter
from dds.train.bench import parse_entry

ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(split: str, root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W) and labels int64 (N,) of ``train`` or ``test`` (``t10k``)."""
    stem = "train" if split == "train" else "t10k"
    images = parse_idx(gzip.decompress((root / f"{stem}-images-idx3-ubyte.gz").read_bytes()), "images")
    labels = parse_idx(gzip.decompress((root / f"{stem}-labels-idx1-ubyte.gz").read_bytes()), "labels")
    return images, labels.astype(np.int64)


class Images(Dataset):
    """``ds[i] -> (x float (1, H, W), label, i)``, normalised by ``mean``/``std``.

    A training dataset augments each sample as the current plan says (:meth:`use`).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float, train: bool) -> None:
        self.x, self.y = torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels)
        self.mean, self.std, self.train = mean, std, train
        size = images.shape[-1]
        self.augment = Augmenter(size, channels=1).transforms  # indexed by plan.aug code (0 base, 1.. strong)
        self.weights = torch.zeros(len(labels))  # (N,) this epoch's loss weight of each sample
        self.aug = np.zeros(len(labels), np.int64)  # (N,) this epoch's augmentation code of each sample

    def use(self, plan) -> None:
        """Read the plan's per-sample weights and augmentation codes (by sample index)."""
        self.weights.zero_()
        self.weights[torch.from_numpy(plan.indices)] = torch.from_numpy(plan.weights.astype(np.float32))
        self.aug[:] = 0
        self.aug[plan.indices] = plan.aug

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.augment[self.aug[i]](self.x[i]) if self.train else self.x[i]
        return (x.float() / 255.0 - self.mean) / self.std, self.y[i], i


def scores_info(workspace: str, dataset: str, encoder: str, limit: int) -> tuple[np.ndarray, SampleInfo]:
    """IDX positions and SampleInfo of the first ``limit`` scored samples (labels as dds trained them)."""
    import pyarrow.parquet as pq

    from dds.workspace import Workspace

    ws = Workspace.resolve(workspace)
    scores = pq.read_table(ws.index_dir(dataset, encoder) / "scores.parquet").to_pandas()
    scores = scores.sort_values("key").head(limit)
    positions = scores["key"].str.split("-").str[1].astype(int).to_numpy()  # train-0000042 -> 42
    info = SampleInfo(labels=scores["label"].to_numpy(), num_classes=len(ws.dataset_info(dataset)["classes"]),
                      density=scores["density"].to_numpy(), consistency=scores["consistency"].to_numpy(),
                      joint=scores["joint"].to_numpy(), region=encode_regions(scores["region"].to_numpy()))
    return positions, info


def make_model(channels: int, size: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, num_classes))


@torch.inference_mode()
def accuracy(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == t).sum().item() for x, t, _ in DataLoader(ds, batch_size=512))
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
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy option, e.g. -o strong_aug=top_q (repeatable; values as in dds train -o)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = read_idx("train")
    if args.workspace:  # the scored samples, with the labels dds trains on
        positions, info = scores_info(args.workspace, args.dataset, args.encoder, args.limit)
        images, labels = images[positions], info.labels
    else:
        images, labels = images[:args.limit], labels[:args.limit]
        info = SampleInfo(labels=labels, num_classes=int(labels.max()) + 1)
    pixels = images.astype(np.float64) / 255.0  # normalisation from the train images
    mean, std = float(pixels.mean()), float(pixels.std())
    train = Images(images, labels, mean, std, train=True)
    test_x, test_y = read_idx("test")
    n_test = max(1, args.limit // 5)
    test = Images(test_x[:n_test], test_y[:n_test], mean, std, train=False)

    model = make_model(1, images.shape[-1], info.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _, options = parse_entry(":".join([args.policy, *args.option]))
    sel = Selector(args.policy, info, epochs=args.epochs, budget=args.budget, seed=args.seed, **options)
    losses = torch.zeros(info.n)  # (N,) last loss of each sample this epoch, kept where the loss is
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        plan = sel.plan(epoch)                                   # indices (shuffled), weights, aug
        train.use(plan)                                          # per-sample weight and augmentation
        for x, y, idx in DataLoader(train, sampler=PlanSampler(plan), batch_size=args.batch_size):
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            weighted_mean(per_sample, train.weights[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[idx] = per_sample.detach()                    # no host sync per batch
        seen = np.unique(plan.indices)
        sel.observe(seen, losses[torch.from_numpy(seen)], train.aug[seen])   # once per epoch, with the views' codes
        acc = accuracy(model, test)
        print(f"epoch {epoch + 1}/{args.epochs}: {len(plan.indices)} samples ({int(np.count_nonzero(plan.aug))} strong), "
              f"{len(seen)} losses observed, test acc {acc:.4f}, {time.perf_counter() - t0:.1f} s")
    print(f"budget spent {sel.spent() / (args.epochs * info.n):.3f} of {args.budget}")
    return acc


if __name__ == "__main__":
    main()
