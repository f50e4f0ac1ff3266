"""``dds``: dynamic selection joined with augmentation (Yang et al., ICML 2025, arXiv 2505.03809).

Each epoch is one of three phases (every constant is a :class:`DdsConfig` field):

* warm-up (``e < warmup_epochs``) and annealing (``e >= delta * E``): full data, base augmentation,
  weight 1; annealing leaves the ``noisy`` region out unless ``anneal_exclude_noisy`` is false;
* pruned epochs in between: a sample without replacement of the epoch size, drawn with probability
  ``∝ pi_i ** sharpness``, ``pi_i = eps + joint_i ** prior_weight * lnorm_i ** loss_weight``, with
  ``lnorm`` the normalised loss EMA (:data:`LOSS_NORMS`); the ``noisy`` region's ``pi`` is scaled by
  ``noisy_weight``; with ``class_balance`` each class gets its size's share, else one global draw;
* optional strong augmentation of selected clean samples (``strong_aug``), its magnitude from
  :func:`aug_codes`, or with ``strong_aug=gap`` from the held-out gap (:func:`gap_codes`): in runs of
  at least ``gap_min_passes`` passes (budget x epochs) two random probe sets of clean samples ride
  along every pruned epoch, one trained (the anchor), one measured at weight 0 (held out), and
  strong views grow as the anchor's loss falls below the held-out one;
  strong views' losses are deflated (:func:`deflate_strong`) so augmentation alone does not raise a
  sample's selection probability.

``noise_handling`` applies the static verdict of ``dds index``: ``relabel`` samples train on
``label_fixed`` and are never strongly augmented, ``suppress`` samples count as ``noisy``. Warm-up and
annealing are charged at their real size and the pruned epochs share the rest of the budget; what
the schedule cannot spend shows in ``spent()``. Details and the reasons: docs/selector.md, "Design
notes: selector/_dds.py".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dds.errors import DdsError
from dds.selector._base import (AUG_LEVELS, EpochPlan, LossPolicy, anneal_start, check_bool, check_int, check_real, make_plan,
                                register_policy)
from dds.selector._core import (ClassLayout, LossEma, capped_quotas, even_sizes, power_, sampling_keys, shuffle_order,
                                shuffle_values, shuffled, top_k_mask, uniform_keys)
from dds.tables import AUGMENT, CLEAN, NOISY, RELABEL, SUPPRESS

log = logging.getLogger(__name__)

STRONG_AUG = ("gap", "top_q", "region", "all", "none")
LOSS_RESCALE = ("none", "const", "is")
NOISE_HANDLING = ("relabel", "suppress", "off")
UNSEEN = ("mean", "max")
AUG_BITS = AUG_LEVELS.bit_length()   # bits of a plan aug code
# strong_aug=gap: the held-out gap is averaged over pruned epochs as g <- m * g + (1 - m) * gap_epoch,
# from g = 0. One epoch's gap (50 losses a side) has a standard error of 0.06-0.15. The first version
# clipped each epoch at 0 and started from the first epoch's value, so a single chance high in the
# first epochs put most of a short run on strong views; now a lone epoch moves g by a fifth of that
# epoch's gap, while a gap that stays open (long runs: 0.2-0.35 from the 20th of 60 epochs) is
# followed a few epochs late. Picked from the per-epoch gaps of the val runs (docs/experiments.md,
# "Issue 28").
GAP_MOMENTUM = 0.8


@dataclass(frozen=True)
class DdsConfig:
    """Options of ``dds``. The defaults are the best settings measured on ``val`` (docs/experiments.md,
    "Tuning dds on val", and for ``strong_aug``/``gap_full`` "Issue 28"); the paper's reconstruction
    (docs/selector.md) is ``warmup_epochs=1 loss_weight=0.5 prior_weight=1 unseen=mean sharpness=1
    strong_aug=top_q class_balance=true loss_norm=minmax``.
    """

    warmup_epochs: int = 0              # first epochs on the full data, base augmentation, weight 1
    delta: float = 0.875                # annealing: epochs >= delta * epochs on the full data (1.0 = none)
    anneal_exclude_noisy: bool = True   # leave the 'noisy' region out of the annealing epochs
    eps: float = 0.05                   # exploration floor in pi = eps + joint**a * loss term
    loss_weight: float = 1.0            # exponent c on the normalised loss EMA (0 = loss signal off)
    loss_momentum: float = 0.5          # EMA momentum of each sample's training loss (weight of the old value)
    noisy_weight: float = 0.0           # factor on pi of the 'noisy' region in pruned epochs (0 = suppressed)
    prior_weight: float = 0.0           # exponent a on joint in pi = eps + joint**a * loss term (0 = loss only)
    unseen: str = "max"                 # loss term of never-observed samples: max (optimistic: seen soon) | mean
    sharpness: float = 4.0              # tau: samples drawn with probability ∝ pi**tau (large = greedy top-pi)
    strong_aug: str = "gap"             # who gets strong views: gap (by the held-out gap) | none | top_q | region | all
    probe_size: int = 50                # strong_aug=gap: samples in each probe set (held out, anchor)
    gap_full: float = 0.25              # strong_aug=gap: the held-out gap at which views reach full strength
    gap_min_passes: float = 16.0        # strong_aug=gap: runs of fewer passes (budget x epochs) keep base views, no probes
    aug_fraction: float = 0.5           # q: share of each pruned selection augmented when strong_aug = top_q
    aug_strength: float = 1.0           # largest strong-augmentation magnitude in [0, 1] (see aug_codes)
    loss_rescale: str = "none"          # pruned-epoch loss weights: none (1) | const (N/size) | is (importance)
    is_clip: float = 5.0                # upper clip of the importance weights (loss_rescale = is)
    noise_handling: str = "relabel"     # label verdict: relabel (train on label_fixed) | suppress | off
    class_balance: bool = False         # pruned epochs: class quotas by class size (false: one global draw)
    loss_norm: str = "rank"             # loss EMA -> [0, 1]: rank (percentile among observed clean samples) | minmax

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "warmup_epochs", check_int("warmup_epochs", self.warmup_epochs, 0))
        set_(self, "delta", check_real("delta", self.delta, 0.0, 1.0))
        set_(self, "anneal_exclude_noisy", check_bool("anneal_exclude_noisy", self.anneal_exclude_noisy))
        set_(self, "class_balance", check_bool("class_balance", self.class_balance))
        set_(self, "eps", check_real("eps", self.eps, 0.0))
        set_(self, "loss_weight", check_real("loss_weight", self.loss_weight, 0.0))
        set_(self, "loss_momentum", check_real("loss_momentum", self.loss_momentum, 0.0, 1.0, hi_open=True))
        set_(self, "noisy_weight", check_real("noisy_weight", self.noisy_weight, 0.0))
        set_(self, "aug_fraction", check_real("aug_fraction", self.aug_fraction, 0.0, 1.0))
        set_(self, "prior_weight", check_real("prior_weight", self.prior_weight, 0.0))
        set_(self, "sharpness", check_real("sharpness", self.sharpness, 0.0, lo_open=True))
        set_(self, "aug_strength", check_real("aug_strength", self.aug_strength, 0.0, 1.0))
        set_(self, "is_clip", check_real("is_clip", self.is_clip, 1.0))
        set_(self, "probe_size", check_int("probe_size", self.probe_size, 1))
        set_(self, "gap_full", check_real("gap_full", self.gap_full, 0.0, 1.0, lo_open=True))
        set_(self, "gap_min_passes", check_real("gap_min_passes", self.gap_min_passes, 0.0))
        for name, choices in (("strong_aug", STRONG_AUG), ("loss_rescale", LOSS_RESCALE),
                              ("noise_handling", NOISE_HANDLING), ("unseen", UNSEEN), ("loss_norm", tuple(LOSS_NORMS))):
            if getattr(self, name) not in choices:
                raise DdsError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


RANK_EXACT_MAX = 1 << 17   # rank_term: exact ranks up to this many reference samples, a fine histogram above


def rank_term(ema: np.ndarray, seen: np.ndarray, exclude: np.ndarray, unseen: str) -> np.ndarray | None:
    """(N,) float32 share of the reference samples (observed, not excluded) whose loss EMA is <= each
    sample's, in [0, 1]; unseen samples get 1 (``unseen='max'``) or the reference mean; None when
    nothing usable is observed yet or all reference values are equal.

    Above ``RANK_EXACT_MAX`` reference samples the share is read from a histogram over the top 20 bits
    of the float32 values (monotone for values >= 0; bins 2**-11 of a value wide), an order of
    magnitude faster than the exact search (docs/selector.md); losses are >= 0.
    """
    ref = seen & (exclude == 0)
    count = int(np.count_nonzero(ref))
    if count <= RANK_EXACT_MAX:
        vals = np.sort(ema[ref])
        if count == 0 or not vals[-1] > vals[0]:
            return None
        ln = np.searchsorted(vals, ema, side="right").astype(np.float32)
    else:
        bits = np.maximum(ema, np.float32(0)).view(np.int32) >> 12
        ref_bits = bits[ref]
        lo, hi = int(ref_bits.min()), int(ref_bits.max())
        if hi == lo:
            return None
        ref_bits -= lo
        cdf = np.cumsum(np.bincount(ref_bits, minlength=hi - lo + 1)).astype(np.float32)
        bits -= lo
        np.clip(bits, 0, hi - lo, out=bits)
        ln = cdf[bits]
    ln *= np.float32(1.0 / count)
    if not seen.all():
        fill = 1.0 if unseen == "max" else float(ln[ref].mean())
        np.copyto(ln, np.float32(fill), where=~seen)
    return ln


def minmax_term(ema: np.ndarray, seen: np.ndarray, exclude: np.ndarray, unseen: str) -> np.ndarray | None:
    """(N,) float32 loss EMA min-max scaled over the reference samples (observed, not excluded), clipped
    to [0, 1]; unseen samples get 1 (``unseen='max'``) or the reference mean; None when nothing usable
    is observed yet or all reference values are equal."""
    all_seen = bool(seen.all())
    if all_seen:   # branch-free min/max: excluded samples are pushed to +-inf
        lo, hi = float(np.min(ema + exclude)), float(np.max(ema - exclude))
    else:
        ref = seen & (exclude == 0)
        if not ref.any():
            return None
        lo = float(np.where(ref, ema, np.float32(np.inf)).min())
        hi = float(np.where(ref, ema, np.float32(-np.inf)).max())
    if not hi > lo:   # also catches "no reference sample" (lo = inf)
        return None
    ln = ema - np.float32(lo)
    ln *= np.float32(1.0 / (hi - lo))
    np.clip(ln, 0.0, 1.0, out=ln)
    if not all_seen:
        fill = 1.0 if unseen == "max" else (float(np.dot(ref, ema)) / int(np.count_nonzero(ref)) - lo) / (hi - lo)
        np.copyto(ln, np.float32(fill), where=~seen)
    return ln


LOSS_NORMS = {"minmax": minmax_term, "rank": rank_term}


def loss_term(ema: np.ndarray, seen: np.ndarray, exclude: np.ndarray, exponent: float,
              unseen: str = "mean", norm: str = "minmax") -> np.ndarray | float:
    """``lnorm ** exponent``: the loss EMA min-max scaled over the observed, not excluded samples
    (``norm='minmax'``, :func:`minmax_term`) or its percentile rank among them (``'rank'``,
    :func:`rank_term`).

    Args:
        ema: (N,) float32 loss EMA.
        seen: (N,) bool, observed at least once; unseen samples get the mean of ``lnorm`` over the
            reference samples (observed and not excluded), or 1 (the largest) with ``unseen="max"``.
        exclude: (N,) float32, 0 for samples that may define the scale and the mean, +inf for the
            others (noisy ones, whose losses are high because their labels are wrong).
        exponent: c >= 0; 0 returns 1.0 (signal off).
        norm: a key of ``LOSS_NORMS``.

    Returns:
        (N,) float32 in [0, 1], or the scalar 1.0 when off, nothing usable is observed yet, or all equal.
    """
    if exponent == 0:
        return 1.0
    ln = LOSS_NORMS[norm](ema, seen, exclude, unseen)
    if ln is None:
        return 1.0
    return power_(ln, exponent)


def augment_ramp(phase: np.ndarray) -> np.ndarray:
    """(E,) float32 schedule factor of the strong-augmentation magnitude: 0 in warm-up and annealing
    epochs (phase 0 and 2), ``(p + 1) / P`` in the p-th of the P pruned epochs (phase 1), so the
    magnitude grows from little in the first pruned epoch to its full value in the last one."""
    ramp = np.zeros(phase.shape[0], np.float32)
    pruned = np.flatnonzero(phase == 1)
    ramp[pruned] = np.arange(1, pruned.size + 1, dtype=np.float32) / max(pruned.size, 1)
    return ramp


def class_percentile(values_l: np.ndarray, layout: ClassLayout) -> np.ndarray:
    """(N,) float32 rank of each value within its class, in (0, 1] (1 = the class's largest), layout order."""
    order = np.lexsort((values_l, layout.row))
    rank = np.empty(values_l.shape[0], np.int64)
    rank[order] = np.arange(values_l.shape[0]) - layout.bounds[:-1][layout.row]
    return ((rank + 1) / np.maximum(layout.counts[layout.row], 1)).astype(np.float32)


def aug_codes(suitability: np.ndarray, ramp: float, strength: float) -> np.ndarray:
    """Plan aug codes of strongly augmented samples: ``ceil(AUG_LEVELS * strength * ramp * s)``.

    A pure function of the samples' static suitability ``s`` in [0, 1] (their joint score's
    percentile within their class: sparse and consistent samples get the strongest views), the
    epoch's ramp (:func:`augment_ramp`) and the configured ``strength``; 0 (base) where that is 0.

    Returns:
        (M,) uint8 codes in 0..AUG_LEVELS.
    """
    mag = np.float32(strength * ramp) * suitability
    return np.ceil(np.clip(mag, 0.0, 1.0) * AUG_LEVELS).astype(np.uint8)


def held_out_gap(held_out: float, anchor: float) -> float:
    """``1 - anchor / held_out`` of two mean losses: how much lower the loss of samples trained every
    pruned epoch (the anchor) is than that of samples never trained in them (held out), both drawn at
    random from the clean samples and measured on base views in the same epoch; about 0 while the model
    generalises to what it has not seen (negative by chance as often as positive), towards 1 as it
    memorises. Signed, so that averaging it over epochs cancels the noise instead of keeping its
    positive half (:data:`GAP_MOMENTUM`), and held at -1 below as it is at 1 above, so that one epoch
    cannot pull the average further down than up."""
    return 0.0 if held_out <= 0 else max(-1.0, 1.0 - anchor / held_out)


def gap_codes(gap: float, suitability: np.ndarray, phase: int, strength: float, full: float = 0.25) -> np.ndarray:
    """Plan aug codes of ``strong_aug=gap``: ``round(AUG_LEVELS * strength * min(gap / full, 1) * s)`` in
    pruned epochs (phase 1), 0 in warm-up and annealing; ``s`` in [0, 1] is each sample's suitability
    (0 for suspects and relabelled samples, else its joint score's percentile within its class) and
    ``full`` the gap at which the views reach full strength.

    A pure function of the held-out gap (:func:`held_out_gap`), the samples' suitability and the epoch's
    phase: short runs, whose gap stays small, keep base views (the rounding leaves a gap below
    ``full / (2 * AUG_LEVELS)`` at 0); long runs that memorise get strong views, sparse and consistent
    samples first.

    Returns:
        (M,) uint8 codes in 0..AUG_LEVELS.
    """
    if phase != 1 or gap <= 0:
        return np.zeros(suitability.shape[0], np.uint8)
    mag = np.clip(np.float32(strength * min(gap / full, 1.0)) * suitability, 0.0, 1.0)
    return np.rint(mag * AUG_LEVELS).astype(np.uint8)


def deflate_strong(losses: np.ndarray, aug: np.ndarray) -> np.ndarray:
    """``losses`` with those of strong views divided by their level's inflation factor.

    The factor of level k is the mean loss of the epoch's level-k views over the mean loss of its
    base views (at least 1): what the view adds on average, so that a sample's loss EMA follows the
    base view. Levels without base views to compare with (an epoch all strong) are left as measured.

    Args:
        losses: (K,) float32 losses of one epoch (or part of one); aug: (K,) uint8 plan codes.

    Returns:
        (K,) float32 corrected losses (the input itself when nothing is strong).
    """
    strong = aug > 0
    base = ~strong
    if not strong.any() or not base.any():
        return losses
    mean_base = float(losses[base].mean())
    out = losses.copy()
    for k in np.unique(aug[strong]).tolist():
        at = aug == k
        factor = max(float(losses[at].mean()) / max(mean_base, 1e-12), 1.0)
        out[at] /= np.float32(factor)
    return out


def noise_masks(info, handling: str) -> tuple[np.ndarray, np.ndarray]:
    """``(suppressed, relabelled)`` (N,) bool masks from the verdict (``info.status``) or, without
    one, the ``noisy`` region, under ``handling`` (see the module docstring)."""
    n = info.n
    if handling == "off":
        return np.zeros(n, bool), np.zeros(n, bool)
    if info.status is None:
        noisy = np.zeros(n, bool) if info.region is None else info.region == NOISY
        return noisy, np.zeros(n, bool)
    relabel = info.status == RELABEL
    suppress = info.status == SUPPRESS
    if handling == "suppress":
        return suppress | relabel, np.zeros(n, bool)
    return suppress, relabel


@register_policy("dds")
class DdsPolicy(LossPolicy):
    """The paper's method (see the module docstring). Reads ``joint``, ``region`` and the verdict when
    ``SampleInfo`` has them; without scores it selects by the losses alone (joint taken as 1, no
    region, nothing suppressed), which the defaults allow (:meth:`scores_required`).

    Per-sample arrays are kept in class layout (``ClassLayout``): class blocks are contiguous, so a
    pruned epoch is planned with a few vector passes, one row-wise partition for the per-class
    cut and one sort for the shuffle (timing: docs/selector.md).
    """

    Config = DdsConfig
    needs_scores = True
    saved_defaults = {"gap_min_passes": 0.0}   # runs saved before it planned probes at any length

    @classmethod
    def scores_required(cls, cfg: DdsConfig) -> list[str]:
        return ([f"prior_weight={cfg.prior_weight:g}"] if cfg.prior_weight > 0 else []) + (
            [f"strong_aug={cfg.strong_aug}"] if cfg.strong_aug not in ("none", "gap") else [])

    def __init__(self, info, cfg, *, epochs: int, total: int) -> None:
        super().__init__(info, cfg, epochs=epochs, total=total)
        lay = self._layout = ClassLayout(info.labels, info.num_classes)
        noisy, relabel = noise_masks(info, cfg.noise_handling)
        self._status = (np.where(noisy, SUPPRESS, np.where(relabel, RELABEL, CLEAN)).astype(np.int8)
                        if noisy.any() or relabel.any() else None)
        self._label_used = np.where(relabel, info.label_fixed, info.labels) if relabel.any() else None
        self._clean_idx = np.flatnonzero(~noisy)
        # strong_aug=gap: the probe sets, planned apart from the draw (never drawn), in runs long enough
        passes = total / max(info.n, 1)
        gap_on = cfg.strong_aug == "gap" and passes >= cfg.gap_min_passes
        if cfg.strong_aug == "gap" and not gap_on:
            log.info("dds: the budget trains each sample %.1f times, under gap_min_passes=%g: base views, "
                     "no held-out probes", passes, cfg.gap_min_passes)
        self._held, self._anchor = self._probes(~noisy & ~relabel) if gap_on else (None, None)
        self._gap = 0.0                                 # held_out_gap averaged over pruned epochs
        self._probing = False                           # the latest plan holds the probes
        self._probe_sums = np.zeros((2, 3))             # its loss sums (row 0) and counts (row 1) by role so far
        probe_l = self._probe_l = np.zeros(info.n, bool)
        self._probe_role = np.zeros(info.n, np.int8)    # by sample index: 1 held out, 2 anchor, 0 neither
        if self._held is not None:
            probe_l[lay.slot[np.concatenate([self._held, self._anchor])]] = True
            self._probe_role[self._held], self._probe_role[self._anchor] = 1, 2
        elif gap_on:
            log.warning("dds: strong_aug=gap needs at least 20 clean samples for its probes; no strong views")
        self._noisy_l = noisy[lay.order]
        self._no_strong_l = (noisy | relabel)[lay.order]   # suspects are never strongly augmented
        self._exclude_l = np.where(self._noisy_l, np.float32(np.inf), np.float32(0))
        joint = np.ones(info.n, np.float32) if info.joint is None else info.joint   # no scores: loss only
        self._joint_l = joint[lay.order]
        self._region_l = None if info.region is None else info.region[lay.order]
        # strong-augmentation ranking: joint's float32 bits (monotone for x >= 0) + 1; suspects = 0 (never)
        self._jkey_l = np.where(self._no_strong_l, 0, (self._joint_l + np.float32(0)).view(np.uint32) + 1)
        mult_l = np.where(self._noisy_l, np.float32(cfg.noisy_weight), np.float32(1))
        mult_l[probe_l] = 0
        prior_l = self._joint_l ** np.float32(cfg.prior_weight) if cfg.prior_weight != 1 else self._joint_l
        self._jm_l = prior_l * mult_l                     # pi = jm * loss_term + em
        # suitability for strong views: joint's percentile within its class (without scores: 1); suspects 0
        pct_l = class_percentile(self._joint_l, lay) if info.joint is not None else np.ones(info.n, np.float32)
        self._suit_l = np.where(self._no_strong_l, np.float32(0), pct_l)
        self._em_l = np.float32(cfg.eps) * mult_l
        eligible = (~self._noisy_l if cfg.noisy_weight == 0 else np.ones(info.n, bool)) & ~probe_l
        self._cap = lay.class_counts(eligible)          # pi > 0 exactly on these when eps > 0
        self._loss = LossEma(info.n, momentum=cfg.loss_momentum, slot=lay.slot)
        self._phase, self._sizes = self._schedule()
        self._ramp = augment_ramp(self._phase)
        self._id_bits = max(1, int(info.n - 1).bit_length())

    def _probes(self, clean: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(held_out, anchor)``: two disjoint random sets of ``probe_size`` clean samples (a tenth of the
        clean samples when they are fewer than 10 x that; None, None with fewer than 20). In every
        pruned epoch the anchor is trained and the held-out set measured (planned at weight 0), both
        on base views: :func:`held_out_gap`. A count, not a share: the gap's noise depends on it."""
        pool = np.flatnonzero(clean)
        if pool.size < 20:
            return None, None
        k = min(self.cfg.probe_size, pool.size // 10)
        pick = np.random.default_rng([0x9A9, self.info.n]).permutation(pool)
        return np.sort(pick[:k]), np.sort(pick[k:2 * k])

    # ---- budget -> phases and sizes ----

    def _schedule(self) -> tuple[np.ndarray, np.ndarray]:
        """(E,) phase codes (0 warm-up, 1 pruned, 2 annealing) and (E,) int64 sizes summing to the budget."""
        e_all, n = self.epochs, self.info.n
        n_anneal = int(self._clean_idx.size) if self.cfg.anneal_exclude_noisy else n
        warm, a0 = min(self.cfg.warmup_epochs, e_all), anneal_start(e_all, self.cfg.delta)
        reduced = False
        while True:
            a0 = max(a0, warm)
            pruned, annealed = a0 - warm, e_all - a0
            rest = self.total - warm * n - annealed * n_anneal
            if rest >= pruned and (pruned > 0 or rest >= 0):
                break
            if annealed == 0 and warm == 0:
                raise DdsError(f"budget {self.total} sample-steps is below one sample per epoch; "
                               "raise --budget")
            reduced = True
            if annealed > 0:
                a0 += 1
            else:
                warm -= 1
        if reduced:
            log.warning("dds: the budget cannot pay for the configured warm-up and annealing epochs; using "
                        "%d warm-up and %d annealing epochs", warm, e_all - a0)
        phase = np.ones(e_all, np.int8)
        phase[:warm], phase[a0:] = 0, 2
        sizes = np.empty(e_all, np.int64)
        sizes[:warm], sizes[a0:] = n, n_anneal
        sizes[warm:a0] = even_sizes(max(rest, 0), pruned, cap=n)
        if pruned and sizes[warm:a0].mean() < 0.5 * self.total / e_all:
            log.warning("dds: warm-up and annealing leave the pruned epochs %.1f%% of the data each; consider "
                        "warmup_epochs=0 or delta=1.0", 100.0 * sizes[warm:a0].mean() / n)
        return phase, sizes

    def epoch_sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def status(self) -> np.ndarray | None:
        return None if self._status is None else self._status.copy()

    # ---- planning ----

    def plan(self, epoch: int, rng: np.random.Generator, *, spent_before: int) -> EpochPlan:
        phase = self._phase[epoch]
        self._fold_gap()
        self._probing = False
        if phase == 0:
            return self._labelled(make_plan(epoch, shuffle_order(self.info.n, rng)))
        if phase == 2:
            base = self._clean_idx if self.cfg.anneal_exclude_noisy else np.arange(self.info.n)
            return self._labelled(make_plan(epoch, shuffled(base, rng)))
        return self._pruned(epoch, rng, int(self._sizes[epoch]))

    def _pruned(self, epoch: int, rng: np.random.Generator, size: int) -> EpochPlan:
        """A pruned epoch of ``size`` labelled samples drawn by ``pi`` (see the module docstring), the
        probes of ``strong_aug=gap`` among them."""
        lay = self._layout
        probes = 0 if self._held is None else self._held.size + self._anchor.size
        probes = probes if size >= 4 * probes else 0   # an epoch too small for its probes plans none
        self._probing = probes > 0
        size -= probes
        pi_l = self._pi_layout()
        if self.cfg.sharpness != 1:   # the distribution drawn from (and importance-weighted against)
            pi_l = power_(pi_l, self.cfg.sharpness)   # pi_l is a fresh array
        keys_l = sampling_keys(pi_l, rng)
        cap = self._cap if self.cfg.eps > 0 else lay.class_counts(pi_l > 0)
        if size <= int(cap.sum()) and not self.cfg.class_balance:   # one weighted draw over the whole split
            pos = np.flatnonzero(top_k_mask(keys_l, size))
        elif size <= int(cap.sum()):
            pos = lay.select(keys_l, capped_quotas(size, lay.counts, cap))
        else:   # fewer positive-pi samples than the epoch size: all of them, then zero-pi ones at random
            spare = lay.counts - cap - lay.class_counts(self._probe_l)   # probes are planned apart
            quotas = cap + capped_quotas(size - int(cap.sum()), lay.counts, spare)
            zero = pi_l <= 0
            keys_l[zero] = (uniform_keys(int(zero.sum()), rng) >> 9) | 1   # in [1, 2**23): below positive keys
            keys_l[self._probe_l] = 0
            pos = lay.select(keys_l, quotas)
        if self.cfg.strong_aug == "gap":
            aug = gap_codes(self._gap, self._suit_l[pos], 1, self.cfg.aug_strength, self.cfg.gap_full)
            if self._held is not None:
                log.info("dds: held-out gap %+.3f, %.0f%% of the selection at strong views", self._gap,
                         100.0 * np.count_nonzero(aug) / max(aug.size, 1))
        else:
            aug = self._strong(pos) * aug_codes(self._suit_l[pos], float(self._ramp[epoch]), self.cfg.aug_strength)
        weights = self._weights(pos, pi_l, size)
        ids = lay.order[pos]
        if probes:   # the anchor trained (weight 1), the held-out set measured (weight 0), base views
            ids = np.concatenate([ids, self._anchor, self._held])
            anchor_w = weights if np.isscalar(weights) else 1.0   # the selection's weight (loss_rescale=const)
            weights = np.concatenate([np.broadcast_to(np.float32(weights), pos.shape),
                                      np.full(self._anchor.size, anchor_w, np.float32),
                                      np.zeros(self._held.size, np.float32)])
            aug = np.concatenate([aug, np.zeros(probes, np.uint8)])
        if isinstance(weights, np.ndarray):
            order = shuffle_order(ids.shape[0], rng)
            return self._labelled(make_plan(epoch, ids[order], weights[order], aug[order]))
        # one sort shuffles ids and codes together: value = id << AUG_BITS | aug
        packed = shuffle_values((ids << AUG_BITS) | aug, self._id_bits + AUG_BITS, rng)
        return self._labelled(make_plan(epoch, packed >> np.uint64(AUG_BITS), weights,
                                        packed & np.uint64((1 << AUG_BITS) - 1)))

    def _labelled(self, plan: EpochPlan) -> EpochPlan:
        """``plan`` with the labels to train on when some samples are relabelled (else unchanged)."""
        if self._label_used is None:
            return plan
        return make_plan(plan.epoch, plan.indices, plan.weights, plan.aug, self._label_used[plan.indices])

    def _pi_layout(self) -> np.ndarray:
        """(N,) float32 unnormalised selection probabilities, in class layout:
        ``(eps + joint * loss_term) * mult`` with mult = ``noisy_weight`` on noisy samples, else 1."""
        loss = self._loss
        lt = loss_term(loss.mean, loss.seen, self._exclude_l, self.cfg.loss_weight, self.cfg.unseen, self.cfg.loss_norm)
        if isinstance(lt, np.ndarray):
            lt *= self._jm_l           # lt is a fresh array: reuse it
            lt += self._em_l
            return lt
        return self._jm_l * np.float32(lt) + self._em_l

    def observe(self, indices: np.ndarray, losses: np.ndarray, aug: np.ndarray | None = None) -> None:
        """Losses corrected for the augmentation (:func:`deflate_strong`): a loss measured on a strongly
        augmented view is higher because of the view, and would otherwise raise the sample's
        selection probability and with it its next strong view. With ``strong_aug=gap`` the probes'
        losses update the held-out gap."""
        if self._probing:   # only pruned epochs hold the held-out set out; summed until the next plan
            role = self._probe_role[indices]
            self._probe_sums += (np.bincount(role, weights=losses, minlength=3), np.bincount(role, minlength=3))
        self._loss.update(indices, losses if aug is None else deflate_strong(losses, aug))

    def _fold_gap(self) -> None:
        """The last planned epoch's held-out gap into the average: once per epoch, however many calls
        of :meth:`observe` brought its losses (a slow average from 0: one epoch's losses are noisy)."""
        (_, h_sum, a_sum), (_, h_n, a_n) = self._probe_sums
        if h_n and a_n:   # losses of both sets
            gap = held_out_gap(h_sum / h_n, a_sum / a_n)
            self._gap = GAP_MOMENTUM * self._gap + (1.0 - GAP_MOMENTUM) * gap
        self._probe_sums[:] = 0

    def held_out_gap(self) -> float | None:
        return None if self._held is None else float(self._gap)

    def state_dict(self) -> dict:
        state = {"loss": self._loss.state_dict()}
        if self._held is not None:
            state["held_out_gap"] = self._gap
            state["probe_sums"] = self._probe_sums.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._loss.load_state_dict(state["loss"])
        if self._held is not None and "held_out_gap" in state:
            self._gap = float(state["held_out_gap"])
            self._probe_sums = np.array(state.get("probe_sums", np.zeros((2, 3))), np.float64)
        elif self._held is not None and "gap" in state:   # saved before the gap was averaged signed
            log.warning("dds: this checkpoint's held-out gap was saved by an older dds (clipped, not signed); "
                        "it restarts from 0, so strong views may come later than in an uninterrupted run")

    def _strong(self, pos: np.ndarray) -> np.ndarray:
        """(M,) uint8 strong-augmentation flags of the selected layout positions (never suspects)."""
        mode = self.cfg.strong_aug
        if mode == "none":
            return np.zeros(pos.shape[0], np.uint8)
        if mode == "region":
            return ((self._region_l[pos] == AUGMENT) & ~self._no_strong_l[pos]).view(np.uint8)
        if mode == "all":
            return (~self._no_strong_l[pos]).view(np.uint8)
        jkey = self._jkey_l[pos]
        k = min(int(round(self.cfg.aug_fraction * pos.shape[0])), int(np.count_nonzero(jkey)))
        return top_k_mask(jkey, k).view(np.uint8)

    def _weights(self, pos: np.ndarray, pi_l: np.ndarray, size: int) -> np.ndarray | float:
        """Loss weights of a pruned epoch's selection (``loss_rescale``), aligned with ``pos``."""
        mode = self.cfg.loss_rescale
        if mode == "none":
            return 1.0
        if mode == "const":
            return self.info.n / max(size, 1)
        lay = self._layout
        row = lay.row[pos]
        p = pi_l[pos].astype(np.float64) * lay.counts[row]
        with np.errstate(divide="ignore"):
            w = lay.class_sums(pi_l)[row] / p
        return np.minimum(w, self.cfg.is_clip)
