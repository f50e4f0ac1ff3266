"""Reference policies: ``full`` (every sample, every epoch) and ``random`` (uniform dynamic selection)."""
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
    uses_budget = False

    def epoch_sizes(self) -> np.ndarray:
        return np.full(self.epochs, self.info.n, np.int64)

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        return make_plan(epoch, shuffle_order(self.info.n, rng))


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
