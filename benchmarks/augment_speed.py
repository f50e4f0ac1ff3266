"""CPU cost of the augmentation, a sample at a time against ``Augmenter.batch``, side by side. JSON lines.

    python benchmarks/augment_speed.py [--size 28] [--channels 1] [--batch 128] [--reps 5]
                                       [--threads 1] [--out benchmarks/results/augment-speed.jsonl]

For each mix of plan codes (every sample ``base``; every sample at one strong level; the levels
mixed), the same random uint8 batch is augmented ``--reps`` times by both paths, alternating them so
machine drift hits each alike: ``per_sample`` stacks ``Augmenter(...)(image, code, seed)`` over the
batch (what every strong view cost before the batched path), ``batch`` is ``Augmenter.batch``, which
``dds train`` runs. Both give the same pixels (checked here, and tested in tests/test_train.py). One
row per mix: microseconds a sample for each path and their ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from dds.selector import AUG_LEVELS
from dds.train.augment import Augmenter, epoch_aug_seeds


def time_paths(aug: Augmenter, images: torch.Tensor, codes: np.ndarray, seeds: np.ndarray, reps: int) -> dict:
    """Best-of-``reps`` microseconds a sample of the per-sample path and of ``batch``."""
    def per_sample() -> torch.Tensor:
        return torch.stack([aug(images[i], int(codes[i]), int(seeds[i])) for i in range(len(codes))])

    def batch() -> torch.Tensor:
        return aug.batch(images, codes, seeds)

    if not torch.equal(per_sample(), batch()):
        raise SystemExit("the two paths disagree: the batched augmentation is broken")
    best = {"per_sample": float("inf"), "batch": float("inf")}
    for _ in range(reps):
        for name, fn in (("per_sample", per_sample), ("batch", batch)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / len(codes) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/augment-speed.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aug = Augmenter(args.size, args.channels)
    images = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    seeds = epoch_aug_seeds(0, 0, args.batch)
    mixes = {"base": np.zeros(args.batch, np.uint8),
             **{f"strong {k}/{AUG_LEVELS}": np.full(args.batch, k, np.uint8) for k in range(1, AUG_LEVELS + 1)},
             "mixed": (np.arange(args.batch) % (AUG_LEVELS + 1)).astype(np.uint8)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.out, "a") as f:
        for mix, codes in mixes.items():
            us = time_paths(aug, images, codes, seeds, args.reps)
            row = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "commit": commit, "mix": mix,
                   "size": args.size, "channels": args.channels, "batch": args.batch, "threads": args.threads,
                   "per_sample_us": round(us["per_sample"], 1), "batch_us": round(us["batch"], 1),
                   "speedup": round(us["per_sample"] / us["batch"], 2)}
            print(json.dumps(row))
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
