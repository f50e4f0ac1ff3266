"""``Selector``: the object a training loop talks to (plan an epoch, observe its losses, resume)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from dds.errors import DdsError
from dds.selector._base import EpochPlan, SampleInfo, check_budget, check_int, get_policy, make_config

log = logging.getLogger(__name__)


def _as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        try:
            x = x.numpy()
        except TypeError:          # bfloat16 / float16 tensors numpy cannot hold as such
            x = x.float().numpy()
    return np.asarray(x)


class Selector:
    """Chooses, every epoch, which samples are trained on, in which order, with which weight and augmentation.

    Args:
        policy: a registered policy name (``list_policies()``: dds, full, infobatch, random, ucb).
        info: the static per-sample inputs; ``dds`` reads joint, region and the verdict when given and
            runs on losses alone without them (its options ``prior_weight > 0`` and
            ``strong_aug=top_q|region|all`` need them).
        epochs: training epochs E.
        budget: fraction of full-data sample-steps (``epochs * N``) the whole run may spend, warm-up
            and annealing included, in (0, 1]. Policies that do not follow the budget (``full``;
            ``infobatch`` with a fixed ``prune_ratio``, its default) get budget 1.0 as their cap and
            spend what they spend (``spent()``); a warning is logged if a smaller one was given.
        seed: non-negative seed; epoch e uses ``np.random.default_rng([seed, e])``, so the plan is
            the same on every rank and after a resume.
        **policy_options: the policy's options (fields of its config dataclass, e.g. ``DdsConfig``).

    Attributes:
        policy, info, epochs, budget, seed: as given (budget as used).
        config: the policy's resolved config dataclass (save it with the run).
        n: number of samples N.
        total_sample_steps: ``round(budget * epochs * N)``, the run's budget in sample-steps.
        follows_budget: whether the policy's spend follows ``budget`` (False for ``full`` and
            fixed-ratio ``infobatch``); ``spent()`` is what it spent.

    The selector is the one place the budget is checked and turned into sample-steps; a trainer
    reads ``budget``, ``total_sample_steps``, ``follows_budget`` and ``spent()`` from it.

    Raises:
        DdsError: budget outside (0, 1] or rounding to 0 sample-steps, bad epochs/seed, unknown policy
            or option, bad option value, or options that need scores without them.
    """

    def __init__(self, policy: str, info: SampleInfo, *, epochs: int, budget: float = 1.0, seed: int = 0,
                 **policy_options: Any) -> None:
        if not isinstance(info, SampleInfo):
            raise DdsError(f"info must be a SampleInfo, got {type(info).__name__}")
        self.epochs = check_int("epochs", epochs, 1)
        self.seed = check_int("seed", seed, 0)
        self.budget = check_budget(budget)
        cls = get_policy(policy)
        self.config = make_config(policy, cls.Config, dict(policy_options))
        required = cls.scores_required(self.config)
        if required and not info.has_scores:
            raise DdsError(f"policy {policy} needs scores (joint, consistency, region) for {', '.join(required)}: "
                           "run `dds index NAME` first, or leave these options at their defaults")
        self.policy, self.info, self.n = policy, info, info.n
        self.follows_budget = cls.follows_budget(self.config)
        if not self.follows_budget and self.budget < 1.0:
            log.warning("policy %s with these options ignores budget %g and spends what it spends (cap 1.0)",
                        policy, self.budget)
            self.budget = 1.0
        total = int(round(self.budget * self.epochs * self.n))
        if total < 1:
            raise DdsError(f"budget {self.budget:g} of {self.epochs} epochs x {self.n} samples rounds to 0 "
                           "sample-steps (below one sample per epoch); raise the budget or the epochs")
        self._policy = cls(info, self.config, epochs=self.epochs, total=total)
        self._sizes = np.full(self.epochs, -1, np.int64)      # planned size per epoch, -1 = not planned

    @property
    def total_sample_steps(self) -> int:
        """``round(budget * epochs * N)``: the run's budget in sample-steps (handed to the policy)."""
        return self._policy.total

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch`` (0-based); deterministic given seed, epoch, observed losses and earlier plans.

        Calling it again for the same epoch replans it (what ``spent()`` counts is replaced).
        """
        epoch = self._check_epoch(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        spent_before = int(self._sizes[:epoch][self._sizes[:epoch] >= 0].sum())
        plan = self._policy.plan(epoch, rng, spent_before=spent_before)
        self._sizes[epoch] = len(plan)
        if self.follows_budget and spent_before + len(plan) > self.total_sample_steps >= spent_before:
            log.warning("policy %s planned more than its budget of %d sample-steps", self.policy,
                        self.total_sample_steps)
        return plan

    def observe(self, indices: Any, losses: Any, aug: Any = None) -> None:
        """Record per-sample training losses (unweighted CE, ``reduction='none'``).

        Args:
            indices: (K,) integer sample indices (numpy, list or torch tensor on any device).
            losses: (K,) float losses of those samples.
            aug: optional (K,) augmentation codes the losses were measured under (the plan's ``aug``);
                ``dds`` does not let a loss measured on a strongly augmented view move its selection.

        May be called several times per epoch with parts of the epoch.

        Raises:
            DdsError: shapes differ, an index is out of range, or a loss is NaN/inf.
        """
        idx, loss = _as_numpy(indices).reshape(-1), _as_numpy(losses).reshape(-1)
        if idx.shape != loss.shape:
            raise DdsError(f"observe got {idx.size} indices but {loss.size} losses; pass one loss per index")
        if idx.size == 0:
            return
        if not np.issubdtype(idx.dtype, np.integer):
            raise DdsError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= self.n:
            raise DdsError(f"indices must lie in [0, {self.n}), got [{idx.min()}, {idx.max()}]")
        loss = loss.astype(np.float32, copy=False)
        if not np.isfinite(loss).all():
            raise DdsError("losses contain NaN or inf: training diverged; lower the learning rate")
        codes = None
        if aug is not None:
            codes = _as_numpy(aug).reshape(-1)
            if codes.shape != idx.shape:
                raise DdsError(f"observe got {idx.size} indices but {codes.size} augmentation codes")
            codes = codes.astype(np.uint8, copy=False)
        self._policy.observe(idx.astype(np.int64, copy=False), loss, codes)

    def status(self) -> np.ndarray | None:
        """(N,) int8 codes into ``STATUSES`` (clean / relabel / suppress): how the policy treats each
        sample's label, or None when it takes every label as given (all but ``dds`` with a verdict)."""
        return self._policy.status()

    def held_out_gap(self) -> float | None:
        """The held-out gap as of the latest plan, averaged over the pruned epochs before it (what that
        plan's strong views were decided by): ``dds`` with ``strong_aug=gap`` in runs of at least
        ``gap_min_passes`` passes; else None. The ``epochs`` table records it per epoch."""
        return self._policy.held_out_gap()

    def spent(self) -> int:
        """Sample-steps planned so far (sum of the planned epochs' sizes): the run's spend."""
        return int(self._sizes[self._sizes >= 0].sum())

    def epoch_sizes(self) -> np.ndarray:
        """(epochs,) int64 expected sizes of every epoch (exact for full, budgeted, random, ucb and dds;
        an estimate for infobatch, whose sizes depend on the losses). Planned epochs show their real size."""
        sizes = self._policy.epoch_sizes()
        return np.where(self._sizes >= 0, self._sizes, sizes)

    def state_dict(self) -> dict:
        """Picklable state: numpy arrays and python scalars only."""
        return {"policy": self.policy, "n": self.n, "epochs": self.epochs, "seed": self.seed,
                "budget": self.budget, "config": dataclasses.asdict(self.config),
                "sizes": self._sizes.copy(), "policy_state": self._policy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``; later plans equal those of the uninterrupted selector.

        Raises:
            DdsError: the state belongs to another policy, dataset size, epoch count or seed.
        """
        mine = {"policy": self.policy, "n": self.n, "epochs": self.epochs, "seed": self.seed}
        diff = [f"{k}={state.get(k)!r} (here {v!r})" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise DdsError(f"selector state does not match this selector: {', '.join(diff)}")
        self._sizes = np.asarray(state["sizes"], dtype=np.int64).copy()
        self._policy.load_state_dict(state["policy_state"])

    def _check_epoch(self, epoch: Any) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= epoch < self.epochs:
            raise DdsError(f"epoch must be an integer in [0, {self.epochs}), got {epoch!r}")
        return int(epoch)

    def __repr__(self) -> str:
        return (f"Selector(policy={self.policy!r}, n={self.n}, epochs={self.epochs}, budget={self.budget:g}, "
                f"seed={self.seed})")


def synthetic_info(n: int, classes: int, *, noisy_fraction: float = 0.1, seed: int = 0) -> SampleInfo:
    """Random ``SampleInfo`` with scores, for benchmarks and tests (balanced labels, ``noisy_fraction`` noisy)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    density = rng.random(n, dtype=np.float32)
    consistency = rng.random(n, dtype=np.float32)
    joint = (1.0 - density) * consistency
    region = np.where(consistency < noisy_fraction, 3, np.where(joint > 0.5, 0, np.where(density > 0.7, 2, 1)))
    return SampleInfo(labels=labels, num_classes=classes, density=density, consistency=consistency,
                      joint=joint, region=region.astype(np.int8))
