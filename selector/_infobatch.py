"""``infobatch``: InfoBatch (Qin et al., ICLR 2024, arXiv 2303.04947), at a matched budget.

The rule, as in the official code (``NUS-HPC-AI-Lab/InfoBatch:infobatch/infobatch.py``):

* score of a sample = its most recently observed training loss;
* in a pruned epoch, the samples whose score is below the mean score ("well learned") are pruned
  at ratio r: ``int((1 - r) * n_below)`` of them are kept, uniformly at random, with loss weight
  ``1 / (1 - r)``; every sample at or above the mean is kept with weight 1;
* annealing: epochs ``e >= delta * E`` (delta = 0.875) train on the full data with weight 1.

Differences from the official code, on purpose:

* r is chosen per pruned epoch from the remaining budget, so that the run spends the same
  sample-steps as the other policies: ``r = clip(needed_drop / n_below, 0, max_prune_ratio)`` with
  ``needed_drop = N - remaining / pruned_epochs_left``. A fixed r is available (``prune_ratio``).
  InfoBatch can never drop high-loss samples, so when the budget is below what it can reach it
  spends more; ``Selector.spent()`` reports what it really spent.
* Unseen samples (no loss observed yet) are always kept and left out of the mean; the official code
  gives them the constant score 3 instead. In the first epoch nothing has been observed, so it is a
  full epoch in both.
* Annealing starts at ``e >= delta * E`` (as described in the paper and seen in the lab's logs); the
  official sampler starts one epoch later (``e > delta * E``). r is not clamped to 0.9 silently.
* Randomness comes from the epoch's generator, not the global numpy seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dds.selector._base import LossPolicy, EpochPlan, anneal_start, check_real, make_plan, register_policy
from dds.selector._core import LossEma, even_sizes, shuffle_order, shuffled


@dataclass(frozen=True)
class InfoBatchConfig:
    """Options of ``infobatch``."""

    prune_ratio: float | None = None  # fixed r in [0, 1) (the official `prune_ratio`); None = set per epoch from the budget
    delta: float = 0.875              # annealing: epochs >= delta * epochs use the full data with weight 1 (1.0 = none)
    max_prune_ratio: float = 1.0      # upper bound on the budget-derived r (the official code clamps r to 0.9)

    def __post_init__(self) -> None:
        if self.prune_ratio is not None:
            object.__setattr__(self, "prune_ratio", check_real("prune_ratio", self.prune_ratio, 0.0, 1.0,
                                                               hi_open=True))
        object.__setattr__(self, "delta", check_real("delta", self.delta, 0.0, 1.0))
        object.__setattr__(self, "max_prune_ratio", check_real("max_prune_ratio", self.max_prune_ratio, 0.0, 1.0))


def infobatch_prune(scores: np.ndarray, seen: np.ndarray, n_keep_low: int | None, *,
                    prune_ratio: float | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One InfoBatch pruning step (the pure core).

    Args:
        scores: (N,) float last observed losses.
        seen: (N,) bool, a loss was observed; unseen samples are always kept with weight 1.
        n_keep_low: how many below-mean samples to keep (budget mode), or None to use ``prune_ratio``.
        prune_ratio: fixed r in [0, 1) when ``n_keep_low`` is None: keep ``int((1 - r) * n_below)``.
        rng: the epoch's generator.

    Returns:
        ``(indices, weights)``: (M,) int64 kept samples (high/unseen first, then kept low-loss, not
        shuffled) and (M,) float32 weights: 1 for high-loss/unseen, ``n_below / n_keep`` (= 1/(1-r))
        for kept low-loss samples.
    """
    below = np.zeros(scores.shape[0], bool)
    if seen.any():
        below = seen & (scores < scores[seen].mean())
    low = np.flatnonzero(below)
    high = np.flatnonzero(~below)
    if n_keep_low is None:
        n_keep_low = int((1.0 - float(prune_ratio)) * low.size)
        w_low = 1.0 / (1.0 - float(prune_ratio))
    else:
        n_keep_low = max(0, min(int(n_keep_low), low.size))
        w_low = low.size / n_keep_low if n_keep_low else 1.0
    kept = shuffled(low, rng)[:n_keep_low] if n_keep_low < low.size else low
    indices = np.concatenate([high, kept])
    weights = np.concatenate([np.ones(high.size, np.float32), np.full(kept.size, w_low, np.float32)])
    return indices, weights


@register_policy("infobatch")
class InfoBatchPolicy(LossPolicy):
    """InfoBatch with r set per pruned epoch from the budget (see the module docstring)."""

    Config = InfoBatchConfig

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        self._anneal = anneal_start(epochs, cfg.delta)
        self._loss = LossEma(info.n, momentum=0.0)   # momentum 0: `last` = `mean` = the last loss

    def epoch_sizes(self) -> np.ndarray:
        """Estimate: epoch 0 and annealing epochs full, the pruned epochs share the rest evenly."""
        n, sizes = self.info.n, np.full(self.epochs, self.info.n, np.int64)
        pruned = max(0, self._anneal - 1)
        if pruned and self.cfg.prune_ratio is None:
            rest = self.total - n * (self.epochs - pruned)
            sizes[1:self._anneal] = even_sizes(max(rest, 0), pruned, cap=n)
        elif pruned:  # fixed r: about half the samples are below the mean
            sizes[1:self._anneal] = round(n * (1.0 - 0.5 * self.cfg.prune_ratio))
        return sizes

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        n = self.info.n
        if epoch >= self._anneal:
            return make_plan(epoch, shuffle_order(n, rng))
        n_keep_low = None
        if self.cfg.prune_ratio is None:
            n_keep_low = self._keep_low_for_budget(epoch, spent_before)
        idx, w = infobatch_prune(self._loss.last, self._loss.seen, n_keep_low,
                                 prune_ratio=self.cfg.prune_ratio, rng=rng)
        perm = shuffle_order(idx.size, rng)
        return make_plan(epoch, idx[perm], w[perm])

    def _keep_low_for_budget(self, epoch: int, spent_before: int) -> int:
        """Below-mean samples to keep so the remaining pruned epochs share the remaining budget evenly."""
        n, seen = self.info.n, self._loss.seen
        pruned_left = self._anneal - epoch
        remaining = self.total - spent_before - n * (self.epochs - self._anneal)
        target = int(np.ceil(remaining / pruned_left)) if remaining > 0 else 0
        n_below = 0
        if seen.any():
            last = self._loss.last
            n_below = int(np.count_nonzero(seen & (last < last[seen].mean())))
        need_drop = min(max(n - target, 0), n_below)
        max_drop = int(np.floor(self.cfg.max_prune_ratio * n_below + 1e-9))
        return n_below - min(need_drop, max_drop)
