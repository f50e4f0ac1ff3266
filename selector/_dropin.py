"""``DropIn``: the selector in an existing PyTorch loop, for InfoBatch's three lines.

Wrap the dataset, hand its ``sampler`` to the ``DataLoader`` and let ``update`` weight the batch loss::

    ds = DropIn(train_set, "dds", epochs=E, budget=0.5)
    loader = DataLoader(ds, batch_size=128, sampler=ds.sampler)
    ...
    loss = ds.update(F.cross_entropy(logits, y, reduction="none"))

Each ``iter()`` of the sampler is one epoch (this rank's part of the plan in a DDP job); since the
loader yields the plan in order, ``update`` knows each batch's indices and weights without the batch
carrying them (docs/selector.md, "Design notes: selector/_dropin.py"). Imports torch;
``dds.selector`` exposes it lazily.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from dds.errors import DdsError
from dds.selector._base import SampleInfo, check_int, get_policy
from dds.selector._parts import Dist, part_entries, part_size
from dds.selector._scores import embedding_scores
from dds.selector._selector import Selector, _as_numpy
from dds.selector.torch import gather_part, state_to_numpy, state_to_torch, weighted_mean
from dds.tables import RELABEL


class DropIn(Dataset):
    """A map-style dataset of ``(x, y)`` pairs, wrapped so that a selection policy picks each epoch's samples.

    ``ds[i]`` is ``dataset[i]`` with, for samples the verdict relabels, the corrected label instead
    of ``y``. The wrapped dataset's own transforms apply; ``DropIn`` adds no augmentation (the
    ``strong_aug`` option of ``dds`` needs ``dds train``).

    Args:
        dataset: map-style dataset, ``dataset[i] -> (x, y)`` with an integer class ``y``.
        policy: a registered policy (``list_policies()``); ``dds`` runs on losses alone without scores.
        epochs: epochs the loop trains: the loader is iterated exactly this many times.
        budget: fraction of ``epochs * N`` sample-steps the run spends, in (0, 1].
        scores: None (losses only); a ``SampleInfo`` with scores (:func:`dds.selector.workspace_scores`);
            or ``(N, D)`` image embeddings, scored by :func:`dds.selector.embedding_scores`.
        labels: ``(N,)`` labels of the dataset; default: ``dataset.targets``, else the scores' labels.
        num_classes: default: ``len(dataset.classes)``, else the scores', else ``max(labels) + 1``.
        seed: the selector's seed (the same on every rank).
        rank, world_size: this process in a DDP job (``torch.distributed`` initialised): the
            sampler yields this rank's part of each plan; parts are disjoint and cover the plan.
        k: neighbours per sample when ``scores`` are embeddings.
        **policy_options: the policy's options (e.g. ``DdsConfig`` fields).

    Attributes:
        selector: the :class:`~dds.selector.Selector` (``spent()``, ``status()``, ``epoch_sizes()``).
        sampler: the epoch sampler to pass to the ``DataLoader``.

    Raises:
        DdsError: labels unknown or disagreeing with the scores, sizes that differ, ``world_size``
            not matching ``torch.distributed``, or the selector's own checks.
    """

    def __init__(self, dataset: Dataset, policy: str = "dds", *, epochs: int, budget: float = 0.5,
                 scores: SampleInfo | Any = None, labels: Any = None, num_classes: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, k: int = 10, **policy_options: Any) -> None:
        self.dataset = dataset
        info = _sample_info(dataset, scores, labels, num_classes, k)
        if "strong_aug" in {f.name for f in dataclasses.fields(get_policy(policy).Config)}:
            policy_options.setdefault("strong_aug", "none")   # the dataset's transforms: no strong views here
        self.selector = Selector(policy, info, epochs=epochs, budget=budget, seed=seed, **policy_options)
        if getattr(self.selector.config, "strong_aug", "none") != "none":
            raise DdsError("DropIn trains on the dataset's own transforms; strong_aug needs `dds train` "
                           "(leave strong_aug at none)")
        self._dist = _check_dist(rank, world_size)
        status = self.selector.status()
        relabel = None if status is None else status == RELABEL
        self._fixed = None if relabel is None or not relabel.any() else np.where(relabel, info.label_fixed, -1)
        self.sampler = _EpochSampler(self)
        self._next_epoch = 0
        self._plan = None            # the current epoch's EpochPlan
        self._entries = np.empty(0, np.int64)   # plan positions this rank trains, in order
        self._losses: torch.Tensor | None = None   # (P,) losses of this rank's part, on the loss's device
        self._done = 0               # losses received this epoch
        self._observed = True        # the current epoch's losses reached the selector

    def __len__(self) -> int:
        return self.selector.n

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.dataset[i]
        if self._fixed is not None and self._fixed[i] >= 0:
            y = torch.as_tensor(self._fixed[i], dtype=y.dtype) if torch.is_tensor(y) else type(y)(self._fixed[i])
        return x, y

    def update(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """The batch's loss weighted by the plan; records the unweighted losses for the selector.

        Args:
            per_sample_loss: ``(B,)`` losses of the loader's latest batch (``reduction="none"``); not modified.

        Returns:
            A new 0-d tensor ``sum(loss * weight) / B`` to call ``backward()`` on.

        Raises:
            DdsError: not a 1-D tensor, no epoch started, or more losses than this rank's part of the plan.
        """
        if not torch.is_tensor(per_sample_loss) or per_sample_loss.ndim != 1:
            shape = tuple(per_sample_loss.shape) if torch.is_tensor(per_sample_loss) else type(per_sample_loss).__name__
            raise DdsError(f"update takes the (B,) per-sample losses (reduction='none'), got {shape}")
        if self._plan is None:
            raise DdsError("update before any epoch: build the DataLoader with sampler=ds.sampler and iterate it")
        b, part = per_sample_loss.shape[0], len(self._entries)
        if self._done + b > part:
            raise DdsError(f"update got {self._done + b} losses in epoch {self._plan.epoch + 1} but this rank's plan "
                           f"has {part} samples: call update once per batch of the DataLoader with sampler=ds.sampler")
        if self._losses is None:
            self._losses = torch.empty(part, dtype=torch.float32, device=per_sample_loss.device)
        pos = self._entries[self._done:self._done + b]
        self._losses[self._done:self._done + b] = per_sample_loss.detach()   # on device: no sync per batch
        self._done += b
        loss = weighted_mean(per_sample_loss, self._plan.weights[pos])
        if self._done == part and not self._observed:
            self._observe()
        return loss

    def steps(self, batch_size: int) -> int:
        """Optimiser steps of the whole run at ``batch_size`` per rank (exact where the policy's epoch
        sizes are fixed in advance; an estimate for ``infobatch``): e.g. ``max_steps`` of a Hugging
        Face ``Trainer`` or the length of an LR schedule."""
        batch_size = check_int("batch_size", batch_size, 1)
        sizes = self.selector.epoch_sizes()
        return sum(-(-part_size(int(m), self._dist.world) // batch_size) for m in sizes)

    def state_dict(self) -> dict:
        """The selector, the next epoch and this rank's losses not yet observed (none once an epoch's
        every batch was updated), as tensors and python scalars: ``torch.save`` keeps it.

        Under DDP every rank calls it between epochs, as DDP checkpoints do: the ranks' pending losses
        (``drop_last=True`` leaves some) are gathered and observed first, so rank 0's state holds them all.
        """
        if not self._observed and self._done and self._dist.world > 1:
            self._observe()   # a collective over the ranks
        pending = {"indices": np.empty(0, np.int64), "losses": np.empty(0, np.float32)}
        if not self._observed and self._done:
            pending = {"indices": self._plan.indices[self._entries[:self._done]],
                       "losses": self._losses[:self._done].cpu().numpy()}
        return state_to_torch({"selector": self.selector.state_dict(), "next_epoch": self._next_epoch,
                               "pending": pending})

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the next ``iter()`` of the sampler plans the epoch after the saved one."""
        state = state_to_numpy(state)
        self.selector.load_state_dict(state["selector"])
        self.selector.observe(state["pending"]["indices"], state["pending"]["losses"])
        self._next_epoch = int(state["next_epoch"])
        self._plan, self._observed = None, True

    # ---- epochs ----

    def _start_epoch(self) -> np.ndarray:
        """Observe the last epoch if needed, plan the next one; the sample indices this rank trains, in order."""
        if not self._observed:
            self._observe()
        epoch = self._next_epoch
        if epoch >= self.selector.epochs:
            raise DdsError(f"the loader is iterated for epoch {epoch + 1} but DropIn was built for "
                           f"epochs={self.selector.epochs}; pass the number of epochs the loop trains")
        self._plan = self.selector.plan(epoch)
        self._entries = part_entries(len(self._plan), self._dist.rank, self._dist.world)
        self._losses, self._done, self._observed = None, 0, False
        self._next_epoch = epoch + 1
        return self._plan.indices[self._entries]

    def _observe(self) -> None:
        """Gather the ranks' losses of the epoch in plan order and hand them to the selector."""
        n = min(len(self._plan), self._done * self._dist.world)   # every rank received the same count
        if n:
            losses = gather_part(self._dist, self._losses[:self._done], n)
            self.selector.observe(self._plan.indices[:n], losses, self._plan.aug[:n])
        self._observed = True

    def _epoch_len(self) -> int:
        """Samples this rank trains in the current epoch, or, between epochs, in the next one."""
        if not self._observed:
            return len(self._entries)
        epoch = min(self._next_epoch, self.selector.epochs - 1)
        return part_size(int(self.selector.epoch_sizes()[epoch]), self._dist.world)


class _EpochSampler(Sampler[int]):
    """Each ``iter()`` is one epoch of its ``DropIn``: this rank's part of the next plan, in order."""

    def __init__(self, owner: DropIn) -> None:
        super().__init__()
        self._owner = owner

    def __iter__(self) -> Iterator[int]:
        return iter(self._owner._start_epoch().tolist())

    def __len__(self) -> int:
        return self._owner._epoch_len()


def _sample_info(dataset: Dataset, scores: Any, labels: Any, num_classes: int | None, k: int) -> SampleInfo:
    """The selector's inputs from what the user gave (see :class:`DropIn`)."""
    given = labels if labels is not None else getattr(dataset, "targets", None)
    if given is not None:
        given = _as_numpy(given).reshape(-1)
    if isinstance(scores, SampleInfo):
        info = scores
        if given is not None and (given.shape != info.labels.shape or (given != info.labels).any()):
            differ = "their sizes" if given.shape != info.labels.shape else f"{int((given != info.labels).sum())} labels"
            raise DdsError(f"the scores and the dataset's labels differ ({differ}): the scores belong to another "
                           "dataset or another order of its samples (workspace_scores follows samples.idx)")
    elif given is None:
        raise DdsError(f"{type(dataset).__name__} has no `targets`: pass labels= (the (N,) class of every sample)")
    else:
        if num_classes is None:
            classes = getattr(dataset, "classes", None)
            num_classes = len(classes) if classes is not None else int(given.max()) + 1
        info = SampleInfo(labels=given, num_classes=num_classes) if scores is None else embedding_scores(
            scores, given, num_classes, k=k)
    if len(dataset) != info.n:
        raise DdsError(f"the dataset has {len(dataset)} samples but the labels/scores {info.n}; they must match")
    return info


def _check_dist(rank: int, world_size: int) -> Dist:
    """``Dist(rank, world_size)``, checked against ``torch.distributed`` when ``world_size > 1``."""
    world_size = check_int("world_size", world_size, 1)
    rank = check_int("rank", rank, 0)
    if rank >= world_size:
        raise DdsError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size > 1:
        if not dist.is_initialized():
            raise DdsError(f"world_size={world_size} needs torch.distributed: call init_process_group first")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise DdsError(f"rank {rank} / world_size {world_size} differ from torch.distributed's "
                           f"{dist.get_rank()} / {dist.get_world_size()}")
    return Dist(rank=rank, world=world_size)
