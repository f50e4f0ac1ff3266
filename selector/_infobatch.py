"""``infobatch``: InfoBatch (Qin et al., ICLR 2024, arXiv 2303.04947), the rule of the official code.

* score of a sample = its most recently observed training loss;
* in epochs ``e <= delta * E`` (delta = 0.875) the samples below the mean score are pruned at a
  fixed ratio r (``prune_ratio``): ``int(k * n_below)`` of them are kept at random, ``k = clip(1 -
  r, 0.1, 1)``, with loss weight ``1 / k``; samples at or above the mean are kept with weight 1;
* later epochs train on the full data with weight 1 (annealing).

It spends what the losses make it spend (``Selector.spent()``), not ``--budget``;
``match_budget=True`` is our budget-matched variant, ``r = min(needed_drop / n_below,
max_prune_ratio)`` per pruned epoch. Where it differs from the official code, and why:
docs/selector.md, "Design notes: selector/_infobatch.py".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dds.selector._base import LossPolicy, EpochPlan, anneal_start, check_bool, check_real, make_plan, register_policy
from dds.selector._core import LossEma, even_sizes, shuffle_order, shuffled

MIN_KEEP = 0.1  # the official keep-ratio clamp: at most 90 % of the well-learned samples are pruned


@dataclass(frozen=True)
class InfoBatchConfig:
    """Options of ``infobatch``."""

    prune_ratio: float = 0.5          # r in [0, 1): share of the below-mean samples pruned (keep ratio clipped to >= 0.1)
    delta: float = 0.875              # epochs e <= delta * epochs are pruned, later ones use the full data (1.0 = never)
    match_budget: bool = False        # set r per epoch so the run spends --budget (our variant, not the published rule)
    max_prune_ratio: float = 0.9      # with match_budget: upper bound on r (the official clamp)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "prune_ratio", check_real("prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True))
        set_(self, "delta", check_real("delta", self.delta, 0.0, 1.0))
        set_(self, "match_budget", check_bool("match_budget", self.match_budget))
        set_(self, "max_prune_ratio", check_real("max_prune_ratio", self.max_prune_ratio, 0.0, 1.0))


def keep_ratio(prune_ratio: float) -> float:
    """The official keep ratio of the below-mean samples: ``clip(1 - r, 0.1, 1)``."""
    return min(1.0, max(MIN_KEEP, 1.0 - float(prune_ratio)))


def infobatch_prune(scores: np.ndarray, seen: np.ndarray, n_keep_low: int | None, *,
                    prune_ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One InfoBatch pruning step (the pure core).

    Args:
        scores: (N,) float last observed losses.
        seen: (N,) bool, a loss was observed; unseen samples are always kept with weight 1.
        n_keep_low: how many below-mean samples to keep (budget mode), or None for the published
            rule: keep ``int(keep_ratio(prune_ratio) * n_below)`` with weight ``1 / keep_ratio``.
        prune_ratio: r in [0, 1), used when ``n_keep_low`` is None.
        rng: the epoch's generator.

    Returns:
        ``(indices, weights)``: (M,) int64 kept samples (high/unseen first, then kept low-loss, not
        shuffled) and (M,) float32 weights: 1 for high-loss/unseen, ``1 / keep ratio`` for kept
        low-loss samples (``n_below / n_keep`` in budget mode).
    """
    below = np.zeros(scores.shape[0], bool)
    if seen.any():
        below = seen & (scores < scores[seen].mean())
    low = np.flatnonzero(below)
    high = np.flatnonzero(~below)
    if n_keep_low is None:
        k = keep_ratio(prune_ratio)
        n_keep_low, w_low = int(k * low.size), 1.0 / k
    else:
        n_keep_low = max(0, min(int(n_keep_low), low.size))
        w_low = low.size / n_keep_low if n_keep_low else 1.0
    kept = shuffled(low, rng)[:n_keep_low] if n_keep_low < low.size else low
    indices = np.concatenate([high, kept])
    weights = np.concatenate([np.ones(high.size, np.float32), np.full(kept.size, w_low, np.float32)])
    return indices, weights


@register_policy("infobatch")
class InfoBatchPolicy(LossPolicy):
    """InfoBatch with the published fixed-ratio rule, or budget-matched (see the module docstring)."""

    Config = InfoBatchConfig

    @classmethod
    def follows_budget(cls, cfg: InfoBatchConfig) -> bool:
        return cfg.match_budget

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        self._anneal = anneal_start(epochs, cfg.delta, strict=True)
        self._loss = LossEma(info.n, momentum=0.0)   # momentum 0: `last` = `mean` = the last loss
        self._last_pruned = -1                        # size of the latest pruned epoch with a loss-based cut

    def epoch_sizes(self) -> np.ndarray:
        """Estimate: epoch 0 and annealing epochs full; pruned epochs share the rest of the budget
        evenly (match_budget), or take the latest pruned epoch's size (before one: half the samples
        below the mean)."""
        n, sizes = self.info.n, np.full(self.epochs, self.info.n, np.int64)
        pruned = max(0, self._anneal - 1)
        if pruned and self.cfg.match_budget:
            rest = self.total - n * (self.epochs - pruned)
            sizes[1:self._anneal] = even_sizes(max(rest, 0), pruned, cap=n)
        elif pruned:
            guess = round(n * (1.0 - 0.5 * (1.0 - keep_ratio(self.cfg.prune_ratio))))
            sizes[1:self._anneal] = self._last_pruned if self._last_pruned >= 0 else guess
        return sizes

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        n = self.info.n
        if epoch >= self._anneal:
            return make_plan(epoch, shuffle_order(n, rng))
        n_keep_low = self._keep_low_for_budget(epoch, spent_before) if self.cfg.match_budget else None
        idx, w = infobatch_prune(self._loss.last, self._loss.seen, n_keep_low,
                                 prune_ratio=self.cfg.prune_ratio, rng=rng)
        if self._loss.seen.any():
            self._last_pruned = int(idx.size)
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

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_pruned": self._last_pruned}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._last_pruned = int(state.get("last_pruned", -1))
