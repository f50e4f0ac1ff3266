"""The surgery ``dds shard`` does on a source before writing it: which samples (a class-stratified
subset, a validation split carved off train) and which labels (injected label noise).

Pure functions of labels and a seed, so the same options give the same dataset.
"""
from __future__ import annotations

import numpy as np

from dds.errors import DdsError

NOISE_KINDS = ("symmetric", "pairflip", "asymmetric")


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Choose exactly ``limit`` samples, each class in proportion to its size.

    Quotas are ``floor(limit * n_c / N)`` plus one for the classes with the largest remainders
    (ties: lower class first); within a class the samples are drawn at random from ``seed``.

    Args:
        labels: (N,) integer labels.
        limit: samples to keep, 1 <= limit <= N.
        seed: seed of the draw within each class.

    Returns:
        (limit,) int64, sorted indices into ``labels``.

    Raises:
        ValueError: ``limit`` is not in 1..N.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 1 <= limit <= n:
        raise ValueError(f"limit must be in 1..{n}, got {limit}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = limit * counts / n
    quota = np.floor(exact).astype(np.int64)
    extra = limit - int(quota.sum())
    order = np.lexsort((np.arange(len(classes)), -(exact - quota)))  # largest remainder first
    quota[order[:extra]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def carve_val(labels: np.ndarray, order: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a validation set off the train split: ``(train_order, val_order)``, disjoint, both sorted.

    With ``order`` a strict subset (``--limit``), the ``n_val`` validation samples are drawn,
    class-stratified, from the samples *not* in it, so the train subset is the same with or without
    a validation split; with ``order`` the whole split, they are drawn from it and removed from train.

    Args:
        labels: (N,) labels of the whole split (true labels: the draw must not depend on injected noise).
        order: (M,) sorted indices of the chosen train samples.
        n_val: validation samples, >= 1.
        seed: seed of the draw (``stratified_subset(.., seed + 1)``, independent of ``--limit``'s).

    Raises:
        DdsError: fewer than ``n_val`` samples left to draw from (or none left for train).
    """
    n = len(labels)
    whole = len(order) == n
    pool = order if whole else np.setdiff1d(np.arange(n, dtype=np.int64), order, assume_unique=True)
    if whole and n_val >= len(pool):
        raise DdsError(f"--val {n_val} would leave no train samples: the train split has {len(pool)}; lower --val")
    if n_val > len(pool):
        raise DdsError(f"--val {n_val} needs more samples than the {len(pool)} train samples outside --limit; "
                       "lower --val or --limit")
    val = pool[stratified_subset(labels[pool], n_val, seed + 1)]
    train = np.setdiff1d(order, val, assume_unique=True) if whole else order
    return train, val


def symmetric_noise(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Flip exactly ``round(fraction * N)`` labels, each to a uniformly drawn *different* class.

    Args:
        labels: (N,) integer labels in 0..num_classes-1.
        num_classes: number of classes C (at least 2 when anything is flipped).
        fraction: share of labels to flip, in [0, 1].
        seed: seed of which samples flip and to what.

    Returns:
        (N,) int64, the noisy labels (``labels`` itself is not modified).

    Raises:
        ValueError: ``fraction`` outside [0, 1], or flips asked for with fewer than 2 classes.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n_flip = int(round(fraction * len(labels)))
    noisy = labels.copy()
    if n_flip == 0:
        return noisy
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(labels), size=n_flip, replace=False)
    offset = rng.integers(1, num_classes, size=n_flip)  # 1..C-1: never the same class
    noisy[idx] = (labels[idx] + offset) % num_classes
    return noisy


def class_map_noise(labels: np.ndarray, mapping: dict[int, int], fraction: float, seed: int) -> np.ndarray:
    """Flip exactly ``round(fraction * n_c)`` labels of every mapped class ``c`` to ``mapping[c]``.

    Classes missing from ``mapping`` stay clean. Which samples of a class flip is drawn from ``seed``,
    class after class in ascending order, so the same seed gives the same flips.

    Args:
        labels: (N,) integer labels.
        mapping: class -> the class its flipped samples get (never itself).
        fraction: share of each mapped class to flip, in [0, 1].
        seed: seed of which samples flip.

    Returns:
        (N,) int64, the noisy labels (``labels`` itself is not modified).

    Raises:
        ValueError: ``fraction`` outside [0, 1], or a class mapped to itself.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if any(int(a) == int(b) for a, b in mapping.items()):
        raise ValueError("a noise mapping must send every class to another class")
    noisy = labels.copy()
    rng = np.random.default_rng(seed)
    for c in sorted(int(c) for c in mapping):
        rows = np.flatnonzero(labels == c)
        n_flip = int(round(fraction * len(rows)))
        noisy[rng.choice(rows, size=n_flip, replace=False)] = int(mapping[c])
    return noisy


def pairflip_map(num_classes: int) -> dict[int, int]:
    """``c -> (c + 1) mod C`` for every class (pair-flip noise)."""
    return {c: (c + 1) % num_classes for c in range(num_classes)} if num_classes >= 2 else {}


def noise_map(kind: str, classes: list[str], manifest_map: dict[str, str] | None, source: str) -> dict[int, int] | None:
    """The class mapping of noise ``kind`` (None for ``symmetric``), by class index.

    ``asymmetric`` takes the manifest's ``noise_map`` (class name -> class name).

    Raises:
        DdsError: ``asymmetric`` without a mapping, or a mapping naming unknown classes.
    """
    if kind == "symmetric":
        return None
    if kind == "pairflip":
        if len(classes) < 2:
            raise DdsError("pairflip label noise needs at least 2 classes")
        return pairflip_map(len(classes))
    if not manifest_map:
        raise DdsError(f"--noise-kind asymmetric needs a class mapping (noise_map in the dataset's manifest), and "
                       f"{source} has none; use --noise-kind symmetric or pairflip")
    pos = {c: i for i, c in enumerate(classes)}
    bad = sorted({n for kv in manifest_map.items() for n in kv if n not in pos})
    if bad:
        raise DdsError(f"the noise_map of {source} names unknown classes {bad}; classes: {classes}")
    return {pos[a]: pos[b] for a, b in manifest_map.items()}


def inject_noise(labels: np.ndarray, num_classes: int, fraction: float, kind: str, seed: int,
                 mapping: dict[int, int] | None = None) -> np.ndarray:
    """Noisy labels of ``kind``: ``symmetric`` (:func:`symmetric_noise`) or a class mapping (:func:`class_map_noise`)."""
    if kind == "symmetric":
        return symmetric_noise(labels, num_classes, fraction, seed)
    return class_map_noise(labels, mapping or {}, fraction, seed)
