"""A process's place in a data-parallel job, and its part of every epoch plan (pure numpy, no torch).

Every rank computes the same plan from the same seed (no broadcast), pads it cyclically to a
multiple of the world size and takes every ``world``-th position starting at its rank. The parts
are disjoint, equal in size (so every rank runs the same number of optimiser steps and none waits
at the end of an epoch) and together cover the plan; :func:`interleave` puts the ranks' per-sample
values back into plan order (:func:`dds.selector.torch.gather_part` gathers them across processes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files that exist once per job (history, checkpoints, summaries)."""
        return self.rank == 0


def part_size(m: int, world: int) -> int:
    """Samples per rank for a plan of ``m``: ``ceil(m / world)`` (the plan is padded cyclically)."""
    return -(-m // world)


def part_positions(m: int, rank: int, world: int) -> np.ndarray:
    """Positions of rank ``rank``'s part in the padded plan: ``rank, rank + world, ...``.

    Args:
        m: samples in the epoch's plan.
        rank, world: this rank and the number of ranks.

    Returns:
        ``(ceil(m / world),)`` int64 positions in ``[0, world * ceil(m / world))``; position ``p``
        trains plan entry ``p % m`` (positions ``>= m`` are the padding, at most ``world - 1``).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    return np.arange(rank, part_size(m, world) * world, world, dtype=np.int64)


def part_entries(m: int, rank: int, world: int) -> np.ndarray:
    """The plan entries rank ``rank`` trains, in order: its :func:`part_positions` modulo ``m``."""
    return part_positions(m, rank, world) % max(m, 1)


def interleave(parts: Any, m: int) -> Any:
    """``(world, P)`` per-rank values, numpy or torch (rank-major, from :func:`part_positions`) -> the
    ``(m,)`` plan order."""
    return parts.T.reshape(-1)[:m]
