"""dds index: the kNN graph and per-sample scores (density, consistency, joint score, region).

Reads the train split's image embeddings, class-prompt embeddings and ``encoder.json`` written by
``dds embed``; writes ``index/{slug(encoder)}/knn.parquet``, ``scores.parquet`` and ``index.json``
as one generation (:mod:`dds.generations`), so a kill mid-way leaves the previous consistent three
in use.

Per sample: ``density`` (inverted, per-label min-max scaled mean distance to the ``k`` same-label
neighbours), ``consistency`` and ``margin`` (held-out class cosines, :mod:`dds.pipeline.adapters`),
``knn_agreement`` (label share of the ``k`` global neighbours), ``probs`` / ``pred_label`` /
``prob_label`` (softmax of ``cos / tau``, made block by block), ``joint = (1 - density) *
prob_label`` (high for sparse and consistent samples), the label verdict of
:mod:`dds.pipeline.verdict` (``status``, ``label_fixed``, ``label_posterior``) and ``region``
(``noisy`` if not clean, then ``augment``, ``redundant``, ``keep``). Formulas and the reasons:
docs/pipeline.md.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dds import catalog, generations
from dds.device import resolve_device
from dds.errors import DdsError
from dds.pipeline import adapters as adapt, verdict
from dds.pipeline.knn import describe_backend, knn, merge_graphs, resolve_backend
from dds.tables import AUGMENT, CLEAN, KEEP, NOISY, REDUNDANT, REGIONS, STATUSES, dataset_generation
from dds.workspace import Workspace, atomic_write_json, write_parquet

log = logging.getLogger(__name__)

AUGMENT_FRACTION = 0.30  # augment: top 30% of a label's non-noisy samples by joint score ...
AUGMENT_MIN_PROB = 0.5  # ... whose label the held-out adapter finds at least this probable
REDUNDANT_FRACTION = 0.30  # redundant: the densest 30% of a label's non-noisy samples (if not augment)
# adapter passes after the first, each trained without the previous pass's suspects: pass 2 drops the
# wide net of confident-learning suspects, pass 3 only the verdict's suspects of pass 2
TRIM_PASSES = 2
#: ``scores.probs`` is stored for at most this many (sample, class) entries (512 MiB), else left null
PROBS_MAX_ELEMENTS = 1 << 27
THRESHOLDS = {"suspect_below": verdict.SUSPECT_BELOW, "relabel_min": verdict.RELABEL_MIN,
              "augment_fraction": AUGMENT_FRACTION, "augment_min_prob": AUGMENT_MIN_PROB,
              "redundant_fraction": REDUNDANT_FRACTION}


# --------------------------------------------------------------------------------------- pure cores


def _minmax_per_class(v: np.ndarray, labels: np.ndarray, *, empty: float = 0.5) -> np.ndarray:
    """``v`` min-max scaled to [0, 1] within each label; ``nan`` entries stay ``nan``.

    A label whose finite values are all equal gets ``empty`` (no spread to rank by).
    """
    out = np.full(len(v), np.nan, dtype=np.float64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        vals = v[rows]
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        lo, hi = vals[ok].min(), vals[ok].max()
        out[rows] = (vals - lo) / (hi - lo) if hi > lo else np.where(ok, empty, np.nan)
    return out


def local_density(sims: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Within-class local density from the per-class kNN similarities.

    Args:
        sims: ``(N, k)`` cosine similarities to each sample's same-label neighbours (``nan`` for
            missing neighbours, as :func:`dds.pipeline.knn.knn` returns them).
        labels: ``(N,)`` ints.

    Returns:
        ``(N,)`` float32 in [0, 1]: the mean distance ``sqrt(2 - 2 sim)`` to the neighbours,
        min-max normalised within the label and inverted (1 = densest of its class). A sample
        without any neighbour (a singleton label) gets 0; a label with no spread gets 0.5.
    """
    sims = np.asarray(sims, dtype=np.float64)
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, None))
    with np.errstate(invalid="ignore"):
        has = np.isfinite(dist).any(axis=1)
        mean = np.where(has, np.nanmean(np.where(has[:, None], dist, 0.0), axis=1), np.nan)
    density = 1.0 - _minmax_per_class(mean, np.asarray(labels))
    return np.nan_to_num(density, nan=0.0).astype(np.float32)


def knn_agreement(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Share of each sample's neighbours that carry its label.

    Args:
        idx: ``(N, k)`` neighbour indices (``-1`` = no neighbour).
        labels: ``(N,)`` ints.

    Returns:
        ``(N,)`` float32 in [0, 1]; 1 for a sample without neighbours (no evidence against it).
    """
    labels = np.asarray(labels)
    valid = idx >= 0
    same = (labels[np.maximum(idx, 0)] == labels[:, None]) & valid
    n = valid.sum(axis=1)
    return np.where(n > 0, same.sum(axis=1) / np.maximum(n, 1), 1.0).astype(np.float32)


def label_scores(cos: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Consistency, margin and label probabilities from class cosines and probabilities.

    Args:
        cos: ``(n, C)`` cosine of each sample's image embedding to each class embedding.
        probs: ``(n, C)`` class probabilities.
        labels: ``(n,)`` ints in ``0..C-1``.

    Returns:
        ``consistency`` ``cos[i, y_i]``, ``margin`` (own minus best other class; the own cosine when
        ``C == 1``), ``prob_label`` ``probs[i, y_i]`` (float32) and ``pred_label`` (int32 argmax).
    """
    rows = np.arange(len(labels))
    own = cos[rows, labels]
    other = cos.astype(np.float64, copy=True)
    other[rows, labels] = -np.inf
    best_other = other.max(axis=1) if cos.shape[1] > 1 else np.zeros(len(labels))
    return {
        "consistency": own.astype(np.float32),
        "margin": (own - best_other).astype(np.float32),
        "prob_label": probs[rows, labels].astype(np.float32),
        "pred_label": probs.argmax(axis=1).astype(np.int32),
    }


def label_scores_blocked(scores, labels: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`label_scores` of every sample of ``scores`` (:class:`~dds.pipeline.adapters.ClassScores`),
    computed block by block so no ``(N, C)`` array is held."""
    out: dict[str, np.ndarray] = {}
    for rows in scores.blocks():
        part = label_scores(*scores.block(rows), labels[rows])
        for name, v in part.items():
            out.setdefault(name, np.empty(len(scores), v.dtype))[rows] = v
    return out


def joint_score(density: np.ndarray, prob_label: np.ndarray) -> np.ndarray:
    """``(1 - density) * prob_label``: sparse and consistent samples score high; ``(N,)`` float32 in [0, 1]."""
    return ((1.0 - np.asarray(density, np.float64)) * np.asarray(prob_label, np.float64)).astype(np.float32)


def _top_fraction(values: np.ndarray, rows: np.ndarray, fraction: float, total: int) -> np.ndarray:
    """The ``round(fraction * total)`` entries of ``rows`` with the highest ``values`` (ties: lower index)."""
    m = min(len(rows), int(round(fraction * total)))
    order = np.argsort(-values[rows], kind="stable")
    return rows[order[:m]]


def assign_regions(density: np.ndarray, joint: np.ndarray, prob_label: np.ndarray, suspect: np.ndarray,
                   labels: np.ndarray) -> np.ndarray:
    """Region of every sample by the rule in the module docstring.

    Args:
        density: ``(N,)`` in [0, 1], 1 = densest within the label.
        joint: ``(N,)`` joint score.
        prob_label: ``(N,)`` probability of the given label (cross-fitted).
        suspect: ``(N,)`` bool, the verdict is not ``clean``: these form the ``noisy`` region.
        labels: ``(N,)`` ints.

    Returns:
        ``(N,)`` object array of ``augment``, ``keep``, ``redundant`` or ``noisy``.
    """
    labels = np.asarray(labels)
    region = np.full(len(labels), REGIONS[KEEP], dtype=object)
    noisy = np.asarray(suspect, bool)
    region[noisy] = REGIONS[NOISY]
    for c in np.unique(labels):
        clean = np.flatnonzero((labels == c) & ~noisy)
        if len(clean) == 0:
            continue
        eligible = clean[prob_label[clean] >= AUGMENT_MIN_PROB]
        augment = _top_fraction(joint, eligible, AUGMENT_FRACTION, len(clean))
        region[augment] = REGIONS[AUGMENT]
        rest = clean[region[clean] == REGIONS[KEEP]]
        region[_top_fraction(density, rest, REDUNDANT_FRACTION, len(clean))] = REGIONS[REDUNDANT]
    return region


@contextmanager
def _timed(seconds: dict[str, float] | None, phase: str) -> Iterator[None]:
    """Add the wall-clock seconds of the ``with`` body to ``seconds[phase]`` (nothing when ``seconds`` is None)."""
    t = time.perf_counter()
    yield
    if seconds is not None:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t


def _judged(prob_label: np.ndarray, labels: np.ndarray, num_classes: int, view: str,
            judge: Callable[[], verdict.Verdict]) -> tuple[verdict.Verdict, str | None]:
    """``(judge(), None)``, or, when the view behind ``prob_label`` is blind (:func:`verdict.blind_note`),
    every label taken as given and the reason, logged once."""
    note = verdict.blind_note(prob_label, labels, view)
    if note is None:
        return judge(), None
    log.warning(note)
    return verdict.no_verdict(labels, num_classes), note


def compute_scores(class_sims: np.ndarray, global_idx: np.ndarray, labels: np.ndarray, scores,
                   trim: np.ndarray | None = None, seconds: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Every per-sample score column of ``scores.parquet`` (except identifiers) from the cores above.

    Args:
        class_sims: ``(N, k)`` similarities to same-label neighbours.
        global_idx: ``(N, k)`` indices of the global neighbours.
        labels: ``(N,)`` ints in ``0..C-1`` (the given labels; the injected truth is never an input).
        scores: the class cosines and probabilities (:class:`~dds.pipeline.adapters.ClassScores`,
            cross-fitted or zero-shot), made block by block.
        trim: ``(N,)`` bool, the first-pass suspects left out of the adapters' second pass; they do not
            vote in the neighbour evidence either. None: found from ``scores`` (:func:`verdict.trim_mask`).
        seconds: when given, the seconds of the phases ``scores`` (density, consistency, agreement,
            joint), ``verdict`` and ``regions`` are added to it.

    Returns:
        Columns density, consistency, margin, knn_agreement, joint, region, pred_label, prob_label,
        status, label_fixed, label_posterior, and ``verdict_note``: None, or why no label was judged
        (:func:`verdict.blind_note`).
    """
    labels = np.asarray(labels)
    with _timed(seconds, "scores"):
        density = local_density(class_sims, labels)
        out = label_scores_blocked(scores, labels)
        out["density"] = density
        out["knn_agreement"] = knn_agreement(global_idx, labels)
        out["joint"] = joint_score(density, out["prob_label"])
    with _timed(seconds, "verdict"):
        def judge() -> verdict.Verdict:
            keep = ~(verdict.trim_mask(verdict.Views.held_out(scores, global_idx, labels), labels)
                     if trim is None else trim)
            return verdict.static_verdict(verdict.Views.held_out(scores, global_idx, labels, keep=keep), labels)

        v, out["verdict_note"] = _judged(out["prob_label"], labels, scores.num_classes, "class scores", judge)
        out["status"], out["label_fixed"] = v.status, v.label_fixed.astype(np.int32)
        out["label_posterior"] = v.label_posterior.astype(np.float32)
    with _timed(seconds, "regions"):
        out["region"] = assign_regions(density, out["joint"], out["prob_label"], v.status != STATUSES[CLEAN], labels)
    return out


def image_scores(img: np.ndarray, labels: np.ndarray, num_classes: int, *, k: int = 10,
                 device: str = "cpu") -> dict[str, np.ndarray]:
    """Scores from image embeddings alone, for data without class-prompt (text) embeddings.

    The same cores as :func:`compute_scores`, with the global neighbours' label votes as the only
    held-out view: ``knn_agreement`` stands in for the label probability, so ``joint =
    (1 - density) * knn_agreement``, and the verdict (:func:`verdict.static_verdict`) reads the
    votes alone.

    Args:
        img: ``(N, D)`` image embeddings (rows are L2-normalised here).
        labels: ``(N,)`` ints in ``0..C-1``.
        num_classes: ``C``.
        k: neighbours per sample, in the per-class and the global graph.
        device: ``cpu`` or ``cuda`` (the kNN search).

    Returns:
        Columns density, knn_agreement, joint (float32), status (object: clean / relabel / suppress),
        label_fixed (int64) and region (object), each ``(N,)``.
    """
    img = np.asarray(img, dtype=np.float32)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels, np.int64)
    class_sims, _ = knn(img, k, labels=labels, device=device)
    _, global_idx = knn(img, k, device=device)
    density = local_density(class_sims, labels)
    agreement = knn_agreement(global_idx, labels)

    def votes(rows: slice) -> tuple[np.ndarray, np.ndarray]:   # one view, served as both
        v = verdict.neighbour_votes(global_idx[rows], labels, num_classes)
        return v, v

    v, _ = _judged(agreement, labels, num_classes, "neighbour votes",
                   lambda: verdict.static_verdict(verdict.Views(len(labels), num_classes, votes), labels))
    joint = joint_score(density, agreement)
    return {"density": density, "knn_agreement": agreement, "joint": joint, "status": v.status,
            "label_fixed": v.label_fixed.astype(np.int64),
            "region": assign_regions(density, joint, agreement, v.status != STATUSES[CLEAN], labels)}


def index_arrays(img: np.ndarray, labels: np.ndarray, text: np.ndarray, *, k: int = 10, use_adapters: bool = True,
                 folds: int = 5, seed: int = 0, device: str = "cpu", backend: str = "auto",
                 progress: bool = False) -> dict[str, Any]:
    """The index stage's compute on arrays: both kNN graphs, the class evidence and every score column.

    ``run_index`` is this plus reading the workspace and writing the tables; ``dds bench-index`` runs it
    on synthetic arrays.

    Args:
        img: ``(N, D)`` float32 L2-normalised image embeddings.
        labels: ``(N,)`` ints in ``0..C-1``.
        text: ``(C, Dt)`` float32 L2-normalised class-prompt embeddings (row c = class c).
        k: neighbours per sample, in both the per-class and the global graph.
        use_adapters: train cross-fitted adapters (``1 + TRIM_PASSES`` passes, trimmed after the first;
            one pass when the first is blind, :func:`verdict.blind_note`); False: zero-shot cosines
            (aligned towers only).
        folds: cross-fitting folds.
        seed: seed of the folds, adapter training and the approximate kNN search.
        device: ``cpu`` or ``cuda``.
        backend: kNN backend of both graphs (:func:`dds.pipeline.knn.knn`); ``auto``: exact up to
            :data:`dds.pipeline.knn.EXACT_MAX_ROWS` rows per searched set, approximate above.
        progress: show the adapters' progress bar.

    Returns:
        ``class_sims``, ``class_idx``, ``global_sims``, ``global_idx`` (``(N, k)`` each), ``scores``
        (:class:`~dds.pipeline.adapters.ClassScores`: class cosines and probabilities on demand),
        ``trim`` (``(N,)`` bool or None), ``cols`` (:func:`compute_scores`),
        ``knn_backend`` (str: the method of the global graph and of the largest class) and ``seconds``
        (phase -> wall-clock seconds: ``knn_class``, ``knn_global``, ``adapters``, ``scores``, ``verdict``,
        ``regions``).
    """
    seconds: dict[str, float] = {}
    with _timed(seconds, "knn_class"):
        class_sims, class_idx = knn(img, k, labels=labels, device=device, backend=backend, seed=seed)
    with _timed(seconds, "knn_global"):
        global_sims, global_idx = knn(img, k, device=device, backend=backend, seed=seed)
        approximate = resolve_backend(backend, device, len(labels)) == "ivf"
        if approximate:  # the exact same-label neighbours replace the ones the approximate search missed
            global_sims, global_idx = merge_graphs((global_sims, global_idx), (class_sims, class_idx))
    largest = int(np.bincount(labels).max()) if len(labels) else 0
    described = (f"global: {describe_backend(backend, device, len(labels))}"
                 f"{' merged with the per-class graph' if approximate else ''}; "
                 f"per class: {describe_backend(backend, device, largest)}")
    with _timed(seconds, "adapters"):
        trim = None
        if use_adapters:  # trimmed passes: each trains without the previous pass's suspects (pipeline/verdict.py)
            fit = adapt.crossfit_adapters(img, labels, text, folds=folds, seed=seed, progress=progress, device=device)
            # a blind first pass judges no label (compute_scores says why), so no trimmed pass is trained
            first = label_scores_blocked(fit.scores, labels)["prob_label"]
            blind = verdict.blind_note(first, labels, "class scores") is not None
            trim = None if blind else verdict.trim_mask(verdict.Views.held_out(fit.scores, global_idx, labels), labels)
            fold = fit.fold
            for p in range(0 if blind else TRIM_PASSES):
                del fit  # its (N, S) embeddings go before the next pass makes its own (ImageNet-1k: 2.6 GB)
                fit = adapt.crossfit_adapters(img, labels, text, folds=folds, seed=seed, progress=progress,
                                              device=device, fold=fold, train_mask=~trim)
                if p + 1 < TRIM_PASSES:  # (no reference to this pass's embeddings outlives the verdict)
                    trim = verdict.static_verdict(verdict.Views.held_out(fit.scores, global_idx, labels, keep=~trim),
                                                  labels).status != STATUSES[CLEAN]
            scores = fit.scores
        else:
            scores = adapt.zero_shot(img, text)
    cols = compute_scores(class_sims, global_idx, labels, scores, trim=trim, seconds=seconds)
    return {"class_sims": class_sims, "class_idx": class_idx, "global_sims": global_sims, "global_idx": global_idx,
            "scores": scores, "trim": trim, "cols": cols, "knn_backend": described,
            "seconds": {p: round(t, 3) for p, t in seconds.items()}}


# ------------------------------------------------------------------------------------------- I/O


def _vectors(table) -> np.ndarray:
    """The ``vector`` list column of an arrow table as an ``(n, D)`` float32 array, rows re-normalised."""
    col = table.column("vector").combine_chunks()
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    x = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norm > 0, norm, 1.0)
    return x


def _read_vectors(paths: list, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The image vectors of ``keys`` from the embedding shards at ``paths``, filled into one array.

    Reads the key columns first, so the ``(n, D)`` float32 result is allocated once at its final size
    and filled shard by shard: no second full copy of the embeddings is ever held.

    Returns:
        ``(img, found)``: ``(n_found, D)`` float32 unit rows in ``keys`` order, and ``(len(keys),)`` bool.
    """
    pos = {k: i for i, k in enumerate(keys)}
    found = np.zeros(len(keys), dtype=bool)
    for path in paths:
        found[[pos[k] for k in pq.read_table(path, columns=["key"]).column("key").to_pylist() if k in pos]] = True
    row = np.cumsum(found) - 1  # position of each found key in the result
    img = None
    for path in paths:
        t = pq.read_table(path, columns=["key", "vector"])
        if t.num_rows == 0:
            continue
        at = np.array([pos.get(k, -1) for k in t.column("key").to_pylist()], dtype=np.int64)
        vec = _vectors(t)
        if img is None:
            img = np.empty((int(found.sum()), vec.shape[1]), np.float32)
        img[row[at[at >= 0]]] = vec[at >= 0]
    return (img if img is not None else np.zeros((0, 0), np.float32)), found


def load_inputs(ws: Workspace, name: str, encoder: str) -> dict[str, Any]:
    """Train samples (in split order), their image vectors, the class text vectors and encoder.json.

    Returns:
        ``keys`` (N,) object, ``labels`` (N,) int64, ``img`` (N, D) float32, ``text`` (C, Dt)
        float32 (row c = class c) and ``encoder_json`` (dict).

    Raises:
        DdsError: if the dataset was not sharded, or not embedded (completely) with ``encoder``.
    """
    info = ws.dataset_info(name)
    hint = f"run `dds embed {name} --encoder {encoder}` first"
    edir = ws.embed_dir(name, encoder)
    if not (edir / "encoder.json").exists() or not (edir / "text.parquet").exists():
        raise DdsError(f"dataset '{name}' has no embeddings for encoder '{encoder}'; {hint}")
    samples = pq.read_table(ws.dataset_dir(name) / "samples.parquet", columns=["key", "split", "label", "shard", "idx"])
    samples = samples.filter(pc.equal(samples["split"], "train")).sort_by("idx")
    if samples.num_rows == 0:
        raise DdsError(f"dataset '{name}' has no train samples to index; shard a train split first")
    shards = list(dict.fromkeys(samples.column("shard").to_pylist()))
    missing = [s for s in shards if not (edir / "shards" / f"{s}.parquet").exists()]
    if missing:
        raise DdsError(f"{len(missing)} of {len(shards)} train shards of '{name}' have no '{encoder}' "
                       f"embeddings (first: {missing[0]}); {hint}")
    keys = samples.column("key").to_pylist()
    img, found = _read_vectors([edir / "shards" / f"{s}.parquet" for s in shards], keys)
    if not found.all():
        log.warning("%d train samples have no embedding (unreadable at embed time); they are not indexed",
                    int((~found).sum()))
    keys = [k for k, ok in zip(keys, found) if ok]
    labels = samples.column("label").to_numpy().astype(np.int64)[found]
    classes = info.get("classes") or []
    text = pq.read_table(edir / "text.parquet", columns=["label", "vector"]).sort_by("label")
    if text.column("label").to_pylist() != list(range(len(classes))):
        raise DdsError(f"text embeddings of '{encoder}' do not cover the {len(classes)} classes of '{name}'; "
                       f"rerun `dds embed {name} --encoder {encoder}`")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DdsError(f"samples of '{name}' carry labels outside 0..{len(classes) - 1}; reshard the dataset")
    return {"keys": np.array(keys, dtype=object), "labels": labels, "img": img, "text": _vectors(text),
            "encoder_json": json.loads((edir / "encoder.json").read_text())}


def _use_adapters(adapters: str, aligned: bool) -> bool:
    if adapters not in ("auto", "on", "off"):
        raise DdsError(f"adapters must be one of auto, on, off, got '{adapters}'")
    if adapters == "off" and not aligned:
        raise DdsError("this encoder's image and text towers are not aligned, so zero-shot scores are "
                       "meaningless; use --adapters auto or on")
    return adapters == "on" or (adapters == "auto" and not aligned)


def _knn_table(name: str, encoder: str, keys: np.ndarray, sims: np.ndarray, idx: np.ndarray, scope: str):
    """Rows of ``knn.parquet`` for one scope; empty neighbour slots are left out."""
    n, k = idx.shape
    valid = (idx >= 0).ravel()
    src = np.repeat(np.arange(n), k)[valid]
    key = pa.array(keys, pa.string())  # taken by index in arrow: no Python string per row
    return pa.table({
        "dataset": pa.array([name] * len(src), pa.string()),
        "encoder": pa.array([encoder] * len(src), pa.string()),
        "key": key.take(pa.array(src)),
        "neighbor": key.take(pa.array(idx.ravel()[valid])),
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)[valid], pa.int32()),
        "similarity": pa.array(sims.ravel()[valid].astype(np.float32), pa.float32()),
        "scope": pa.array([scope] * len(src), pa.string()),
    })


def _probs_column(scores):
    """The ``probs`` list column: each sample's class probabilities, or nulls when ``N x C`` exceeds
    :data:`PROBS_MAX_ELEMENTS` (ImageNet-1k: 1.28M x 1000 would be 5 GB; ``prob_label`` and
    ``pred_label`` are always stored)."""
    n, c = len(scores), scores.num_classes
    if n * c > PROBS_MAX_ELEMENTS:
        return pa.nulls(n, pa.list_(pa.float32()))
    probs = np.empty((n, c), np.float32)
    for rows in scores.blocks():
        probs[rows] = scores.block(rows)[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel(), pa.float32()), c).cast(pa.list_(pa.float32()))


def _scores_table(name: str, encoder: str, keys: np.ndarray, labels: np.ndarray, cols: dict, scores):
    n = len(keys)
    return pa.table({
        "dataset": pa.array([name] * n, pa.string()),
        "encoder": pa.array([encoder] * n, pa.string()),
        "key": pa.array(keys, pa.string()),
        "label": pa.array(labels.astype(np.int32), pa.int32()),
        **{f: pa.array(cols[f].astype(np.float32), pa.float32())
           for f in ("density", "consistency", "margin", "knn_agreement", "joint")},
        "region": pa.array(list(cols["region"]), pa.string()),
        "pred_label": pa.array(cols["pred_label"], pa.int32()),
        "prob_label": pa.array(cols["prob_label"], pa.float32()),
        "probs": _probs_column(scores),
        "status": pa.array(list(cols["status"]), pa.string()),
        "label_fixed": pa.array(cols["label_fixed"], pa.int32()),
        "label_posterior": pa.array(cols["label_posterior"], pa.float32()),
    })


def run_index(ws: Workspace, name: str, *, encoder: str = "lite0-minilm", k: int = 10, adapters: str = "auto",
              folds: int = 5, seed: int = 0, device: str = "auto", backend: str = "auto",
              progress: bool = True) -> dict[str, Any]:
    """Build the kNN graph and the per-sample scores of dataset ``name``'s train split.

    Args:
        ws: the workspace.
        name: dataset name (as given to ``dds shard``).
        encoder: encoder whose embeddings ``dds embed`` wrote.
        k: neighbours per sample, in both the per-class and the global graph.
        adapters: ``auto`` (on for unaligned towers, off for aligned ones), ``on`` or ``off``; with
            adapters on they are trained ``1 + TRIM_PASSES`` times (cross-fitted each time), trimmed
            after the first.
        folds: cross-fitting folds for the adapters (>= 2).
        seed: seed of the folds, of adapter training and of the approximate kNN search (large N only).
        device: ``auto``, ``cpu`` or ``cuda`` (kNN and adapter training).
        backend: kNN backend (:func:`dds.pipeline.knn.knn`); ``auto``: exact up to
            :data:`dds.pipeline.knn.EXACT_MAX_ROWS` rows per searched set, approximate above.
        progress: show progress bars.

    Returns:
        Summary: dataset, encoder, n, classes, k, knn_backend, knn_s, adapters, folds, adapters_s,
        phases_s (phase -> seconds, :func:`index_arrays`), seconds, regions (region -> count),
        status (status -> count), trimmed (samples left out of the adapters' last pass), out (index
        folder), generation (of this index) and train_generation (of the train samples it scored).

    Raises:
        DdsError: bad arguments, the dataset was not sharded / embedded with ``encoder``, or another
            process is re-sharding the dataset or indexing it with ``encoder``.
    """
    if k < 1:
        raise DdsError(f"k must be a positive integer, got {k}")
    if folds < 2:
        raise DdsError(f"folds must be at least 2 (cross-fitting), got {folds}")
    t0 = time.perf_counter()
    dev = str(resolve_device(device))
    ws.dataset_info(name)
    with ws.lock(name, shared=True, holder=f"dds index {name}"):  # the data stays the same while it is read
        train_gen = dataset_generation(ws, name, "train")
        data = load_inputs(ws, name, encoder)
        out = ws.index_dir(name, encoder)
        with ws.lock(out, f"index of '{name}' ({encoder})"):  # one `dds index` per dataset and encoder at a time
            summary = _build(name, encoder, data, out, train_gen, k=k, adapters=adapters, folds=folds, seed=seed,
                             device=dev, backend=backend, progress=progress, t0=t0)
    catalog.refresh(ws)
    log.info("indexed %d samples of %s with %s in %.1f s: %s", summary["n"], name, encoder, summary["seconds"],
             summary["regions"])
    return summary


def _build(name: str, encoder: str, data: dict[str, Any], out, train_gen: str, *, k: int, adapters: str,
           folds: int, seed: int, device: str, backend: str, progress: bool, t0: float) -> dict[str, Any]:
    """Compute the index of :func:`load_inputs`' ``data``, then write and commit it as one generation of ``out``."""
    keys, labels, img, text = data["keys"], data["labels"], data["img"], data["text"]
    if len(labels) < folds:
        raise DdsError(f"'{name}' has {len(labels)} train samples, fewer than --folds {folds}; lower --folds")
    use = _use_adapters(adapters, bool(data["encoder_json"].get("aligned", False)))
    res = index_arrays(img, labels, text, k=k, use_adapters=use, folds=folds, seed=seed, device=device,
                       backend=backend, progress=progress)
    cols, trim, sec = res["cols"], res["trim"], res["seconds"]

    gen = generations.new_generation(out, generations.INDEX_LINKED)
    summary = {"dataset": name, "encoder": encoder, "n": int(len(labels)), "classes": int(len(text)), "k": k,
               "knn_backend": f"{res['knn_backend']} ({device})",
               "knn_s": round(sec["knn_class"] + sec["knn_global"], 2),
               "adapters": "on (cross-fitted)" if use else "off (zero-shot)", "folds": folds if use else 0,
               "adapters_s": round(sec["adapters"], 2), "phases_s": sec, "seed": seed,
               "regions": {r: int((cols["region"] == r).sum()) for r in REGIONS},
               "status": {st: int((cols["status"] == st).sum()) for st in STATUSES},
               "trimmed": int(trim.sum()) if trim is not None else 0,
               "verdict": f"skipped: {cols['verdict_note']}" if cols["verdict_note"] else "judged",
               "thresholds": THRESHOLDS, "out": str(out), "generation": gen.name,
               "train_generation": train_gen}
    try:
        write_parquet(gen / "knn.parquet", pa.concat_tables([
            _knn_table(name, encoder, keys, res["class_sims"], res["class_idx"], "class"),
            _knn_table(name, encoder, keys, res["global_sims"], res["global_idx"], "global")]))
        write_parquet(gen / "scores.parquet", _scores_table(name, encoder, keys, labels, cols, res["scores"]))
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(gen / "index.json", summary)
        generations.commit(out, gen, generations.INDEX_LINKED)
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    return summary
