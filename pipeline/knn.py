"""k-nearest-neighbour search on L2-normalised vectors (cosine similarity), self excluded.

Backends (``backend=``), each one method: ``torch``, exact, blocked ``X[block] @ X.T`` + ``topk`` on
CPU or CUDA (faster than faiss-cpu on these machines); ``faiss``, exact ``IndexFlatIP``, on the GPU
when faiss has one; ``ivf``, approximate: spherical k-means (faiss) into ``IVF_LISTS_PER_SQRT *
sqrt(N)`` lists, each row searching its :data:`IVF_NPROBE` nearest lists, scanned list by list in
torch (``nprobe = nlist`` is exact). ``auto`` is exact up to :data:`EXACT_MAX_ROWS` rows
(:data:`EXACT_MAX_ROWS_CUDA` on CUDA) per searched set and ``ivf`` above.

With ``labels`` one search runs per class, so neighbours share the sample's label (``auto`` picks
per class size). Slots that cannot be filled (``n <= k``, or too few rows in a row's probed lists)
hold index ``-1`` and similarity ``nan``. Measurements behind these choices: docs/pipeline.md,
"Design notes: pipeline/knn.py".
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from dds._validate import check_positive_int
from dds.errors import DdsError

# faiss is imported where it is used: 0.5 s to import, and needed only for the approximate search of
# large sets or when asked for (--backend faiss)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss", "ivf")
#: Similarity-matrix elements per torch block (block rows x N); 2**25 float32 = 128 MiB.
BLOCK_ELEMENTS = 1 << 25
#: ``auto`` searches sets of at most this many rows exactly on CPU (100k x 512: ~130 s on 2 cores) ...
EXACT_MAX_ROWS = 100_000
#: ... and on CUDA (an estimate: 1.28M x 512 exact is ~1e15 multiply-adds, about a minute on one GPU).
EXACT_MAX_ROWS_CUDA = 2_000_000
IVF_LISTS_PER_SQRT = 4  # nlist = 4 sqrt(N): 1265 lists for 100k rows, 4525 for 1.28M
IVF_NPROBE = 16  # lists each row searches (recall@10 on bench-index's clustered data: 1.00 from 8 on)
IVF_TRAIN_PER_LIST = 32  # k-means training rows per list (sampled) ...
IVF_NITER = 10  # ... and iterations


def faiss_gpu_available() -> bool:
    """True when faiss is importable, was built with GPU support and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def resolve_backend(backend: str, device: str, n: int) -> str:
    """The backend that searches ``n`` rows on ``device`` (``cpu`` or ``cuda``): ``auto`` resolved, others as given."""
    if backend not in BACKENDS:
        raise DdsError(f"unknown kNN backend '{backend}'; known: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if n > (EXACT_MAX_ROWS if device == "cpu" else EXACT_MAX_ROWS_CUDA):
        return "ivf"
    # faiss only wins with a GPU; on CPU its bundled OpenBLAS is ~4x slower than torch here.
    return "faiss" if device != "cpu" and faiss_gpu_available() else "torch"


def ivf_params(n: int) -> tuple[int, int]:
    """``(nlist, nprobe)`` of the ``ivf`` search over ``n`` rows (module docstring)."""
    nlist = max(1, min(n, int(round(IVF_LISTS_PER_SQRT * np.sqrt(n)))))
    return nlist, min(IVF_NPROBE, nlist)


def describe_backend(backend: str, device: str, n: int) -> str:
    """The search :func:`knn` runs over ``n`` rows in words, e.g. ``ivf (approximate: 4525 lists, nprobe 16)``."""
    chosen = resolve_backend(backend, device, n)
    if chosen == "ivf":
        nlist, nprobe = ivf_params(n)
        return f"ivf (approximate: {nlist} lists, nprobe {nprobe})"
    return f"{chosen} (exact)"


def knn(x: np.ndarray, k: int, *, labels: np.ndarray | None = None, device: str = "cpu",
        backend: str = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of each row of ``x`` by inner product, the row itself excluded.

    Args:
        x: ``(N, D)`` float32, rows L2-normalised (inner product = cosine).
        k: neighbours per row (>= 1).
        labels: ``(N,)`` ints; when given, neighbours are searched only among rows of the same label.
        device: ``cpu`` or ``cuda`` (where the torch and ivf backends compute).
        backend: ``auto``, ``torch``, ``faiss`` or ``ivf`` (see the module docstring).
        seed: seed of the ``ivf`` k-means (exact backends ignore it).

    Returns:
        ``(sims, idx)``: ``(N, k)`` float32 similarities, descending per row, and ``(N, k)`` int64
        row indices into ``x``; slots without a neighbour hold ``nan`` / ``-1``.
    """
    check_positive_int("k", k)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise DdsError(f"embeddings must be a 2-D array (N, D), got shape {x.shape}")
    resolve_backend(backend, device, len(x))  # rejects an unknown name before any work

    def search(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chosen = resolve_backend(backend, device, len(rows))
        if chosen == "ivf":
            return _search_ivf(rows, k, device, seed)
        return (_search_faiss if chosen == "faiss" else _search_torch)(rows, k, device)

    if labels is None:
        return search(x)
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise DdsError(f"labels must have shape ({len(x)},), got {labels.shape}")
    sims = np.full((len(x), k), np.nan, dtype=np.float32)
    idx = np.full((len(x), k), -1, dtype=np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        s, i = search(x[rows])
        sims[rows] = s
        idx[rows] = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
    return sims, idx


def merge_graphs(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                 block: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar distinct neighbours among two candidate lists of the same rows.

    ``dds index`` merges its approximate global graph with the exact per-class graph this way: most
    of a sample's global neighbours carry its label, and the per-class search found those exactly
    (recall gains: docs/pipeline.md, "Design notes: pipeline/knn.py").

    Args:
        a, b: ``(sims, idx)`` pairs, ``(N, ka)`` and ``(N, kb)``, as :func:`knn` returns them (``nan`` / ``-1``
            for empty slots).
        block: rows merged at a time.

    Returns:
        ``(sims, idx)``: ``(N, ka)`` float32 / int64, descending per row; a neighbour found by both counts once.
    """
    k, n = a[1].shape[1], len(a[1])
    sims, idx = np.full((n, k), np.nan, np.float32), np.full((n, k), -1, np.int64)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        i = np.concatenate([a[1][rows], b[1][rows]], axis=1)
        s = np.concatenate([a[0][rows], b[0][rows]], axis=1).astype(np.float32)
        s = np.where((i >= 0) & np.isfinite(s), s, -np.inf)
        order = np.argsort(i, axis=1, kind="stable")
        i, s = np.take_along_axis(i, order, axis=1), np.take_along_axis(s, order, axis=1)
        s[:, 1:][i[:, 1:] == i[:, :-1]] = -np.inf  # a neighbour listed twice counts once
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        top_s, top_i = np.take_along_axis(s, top, axis=1), np.take_along_axis(i, top, axis=1)
        found = np.isfinite(top_s)
        sims[rows], idx[rows] = np.where(found, top_s, np.nan), np.where(found, top_i, -1)
    return sims, idx


def _padded(m: int, k: int, n: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Output arrays for ``m`` query rows searched among ``n`` rows (``m`` by default), and how many
    real neighbours each can have."""
    n = m if n is None else n
    kk = min(k, n - 1)
    if kk < k:
        log.warning("only %d rows: %d of %d neighbour slots stay empty (-1 / nan)", n, k - max(kk, 0), k)
    return np.full((m, k), np.nan, np.float32), np.full((m, k), -1, np.int64), max(kk, 0)


def exact_knn_rows(x: np.ndarray, rows: np.ndarray, k: int, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest neighbours of the rows ``rows`` of ``x`` among all of ``x``, each row itself excluded.

    The reference :func:`knn`'s approximate search is measured against (``dds bench-index``).

    Args:
        x: ``(N, D)`` float32 L2-normalised rows.
        rows: ``(m,)`` distinct row indices into ``x``, the queries.
        k: neighbours per query.
        device: ``cpu`` or ``cuda``.

    Returns:
        ``(sims, idx)``: ``(m, k)`` float32 and int64, as :func:`knn` returns them.
    """
    check_positive_int("k", k)
    return _search_torch(np.ascontiguousarray(x, dtype=np.float32), k, device, rows=np.asarray(rows, np.int64))


def _search_torch(x: np.ndarray, k: int, device: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact blocked ``X[rows] @ X.T`` + ``topk`` in torch (all rows by default); self is masked to ``-inf``."""
    n = len(x)
    queries = np.arange(n) if rows is None else rows
    sims, idx, kk = _padded(len(queries), k, n)
    if kk == 0:
        return sims, idx
    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    xt = torch.from_numpy(x).to(dev)
    q_all = torch.from_numpy(queries).to(dev)
    block = max(1, min(n, BLOCK_ELEMENTS // n))
    with torch.inference_mode():
        for start in range(0, len(queries), block):
            stop = min(len(queries), start + block)
            q = q_all[start:stop]
            s = xt[q] @ xt.T  # (block, N)
            s[torch.arange(len(q), device=dev), q] = float("-inf")  # exclude self by index, so duplicates still count
            top_s, top_i = torch.topk(s, kk, dim=1)
            sims[start:stop, :kk] = top_s.cpu().numpy()
            idx[start:stop, :kk] = top_i.cpu().numpy()
    return sims, idx


def _faiss_index(x: np.ndarray):
    """An exact inner-product faiss index over ``x``, on GPU when possible."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
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


def _kmeans(x: np.ndarray, nlist: int, device: str, seed: int) -> np.ndarray:
    """``(nlist, D)`` float32 unit centroids: faiss spherical k-means on a seeded sample of the rows."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), min(len(x), IVF_TRAIN_PER_LIST * nlist), replace=False))]
    km = faiss.Kmeans(x.shape[1], nlist, niter=IVF_NITER, spherical=True, seed=seed, min_points_per_centroid=1,
                      gpu=device == "cuda" and faiss_gpu_available())
    km.train(sample)
    return km.centroids


def _search_ivf(x: np.ndarray, k: int, device: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate search through an inverted file, scanned list by list in torch (module docstring)."""
    n = len(x)
    sims, idx, kk = _padded(n, k)
    if kk == 0:
        return sims, idx
    nlist, nprobe = ivf_params(n)
    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    xt = torch.from_numpy(x).to(dev)
    centroids = torch.from_numpy(_kmeans(x, nlist, device, seed)).to(dev)
    log.info("ivf search over %d rows: %d lists, nprobe %d (approximate)", n, nlist, nprobe)
    with torch.inference_mode():
        block = max(1, BLOCK_ELEMENTS // nlist)
        probe = torch.cat([torch.topk(xt[a:a + block] @ centroids.T, nprobe, dim=1).indices
                           for a in range(0, n, block)])  # (N, nprobe) nearest lists, nearest first
        home = probe[:, 0]  # the list that stores each row
        members = torch.argsort(home, stable=True)  # rows grouped by home list, list l at m_at[l]:m_at[l + 1]
        m_at = [0, *torch.bincount(home, minlength=nlist).cumsum(0).tolist()]
        slot = torch.empty_like(members)  # each row's position within its home list
        slot[members] = torch.arange(n, device=dev) - torch.tensor(m_at[:-1], device=dev)[home[members]]
        probers = torch.argsort(probe.flatten(), stable=True) // nprobe  # rows grouped by the lists they probe
        q_at = [0, *torch.bincount(probe.flatten(), minlength=nlist).cumsum(0).tolist()]
        best_s = torch.full((n, kk), float("-inf"), device=dev)
        best_i = torch.full((n, kk), -1, dtype=torch.int64, device=dev)
        for lst in range(nlist):
            m, q_all = members[m_at[lst]:m_at[lst + 1]], probers[q_at[lst]:q_at[lst + 1]]
            if len(m) == 0:
                continue
            xm = xt[m]
            chunk = max(1, BLOCK_ELEMENTS // len(m))
            for a in range(0, len(q_all), chunk):
                q = q_all[a:a + chunk]  # a row probes a list once, so q has no repeats
                s = xt[q] @ xm.T
                own = torch.nonzero(home[q] == lst)[:, 0]  # the rows stored in this list meet themselves
                s[own, slot[q[own]]] = float("-inf")  # exclude self by index, so duplicates still count
                top_s, top_j = torch.topk(s, min(kk, len(m)), dim=1)
                merged_s, pick = torch.topk(torch.cat([best_s[q], top_s], dim=1), kk, dim=1)
                best_s[q] = merged_s
                best_i[q] = torch.cat([best_i[q], m[top_j]], dim=1).gather(1, pick)
    found = torch.isfinite(best_s)
    sims[:, :kk] = torch.where(found, best_s, float("nan")).cpu().numpy()
    idx[:, :kk] = torch.where(found, best_i, -1).cpu().numpy()
    return sims, idx
