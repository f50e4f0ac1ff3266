"""The workspace's tables: where each lives, its columns (the one home of every schema), and readers.

``TABLES`` maps each catalog view to the parquet files that hold it and the full schema its writers
produce; the catalog's views, empty or not, always have every column listed here. ``REGIONS`` and
``STATUSES`` are the values of the scores table's ``region`` and ``status`` columns. The readers
below (runs, epochs, history, train samples, scores) are what the stages after training share.
"""
from __future__ import annotations

import difflib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dds.errors import DdsError
from dds.workspace import Workspace, pid_alive

_s, _i32, _i64, _f32, _f64, _b = pa.string(), pa.int32(), pa.int64(), pa.float32(), pa.float64(), pa.bool_()


@dataclass(frozen=True)
class Table:
    """One catalog view: its files (a glob relative to the workspace) and its schema."""

    pattern: str
    schema: pa.Schema


def _schema(*cols: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(cols))


SAMPLES_SCHEMA = _schema(("dataset", _s), ("key", _s), ("split", _s), ("label", _i32), ("label_orig", _i32),
                         ("shard", _s), ("idx", _i64), ("source", _s), ("image_sha", _s))
SHARDS_SCHEMA = _schema(("dataset", _s), ("split", _s), ("shard", _s), ("path", _s), ("count", _i64), ("sha256", _s))
REJECTS_SCHEMA = _schema(("dataset", _s), ("source", _s), ("reason", _s), ("split", _s))

TABLES: dict[str, Table] = {
    "datasets": Table("datasets/*/dataset.parquet", _schema(
        ("name", _s), ("num_samples", _i64), ("num_classes", _i32), ("classes", pa.list_(_s)), ("source", _s),
        ("generation", _s))),
    "samples": Table("datasets/*/samples.parquet", SAMPLES_SCHEMA),
    "shards": Table("datasets/*/shards.parquet", SHARDS_SCHEMA),
    "rejects": Table("datasets/*/rejects.parquet", REJECTS_SCHEMA),
    "embeddings": Table("datasets/*/embed/*/shards/*.parquet", _schema(
        ("dataset", _s), ("encoder", _s), ("key", _s), ("label", _i32), ("vector", pa.list_(_f32)))),
    "text_embeddings": Table("datasets/*/embed/*/text.parquet", _schema(
        ("dataset", _s), ("encoder", _s), ("label", _i32), ("class_name", _s), ("vector", pa.list_(_f32)))),
    "knn": Table("datasets/*/index/*/knn.parquet", _schema(
        ("dataset", _s), ("encoder", _s), ("key", _s), ("neighbor", _s), ("rank", _i32), ("similarity", _f32),
        ("scope", _s))),
    "scores": Table("datasets/*/index/*/scores.parquet", _schema(
        ("dataset", _s), ("encoder", _s), ("key", _s), ("label", _i32), ("density", _f32), ("consistency", _f32),
        ("margin", _f32), ("knn_agreement", _f32), ("joint", _f32), ("region", _s), ("pred_label", _i32),
        ("prob_label", _f32), ("probs", pa.list_(_f32)), ("status", _s), ("label_fixed", _i32),
        ("label_posterior", _f32))),
    "runs": Table("runs/*/run.parquet", _schema(
        ("run_id", _s), ("dataset", _s), ("policy", _s), ("budget", _f64), ("epochs", _i32), ("seed", _i32),
        ("status", _s), ("config", _s), ("model", _s), ("budget_spent", _f64), ("sample_steps", _i64),
        ("total_sample_steps", _i64), ("steps", _i64), ("total_steps", _i64), ("follows_budget", _b),
        ("epochs_done", _i32), ("test_acc", _f64), ("data_s", _f64), ("compute_s", _f64), ("select_s", _f64),
        ("eval_s", _f64), ("wall_s", _f64), ("train_s", _f64), ("updated", _s), ("pid", _i64), ("host", _s),
        ("dataset_generation", _s), ("index_generation", _s), ("reason", _s))),
    "epochs": Table("runs/*/epochs/*.parquet", _schema(
        ("run_id", _s), ("epoch", _i32), ("selected", _i64), ("sample_steps", _i64), ("train_loss", _f64),
        ("test_acc", _f64), ("wall_s", _f64), ("data_s", _f64), ("compute_s", _f64), ("select_s", _f64),
        ("eval_s", _f64), ("lr_first", _f64), ("lr_last", _f64), ("steps", _i64), ("total_steps", _i64),
        ("samples_done", _i64), ("budget_spent", _f64), ("held_out_gap", _f64))),
    "history": Table("runs/*/history/*.parquet", _schema(
        ("run_id", _s), ("epoch", _i32), ("key", _s), ("selected", _b), ("count", _i32), ("weight", _f32),
        ("aug", _s), ("magnitude", _f32), ("loss", _f32), ("label_used", _i32), ("status", _s))),
    "bench": Table("bench/*.parquet", _schema(
        ("bench_id", _s), ("dataset", _s), ("policy", _s), ("budget", _f64), ("seeds", _i32), ("model", _s),
        ("eval_split", _s), ("acc_mean", _f64), ("acc_std", _f64), ("budget_spent", _f64), ("wall_ratio", _f64),
        ("wall_ratio_eval", _f64), ("select_s", _f64), ("train_s", _f64), ("eval_s", _f64), ("accs", pa.list_(_f64)),
        ("lossless_budget", _f64), ("run_ids", pa.list_(_s)), ("wall_ratio_min", _f64), ("wall_ratio_max", _f64),
        ("orders", pa.list_(_i32)))),
}


# ---------------------------------------------------------------- the scores vocabulary

#: ``scores.region`` values, in code order: ``SampleInfo.region`` holds their positions (int8 codes).
REGIONS: tuple[str, ...] = ("augment", "keep", "redundant", "noisy")
AUGMENT, KEEP, REDUNDANT, NOISY = range(len(REGIONS))
#: ``scores.status`` values (the label verdicts of ``dds index``), in code order: ``SampleInfo.status``
#: holds their positions.
STATUSES: tuple[str, ...] = ("clean", "relabel", "suppress")
CLEAN, RELABEL, SUPPRESS = range(len(STATUSES))


def _encode(names: Any, known: tuple[str, ...], what: str) -> np.ndarray:
    arr = np.asarray(names).astype(str)
    codes = np.full(arr.shape, -1, dtype=np.int8)
    for code, name in enumerate(known):
        codes[arr == name] = code
    if (codes < 0).any():
        bad = sorted(set(arr[codes < 0].tolist()))[:5]
        raise DdsError(f"unknown {what} value(s) {bad}; known: {', '.join(known)}")
    return codes


def encode_regions(names: Any) -> np.ndarray:
    """Region names (as in the ``scores`` table) -> int8 codes into ``REGIONS``.

    Args:
        names: (N,) strings, each one of ``REGIONS``.

    Returns:
        (N,) int8 codes.

    Raises:
        DdsError: a name is not a region.
    """
    return _encode(names, REGIONS, "region")


def encode_status(names: Any) -> np.ndarray:
    """Verdict names (``scores.status``: clean, relabel, suppress) -> int8 codes into ``STATUSES``."""
    return _encode(names, STATUSES, "status")


def table_files(ws: Workspace, name: str) -> list[Path]:
    """The parquet files of table ``name`` (links resolved to existing files only), sorted."""
    return sorted(p for p in ws.root.glob(TABLES[name].pattern) if p.is_file())


# ---------------------------------------------------------------- checks on the samples table

#: share of an evaluation split whose images may repeat train images before the split is refused: more
#: looks like the train folder sharded again; real datasets hold a few exact duplicates (`dds shard` drops them)
MAX_SHARED = 0.5


def shared_images(samples, split: str, other: str = "train") -> int:
    """How many samples of ``split`` have the same image (``image_sha``) as a sample of ``other``.

    Args:
        samples: a samples table (pyarrow or pandas) with ``split`` and ``image_sha``; rows without
            a hash (tables written before it existed) are not compared.
    """
    df = samples.to_pandas() if isinstance(samples, pa.Table) else samples
    if "image_sha" not in df:
        return 0
    df = df[df["image_sha"].notna()]
    seen = set(df.loc[df["split"] == other, "image_sha"])
    return int(df.loc[df["split"] == split, "image_sha"].isin(seen).sum())


def check_shared(split: str, shared: int, n: int, name: str) -> None:
    """Refuse an evaluation ``split`` of ``n`` images of which ``shared`` are train images, when that is most of it.

    Raises:
        DdsError: ``shared`` is more than ``MAX_SHARED`` of ``n`` (the same images sharded as train and as ``split``).
    """
    if shared > MAX_SHARED * n:
        raise DdsError(f"{shared} of the {n} {split} images of dataset '{name}' are also train images, so "
                       f"{split} accuracy would measure memory; shard held-out images as {split} (never the "
                       "train folder), or carve a val split off train with --val N")


def check_disjoint_splits(samples, name: str) -> None:
    """Refuse a test or val split that repeats the train images (e.g. the train folder sharded as test);
    warn, with the count, about a split that repeats a few.

    Raises:
        DdsError: more than ``MAX_SHARED`` of an evaluation split's images are train images.
    """
    import logging

    df = samples.to_pandas() if isinstance(samples, pa.Table) else samples
    for split in ("test", "val"):
        n = int((df["split"] == split).sum())
        shared = shared_images(df, split) if n else 0
        check_shared(split, shared, n, name)
        if shared:
            logging.getLogger(__name__).warning(
                "%d of the %d %s images of %s repeat train images exactly and count in %s accuracy; sharding "
                "the %s split again with --overlap drop (the default) leaves them out", shared, n, split, name, split, split)


# ---------------------------------------------------------------- readers of run outputs

def stale_run_ids(rows: list[dict], host: str | None = None) -> set[str]:
    """Runs marked ``running`` whose process is gone: same host, and no process with that pid.

    Rows without ``pid`` (older runs) or from another host are left as they are.
    """
    host = host or socket.gethostname()
    stale = set()
    for r in rows:
        if r.get("status") == "running" and r.get("pid") is not None and r.get("host") == host:
            if not pid_alive(int(r["pid"])):
                stale.add(r["run_id"])
    return stale


def load_run(ws: Workspace, run_id: str) -> dict[str, Any]:
    """The ``run.json`` row of ``run_id`` with ``config`` parsed into a dict.

    Raises:
        DdsError: no such run (the message lists close or recent run ids).
    """
    path = ws.run_dir(run_id) / "run.json"
    if "/" in run_id or not path.exists():
        known = sorted(p.parent.name for p in (ws.root / "runs").glob("*/run.json"))
        close = difflib.get_close_matches(run_id, known, n=3)
        hint = f"; did you mean {', '.join(close)}" if close else (
            f"; runs here: {', '.join(known[-5:])}" if known else "; train one with `dds train NAME`")
        raise DdsError(f"unknown run id '{run_id}' in workspace {ws.root}{hint}")
    row = json.loads(path.read_text())
    if stale_run_ids([row]):
        row["status"] = "stale"
    row["config"] = json.loads(row["config"]) if isinstance(row.get("config"), str) else dict(row.get("config") or {})
    return row


def _read_dir(folder: Path, columns: list[str] | None = None):
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=columns or [])
    return pd.concat([pq.read_table(f, columns=columns).to_pandas() for f in files], ignore_index=True)


def load_epochs(ws: Workspace, run_id: str):
    """The run's ``epochs`` rows (pandas), sorted by epoch."""
    df = _read_dir(ws.run_dir(run_id) / "epochs")
    return df.sort_values("epoch").reset_index(drop=True) if len(df) else df


def load_history(ws: Workspace, run_id: str):
    """The run's ``history`` rows (pandas: epoch, key, selected, weight, aug, loss, status)."""
    return _read_dir(ws.run_dir(run_id) / "history", ["epoch", "key", "selected", "weight", "aug", "loss", "status"])


def trained_rows(hist) -> np.ndarray:
    """(R,) bool: the ``history`` rows whose sample was trained, i.e. selected at a loss weight above 0.
    ``dds``'s held-out probes (``strong_aug=gap``) are selected at weight 0: measured, not trained."""
    return hist["selected"].to_numpy(bool) & (hist["weight"].to_numpy(np.float64, na_value=0.0) > 0)


def load_train_samples(ws: Workspace, dataset: str):
    """Train rows of ``samples.parquet`` (key, label, label_orig, shard, idx) in idx order."""
    ws.dataset_info(dataset)  # a clear error when the dataset is gone
    return ws.split_samples(dataset, "train", ["key", "label", "label_orig", "shard"])


def load_scores(ws: Workspace, dataset: str, encoder: str, columns: list[str] | None = None):
    """The ``scores`` rows of ``dataset`` under ``encoder`` (pandas), or None when it was never indexed.

    The file is opened once, through the index folder's fixed link into its generation in use, so the
    schema and the rows come from one generation even while ``dds index`` commits a new one.

    Args:
        columns: the columns to read (None: all); those the file lacks are left out (tables written
            before the label verdict have no ``status``, ``label_fixed``, ``label_posterior``).
    """
    import pyarrow.parquet as pq

    path = ws.index_dir(dataset, encoder) / "scores.parquet"
    if not path.exists():
        return None
    with pq.ParquetFile(path) as f:
        have = f.schema_arrow.names
        return f.read(columns=None if columns is None else [c for c in columns if c in have]).to_pandas()


# ---------------------------------------------------------------- generations a run is bound to

def dataset_generation(ws: Workspace, name: str, split: str | None = None) -> str:
    """The id of dataset ``name``'s generation in use (:func:`dds.generations.content_id`).

    Args:
        split: None for the whole dataset (``dataset.json``'s ``generation``, or for a dataset sharded
            before ids were recorded the same hash of its samples table); a split name for the id of
            that split's rows alone (what ``dds index`` records for the train samples it scored).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dds.generations import content_id

    info = ws.dataset_info(name)
    if split is None and info.get("generation"):
        return info["generation"]
    samples = pq.read_table(ws.dataset_dir(name) / "samples.parquet")
    return content_id(samples if split is None else samples.filter(pc.equal(samples["split"], split)))


def index_info(ws: Workspace, name: str, encoder: str) -> dict[str, Any]:
    """``index.json`` of ``name`` under ``encoder`` (its ``generation`` and ``train_generation``), or {}."""
    path = ws.index_dir(name, encoder) / "index.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check_index_current(ws: Workspace, name: str, encoder: str) -> None:
    """Refuse scores computed on other train samples than the dataset's generation in use holds.

    Raises:
        DdsError: ``index.json`` records a train generation other than the current one.
    """
    made_on = index_info(ws, name, encoder).get("train_generation")
    now = dataset_generation(ws, name, "train")
    if made_on and made_on != now:
        raise DdsError(f"the scores of '{name}' ({encoder}) were computed on train samples of generation {made_on}, "
                       f"but the dataset now holds {now} (re-sharded since); run `dds index {name} --encoder "
                       f"{encoder}` again")


def check_run_data(ws: Workspace, run: dict[str, Any]) -> None:
    """Refuse to resume a run, or read its dataset or scores, when they are no longer the generations
    it trained on.

    Args:
        run: a :func:`load_run` row (run_id, dataset, config's encoder, dataset_generation and
            index_generation); runs that recorded no generation (older runs) pass.

    Raises:
        DdsError: the dataset was re-sharded, or its index rebuilt, since the run trained on it.
    """
    ds, rid = run["dataset"], run["run_id"]
    used, now = run.get("dataset_generation"), dataset_generation(ws, ds)
    if used and used != now:
        raise DdsError(f"run {rid} trained on generation {used} of dataset '{ds}', but '{ds}' now holds generation "
                       f"{now} (re-sharded since), so its data is not the run's: re-shard '{ds}' back to the data "
                       f"the run used, or start a new run (dds train {ds})")
    encoder = run["config"].get("encoder", "lite0-minilm")
    used, now = run.get("index_generation"), index_info(ws, ds, encoder).get("generation")
    if used and used != now:
        raise DdsError(f"run {rid} selected by index generation {used} of '{ds}' ({encoder}), but the index now "
                       f"holds {now or 'nothing'} (`dds index` ran since), so its scores are not the run's: start a "
                       f"new run (dds train {ds})")
