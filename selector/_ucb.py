"""``ucb``: upper-confidence-bound dynamic pruning after Raju, Daruwalla & Lipasti 2021
("Accelerating deep learning with dynamic data pruning", arXiv 2111.12621).

Each sample is an arm whose reward is its training loss. The score is ``EMA(loss) + c * sqrt(EMA
variance of the loss)``; every epoch keeps the ``(1 - epsilon)`` share of the epoch size with the
highest scores and fills the ``epsilon`` share with uniform random picks from the rest (the
epsilon-greedy exploration the paper pairs with its bandit selectors). Samples never observed
have an infinite score (tried first, in random order). Sizes are spread evenly over the epochs as
for ``random``; weight 1; base augmentation. The paper's own constants were not available; the
defaults below are ours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dds.selector._base import LossPolicy, EpochPlan, check_real, make_plan, register_policy
from dds.selector._core import LossEma, even_sizes, shuffled


@dataclass(frozen=True)
class UcbConfig:
    """Options of ``ucb``."""

    momentum: float = 0.8     # EMA momentum of the loss mean and variance (weight of the old value)
    confidence: float = 1.0   # c: weight of the loss standard deviation in the score
    epsilon: float = 0.1      # share of each epoch's selection drawn uniformly at random

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", check_real("momentum", self.momentum, 0.0, 1.0, hi_open=True))
        object.__setattr__(self, "confidence", check_real("confidence", self.confidence, 0.0))
        object.__setattr__(self, "epsilon", check_real("epsilon", self.epsilon, 0.0, 1.0))


def ucb_select(score: np.ndarray, seen: np.ndarray, size: int, epsilon: float,
               rng: np.random.Generator) -> np.ndarray:
    """Pick ``size`` samples: unseen first, then highest ``score``, plus an epsilon share at random.

    Args:
        score: (N,) float UCB scores (only read where ``seen``).
        seen: (N,) bool.
        size: samples to pick, <= N.
        epsilon: share of ``size`` drawn uniformly from the samples not picked greedily.
        rng: the epoch's generator.

    Returns:
        (size,) int64 unique sample indices (greedy picks first, not shuffled).
    """
    n = score.shape[0]
    n_rand = int(round(epsilon * size))
    n_top = size - n_rand
    unseen = np.flatnonzero(~seen)
    if unseen.size >= n_top:
        greedy = shuffled(unseen, rng)[:n_top]
    else:
        cand = np.flatnonzero(seen)
        k = n_top - unseen.size
        top = cand[np.argpartition(score[cand], cand.size - k)[cand.size - k:]] if k < cand.size else cand
        greedy = np.concatenate([unseen, top])
    rest = np.ones(n, bool)
    rest[greedy] = False
    extra = shuffled(np.flatnonzero(rest), rng)[:n_rand]
    return np.concatenate([greedy, extra]).astype(np.int64)


@register_policy("ucb")
class UcbPolicy(LossPolicy):
    """Loss-EMA + variance bandit selection (see the module docstring)."""

    Config = UcbConfig

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        self._sizes = even_sizes(total, epochs, cap=info.n)
        self._loss = LossEma(info.n, momentum=cfg.momentum)

    def epoch_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        score = self._loss.mean + self.cfg.confidence * np.sqrt(self._loss.var)
        chosen = ucb_select(score, self._loss.seen, int(self._sizes[epoch]), self.cfg.epsilon, rng)
        return make_plan(epoch, shuffled(chosen, rng))
