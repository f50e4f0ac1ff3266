"""Run under torchrun by test_distributed.py: ``torchrun --nproc-per-node 2 dist_worker.py MODE OUT [ARGS]``.

Modes:
    selector OUT: two epochs of a dds selector with losses gathered from the ranks' parts; each rank
        saves its selector state and its part positions to OUT/rank{R}.pkl.
    train OUT WORKSPACE: ``run_train`` of the tiny dataset stopped after one epoch; rank 0 writes the
        run id to OUT/run_id.
    dropin OUT: three epochs of ``DropIn`` (rank and world size given explicitly) over a dataset whose
        x is the sample index; each rank saves the indices its loader yielded per epoch and its
        ``state_dict`` to OUT/rank{R}.pkl.
    dropin_drop_last OUT: one epoch with ``drop_last=True``, then each rank's ``state_dict``.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from dds.distributed import check_same, gather_part, init, part_entries
from dds.selector import Selector
from dds.selector._selector import synthetic_info


def fake_losses(indices: np.ndarray) -> np.ndarray:
    """A loss per sample that depends only on the sample: gathered losses can be checked exactly."""
    return (np.sin(indices.astype(np.float64)) + 1.5).astype(np.float32)


def selector(out: Path) -> None:
    d = init("cpu")
    sel = Selector("dds", synthetic_info(1001, 7), epochs=4, budget=0.5, seed=5, warmup_epochs=1)
    parts = []
    for epoch in range(2):
        plan = sel.plan(epoch)
        check_same(d, plan, torch.device("cpu"))
        parts.append(plan.indices[part_entries(len(plan.indices), d.rank, d.world)])
        mine = torch.from_numpy(fake_losses(parts[-1]))
        sel.observe(plan.indices, gather_part(d, mine, len(plan.indices)).numpy())
    (out / f"rank{d.rank}.pkl").write_bytes(pickle.dumps({"state": sel.state_dict(), "parts": parts}))


def train(out: Path, workspace: str) -> None:
    from dds.train import TrainConfig, run_train
    from dds.workspace import Workspace

    cfg = TrainConfig(dataset="tiny", policy="dds", policy_options={"strong_aug": "top_q"}, budget=0.5, epochs=3,
                      model="cnn3", batch_size=16, seed=3)
    result = run_train(Workspace(Path(workspace)), cfg, progress=False, stop_after=1)
    if init("cpu").is_main:
        (out / "run_id").write_text(result["run_id"])


def dropin(out: Path) -> None:
    from torch.utils.data import DataLoader

    from dds.selector import DropIn

    d = init("cpu")
    n = 41
    data = [(torch.tensor(float(i)), i % 3) for i in range(n)]
    ds = DropIn(data, "dds", epochs=3, budget=0.5, seed=2, labels=[y for _, y in data], rank=d.rank,
                world_size=d.world)
    seen = []
    for _ in range(3):
        seen.append([])
        for x, _ in DataLoader(ds, batch_size=4, sampler=ds.sampler):
            seen[-1] += x.long().tolist()
            ds.update(torch.from_numpy(fake_losses(x.long().numpy())))
    (out / f"rank{d.rank}.pkl").write_bytes(pickle.dumps({"seen": seen, "state": ds.state_dict()}))


def dropin_drop_last(out: Path) -> None:
    """One epoch of ``DropIn`` with ``drop_last=True`` (a last, short batch is never updated), then every
    rank's ``state_dict``, saved to OUT/rank{R}.pkl."""
    from torch.utils.data import DataLoader

    from dds.selector import DropIn

    d = init("cpu")
    data = [(torch.tensor(float(i)), i % 3) for i in range(41)]
    ds = DropIn(data, "dds", epochs=3, budget=0.5, seed=2, labels=[y for _, y in data], rank=d.rank,
                world_size=d.world)
    for x, _ in DataLoader(ds, batch_size=4, sampler=ds.sampler, drop_last=True):
        ds.update(torch.from_numpy(fake_losses(x.long().numpy())))
    (out / f"rank{d.rank}.pkl").write_bytes(pickle.dumps({"state": ds.state_dict()}))


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "train":
        train(out, sys.argv[3])
    else:
        {"selector": selector, "dropin": dropin, "dropin_drop_last": dropin_drop_last}[mode](out)
