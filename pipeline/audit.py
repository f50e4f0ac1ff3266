"""``dds audit NAME``: the samples most likely mislabelled, and how well that ranking finds injected noise.

The ranking is ``suspicion = 1 - label_posterior`` from the scores table (the held-out posterior
that the given label is right, :mod:`dds.pipeline.verdict`); each row carries the given label,
``pred_label``, the verdict (``status``, ``label_fixed``) and the score. Without injected noise
the audit reports the share the verdict suspects; with it (``label != label_orig`` somewhere) it
measures the ranking (AUROC, precision = recall among the top K flipped), the verdict
(``noisy_region``: precision, recall, F1 of relabel ∪ suppress, relabel accuracy) and, when
installed, cleanlab's ``find_label_issues`` on the same ``probs``. The metric functions are pure
(numpy in, floats out). Output and numbers: docs/report.md, docs/label-noise.md.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dds.errors import DdsError
from dds.tables import (CLEAN, NOISY, REGIONS, RELABEL, STATUSES, SUPPRESS, check_index_current, index_info,
                        load_scores)
from dds.workspace import Workspace

log = logging.getLogger(__name__)

CLEANLAB_MISSING = "cleanlab is not installed: the cleanlab comparison is skipped (pip install 'dds[audit]')"


# ---------------------------------------------------------------- pure metrics

def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positives in ``truth`` (ties count one half).

    Args:
        score: (N,) float, higher = more likely positive.
        truth: (N,) bool.

    Returns:
        The probability that a random positive scores above a random negative; NaN when
        ``truth`` holds only positives or only negatives (where scikit-learn would warn).
    """
    # lazy: sklearn.metrics takes ~3 s to import, and `dds report` imports this module without needing it
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, bool)
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, np.asarray(score, np.float64)))


def precision_recall_at_k(score: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Precision and recall of the ``k`` highest scores (ties broken by position, earlier first).

    Args:
        score: (N,) float; truth: (N,) bool; k: how many top samples are flagged (>= 1).

    Returns:
        ``(hits / k, hits / positives)``; recall is NaN without positives.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    truth = np.asarray(truth, bool)
    top = np.argsort(-np.asarray(score, np.float64), kind="stable")[:k]
    hits = int(truth[top].sum())
    pos = int(truth.sum())
    return hits / min(k, len(truth)), (hits / pos if pos else float("nan"))


def flag_metrics(flag: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall, F1 and count of a boolean flag against the truth.

    Args:
        flag: (N,) bool, flagged as mislabelled; truth: (N,) bool, really mislabelled.

    Returns:
        {"flagged": int, "precision": float (NaN if none flagged), "recall": float (NaN without
        positives), "f1": float (NaN if either is NaN, 0 when both are 0)}.
    """
    flag, truth = np.asarray(flag, bool), np.asarray(truth, bool)
    hits, flagged, pos = int((flag & truth).sum()), int(flag.sum()), int(truth.sum())
    p = hits / flagged if flagged else float("nan")
    r = hits / pos if pos else float("nan")
    f1 = float("nan") if np.isnan(p) or np.isnan(r) else (2 * p * r / (p + r) if p + r else 0.0)
    return {"flagged": flagged, "precision": p, "recall": r, "f1": f1}


def relabel_accuracy(status: np.ndarray, label_fixed: np.ndarray, label_orig: np.ndarray) -> dict[str, float]:
    """How many samples the verdict relabels and the share of them whose new label is the true one.

    Returns:
        {"relabelled": int, "relabel_acc": float (NaN when nothing is relabelled), "suppressed": int}.
    """
    status = np.asarray(status, object)
    rel = status == STATUSES[RELABEL]
    n = int(rel.sum())
    acc = float((np.asarray(label_fixed)[rel] == np.asarray(label_orig)[rel]).mean()) if n else float("nan")
    return {"relabelled": n, "relabel_acc": acc, "suppressed": int((status == STATUSES[SUPPRESS]).sum())}


def suspected_share(status: np.ndarray) -> dict[str, float]:
    """Without injected noise: how many samples the verdict takes out of ``clean``, and their share."""
    status = np.asarray(status, object)
    n = int((status != STATUSES[CLEAN]).sum())
    return {"flagged": n, "share": n / len(status) if len(status) else float("nan"),
            "relabelled": int((status == STATUSES[RELABEL]).sum()),
            "suppressed": int((status == STATUSES[SUPPRESS]).sum())}


def suspicion(label_posterior: np.ndarray) -> np.ndarray:
    """``1 - label_posterior`` (or any probability of the given label): (N,) float64, higher = more likely mislabelled."""
    return 1.0 - np.asarray(label_posterior, np.float64)


def named_labels(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Labels as the audit prints them, number and class name: ``[3, 0]`` -> ``["3 Dress", "0 T-shirt/top"]``."""
    return [f"{y} {classes[y]}" for y in np.asarray(labels, np.int64)]


def cleanlab_flags(labels: np.ndarray, probs: np.ndarray) -> np.ndarray | None:
    """cleanlab's ``find_label_issues`` on out-of-sample probabilities; None when cleanlab is missing.

    Args:
        labels: (N,) int given labels; probs: (N, C) float cross-fitted class probabilities.

    Returns:
        (N,) bool mask of the samples cleanlab flags, or None without cleanlab.
    """
    try:   # optional: dds[audit]
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    p = np.clip(np.asarray(probs, np.float64), 1e-12, None)
    p /= p.sum(axis=1, keepdims=True)
    return np.asarray(find_label_issues(np.asarray(labels, np.int64), p), bool)


# ---------------------------------------------------------------- I/O edge

def load_audit_inputs(ws: Workspace, name: str, encoder: str):
    """Scores joined with ``label_orig`` from samples (pandas), one row per scored train sample.

    Raises:
        DdsError: the dataset is unknown or has no scores under ``encoder``.
    """
    ws.dataset_info(name)
    verdict_cols = ["status", "label_fixed", "label_posterior"]
    scores = load_scores(ws, name, encoder,
                         ["key", "label", "pred_label", "prob_label", "region", "probs", *verdict_cols])
    if scores is None:
        raise DdsError(f"dataset {name} has no scores under encoder {encoder}; run `dds embed {name} --encoder "
                       f"{encoder}` and `dds index {name} --encoder {encoder}` first")
    if not set(verdict_cols) <= set(scores.columns):  # a table written before the verdict: its noisy region, suppressed
        log.warning("the scores of %s under %s predate the label verdict; run `dds index %s` again", name, encoder, name)
        scores["status"] = np.where(scores["region"] == REGIONS[NOISY], STATUSES[SUPPRESS], STATUSES[CLEAN])
        scores["label_fixed"] = scores["label"]
        scores["label_posterior"] = scores["prob_label"]
    samples = pq.read_table(ws.dataset_dir(name) / "samples.parquet", columns=["key", "label_orig"]).to_pandas()
    return scores.merge(samples, on="key", how="left")


def verdict_notes(ws: Workspace, name: str, encoder: str) -> list[str]:
    """``[why]`` when ``dds index`` judged no label of ``name`` (``index.json``'s ``verdict``), else ``[]``."""
    said = str(index_info(ws, name, encoder).get("verdict", ""))
    return [f"no label verdict: {said.removeprefix('skipped: ')}"] if said.startswith("skipped") else []


def run_audit(ws: Workspace, name: str, *, encoder: str = "lite0-minilm", use_cleanlab: bool = True) -> dict[str, Any]:
    """Rank the train samples of ``name`` by suspicion and, with injected noise, measure the ranking.

    Args:
        ws: the workspace.
        name: the dataset.
        encoder: whose scores to use.
        use_cleanlab: also run cleanlab's ``find_label_issues`` (skipped, with a note, when not installed).

    Returns:
        {"ranking": pandas DataFrame (rank, key, label, pred_label, suspicion, prob_label, region,
        status, label_fixed, noisy_truth (bool or None), cleanlab_flag (bool or None)) most suspicious
        first, "classes": [class name by label], "has_noise": bool, "metrics": {"ranking": {...},
        "noisy_region": {...}, "cleanlab": {...}} (without injected noise only "noisy_region", the
        suspected share), "notes": [str]}.

    Raises:
        DdsError: no such dataset, no scores, or scores computed on an earlier generation of the dataset.
    """
    ws.dataset_info(name)   # a clear error for an unknown dataset before its folder is locked
    with ws.lock(name, shared=True, holder=f"dds audit {name}"):   # scores and samples of one generation
        check_index_current(ws, name, encoder)
        df = load_audit_inputs(ws, name, encoder)
    notes = verdict_notes(ws, name, encoder)
    susp = suspicion(df["label_posterior"].to_numpy())
    flags = None
    if use_cleanlab and df["probs"].isna().any():
        notes.append("cleanlab skipped: the scores table stores no class probabilities for this many samples x "
                     "classes (dds index leaves probs null above PROBS_MAX_ELEMENTS)")
    elif use_cleanlab:
        try:
            flags = cleanlab_flags(df["label"].to_numpy(), np.stack(df["probs"].to_numpy()))
        except Exception as e:  # cleanlab refusing these inputs is a note, not a failure of the audit
            notes.append(f"cleanlab find_label_issues failed: {type(e).__name__}: {str(e).splitlines()[0]}")
        else:
            if flags is None:
                notes.append(CLEANLAB_MISSING)
    truth = None
    has_noise = bool(df["label_orig"].notna().all() and (df["label"] != df["label_orig"]).any())
    metrics: dict[str, Any] = {}
    if has_noise:
        truth = (df["label"] != df["label_orig"]).to_numpy()
        k = int(truth.sum())
        p, r = precision_recall_at_k(susp, truth, k)
        metrics["ranking"] = {"auroc": auroc(susp, truth), "k": k, "precision_at_k": p, "recall_at_k": r}
        metrics["noisy_region"] = {**flag_metrics(df["status"].to_numpy() != STATUSES[CLEAN], truth),
                                   **relabel_accuracy(df["status"].to_numpy(), df["label_fixed"].to_numpy(),
                                                      df["label_orig"].to_numpy())}
        if flags is not None:
            metrics["cleanlab"] = flag_metrics(flags, truth)
    else:
        metrics["noisy_region"] = suspected_share(df["status"].to_numpy())
        notes.append(f"{name} has no injected label noise (label_orig = label): no precision/recall to report")
    ranking = df[["key", "label", "pred_label", "prob_label", "region", "status", "label_fixed"]].copy()
    ranking.insert(3, "suspicion", susp)
    ranking["noisy_truth"] = truth if truth is not None else None
    ranking["cleanlab_flag"] = flags if flags is not None else None
    ranking = ranking.iloc[np.argsort(-susp, kind="stable")].reset_index(drop=True)
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return {"ranking": ranking, "classes": list(ws.dataset_info(name)["classes"]), "has_noise": has_noise,
            "metrics": metrics, "notes": notes}
