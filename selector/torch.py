"""Torch helpers for ``EpochPlan``s: a sampler that replays a plan, the gather of a distributed rank's
per-sample values back into plan order, the weighted loss mean, and selector state in the form
``torch.save``/``torch.load(weights_only=True)`` keep.

Importing this module imports torch; ``dds.selector`` itself does not.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dds.selector._base import EpochPlan
from dds.selector._parts import Dist, interleave, part_entries


class PlanSampler(torch.utils.data.Sampler[int]):
    """Yields ``plan.indices`` in the plan's order (the plan is already shuffled); ``len`` = M.

    Hand it to a map-style ``DataLoader`` as ``sampler=``. In a distributed job every rank holds the
    same plan; ``rank``/``world`` make it yield that rank's part (:func:`~dds.selector._parts.part_positions`:
    equal sizes on every rank), and :func:`gather_part` puts the ranks' losses back
    in plan order for ``observe``.
    """

    def __init__(self, plan: EpochPlan, *, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        indices = np.asarray(plan.indices, dtype=np.int64)
        if world > 1:
            indices = indices[part_entries(len(indices), rank, world)]
        self._indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return int(self._indices.shape[0])


def gather_part(d: Dist, part: torch.Tensor, m: int) -> torch.Tensor:
    """Every rank's per-sample values of its part, gathered back into the plan's order: ``(m,)``."""
    if not d.enabled:
        return part[:m]
    out = [torch.empty_like(part) for _ in range(d.world)]
    dist.all_gather(out, part.contiguous())
    return interleave(torch.stack(out), m)


def weighted_mean(per_sample_loss: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``sum(loss * weights) / len(loss)``: the batch loss with the plan's per-sample weights.

    Args:
        per_sample_loss: (B,) float tensor (``reduction='none'``); not modified.
        weights: (B,) weights (tensor or numpy), moved to the loss's device and dtype.

    Returns:
        A new 0-d tensor, differentiable w.r.t. ``per_sample_loss``.

    Raises:
        ValueError: shapes differ or the batch is empty.
    """
    if not torch.is_tensor(weights):
        weights = torch.from_numpy(np.ascontiguousarray(weights))
    weights = weights.to(device=per_sample_loss.device, dtype=per_sample_loss.dtype, non_blocking=True)
    if per_sample_loss.shape != weights.shape or per_sample_loss.ndim != 1:
        raise ValueError(f"per_sample_loss and weights must be 1-D of one length, got "
                         f"{tuple(per_sample_loss.shape)} and {tuple(weights.shape)}")
    if per_sample_loss.numel() == 0:
        raise ValueError("weighted_mean of an empty batch")
    return (per_sample_loss * weights).sum() / per_sample_loss.numel()


def state_to_torch(obj: Any) -> Any:
    """numpy arrays and scalars -> tensors and python scalars (what ``torch.load(weights_only=True)`` reads)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: state_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [state_to_torch(v) for v in obj]
    return obj


def state_to_numpy(obj: Any) -> Any:
    """Inverse of :func:`state_to_torch` for the selector state (every tensor back to a numpy array)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().numpy()   # a checkpoint loaded onto a GPU holds CUDA tensors
    if isinstance(obj, dict):
        return {k: state_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_to_numpy(v) for v in obj]
    return obj
