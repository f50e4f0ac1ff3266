"""The static label verdict of ``dds index``: every train sample is ``clean``, ``relabel`` or ``suppress``.

Only the given labels and held-out evidence are read; nothing here knows the injected truth
(``label_orig``) or the noise rate, and no threshold is fitted to either.

Evidence. Two views of which class a sample belongs to, neither of which saw the sample's own label:

* ``probs``: the cross-fitted adapter probabilities (:mod:`dds.pipeline.adapters`);
* ``votes``: the labels of its ``k`` global neighbours in the frozen image space, as shares.

``evidence = (probs + votes) / 2``, equal weights: two views, no constant to tune.

Steps (:func:`static_verdict`; :func:`trim_mask` and the trimmed passes run in ``dds index``):

1. **Trimming.** Adapters trained on noisy labels learn the noise (a class's flips pull its
   prompt towards the source class, most of all for pair-wise noise). A first pass marks the
   confident-learning suspects (:func:`confident_suspects`, a wide net); ``dds index`` then trains
   the adapters again, cross-fitted on the same folds, *without* those samples, and recounts the
   neighbour votes without them; a third pass leaves out only the second pass's verdict suspects
   (steps 2-5), which gives back the clean samples the wide net caught. The suspects are only left
   out of training: they are scored like every other sample of their fold.
2. **Per-class thresholds** (confident learning): ``t_j`` = mean evidence for class ``j`` over the
   samples labelled ``j``. A sample's *confident class* is the class with the highest evidence among
   those where its evidence reaches ``t_j``. The thresholds follow each class's own distribution.
3. **Noise model.** Counting given label against confident class (the confident joint), with each
   row rescaled to its label's size, estimates ``T[i, j] = P(given label j | true class i)``, the
   dataset's own label-noise transition matrix. Clean data gives a near-identity ``T``; 40 %
   symmetric noise a diagonal near 0.6.
4. **Posterior.** Noise depends on the class only, so ``P(true i | x, given j) ∝ evidence_i(x) ·
   T[i, j]``. A sample is a suspect when the posterior of its given label is below
   :data:`SUSPECT_BELOW` (= 1/2: another class is more likely than the label). The prior ``T`` is
   what keeps genuinely hard samples of a clean dataset clean: where the data show little noise,
   only overwhelming evidence flips the decision.
5. **Relabel or suppress.** A suspect is relabelled to the posterior's top class when that class
   has posterior at least :data:`RELABEL_MIN` *and* both views (adapter argmax and neighbour
   majority) name it; otherwise it is suppressed. ``RELABEL_MIN`` = 0.9 is the relabel accuracy we
   ask for: a calibrated posterior of 0.9 is right nine times in ten.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUSPECT_BELOW = 0.5  # suspect: posterior probability of the given label below this
RELABEL_MIN = 0.9  # relabel: posterior of the new class at least this, and both views agree on it
STATUSES = ("clean", "relabel", "suppress")


@dataclass
class Verdict:
    """Static verdict per sample.

    Attributes:
        status: ``(N,)`` object array of ``clean``, ``relabel`` or ``suppress``.
        label_fixed: ``(N,)`` int64: the new label for ``relabel``, else the given label.
        label_posterior: ``(N,)`` float64 posterior probability that the given label is right.
        posterior: ``(N, C)`` float64 posterior over the true class.
        transition: ``(C, C)`` estimated ``P(given j | true i)``.
    """

    status: np.ndarray
    label_fixed: np.ndarray
    label_posterior: np.ndarray
    posterior: np.ndarray
    transition: np.ndarray


def neighbour_votes(idx: np.ndarray, labels: np.ndarray, num_classes: int,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """Share of each sample's neighbours carrying each label.

    Args:
        idx: ``(N, k)`` neighbour indices (``-1`` = no neighbour).
        labels: ``(N,)`` ints in ``0..C-1``.
        num_classes: ``C``.
        keep: ``(N,)`` bool; only these samples vote (None: all).

    Returns:
        ``(N, C)`` float64 rows summing to 1; uniform for a sample without voting neighbours.
    """
    labels = np.asarray(labels, np.int64)
    n, k = idx.shape
    valid = idx >= 0
    if keep is not None:
        valid &= np.asarray(keep, bool)[np.maximum(idx, 0)]
    counts = np.zeros((n, num_classes))
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    np.add.at(counts, (rows, labels[np.maximum(idx, 0)].ravel()[valid.ravel()]), 1.0)
    total = counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1.0), 1.0 / num_classes)


def combine(probs: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """The evidence: the mean of adapter probabilities and neighbour votes, ``(N, C)`` float64."""
    return (np.asarray(probs, np.float64) + np.asarray(votes, np.float64)) / 2.0


def class_thresholds(evidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``t_j``: mean evidence for class ``j`` over the samples labelled ``j`` (``inf`` for an empty label)."""
    labels = np.asarray(labels)
    out = np.full(evidence.shape[1], np.inf)
    for j in np.unique(labels):
        out[j] = evidence[labels == j, j].mean()
    return out


def confident_labels(evidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's confident class: the highest-evidence class among those at or above ``t_j``; -1 if none."""
    above = evidence >= class_thresholds(evidence, labels)[None, :]
    best = np.where(above, evidence, -np.inf).argmax(axis=1)
    return np.where(above.any(axis=1), best, -1)


def confident_suspects(evidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confident learning's off-diagonal: ``(N,)`` bool, the confident class exists and is not the label."""
    conf = confident_labels(evidence, labels)
    return (conf >= 0) & (conf != np.asarray(labels))


def noise_transition(evidence: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Estimated ``T[i, j] = P(given label j | true class i)`` from the confident joint.

    ``joint[j, i]`` counts samples labelled ``j`` whose confident class is ``i``; each row is
    rescaled to the number of samples labelled ``j`` (samples without a confident class are spread
    like the counted ones), then every true class's column is normalised. A class that is never
    anyone's confident class gets an identity row.

    Returns:
        ``(C, C)`` float64, rows summing to 1.
    """
    labels = np.asarray(labels, np.int64)
    c = evidence.shape[1]
    conf = confident_labels(evidence, labels)
    has = conf >= 0
    joint = np.zeros((c, c))
    np.add.at(joint, (labels[has], conf[has]), 1.0)
    sizes = np.bincount(labels, minlength=c).astype(np.float64)
    row = joint.sum(axis=1, keepdims=True)
    joint = np.where(row > 0, joint / np.maximum(row, 1.0), 0.0) * sizes[:, None]
    col = joint.sum(axis=0)  # mass per true class
    t = np.eye(c)
    seen = col > 0
    t[seen] = (joint[:, seen] / col[seen]).T
    return t


def label_posterior(evidence: np.ndarray, labels: np.ndarray, transition: np.ndarray) -> np.ndarray:
    """``P(true i | x, given y) ∝ evidence_i · T[i, y]``; ``(N, C)`` float64 rows summing to 1.

    A row whose products are all zero falls back to the evidence itself.
    """
    labels = np.asarray(labels, np.int64)
    post = np.asarray(evidence, np.float64) * transition[:, labels].T
    total = post.sum(axis=1, keepdims=True)
    return np.where(total > 0, post / np.where(total > 0, total, 1.0), evidence)


def trim_mask(probs: np.ndarray, votes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Samples to leave out of the second adapter pass: ``(N,)`` bool, the first-pass suspects."""
    return confident_suspects(combine(probs, votes), labels)


def static_verdict(probs: np.ndarray, votes: np.ndarray, labels: np.ndarray) -> Verdict:
    """The verdict of every sample from held-out evidence and the given labels (module docstring).

    Args:
        probs: ``(N, C)`` cross-fitted (or zero-shot) class probabilities.
        votes: ``(N, C)`` neighbour label shares (:func:`neighbour_votes`).
        labels: ``(N,)`` given labels in ``0..C-1``.

    Returns:
        A :class:`Verdict`.
    """
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))
    evidence = combine(probs, votes)
    t = noise_transition(evidence, labels)
    post = label_posterior(evidence, labels, t)
    suspect = post[rows, labels] < SUSPECT_BELOW
    top = post.argmax(axis=1)
    agree = (np.asarray(probs).argmax(axis=1) == top) & (np.asarray(votes).argmax(axis=1) == top)
    relabel = suspect & (top != labels) & (post[rows, top] >= RELABEL_MIN) & agree
    status = np.full(len(labels), "clean", dtype=object)
    status[suspect] = "suppress"
    status[relabel] = "relabel"
    return Verdict(status=status, label_fixed=np.where(relabel, top, labels), label_posterior=post[rows, labels],
                   posterior=post, transition=t)
