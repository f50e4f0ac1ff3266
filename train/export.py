"""``dds export RUN_ID --budget F``: a run's history and scores as a static subset (a coreset).

:func:`select_coreset` picks exactly ``round(F * N)`` of the N train samples: class quotas
proportional to the class sizes (largest remainder; a class short of eligible samples passes its
shortfall on to the others), ``noisy`` samples only once the others run out (class-balanced in the
same way), and within a class by ``times_selected``, then ``joint`` (both descending), then
``samples.idx``; for a ``full`` run ``joint`` decides. Weights are 1 (``uniform``) or ``N_c / n_c``
(``class``), so a weighted loss sees the dataset's class proportions even where the quotas deviate.
The output is a parquet file (key, label, weight, region, times_selected, mean_loss: the mean
history loss over the epochs the sample was selected, null if never) and, optionally, WebDataset
shards that ``dds shard "tar:DIR/*.tar"`` reads back as a new dataset (docs/report.md).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dds._validate import check_choice, check_fraction, check_positive_int
from dds.errors import DdsError
from dds.selector._core import capped_quotas
from dds.shards import ShardWriter, iter_tar_samples, shard_rows
from dds.tables import (NOISY, REGIONS, check_run_data, load_history, load_run, load_scores, load_train_samples,
                        trained_rows)
from dds.workspace import Workspace, temp_path, write_parquet

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "class")


# ---------------------------------------------------------------- pure cores

def rank_within_class(times_selected: np.ndarray, joint: np.ndarray) -> np.ndarray:
    """Order of the samples, best first: times_selected desc, then joint desc, then position.

    Args:
        times_selected: (N,) int; joint: (N,) float (zeros when there are no scores).

    Returns:
        (N,) int64 permutation.
    """
    return np.lexsort((np.arange(len(joint)), -np.asarray(joint, np.float64),
                       -np.asarray(times_selected, np.int64)))


def select_coreset(labels: np.ndarray, num_classes: int, noisy: np.ndarray, times_selected: np.ndarray,
                   joint: np.ndarray, budget: float) -> np.ndarray:
    """Positions of exactly ``round(budget * N)`` samples (see the module docstring for the rule).

    Args:
        labels: (N,) int training labels; num_classes: C.
        noisy: (N,) bool, in the ``noisy`` region; times_selected: (N,) int; joint: (N,) float.
        budget: fraction F in (0, 1].

    Returns:
        (round(F * N),) int64 positions, sorted.

    Raises:
        DdsError: F outside (0, 1] or round(F * N) == 0.
    """
    check_fraction("--budget", budget)
    labels = np.asarray(labels, np.int64)
    n_total = len(labels)
    n = int(round(budget * n_total))
    if n < 1:
        raise DdsError(f"--budget {budget} of {n_total} samples rounds to 0 samples; raise --budget")
    order = rank_within_class(times_selected, joint)
    sizes = np.bincount(labels, minlength=num_classes)
    chosen: list[np.ndarray] = []
    for pool in (~np.asarray(noisy, bool), np.asarray(noisy, bool)):  # non-noisy first, noisy only to fill
        ranked = order[pool[order]]
        capacity = np.bincount(labels[ranked], minlength=num_classes)
        want = min(n - sum(len(c) for c in chosen), int(capacity.sum()))
        quota = capped_quotas(want, sizes, capacity)  # proportional to N_c, a short class's gap re-shared
        for c in range(num_classes):
            chosen.append(ranked[labels[ranked] == c][:quota[c]])
    out = np.sort(np.concatenate(chosen))
    if len(out) != n:  # cannot happen: the two pools hold all N >= n samples
        raise RuntimeError(f"coreset has {len(out)} samples, expected {n}")
    return out


def coreset_weights(labels: np.ndarray, chosen: np.ndarray, num_classes: int, weighting: str) -> np.ndarray:
    """(len(chosen),) float32 weights: 1, or N_c / n_c for ``weighting="class"``."""
    if weighting == "uniform":
        return np.ones(len(chosen), np.float32)
    sizes = np.bincount(labels, minlength=num_classes).astype(np.float64)
    taken = np.bincount(labels[chosen], minlength=num_classes).astype(np.float64)
    return (sizes / np.maximum(taken, 1))[labels[chosen]].astype(np.float32)


def selection_stats(selected: np.ndarray, loss: np.ndarray, positions: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """Times selected and mean loss over the selected epochs, per sample.

    Args:
        selected: (R,) bool, one history row each (any epochs);
        loss: (R,) float (NaN when not selected); positions: (R,) int sample position of each row;
        n: number of samples N.

    Returns:
        ``(times_selected (N,) int64, mean_loss (N,) float64, NaN if never selected)``.
    """
    selected = np.asarray(selected, bool)
    pos = np.asarray(positions, np.int64)[selected]
    times = np.bincount(pos, minlength=n)
    total = np.bincount(pos, weights=np.asarray(loss, np.float64)[selected], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(times > 0, total / times, np.nan)
    return times.astype(np.int64), mean


# ---------------------------------------------------------------- I/O edge

def _check_no_tars(folder: Path) -> None:
    """Refuse a shards folder that holds tars: `dds shard "tar:DIR/*.tar"` would read the union of two exports."""
    old = sorted(p.name for p in folder.glob("*.tar")) if folder.is_dir() else []
    if old:
        raise DdsError(f"--shards {folder} already holds {len(old)} tar(s) ({old[0]}, ...); "
                       "give an empty or new folder")


def write_subset_shards(ws: Workspace, dataset: str, samples, keys: list[str], out: Path, *,
                        shard_size: int = 5000) -> list[str]:
    """Write the train samples ``keys`` as ``out/train-{i:06d}.tar`` and copy the dataset's test tars.

    Each sample keeps its key and PNG bytes; ``.cls`` is its training label and ``.txt`` its class name.
    Every tar is written under a unique temporary name and renamed once complete. Returns the paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    classes = ws.dataset_info(dataset)["classes"]
    wanted = dict(zip(samples["key"], samples["label"]))
    wanted = {k: int(wanted[k]) for k in keys}
    stems = set(samples.loc[samples["key"].isin(wanted), "shard"])
    with ShardWriter(out, "train", shard_size) as writer:
        for row in shard_rows(ws, dataset, ["train"]):
            if row["shard"] not in stems:
                continue
            for key, members in iter_tar_samples(row["url"]):
                if key in wanted and "png" in members:
                    label = wanted[key]
                    writer.add(key, {"png": members["png"], "cls": str(label).encode(),
                                     "txt": str(classes[label]).encode()})
        written = [str(out / f"{r['shard']}.tar") for r in writer.close()]
    for test in [r["url"] for r in shard_rows(ws, dataset, ["test"])]:
        tmp = temp_path(out / test.name)
        shutil.copyfile(test, tmp)
        os.replace(tmp, out / test.name)
        written.append(str(out / test.name))
    return written


def run_export(ws: Workspace, run_id: str, budget: float, out: str | Path, *, weighting: str = "uniform",
               shards: str | Path | None = None, shard_size: int = 5000) -> dict[str, Any]:
    """Export ``round(budget * N)`` samples of ``run_id``'s dataset as a static weighted subset.

    Args:
        ws: the workspace.
        run_id: the run whose history (times selected, losses) ranks the samples.
        budget: fraction F of the N train samples, in (0, 1].
        out: parquet file to write (key, label, weight, region, times_selected, mean_loss).
        weighting: "uniform" (weight 1) or "class" (N_c / n_c).
        shards: folder for new WebDataset shards of the subset (plus the test tars), or None.
        shard_size: samples per new tar.

    Returns:
        {"out", "samples", "of", "budget", "per_class", "noisy_included", "weighting", "shards"}.

    Raises:
        DdsError: unknown run, budget outside (0, 1], unknown weighting, a run without history, a run
            whose dataset or index was replaced since it trained, or ``out`` / ``shards`` inside the
            workspace's own files.
    """
    check_fraction("--budget", budget)
    check_choice("--weights", weighting, WEIGHTINGS)
    check_positive_int("--shard-size", shard_size)
    out = ws.check_output(out, "--out")
    shards = ws.check_output(shards, "--shards") if shards else None
    if shards:
        _check_no_tars(shards)   # before anything is written
    run = load_run(ws, run_id)
    with ws.lock(run["dataset"], shared=True, holder=f"dds export {run_id}"):   # the data stays as checked
        check_run_data(ws, run)
        dataset, encoder = run["dataset"], run["config"].get("encoder", "lite0-minilm")
        samples = load_train_samples(ws, dataset)
        hist = load_history(ws, run_id)
        if not len(hist):
            raise DdsError(f"run {run_id} has no epochs in its history yet; export it after its first epoch")
        n, num_classes = len(samples), len(ws.dataset_info(dataset)["classes"])
        position = hist["key"].map(dict(zip(samples["key"], range(n))))
        hist = hist[position.notna()]
        times, mean_loss = selection_stats(trained_rows(hist),
                                           hist["loss"].to_numpy(np.float64, na_value=np.nan),
                                           position.dropna().to_numpy(np.int64), n)
        scores = load_scores(ws, dataset, encoder)
        if scores is None:
            log.warning("no scores of %s under %s: ranking by times selected only, no noisy region excluded",
                        dataset, encoder)
            joint, region = np.zeros(n), np.full(n, None, dtype=object)
        else:
            s = samples[["key"]].merge(scores[["key", "joint", "region"]], on="key", how="left")
            joint, region = s["joint"].fillna(0.0).to_numpy(np.float64), s["region"].to_numpy(object)
        labels = samples["label"].to_numpy(np.int64)
        noisy = region == REGIONS[NOISY]
        chosen = select_coreset(labels, num_classes, noisy, times, joint, budget)

        table = pa.table({"key": pa.array(samples["key"].to_numpy()[chosen].astype(str)),
                          "label": pa.array(labels[chosen].astype(np.int32)),
                          "weight": pa.array(coreset_weights(labels, chosen, num_classes, weighting)),
                          "region": pa.array(region[chosen].tolist(), pa.string()),
                          "times_selected": pa.array(times[chosen].astype(np.int32)),
                          "mean_loss": pa.array(mean_loss[chosen].astype(np.float32),
                                                mask=np.isnan(mean_loss[chosen]))})
        write_parquet(out, table)
        written = write_subset_shards(ws, dataset, samples, table["key"].to_pylist(), shards,
                                      shard_size=shard_size) if shards else []
        return {"out": str(out), "samples": len(chosen), "of": n, "budget": float(budget),
                "per_class": np.bincount(labels[chosen], minlength=num_classes).tolist(),
                "noisy_included": int(noisy[chosen].sum()), "weighting": weighting,
                "shards": written}
