"""Base types of the selector: per-sample inputs, the epoch plan, the policy base class and registry.

No torch here: ``dds.selector`` is imported by other people's training loops.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from dds.errors import DdsError
from dds.registry import Registry
from dds.tables import REGIONS, RELABEL, STATUSES

#: ``EpochPlan.aug`` codes: 0 = base augmentation, k in 1..AUG_LEVELS = strong at magnitude k / AUG_LEVELS.
AUG_LEVELS = 4


@dataclass(frozen=True)
class SampleInfo:
    """Static per-sample inputs; index i is the position in the train split (``samples.idx``).

    Arrays are converted to the dtypes below and checked on construction (``DdsError`` if wrong).

    Attributes:
        labels: (N,) int64 training labels (possibly noisy), in [0, num_classes).
        num_classes: number of classes C.
        density: (N,) float32 in [0, 1], per-class normalised, 1 = densest; optional.
        consistency: (N,) float32, higher = image agrees with its label; optional.
        joint: (N,) float32 in [0, 1], priority: sparse AND consistent; optional.
        region: (N,) int8 codes into ``REGIONS``; optional (see ``encode_regions``).
        status: (N,) int8 codes into ``STATUSES`` (clean / relabel / suppress), the static label
            verdict of ``dds index``; optional. When given, ``dds`` suppresses and relabels by it
            instead of by the ``noisy`` region.
        label_fixed: (N,) int64 corrected labels (``label_fixed`` of ``scores``: the proposed label
            for ``relabel``, else the given one); required with ``status``.
    """

    labels: np.ndarray
    num_classes: int
    density: np.ndarray | None = None
    consistency: np.ndarray | None = None
    joint: np.ndarray | None = None
    region: np.ndarray | None = None
    status: np.ndarray | None = None
    label_fixed: np.ndarray | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise DdsError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} "
                           f"dtype {labels.dtype}")
        if int(self.num_classes) < 1:
            raise DdsError(f"num_classes must be a positive integer, got {self.num_classes}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DdsError(f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        for name in ("density", "consistency", "joint"):
            self._set_optional(name, np.float32)
        self._set_optional("region", np.int8)
        if self.joint is not None and ((self.joint < 0).any() or (self.joint > 1).any()):
            raise DdsError("joint must lie in [0, 1]; recompute the scores with `dds index NAME`")
        if self.region is not None and ((self.region < 0).any() or (self.region >= len(REGIONS)).any()):
            raise DdsError(f"region codes must lie in [0, {len(REGIONS)}); use encode_regions() on region names")
        self._set_optional("status", np.int8)
        self._set_optional("label_fixed", np.int64)
        if (self.status is None) != (self.label_fixed is None):
            raise DdsError("status and label_fixed go together: give both or neither")
        if self.status is not None:
            if (self.status < 0).any() or (self.status >= len(STATUSES)).any():
                raise DdsError(f"status codes must lie in [0, {len(STATUSES)}); use encode_status() on status names")
            if self.label_fixed.min() < 0 or self.label_fixed.max() >= self.num_classes:
                raise DdsError(f"label_fixed must lie in [0, {self.num_classes})")
            if (self.label_fixed[self.status != RELABEL] != self.labels[self.status != RELABEL]).any():
                raise DdsError("label_fixed may differ from labels only where status is relabel")

    def _set_optional(self, name: str, dtype: type) -> None:
        value = getattr(self, name)
        if value is None:
            return
        arr = np.asarray(value)
        if arr.shape != self.labels.shape:
            raise DdsError(f"{name} must have shape {self.labels.shape} like labels, got {arr.shape}")
        if dtype is np.float32 and not np.isfinite(arr).all():
            raise DdsError(f"{name} contains NaN or inf; recompute the scores with `dds index NAME`")
        object.__setattr__(self, name, arr.astype(dtype, copy=False))

    @property
    def n(self) -> int:
        """Number of samples N."""
        return int(self.labels.shape[0])

    @property
    def has_scores(self) -> bool:
        """True when joint, consistency and region are all present."""
        return self.joint is not None and self.consistency is not None and self.region is not None


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains on, in order.

    Attributes:
        epoch: the epoch (0-based).
        indices: (M,) int64 sample indices, in training order (already shuffled), unique.
        weights: (M,) float32 per-sample loss weights.
        aug: (M,) uint8, 0 = base augmentation, k in 1..AUG_LEVELS = strong augmentation at
            magnitude k / AUG_LEVELS.
        labels: (M,) int64 label each planned sample is trained on, or None for the dataset's
            labels (``dds`` sets it when it trains relabelled samples on their corrected label).
    """

    epoch: int
    indices: np.ndarray
    weights: np.ndarray
    aug: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        m = self.indices.shape
        if self.weights.shape != m or self.aug.shape != m or len(m) != 1 or (
                self.labels is not None and self.labels.shape != m):
            raise ValueError(f"plan arrays must share one 1-D shape, got indices {m}, weights "
                             f"{self.weights.shape}, aug {self.aug.shape}"
                             + ("" if self.labels is None else f", labels {self.labels.shape}"))

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def make_plan(epoch: int, indices: np.ndarray, weights: np.ndarray | float = 1.0,
              aug: np.ndarray | None = None, labels: np.ndarray | None = None) -> EpochPlan:
    """Build an ``EpochPlan`` with the contract dtypes (weights may be a scalar, aug defaults to 0,
    labels to None = the dataset's labels)."""
    idx = np.asarray(indices, dtype=np.int64)
    w = np.broadcast_to(np.asarray(weights, dtype=np.float32), idx.shape).copy()
    a = np.zeros(idx.shape, np.uint8) if aug is None else np.asarray(aug, dtype=np.uint8)
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return EpochPlan(epoch=int(epoch), indices=idx, weights=w, aug=a, labels=y)


def anneal_start(epochs: int, delta: float, *, strict: bool = False) -> int:
    """First annealing epoch: the smallest epoch e with e >= delta * epochs (``epochs`` if none).

    ``strict``: the smallest e with e > delta * epochs instead (the official InfoBatch sampler).
    """
    if strict:
        return min(epochs, math.floor(delta * epochs + 1e-9) + 1)
    return min(epochs, math.ceil(delta * epochs - 1e-9))


class Policy:
    """Base class of a selection policy; subclasses are registered with ``@register_policy``.

    A policy owns its per-sample state (losses, scores) and turns it into one ``EpochPlan`` per
    epoch. ``Selector`` validates every input before it reaches a policy.

    Class attributes:
        Config: the policy's options dataclass (one documented default per field).
        needs_scores: whether the policy reads joint, consistency and region when ``SampleInfo`` carries
            them (``dds train`` then requires ``dds index``); which options cannot run without them,
            :meth:`scores_required` says.
        saved_defaults: options added after runs could be saved, each with the value that keeps such a
            run as it started: a resumed run whose saved options lack one takes this value.

    A policy is built by ``Selector`` with ``total``, the run's budget in sample-steps (computed and
    checked there); :meth:`follows_budget` says whether its plans spend it.
    """

    Config: ClassVar[type] = type(None)
    needs_scores: ClassVar[bool] = False
    saved_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, info: SampleInfo, cfg: Any, *, epochs: int, total: int) -> None:
        self.info = info
        self.cfg = cfg
        self.epochs = epochs
        self.total = total

    @classmethod
    def scores_required(cls, cfg: Any) -> list[str]:
        """The options of ``cfg`` that cannot run without scores (empty: the policy runs on losses alone)."""
        return []

    @classmethod
    def follows_budget(cls, cfg: Any) -> bool:
        """Whether a run with options ``cfg`` spends the budget (else it spends what it spends, e.g. ``full``)."""
        return True

    def epoch_sizes(self) -> np.ndarray:
        """(epochs,) int64 planned sample counts per epoch (an estimate where sizes depend on losses)."""
        raise NotImplementedError

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        """The plan of ``epoch``; ``spent_before`` = sample-steps planned for the epochs before it."""
        raise NotImplementedError

    def observe(self, indices: np.ndarray, losses: np.ndarray, aug: np.ndarray | None = None) -> None:
        """Record validated per-sample losses: (K,) int64 indices, (K,) float32 losses and, when the
        caller knows them, the (K,) uint8 augmentation codes the losses were measured under."""

    def status(self) -> np.ndarray | None:
        """(N,) int8 codes into ``STATUSES``: how the policy treats each sample's label now, or None
        for policies that take every label as given."""
        return None

    def held_out_gap(self) -> float | None:
        """The held-out gap as of the latest plan (``dds`` with ``strong_aug=gap`` in a run long enough
        for probes), or None for policies and runs without one."""
        return None

    def state_dict(self) -> dict:
        """Picklable state (numpy arrays / python scalars)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


_POLICIES: Registry[Policy] = Registry("policy")


def register_policy(name: str) -> Callable[[type], type]:
    """Class decorator registering a ``Policy`` subclass under ``name``; a taken name raises ValueError."""
    return _POLICIES.register(name)


def list_policies() -> list[str]:
    """Registered policy names, sorted."""
    return _POLICIES.names()


def get_policy(name: str) -> type:
    """The policy class for ``name``; ``DdsError`` listing the known names if absent."""
    return _POLICIES.get(name)


def make_config(policy: str, cls: type, options: dict[str, Any]) -> Any:
    """Options dict -> the policy's config dataclass; unknown keys raise ``DdsError`` listing known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) if known else "(none)"
        raise DdsError(f"unknown option(s) {', '.join(unknown)} for policy '{policy}'; known: {listed}")
    return cls(**options)


# ---- option checks used by the config dataclasses (one sentence each, no silent clamping) ----

def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` must be a real number within the given bounds; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DdsError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    bad |= lo is not None and (v <= lo if lo_open else v < lo)
    bad |= hi is not None and (v >= hi if hi_open else v > hi)
    if bad:
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        rng = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{')' if hi_open or hi is None else ']'}"
        raise DdsError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_int(name: str, value: Any, lo: int = 0) -> int:
    """``value`` must be an integer >= ``lo``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise DdsError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_budget(budget: Any) -> float:
    """``budget`` must be a fraction of the full data's sample-steps in (0, 1]; returns it as float."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)) \
            or not 0 < float(budget) <= 1:
        raise DdsError(f"budget must be in (0, 1], got {budget!r}")
    return float(budget)


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise DdsError(f"{name} must be true or false, got {value!r}")
    return bool(value)


class LossPolicy(Policy):
    """A policy whose whole state is a per-sample training-loss tracker ``self._loss`` (``LossEma``)."""

    def observe(self, indices: np.ndarray, losses: np.ndarray, aug: np.ndarray | None = None) -> None:
        self._loss.update(indices, losses)

    def state_dict(self) -> dict:
        return {"loss": self._loss.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._loss.load_state_dict(state["loss"])
