"""dds bench-index: the index stage's compute on synthetic embeddings, timed by phase.

:func:`bench_index` runs :func:`dds.pipeline.index.index_arrays`, the same compute ``dds index``
runs (both kNN graphs, cross-fitted adapters, density, consistency, agreement, verdict, regions), on
synthetic data, and measures the global graph's recall@k against exact search on a sample of rows.

Synthetic data (:func:`synthetic_embeddings`): every class is a mixture of a few gaussian clusters
around random unit centres; a share of each class's points (``flip``, 5% by default) is drawn from
another class's clusters but keeps its own label, so there is label noise for the verdict to find.
The class "prompt" embeddings are the class centres plus noise, so the consistency code runs.
"""
from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np

from dds._validate import check_positive_int
from dds.errors import DdsError
from dds.tables import NOISY, REGIONS

CLUSTERS_PER_CLASS = 3  # gaussian clusters per class
RANK = 16  # the clusters vary along a shared RANK-dim subspace (real embeddings have a low intrinsic dimension) ...
SPREAD = 1.0  # ... with an offset of about this norm from the centre (cos to the centre ~0.7) ...
NOISE = 0.3  # ... plus isotropic noise of about this norm
TEXT_NOISE = 0.5  # norm of the noise added to a class centre to make its "prompt" embedding
CHUNK = 65_536  # rows generated at a time, so no (N, D) float64 array is ever made
QUERIES = 10_000  # rows whose global neighbours are checked against exact search


def synthetic_embeddings(n: int, dim: int, classes: int, *, flip: float = 0.05,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Clustered unit vectors with labels, a share of them placed in other classes' clusters.

    Args:
        n: samples.
        dim: embedding width ``D``.
        classes: classes ``C`` (at least 2, at most ``n``).
        flip: share of each class's points drawn from a random other class's clusters.
        seed: seed of everything.

    Returns:
        ``img`` ``(n, D)`` float32 unit rows, ``labels`` ``(n,)`` int64 (balanced), ``text`` ``(C, D)``
        float32 unit rows (noisy class centres) and ``flipped`` ``(n,)`` bool (the points placed in
        another class's clusters).
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((classes * CLUSTERS_PER_CLASS, dim)))
    labels = rng.permutation(np.arange(n) % classes)
    flipped = rng.random(n) < flip
    source = np.where(flipped, (labels + rng.integers(1, classes, n)) % classes, labels)
    cluster = source * CLUSTERS_PER_CLASS + rng.integers(0, CLUSTERS_PER_CLASS, n)
    basis = rng.standard_normal((RANK, dim), dtype=np.float32) * (SPREAD / np.sqrt(RANK * dim))
    img = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(n, start + CHUNK))
        m = rows.stop - start
        offset = rng.standard_normal((m, RANK), dtype=np.float32) @ basis
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
        img[rows] = _unit(centres[cluster[rows]] + offset + noise)
    means = centres.reshape(classes, CLUSTERS_PER_CLASS, dim).mean(axis=1)
    text = _unit(_unit(means) + rng.standard_normal((classes, dim)) * (TEXT_NOISE / np.sqrt(dim)))
    return {"img": img, "labels": labels.astype(np.int64), "text": text, "flipped": flipped}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray) -> float:
    """Mean share of each row's exact neighbours that the approximate search found too.

    Args:
        approx_idx: ``(m, k)`` neighbour indices from the search under test (``-1`` = empty slot).
        exact_idx: ``(m, k')`` exact neighbour indices of the same rows (``-1`` = empty slot).

    Returns:
        The mean over rows with at least one exact neighbour of ``|approx & exact| / |exact|``, the
        order within a row ignored; ``nan`` when no row has one.
    """
    approx_idx, exact_idx = np.asarray(approx_idx), np.asarray(exact_idx)
    if approx_idx.shape[0] != exact_idx.shape[0]:
        raise DdsError(f"recall needs the same rows: got {approx_idx.shape[0]} approximate and "
                       f"{exact_idx.shape[0]} exact rows")
    valid = exact_idx >= 0
    hit = ((exact_idx[:, :, None] == approx_idx[:, None, :]).any(axis=2) & valid).sum(axis=1)
    rows = valid.any(axis=1)
    return float((hit[rows] / valid.sum(axis=1)[rows]).mean()) if rows.any() else float("nan")


def bench_index(n: int, dim: int, classes: int, *, k: int = 10, seed: int = 0, use_adapters: bool = True,
                backend: str = "auto", device: str = "cpu", queries: int = QUERIES) -> dict[str, Any]:
    """Time the index stage's compute on synthetic data, phase by phase, with the global graph's recall.

    Args:
        n: samples.
        dim: embedding width.
        classes: classes (at least 2, at most ``n``).
        k: neighbours per sample.
        seed: seed of the data and of the stage.
        use_adapters: train the cross-fitted adapters as ``dds index`` does; False: zero-shot cosines
            (the synthetic prompts live in the image space), to time the rest alone.
        backend: kNN backend (:func:`dds.pipeline.knn.knn`); ``auto`` is what ``dds index`` uses.
        device: ``cpu`` or ``cuda``.
        queries: rows (sampled) whose global neighbours are checked against exact search.

    Returns:
        ``n``, ``dim``, ``classes``, ``k``, ``knn_backend``, ``adapters``, ``{phase}_s`` (wall-clock seconds of
        ``synthesise``, of each phase of :func:`index_arrays` and of ``exact_reference``, the exact
        search of the sampled rows), ``index_s`` (the stage's phases summed), ``peak_rss_gib`` (the
        process's peak resident memory so far), ``recall_at_k`` (global graph against exact, over
        ``queries`` rows), ``queries``, and the ``noisy`` region's ``noise_precision`` /
        ``noise_recall`` against the points placed in other classes' clusters.

    Raises:
        DdsError: bad sizes.
    """
    from dds.pipeline.index import index_arrays
    from dds.pipeline.knn import exact_knn_rows, resolve_backend

    check_positive_int("--n", n)
    check_positive_int("--dim", dim)
    check_positive_int("--k", k)
    if classes < 2:
        raise DdsError(f"--classes must be at least 2 (label noise needs another class), got {classes}")
    if n < classes:
        raise DdsError(f"--n must be at least --classes ({classes}), got {n}")
    resolve_backend(backend, device, n)  # an unknown backend fails before the data is made
    t = time.perf_counter()
    data = synthetic_embeddings(n, dim, classes, seed=seed)
    seconds = {"synthesise": round(time.perf_counter() - t, 3)}
    res = index_arrays(data["img"], data["labels"], data["text"], k=k, use_adapters=use_adapters, folds=5, seed=seed,
                       device=device, backend=backend)
    seconds.update(res["seconds"])
    t = time.perf_counter()
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, min(n, queries), replace=False))
    _, exact = exact_knn_rows(data["img"], rows, k, device=device)
    seconds["exact_reference"] = round(time.perf_counter() - t, 3)
    flagged = res["cols"]["region"] == REGIONS[NOISY]
    flipped = data["flipped"]
    return {"n": n, "dim": dim, "classes": classes, "k": k, "knn_backend": f"{res['knn_backend']} ({device})",
            "adapters": "on (cross-fitted)" if use_adapters else "off (zero-shot)",
            **{f"{phase}_s": sec for phase, sec in seconds.items()},
            "index_s": round(sum(res["seconds"].values()), 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "recall_at_k": round(recall_at_k(res["global_idx"][rows], exact), 4), "queries": len(rows),
            "noise_precision": round(float(flipped[flagged].mean()), 3) if flagged.any() else None,
            "noise_recall": round(float(flagged[flipped].mean()), 3) if flipped.any() else None}
