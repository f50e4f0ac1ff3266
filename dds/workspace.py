"""The workspace folder: where every stage reads and writes, and how files are written atomically.

Layout (all data is parquet, written by atomic rename; ``catalog.duckdb`` holds only views)::

    WORKSPACE/
      catalog.duckdb                      views over the parquet files below
      datasets/NAME/
        dataset.json                      name, classes, manifest, source, per-split counts
        shards/SPLIT-000000.tar           WebDataset shards (KEY.png + KEY.cls)
        shards.parquet                    shard index: split, shard, path, count, sha256
        samples.parquet                   one row per sample (samples table)
        rejects.parquet                   unreadable inputs (rejects table)
        embed/ENCODER_SLUG/
          encoder.json                    encoder name, weights, dim, normalisation
          text.parquet                    one row per class: prompt-averaged text embedding
          shards/SHARD.parquet            one per shard: key, label, vector
        index/ENCODER_SLUG/
          knn.parquet, scores.parquet
      runs/RUN_ID/
        run.json, run.parquet             runs table row (config as json)
        epochs/EPOCH.parquet              epochs table rows
        history/EPOCH.parquet             history table rows
        checkpoint.pt
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dds.errors import DdsError

DEFAULT_WORKSPACE = "./dds-work"


def slug(name: str) -> str:
    """A file-system safe form of an encoder or dataset name (``openclip:ViT-B-32/x`` -> ``openclip_ViT-B-32_x``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace folder. Creating it does not touch the disk."""

    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        """``path``, else ``$DDS_WORKSPACE``, else ``./dds-work``."""
        return cls(Path(path or os.environ.get("DDS_WORKSPACE") or DEFAULT_WORKSPACE).resolve())

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def dataset_dir(self, name: str) -> Path:
        return self.root / "datasets" / slug(name)

    def shards_dir(self, name: str) -> Path:
        return self.dataset_dir(name) / "shards"

    def embed_dir(self, name: str, encoder: str) -> Path:
        return self.dataset_dir(name) / "embed" / slug(encoder)

    def index_dir(self, name: str, encoder: str) -> Path:
        return self.dataset_dir(name) / "index" / slug(encoder)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def dataset_info(self, name: str) -> dict[str, Any]:
        """The ``dataset.json`` written by ``dds shard``; a clear error if the dataset was never sharded."""
        path = self.dataset_dir(name) / "dataset.json"
        if not path.exists():
            known = sorted(p.name for p in (self.root / "datasets").glob("*") if (p / "dataset.json").exists())
            listing = f"; sharded datasets here: {', '.join(known)}" if known else ""
            raise DdsError(
                f"dataset '{name}' is not in workspace {self.root}{listing}; run `dds shard SOURCE --name {name}` first"
            )
        return json.loads(path.read_text())

    def split_samples(self, name: str, split: str, columns: list[str]):
        """Rows of ``samples.parquet`` for one split, in ``idx`` order, as a pandas DataFrame.

        Args:
            columns: columns to read besides ``split`` and ``idx`` (always read).
        """
        import pyarrow.parquet as pq

        cols = list(dict.fromkeys([*columns, "split", "idx"]))
        df = pq.read_table(self.dataset_dir(name) / "samples.parquet", columns=cols).to_pandas()
        return df[df["split"] == split].sort_values("idx").reset_index(drop=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` + ``os.replace`` so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_parquet(path: Path, table) -> None:
    """Write a ``pyarrow.Table`` (or a dict of columns) to ``path`` atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table, dict):
        table = pa.table(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
