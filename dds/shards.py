"""Reading the WebDataset tars of a sharded dataset: the one reader every stage uses.

A tar holds ``KEY.png`` + ``KEY.cls`` (and optionally ``KEY.txt``) per sample, members of one sample
next to each other. Paths come from ``shards.parquet`` (relative to the dataset folder), so
readers follow the generation in use (:mod:`dds.generations`).
"""
from __future__ import annotations

import os
import tarfile
import zlib
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from dds.errors import DdsError
from dds.workspace import Workspace


#: the largest label a ``.cls`` may give: labels are int32 in the samples table
MAX_LABEL = 2**31 - 1


def parse_label(data: bytes) -> int:
    """A ``.cls`` member as a class index.

    Raises:
        ValueError: not a decimal integer, or beyond ``MAX_LABEL``.
    """
    text = data.decode("ascii").strip()
    label = int(text)
    if abs(label) > MAX_LABEL:
        raise ValueError(f"label {text[:24]}{'...' if len(text) > 24 else ''} is beyond {MAX_LABEL}")
    return label


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of a WebDataset tar, in tar order.

    The key is the member name up to the first dot (``train-0000042.png`` -> ``train-0000042``).
    The tar must be whole: it ends with the end-of-archive blocks every tar writer adds. Kept over
    ``webdataset``'s reader because it read the same 20k-sample shards faster: 5,589 samples/s against
    5,161 (benchmarks/tar_read.py, docs/pipeline.md).

    Raises:
        DdsError: the tar is truncated or corrupt (the message names it and the last member read).
    """
    key, members, last = None, {}, None
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                last = m.name
                if not m.isfile():
                    continue
                k, _, ext = os.path.basename(m.name).partition(".")
                data = tf.extractfile(m).read()
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext.lower()] = data
            if tf.offset + 2 * tarfile.BLOCKSIZE > os.path.getsize(path):  # stream mode ends silently on a cut
                raise tarfile.ReadError("no end-of-archive marker: the file is cut short")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        where = f"after member {last}" if last else "at its start"
        raise DdsError(f"shard {path} is truncated or corrupt {where} ({e}); re-run `dds shard` for this "
                       "dataset") from None
    if key is not None:
        yield key, members


def shard_rows(ws: Workspace, name: str, splits: Iterable[str] | None = None) -> list[dict]:
    """Rows of ``shards.parquet`` (split, shard, path, count, sha256) of ``splits`` (all when None), in
    split then shard order, each with ``url``: the tar's absolute path.

    Raises:
        DdsError: the dataset has no shard index (never sharded).
    """
    ddir = ws.dataset_dir(name)
    index = ddir / "shards.parquet"
    if not index.exists():
        raise DdsError(f"dataset '{name}' has no shards.parquet in {ddir}; run `dds shard SOURCE --name {name}` first")
    rows = pq.read_table(index).to_pylist()
    order = list(splits) if splits is not None else sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] in order]
    rows.sort(key=lambda r: (order.index(r["split"]), r["shard"]))
    return [{**r, "url": ddir / r["path"]} for r in rows]


def read_images(ws: Workspace, name: str, keys: Iterable[str], samples) -> dict[str, bytes]:
    """PNG bytes of ``keys``, reading only the shards that hold them.

    Args:
        samples: the samples rows (pandas, with ``key`` and ``shard``) that say which shard holds a key.
    """
    wanted = set(keys)
    stems = set(samples.loc[samples["key"].isin(wanted), "shard"])
    out: dict[str, bytes] = {}
    for row in shard_rows(ws, name):
        if row["shard"] not in stems:
            continue
        for key, members in iter_tar_samples(row["url"]):
            if key in wanted and "png" in members:
                out[key] = members["png"]
    return out

