"""Reading and writing the WebDataset tars of a sharded dataset: the one reader and the one writer every stage uses.

A tar holds ``KEY.png`` + ``KEY.cls`` (and optionally ``KEY.txt``) per sample, members of one sample
next to each other. Paths come from ``shards.parquet`` (relative to the dataset folder), so
readers follow the generation in use (:mod:`dds.generations`).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator

import pyarrow.parquet as pq

from dds.errors import DdsError
from dds.workspace import Workspace, temp_path


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
            # stream mode ends silently on a cut file or a damaged header: the end-of-archive blocks must follow
            with open(path, "rb") as f:
                f.seek(tf.offset)
                tail = f.read(2 * tarfile.BLOCKSIZE)
            if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
                raise tarfile.ReadError("no end-of-archive marker where the members end: the file is cut short "
                                        "or a member header is damaged")
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


# ---------------------------------------------------------------- writing

class TarWriter:
    """One tar written atomically: members go to a unique temporary name beside ``path``, which
    :meth:`commit` fsyncs and renames to ``path``; leaving the ``with`` block without a commit removes it.

    Headers are fixed (ustar, mtime 0, uid/gid 0, mode 0444), so equal content gives equal bytes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.count = 0  # samples added
        self._tmp = temp_path(self.path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: a ``KEY.EXT`` member per ``EXT: bytes`` of ``members``, in their order."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> str:
        """Finish the tar and make it ``path``; returns its sha256 (hex)."""
        self._tar.close()
        with open(self._tmp, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        return sha

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


class ShardWriter:
    """Writes samples into ``{split}-{i:06d}.tar`` files of ``shard_size`` samples each in ``out_dir``,
    each through a :class:`TarWriter`.

    Use it in a ``with`` block: a failure leaves no temporary of the open tar behind.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.shards: list[dict[str, Any]] = []  # one row per committed tar: shard (stem), count, sha256
        self._tar: TarWriter | None = None

    def add(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample (``{EXT: bytes}``); returns the stem of the tar it went into."""
        stem = f"{self.split}-{len(self.shards):06d}"
        if self._tar is None:
            self._tar = TarWriter(self.out_dir / f"{stem}.tar")
        self._tar.add(key, members)
        if self._tar.count == self.shard_size:
            self._commit()
        return stem

    def _commit(self) -> None:
        if self._tar is not None:
            self.shards.append({"shard": self._tar.path.stem, "count": self._tar.count, "sha256": self._tar.commit()})
            self._tar = None

    def close(self) -> list[dict[str, Any]]:
        """Commit the open tar; returns the rows of every tar written."""
        self._commit()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._tar is not None:
            self._tar.__exit__(exc_type, exc, tb)
