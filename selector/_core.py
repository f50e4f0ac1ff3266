"""Pure array functions shared by the policies: budgets, class quotas, weighted sampling, loss EMAs.

Everything here takes numpy arrays (and a ``np.random.Generator`` where random) and returns arrays;
nothing holds state except ``ClassLayout`` (samples grouped by class, for class-balanced sampling)
and ``LossEma`` (per-sample running loss statistics).
"""
from __future__ import annotations

import numpy as np


def even_sizes(total: int, parts: int, cap: int | None = None) -> np.ndarray:
    """Split ``total`` into ``parts`` integers that differ by at most one and sum to ``total``.

    The first ``total % parts`` parts get the extra one. With ``cap``, every part is cut to ``cap``
    (the sum is then ``min(total, parts * cap)``).

    Returns:
        (parts,) int64.
    """
    if parts <= 0:
        return np.zeros(0, np.int64)
    base, extra = divmod(int(total), parts)
    sizes = np.full(parts, base, np.int64)
    sizes[:extra] += 1
    if cap is not None:
        np.minimum(sizes, cap, out=sizes)
    return sizes


def largest_remainder(total: int, counts: np.ndarray) -> np.ndarray:
    """Apportion ``total`` proportionally to integer ``counts`` (Hamilton / largest remainder).

    Each share is floor or ceil of ``total * counts / counts.sum()``; the shares sum to ``total``.
    Exact integer arithmetic; ties go to the lower position.

    Args:
        total: what to share, 0 <= total.
        counts: (C,) non-negative integers, not all zero when total > 0.

    Returns:
        (C,) int64 shares.
    """
    counts = np.asarray(counts, dtype=np.int64)
    denom = int(counts.sum())
    if denom == 0:
        return np.zeros_like(counts)
    num = int(total) * counts
    share, rem = np.divmod(num, denom)
    short = int(total) - int(share.sum())
    if short > 0:
        order = np.argsort(-rem, kind="stable")
        share[order[:short]] += 1
    return share


def power_(x: np.ndarray, exponent: float) -> np.ndarray:
    """``x ** exponent`` in place for a float array ``x``; returns ``x``.

    Small integer exponents (2 to 16) use repeated squaring, many times faster than ``np.power``
    for float32 (docs/selector.md).
    """
    e = float(exponent)
    if e == 1:
        return x
    if e == 0.5:
        return np.sqrt(x, out=x)
    if not (e.is_integer() and 2 <= e <= 16):
        return np.power(x, x.dtype.type(e), out=x)
    k, base = int(e), x.copy()
    k -= 1   # x already holds base ** 1
    while k:
        if k & 1:
            x *= base
        k >>= 1
        if k:
            np.square(base, out=base)
    return x


def capped_quotas(size: int, counts: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Per-class quotas proportional to ``counts``, each at most ``cap``, summing to ``size``.

    Classes whose proportional share exceeds their capacity get their capacity; the rest of
    ``size`` is re-shared among the others (water-filling). Without a binding cap every quota is
    within one of ``size * counts / counts.sum()``.

    Args:
        size: total to place; must be <= cap.sum().
        counts: (C,) int class sizes (the proportions).
        cap: (C,) int capacities.

    Returns:
        (C,) int64 quotas.
    """
    counts = np.asarray(counts, dtype=np.int64)
    cap = np.asarray(cap, dtype=np.int64)
    if size > int(cap.sum()):
        raise ValueError(f"cannot place {size} samples in capacity {int(cap.sum())}")
    capped = cap <= 0
    while True:
        free = ~capped & (counts > 0)
        left = size - int(cap[capped].sum())
        quota = np.zeros_like(counts)
        quota[free] = largest_remainder(left, counts[free])
        quota[capped] = cap[capped]
        over = free & (quota > cap)
        if not over.any():
            return quota
        capped |= over


U32_MAX = np.uint32(0xFFFFFFFF)


class ClassLayout:
    """Samples stored class by class, for fast class-balanced selection.

    A policy keeps its per-sample arrays in this layout (``x_l = x[layout.order]``), so the samples
    of class c are the contiguous block ``bounds[c]:bounds[c+1]``; per-class work then needs no
    random gathers.

    Attributes:
        order: (N,) int64 sample index at each layout position (stable sort by label).
        slot: (N,) int64 layout position of each sample (the inverse of ``order``).
        counts: (C,) int64 class sizes; bounds: (C+1,) int64 block starts.
        row: (N,) int32 class of each layout position.
    """

    def __init__(self, labels: np.ndarray, num_classes: int) -> None:
        n = labels.shape[0]
        self.order = np.argsort(labels, kind="stable").astype(np.int64)
        self.slot = np.empty(n, np.int64)
        self.slot[self.order] = np.arange(n)
        self.counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.row = np.repeat(np.arange(num_classes, dtype=np.int32), self.counts)
        self._col = np.arange(n, dtype=np.int64) - self.bounds[:-1][self.row]
        self._equal = bool((self.counts == self.counts[0]).all()) if num_classes else True
        self._template_key: bytes | None = None
        self._template = np.zeros((0, 0), np.uint32)
        self._flat: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    def class_counts(self, mask_l: np.ndarray) -> np.ndarray:
        """(C,) number of true entries of the layout-ordered (N,) bool ``mask_l`` per class."""
        return np.bincount(self.row[mask_l], minlength=self.num_classes).astype(np.int64)

    def class_sums(self, x_l: np.ndarray) -> np.ndarray:
        """(C,) float64 per-class sums of the layout-ordered (N,) ``x_l``."""
        return np.bincount(self.row, weights=x_l, minlength=self.num_classes)

    def thresholds(self, keys_l: np.ndarray, quotas: np.ndarray) -> np.ndarray:
        """(C,) uint32 per-class cut: class c keeps its keys >= ``thr[c]`` (its ``quotas[c]`` largest).

        One ``np.partition`` with a single kth on a (C, W) matrix: row c holds the class's keys, then
        ``K - quotas[c]`` copies of the maximum (K = max quota), then zeros, so the K-th largest entry
        of every row is the ``quotas[c]``-th largest key of class c. Falls back to a loop over classes
        when the classes are too unequal for the matrix to be small.

        Args:
            keys_l: (N,) uint32 keys in layout order (larger = preferred; 0 is reserved for padding,
                ``U32_MAX`` must not occur).
            quotas: (C,) int, each <= the class size.
        """
        c_n = self.num_classes
        big = int(quotas.max()) if c_n else 0
        if big == 0:
            return np.full(c_n, U32_MAX, np.uint32)
        extra = big - quotas
        width = int((self.counts + extra).max())
        if c_n * width > 3 * keys_l.shape[0] + 4096:
            return self._thresholds_loop(keys_l, quotas)
        template, flat = self._pad_template(quotas, big, width)
        mat = template.copy()
        if flat is None:
            mat[:, :self.counts[0]] = keys_l.reshape(c_n, -1)
        else:
            mat.reshape(-1)[flat] = keys_l
        kth = width - big
        mat.partition(kth, axis=1)
        return mat[:, kth].copy()

    def _pad_template(self, quotas: np.ndarray, big: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The (C, W) uint32 padding matrix for ``quotas`` (zeros, and ``big - quotas[c]`` maxima after
        row c's keys) and the flat matrix slot of every layout position (None when the classes are
        equal and a reshape does). Cached: the quotas repeat from epoch to epoch."""
        key = quotas.tobytes()
        if self._template_key != key:
            cols = np.arange(width)
            pad = (cols >= self.counts[:, None]) & (cols < (self.counts + big - quotas)[:, None])
            self._template = np.where(pad, U32_MAX, np.uint32(0)).astype(np.uint32)
            self._flat = None if self._equal else self.row.astype(np.int64) * width + self._col
            self._template_key = key
        return self._template, self._flat

    def _thresholds_loop(self, keys_l: np.ndarray, quotas: np.ndarray) -> np.ndarray:
        thr = np.full(self.num_classes, U32_MAX, np.uint32)
        b = self.bounds.tolist()
        for c in np.flatnonzero(quotas).tolist():
            seg = keys_l[b[c]:b[c + 1]]
            kth = seg.shape[0] - int(quotas[c])
            thr[c] = np.partition(seg, kth)[kth]
        return thr

    def select(self, keys_l: np.ndarray, quotas: np.ndarray) -> np.ndarray:
        """Layout positions of the ``quotas[c]`` largest keys of every class (exactly; ties cut by position).

        Args:
            keys_l: (N,) uint32 keys in layout order (see ``thresholds``).
            quotas: (C,) int quotas.

        Returns:
            (sum(quotas),) int64 sorted layout positions; map to samples with ``order[pos]``.
        """
        thr = self.thresholds(keys_l, quotas)
        pos = np.flatnonzero(keys_l >= np.repeat(thr, self.counts))
        if pos.shape[0] != int(quotas.sum()):          # equal keys at a cut: drop the surplus
            pos = self._cut_ties(keys_l, pos, thr, quotas)
        return pos

    def _cut_ties(self, keys_l: np.ndarray, pos: np.ndarray, thr: np.ndarray, quotas: np.ndarray) -> np.ndarray:
        got = np.bincount(self.row[pos], minlength=self.num_classes)
        drop = []
        for c in np.flatnonzero(got > quotas).tolist():
            s, e = int(self.bounds[c]), int(self.bounds[c + 1])
            at_cut = s + np.flatnonzero(keys_l[s:e] == thr[c])
            drop.append(at_cut[at_cut.shape[0] - int(got[c] - quotas[c]):])
        keep = ~np.isin(pos, np.concatenate(drop))
        return pos[keep]


def sampling_keys(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint32 keys whose per-class top-k is a weighted sample without replacement, probabilities ∝ ``pi``.

    Exponential keys / Gumbel-top-k (Efraimidis & Spirakis 2006): the ``k`` largest of
    ``log(u_i) / pi_i`` (u_i ~ U(0, 1)) are a sample of ``k`` items drawn one by one without
    replacement, each with probability proportional to its ``pi`` among those left. These float keys
    are negative; their float32 bit patterns, inverted, sort the same way as uint32. Items with
    ``pi == 0`` get the key of -inf (0x007FFFFF), below every positive item.

    Args:
        pi: (N,) non-negative float32 weights.
        rng: the epoch's generator.

    Returns:
        (N,) uint32 keys (never 0 or ``U32_MAX``).
    """
    u = rng.random(pi.shape[0], dtype=np.float32)
    with np.errstate(divide="ignore"):
        np.log(u, out=u)          # u == 0 (p = 2**-24) gives -inf: that item simply ranks last
        np.divide(u, pi, out=u)
    keys = u.view(np.uint32)
    np.invert(keys, out=keys)
    return keys


def uniform_keys(n: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) uint32 uniform random keys in [1, 2**32 - 1) (uniform sampling)."""
    keys = rng.bit_generator.random_raw(n).astype(np.uint32)
    np.clip(keys, 1, 0xFFFFFFFE, out=keys)
    return keys


def shuffle_values(values: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """``values`` (non-negative integers < 2**bits) in a uniform random order, as uint64.

    Sorts 64-bit random keys whose low ``bits`` hold the value (ties in the random part, about once
    in 2**(64 - bits) / m**2, fall to the value). Faster than a permutation and a gather for large m,
    whose random accesses miss cache; small arrays use ``rng.permutation``.
    """
    m = values.shape[0]
    if m < 50_000:
        return values.astype(np.uint64)[rng.permutation(m)]
    low = np.uint64((1 << bits) - 1)
    keys = rng.bit_generator.random_raw(m)
    keys &= ~low
    keys |= values.astype(np.uint64, copy=False)
    keys.sort()
    keys &= low
    return keys


def shuffle_order(m: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation of ``range(m)`` as (m,) int64."""
    return shuffle_values(np.arange(m, dtype=np.uint64), max(1, int(m - 1).bit_length()), rng).astype(np.int64)


def shuffled(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Non-negative integer array ``x`` in a uniform random order (a new int64 array)."""
    if x.shape[0] == 0:
        return x.astype(np.int64)
    return shuffle_values(x, max(1, int(x.max()).bit_length()), rng).astype(np.int64)


def top_k_mask(values: np.ndarray, k: int) -> np.ndarray:
    """(M,) bool mask with exactly ``min(k, M)`` true entries: the largest ``values`` (ties: lower position first)."""
    m = values.shape[0]
    mask = np.zeros(m, bool)
    if k <= 0:
        return mask
    if k >= m:
        mask[:] = True
        return mask
    thr = np.partition(values, m - k)[m - k]
    np.greater(values, thr, out=mask)
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(values == thr)[:need]] = True
    return mask


class LossEma:
    """Per-sample exponential moving average (and variance) of observed training losses.

    With momentum m, a new loss x updates  d = x - mean;  mean += (1 - m) * d;
    var = m * (var + (1 - m) * d**2)  (the exponentially weighted variance). The first observation of
    a sample sets mean = x, var = 0.

    Args:
        n: number of samples.
        momentum: m in [0, 1); 0 keeps only the last loss.
        slot: optional (N,) int64 storage position of each sample (e.g. ``ClassLayout.slot``); the
            arrays below are then in that order. ``state_dict`` is always in sample order.

    Attributes:
        mean: (N,) float32 EMA of the loss (0 where unseen).
        var: (N,) float32 EMA variance.
        last: (N,) float32 the most recent loss.
        seen: (N,) bool, observed at least once.
    """

    _FIELDS = ("mean", "var", "last", "seen")

    def __init__(self, n: int, momentum: float, slot: np.ndarray | None = None) -> None:
        self.momentum = float(momentum)
        self.slot = slot
        self.mean = np.zeros(n, np.float32)
        self.var = np.zeros(n, np.float32)
        self.last = np.zeros(n, np.float32)
        self.seen = np.zeros(n, bool)

    def update(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Fold (K,) float32 losses of (K,) int64 sample indices into the statistics."""
        j = indices if self.slot is None else self.slot[indices]
        m = np.float32(self.momentum)
        first = ~self.seen[j]
        d = losses - self.mean[j]
        mean = self.mean[j] + (1 - m) * d
        var = m * (self.var[j] + (1 - m) * d * d)
        mean[first] = losses[first]
        var[first] = 0.0
        self.mean[j] = mean
        self.var[j] = var
        self.last[j] = losses
        self.seen[j] = True

    def state_dict(self) -> dict:
        """The four arrays, in sample order."""
        return {k: (getattr(self, k) if self.slot is None else getattr(self, k)[self.slot]).copy()
                for k in self._FIELDS}

    def load_state_dict(self, state: dict) -> None:
        for name in self._FIELDS:
            arr = np.asarray(state[name])
            cur = getattr(self, name)
            if arr.shape != cur.shape:
                raise ValueError(f"state '{name}' has shape {arr.shape}, expected {cur.shape}")
            if self.slot is None:
                setattr(self, name, arr.astype(cur.dtype, copy=True))
            else:
                cur[self.slot] = arr
