"""Reference policies: ``full`` (every sample, every epoch), ``budgeted`` (full data, trained shorter)
and ``random`` (uniform dynamic selection)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dds.selector._base import EpochPlan, Policy, check_bool, make_plan, register_policy
from dds.selector._core import ClassLayout, even_sizes, largest_remainder, shuffle_order, shuffled, uniform_keys


@dataclass(frozen=True)
class FullConfig:
    """``full`` has no options."""


@register_policy("full")
class FullPolicy(Policy):
    """Every sample every epoch, weight 1, base augmentation, shuffled per epoch.

    The budget does not apply: ``full`` always spends ``epochs * N`` sample-steps, and ``Selector``
    sets its ``total_sample_steps`` (and ``budget``) to the full data, logging a warning when a
    smaller budget was asked for.
    """

    Config = FullConfig

    @classmethod
    def follows_budget(cls, cfg: FullConfig) -> bool:
        return False

    def epoch_sizes(self) -> np.ndarray:
        return np.full(self.epochs, self.info.n, np.int64)

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        return make_plan(epoch, shuffle_order(self.info.n, rng))


@dataclass(frozen=True)
class BudgetedConfig:
    """``budgeted`` has no options."""


@register_policy("budgeted")
class BudgetedPolicy(Policy):
    """"Just train shorter": full shuffled passes until the budget is spent, the last one partial.

    The control of budgeted training (Li, Yumer & Ramanan, ICLR 2020, "Budgeted training: rethinking
    deep neural network training under resource constraints"): with budget B the run trains
    ``round(B * E * N)`` sample-steps on the full data, epoch by epoch (every epoch a fresh shuffle
    of all N samples; the last trained epoch takes the first part of its shuffle), and the epochs
    after that are empty. The trainer's LR schedule runs over the steps actually planned, so it
    anneals to its end at the budget: the schedule-aware baseline that any selection method must
    beat to be worth its bookkeeping.
    """

    Config = BudgetedConfig

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        n = info.n
        full, part = divmod(int(total), n)
        self._sizes = np.zeros(epochs, np.int64)
        self._sizes[:full] = n
        if full < epochs:
            self._sizes[full] = part

    def epoch_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        return make_plan(epoch, shuffle_order(self.info.n, rng)[:int(self._sizes[epoch])])


@dataclass(frozen=True)
class RandomConfig:
    """Options of ``random``."""

    class_balanced: bool = True  # per-class counts proportional to class sizes (largest remainder); else uniform over all

    def __post_init__(self) -> None:
        check_bool("class_balanced", self.class_balanced)


@register_policy("random")
class RandomPolicy(Policy):
    """Uniform dynamic selection at the budget (Raju et al. 2021's "uniform random dynamic pruning").

    Every epoch draws a fresh uniform sample without replacement. The run's sample-steps
    (``total_sample_steps``) are spread evenly over the epochs (sizes differ by at most one and sum
    to the total exactly); no warm-up, no annealing, weight 1, base augmentation. With
    ``class_balanced`` (default) each class contributes ``size * N_c / N`` samples, rounded by
    largest remainder.
    """

    Config = RandomConfig

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        self._sizes = even_sizes(total, epochs, cap=info.n)
        self._layout = ClassLayout(info.labels, info.num_classes) if cfg.class_balanced else None

    def epoch_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        size = int(self._sizes[epoch])
        if self._layout is None:
            return make_plan(epoch, shuffle_order(self.info.n, rng)[:size])
        quotas = largest_remainder(size, self._layout.counts)
        pos = self._layout.select(uniform_keys(self.info.n, rng), quotas)
        return make_plan(epoch, shuffled(self._layout.order[pos], rng))
