"""The static label verdict of ``dds index``: every train sample is ``clean``, ``relabel`` or ``suppress``.

Only the given labels and held-out evidence are read; nothing here knows the injected truth
(``label_orig``) or the noise rate, and no threshold is fitted to either. ``evidence = (probs +
votes) / 2``: the cross-fitted adapter probabilities and the label shares of the ``k`` global
neighbours, served block by block by :class:`Views` so it is never held for all samples.

:func:`static_verdict`: per-class confident-learning thresholds give each sample a confident class;
counting given label against confident class estimates the noise transition matrix ``T``; the
posterior ``∝ evidence · T[:, given]`` makes a sample a suspect below :data:`SUSPECT_BELOW`; a
suspect is relabelled when its top class reaches :data:`RELABEL_MIN` and both views name it, else
suppressed. :func:`trim_mask` marks the first pass's suspects, left out of the adapters' retraining.
The steps and why: docs/pipeline.md, "Design notes: pipeline/verdict.py".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from dds.tables import CLEAN, RELABEL, STATUSES, SUPPRESS

SUSPECT_BELOW = 0.5  # suspect: posterior probability of the given label below this
RELABEL_MIN = 0.9  # relabel: posterior of the new class at least this, and both views agree on it
BLOCK_ELEMENTS = 1 << 22  # (row, class) entries of evidence made at a time: 32 MiB of float64


@dataclass
class Verdict:
    """Static verdict per sample.

    Attributes:
        status: ``(N,)`` object array of ``clean``, ``relabel`` or ``suppress``.
        label_fixed: ``(N,)`` int64: the new label for ``relabel``, else the given label.
        label_posterior: ``(N,)`` float64 posterior probability that the given label is right.
        transition: ``(C, C)`` estimated ``P(given j | true i)``.
    """

    status: np.ndarray
    label_fixed: np.ndarray
    label_posterior: np.ndarray
    transition: np.ndarray


def row_blocks(n: int, width: int) -> Iterator[slice]:
    """Consecutive slices covering ``n`` rows of ``width`` entries, about :data:`BLOCK_ELEMENTS` entries each."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    return (slice(a, min(n, a + step)) for a in range(0, n, step))


@dataclass
class Views:
    """The two held-out views of ``n`` samples over ``num_classes`` classes, served block by block.

    ``block(rows)`` returns ``(probs, votes)`` of the rows ``rows`` (a slice), both ``(b, C)``.
    Build one with :meth:`dense` (arrays already in memory) or :meth:`held_out` (computed per block).
    """

    n: int
    num_classes: int
    block: Callable[[slice], tuple[np.ndarray, np.ndarray]]

    @classmethod
    def dense(cls, probs: np.ndarray, votes: np.ndarray) -> "Views":
        """Views over ``(N, C)`` arrays of adapter probabilities and neighbour votes."""
        probs, votes = np.asarray(probs), np.asarray(votes)
        return cls(len(probs), probs.shape[1], lambda rows: (probs[rows], votes[rows]))

    @classmethod
    def held_out(cls, scores, idx: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None) -> "Views":
        """Views made per block: ``scores`` (a :class:`dds.pipeline.adapters.ClassScores`) gives the
        probabilities, the global neighbours ``idx`` (``(N, k)``) the votes, only ``keep`` voting."""
        c = scores.num_classes
        return cls(len(scores), c, lambda rows: (scores.block(rows)[1], neighbour_votes(idx[rows], labels, c, keep)))

    def blocks(self) -> Iterator[slice]:
        """Consecutive row slices covering all samples (:func:`row_blocks`)."""
        return row_blocks(self.n, self.num_classes)

    def evidence(self) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
        """``(rows, probs, votes, evidence)`` per block (:func:`combine`)."""
        for rows in self.blocks():
            p, v = self.block(rows)
            yield rows, p, v, combine(p, v)


def neighbour_votes(idx: np.ndarray, labels: np.ndarray, num_classes: int,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """Share of each sample's neighbours carrying each label.

    Args:
        idx: ``(m, k)`` neighbour indices into ``labels`` (``-1`` = no neighbour); any subset of rows.
        labels: ``(N,)`` ints in ``0..C-1``, the labels of all samples.
        num_classes: ``C``.
        keep: ``(N,)`` bool; only these samples vote (None: all).

    Returns:
        ``(m, C)`` float64 rows summing to 1; uniform for a sample without voting neighbours.
    """
    labels = np.asarray(labels, np.int64)
    m, k = idx.shape
    valid = idx >= 0
    if keep is not None:
        valid &= np.asarray(keep, bool)[np.maximum(idx, 0)]
    rows = np.repeat(np.arange(m), k)[valid.ravel()]
    cells = rows * num_classes + labels[np.maximum(idx, 0)].ravel()[valid.ravel()]
    counts = np.bincount(cells, minlength=m * num_classes).reshape(m, num_classes).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1.0), 1.0 / num_classes)


def combine(probs: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The evidence: the mean of adapter probabilities and neighbour votes, float64."""
    return (np.asarray(probs, np.float64) + np.asarray(votes, np.float64)) / 2.0


def class_thresholds(views: Views, labels: np.ndarray) -> np.ndarray:
    """``t_j``: mean evidence for class ``j`` over the samples labelled ``j`` (``inf`` for an empty label)."""
    labels = np.asarray(labels, np.int64)
    total = np.zeros(views.num_classes)
    for rows, _, _, ev in views.evidence():
        y = labels[rows]
        total += np.bincount(y, weights=ev[np.arange(len(y)), y], minlength=views.num_classes)
    count = np.bincount(labels, minlength=views.num_classes)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def confident_labels(evidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each row's confident class: the highest-evidence class among those at or above ``t_j``; -1 if none."""
    above = evidence >= thresholds[None, :]
    best = np.where(above, evidence, -np.inf).argmax(axis=1)
    return np.where(above.any(axis=1), best, -1)


def confident_joint(views: Views, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's counts and suspects.

    Returns:
        ``(joint, suspect)``: ``joint[j, i]`` (``(C, C)`` float64) counts samples labelled ``j`` whose
        confident class is ``i``; ``suspect`` (``(N,)`` bool) marks the off-diagonal: a confident
        class exists and is not the label.
    """
    labels = np.asarray(labels, np.int64)
    c = views.num_classes
    joint = np.zeros((c, c))
    suspect = np.zeros(views.n, bool)
    for rows, _, _, ev in views.evidence():
        conf, y = confident_labels(ev, thresholds), labels[rows]
        has = conf >= 0
        joint += np.bincount(y[has] * c + conf[has], minlength=c * c).reshape(c, c)
        suspect[rows] = has & (conf != y)
    return joint, suspect


def noise_transition(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Estimated ``T[i, j] = P(given label j | true class i)`` from the confident joint.

    Each row of ``joint`` (:func:`confident_joint`) is rescaled to the number of samples labelled
    ``j`` (samples without a confident class are spread like the counted ones), then every true
    class's column is normalised. A class that is never anyone's confident class gets an identity row.

    Returns:
        ``(C, C)`` float64, rows summing to 1.
    """
    c = joint.shape[0]
    sizes = np.bincount(np.asarray(labels, np.int64), minlength=c).astype(np.float64)
    row = joint.sum(axis=1, keepdims=True)
    joint = np.where(row > 0, joint / np.maximum(row, 1.0), 0.0) * sizes[:, None]
    col = joint.sum(axis=0)  # mass per true class
    t = np.eye(c)
    seen = col > 0
    t[seen] = (joint[:, seen] / col[seen]).T
    return t


def label_posterior(evidence: np.ndarray, labels: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """``P(true i | x, given y) ∝ evidence_i · T[i, y]`` for rows of evidence and their labels; rows sum to 1.

    A row whose products are all zero falls back to the evidence itself.
    """
    labels = np.asarray(labels, np.int64)
    post = np.asarray(evidence, np.float64) * transition[:, labels].T
    total = post.sum(axis=1, keepdims=True)
    return np.where(total > 0, post / np.where(total > 0, total, 1.0), evidence)


def blind_note(prob_label: np.ndarray, labels: np.ndarray, view: str) -> str | None:
    """None when the view (``prob_label``: its probability of each given label) can judge labels, else
    one sentence saying why not: its mean probability of the given labels is no higher than that of a
    label-blind guess answering every sample with the class shares (``sum_c share_c**2``; 1/C for
    balanced classes). Such a view makes every label look doubtful, and the verdict's prior reads the
    encoder's confusions as noise; only an encoder that does not separate the classes, or labels
    with no relation to the images, gets there (docs/pipeline.md, verdict step 6)."""
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
        return None
    mean, guess = float(np.mean(prob_label)), float(np.sum((np.bincount(labels) / labels.size) ** 2))
    if mean > guess:
        return None
    return (f"the {view} give the given labels a mean probability of {mean:.3f}, no better than a label-blind "
            f"guess ({guess:.3f}): this encoder does not separate these classes, so no label is judged (all clean); "
            "embed with a stronger encoder for a label verdict")


def no_verdict(labels: np.ndarray, num_classes: int) -> Verdict:
    """Every label taken as given: ``clean``, ``label_fixed`` = the label, posterior 1, identity ``T``."""
    labels = np.asarray(labels, np.int64)
    return Verdict(status=np.full(labels.size, STATUSES[CLEAN], dtype=object), label_fixed=labels.copy(),
                   label_posterior=np.ones(labels.size), transition=np.eye(num_classes))


def trim_mask(views: Views, labels: np.ndarray) -> np.ndarray:
    """Samples to leave out of the second adapter pass: ``(N,)`` bool, the first-pass suspects."""
    return confident_joint(views, labels, class_thresholds(views, labels))[1]


def static_verdict(views: Views, labels: np.ndarray) -> Verdict:
    """The verdict of every sample from held-out evidence and the given labels (module docstring).

    Args:
        views: the adapter probabilities and neighbour votes (:class:`Views`).
        labels: ``(N,)`` given labels in ``0..C-1``.

    Returns:
        A :class:`Verdict`.
    """
    labels = np.asarray(labels, np.int64)
    t = noise_transition(confident_joint(views, labels, class_thresholds(views, labels))[0], labels)
    status = np.full(views.n, STATUSES[CLEAN], dtype=object)
    label_fixed, own = labels.copy(), np.empty(views.n)
    for rows, p, v, ev in views.evidence():
        y = labels[rows]
        at = np.arange(len(y))
        post = label_posterior(ev, y, t)
        top = post.argmax(axis=1)
        suspect = post[at, y] < SUSPECT_BELOW
        agree = (p.argmax(axis=1) == top) & (v.argmax(axis=1) == top)
        relabel = suspect & (top != y) & (post[at, top] >= RELABEL_MIN) & agree
        status[rows] = np.where(relabel, STATUSES[RELABEL], np.where(suspect, STATUSES[SUPPRESS], STATUSES[CLEAN]))
        label_fixed[rows] = np.where(relabel, top, y)
        own[rows] = post[at, y]
    return Verdict(status=status, label_fixed=label_fixed, label_posterior=own, transition=t)
