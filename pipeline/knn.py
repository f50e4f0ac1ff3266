"""Exact k-nearest-neighbour search on L2-normalised vectors (cosine similarity), self excluded.

Two backends:

* ``torch``: blocked ``X[block] @ X.T`` + ``topk``, exact, on CPU or CUDA. On the 2-core machines
  here it beats faiss-cpu by about 4x (DESIGN.md §5: faiss-cpu's bundled OpenBLAS misdetects the
  CPU; 50k x 512 self-kNN takes 93 s in faiss against 25 s in torch). We never set
  ``OPENBLAS_CORETYPE`` to work around that: we pick the faster backend instead.
* ``faiss``: ``IndexFlatIP`` (exact), moved to the GPU when faiss was built with GPU support and a
  GPU is visible; for very large inputs (more than :data:`IVF_MIN_ROWS` rows) an ``IndexIVFFlat``
  (approximate, ``nprobe`` = :data:`IVF_NPROBE`), where exact search no longer pays.

``backend="auto"`` picks faiss only when faiss has a GPU to run on; everywhere else it picks the
exact torch search (on CUDA when ``device`` is ``cuda``).

Per-class search (``labels`` given) runs one search per class on that class's rows, so a sample's
neighbours always share its label. A class (or dataset) with ``n <= k`` rows cannot give ``k``
neighbours: the missing slots hold index ``-1`` and similarity ``nan``.
"""
from __future__ import annotations

import logging

import numpy as np

from dds._validate import check_positive_int
from dds.errors import DdsError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
#: Similarity-matrix elements per torch block (block rows x N); 2**25 float32 = 128 MiB.
BLOCK_ELEMENTS = 1 << 25
#: Above this many rows the faiss backend switches from exact IndexFlatIP to IndexIVFFlat.
IVF_MIN_ROWS = 2_000_000
#: Lists probed by the IVF index (of ``4 * sqrt(N)`` lists).
IVF_NPROBE = 32


def faiss_gpu_available() -> bool:
    """True when faiss is importable, was built with GPU support and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def resolve_backend(backend: str, device: str) -> str:
    """The backend ``auto`` stands for on ``device`` (``cpu`` or ``cuda``); others are returned as given."""
    if backend not in BACKENDS:
        raise DdsError(f"unknown kNN backend '{backend}'; known: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    # faiss only wins with a GPU; on CPU its bundled OpenBLAS is ~4x slower than torch here.
    return "faiss" if device != "cpu" and faiss_gpu_available() else "torch"


def knn(x: np.ndarray, k: int, *, labels: np.ndarray | None = None, device: str = "cpu",
        backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of each row of ``x`` by inner product, the row itself excluded.

    Args:
        x: ``(N, D)`` float32, rows L2-normalised (inner product = cosine).
        k: neighbours per row (>= 1).
        labels: ``(N,)`` ints; when given, neighbours are searched only among rows of the same label.
        device: ``cpu`` or ``cuda`` (where the torch backend computes).
        backend: ``auto``, ``torch`` or ``faiss`` (see the module docstring).

    Returns:
        ``(sims, idx)``: ``(N, k)`` float32 similarities, descending per row, and ``(N, k)`` int64
        row indices into ``x``; slots without a neighbour hold ``nan`` / ``-1``.
    """
    check_positive_int("k", k)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DdsError(f"embeddings must be a 2-D array (N, D), got shape {x.shape}")
    chosen = resolve_backend(backend, device)
    search = _search_faiss if chosen == "faiss" else _search_torch
    if labels is None:
        return search(x, k, device)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise DdsError(f"labels must have shape ({len(x)},), got {labels.shape}")
    sims = np.full((len(x), k), np.nan, dtype=np.float32)
    idx = np.full((len(x), k), -1, dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        s, i = search(x[rows], k, device)
        sims[rows] = s
        idx[rows] = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
    return sims, idx


def _padded(n: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Output arrays for ``n`` rows and how many real neighbours each can have."""
    kk = min(k, n - 1)
    if kk < k:
        log.warning("only %d rows: %d of %d neighbour slots stay empty (-1 / nan)", n, k - max(kk, 0), k)
    return np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64), max(kk, 0)


def _search_torch(x: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact blocked ``X @ X.T`` + ``topk`` in torch; the diagonal is masked to ``-inf``."""
    import torch

    n = len(x)
    sims, idx, kk = _padded(n, k)
    if kk == 0:
        return sims, idx
    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    xt = torch.from_numpy(x).to(dev)
    block = max(1, min(n, BLOCK_ELEMENTS // n))
    with torch.inference_mode():
        for start in range(0, n, block):
            stop = min(n, start + block)
            s = xt[start:stop] @ xt.T  # (block, N)
            rows = torch.arange(stop - start, device=dev)
            s[rows, rows + start] = float("-inf")  # exclude self by index, so duplicates still count
            top_s, top_i = torch.topk(s, kk, dim=1)
            sims[start:stop, :kk] = top_s.cpu().numpy()
            idx[start:stop, :kk] = top_i.cpu().numpy()
    return sims, idx


def _faiss_index(x: np.ndarray):
    """An exact (or, for huge inputs, IVF) inner-product faiss index over ``x``, on GPU when possible."""
    import faiss

    n, d = x.shape
    if n > IVF_MIN_ROWS:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = IVF_NPROBE
        log.info("faiss IVF index: %d lists, nprobe %d (approximate)", nlist, IVF_NPROBE)
    else:
        index = faiss.IndexFlatIP(d)
    if faiss_gpu_available():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


def _search_faiss(x: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """faiss search for ``k + 1`` neighbours, then the row itself is dropped (or the last, if absent)."""
    n = len(x)
    sims, idx, kk = _padded(n, k)
    if kk == 0:
        return sims, idx
    s, i = _faiss_index(x).search(x, kk + 1)
    is_self = i == np.arange(n)[:, None]
    # drop the self column; rows whose self was crowded out by exact duplicates drop their last column
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    sims[:, :kk] = s[keep].reshape(n, kk)
    idx[:, :kk] = i[keep].reshape(n, kk)
    return sims, idx
