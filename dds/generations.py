"""Generations: every ``dds shard`` (and ``dds index``) writes a complete new generation, then switches to it at once.

A dataset folder holds one ``gen-ID/`` folder per generation and a symlink ``current -> gen-ID``;
the names readers open (``dataset.json``, ``samples.parquet``, ``shards/``, ...) are fixed symlinks
``NAME -> current/NAME``, so readers need no code of their own. Renaming a new ``current`` over the
old one is the single commit point: a kill before it leaves the old generation in use, after it the
new one. An index folder works the same way with :data:`INDEX_LINKED`. Writers hold the dataset
lock (:meth:`dds.workspace.Workspace.lock`); :func:`content_id` names a dataset generation by its
samples. Details: docs/integrity.md, "Design notes: dds/generations.py".
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa

#: what a generation holds; each is a fixed link in the dataset folder
LINKED = ("dataset.json", "dataset.parquet", "samples.parquet", "shards.parquet", "rejects.parquet", "shards")
#: what an index generation holds; each is a fixed link in the index folder
INDEX_LINKED = ("knn.parquet", "scores.parquet", "index.json")
CURRENT = "current"
#: the samples columns whose content makes a dataset generation's id
CONTENT_COLUMNS = ("split", "idx", "key", "label", "label_orig", "image_sha")


def content_id(samples) -> str:
    """The id of a dataset generation: 16 hex digits of a hash of its samples table's content.

    Args:
        samples: the samples table (pyarrow or pandas); of :data:`CONTENT_COLUMNS` those it has are
            hashed, row by row in (split, idx) order, so the same samples give the same id.
    """
    df = samples.to_pandas() if isinstance(samples, pa.Table) else samples
    df = df[[c for c in CONTENT_COLUMNS if c in df.columns]].sort_values(["split", "idx"])
    rows = pd.util.hash_pandas_object(df, index=False).to_numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def current_generation(ds_dir: Path) -> Path | None:
    """The generation folder in use, or None for a dataset not written in generations."""
    link = ds_dir / CURRENT
    return ds_dir / os.readlink(link) if link.is_symlink() else None


def new_generation(ds_dir: Path, names: tuple[str, ...] = LINKED) -> Path:
    """Create an empty generation folder (with ``shards/`` if ``names`` has it) beside the one in use;
    nothing reads it yet. Its name (``gen-YYYYmmdd-HHMMSS-XXXXXX``) is unique."""
    ds_dir.mkdir(parents=True, exist_ok=True)
    adopt_legacy(ds_dir, names)
    remove_unused(ds_dir)
    gen = ds_dir / f"gen-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    gen.mkdir()
    if "shards" in names:
        (gen / "shards").mkdir()
    return gen


def commit(ds_dir: Path, gen: Path, names: tuple[str, ...] = LINKED) -> None:
    """Make ``gen`` the generation in use (one atomic rename), then delete the others."""
    _fsync_tree(gen)
    for name in names:  # the fixed links; for a new dataset they point at nothing until `current` exists
        link = ds_dir / name
        if not link.is_symlink():
            os.symlink(f"{CURRENT}/{name}", link)
    _replace_symlink(ds_dir / CURRENT, gen.name)
    _fsync_dir(ds_dir)
    remove_unused(ds_dir)


def remove_unused(ds_dir: Path) -> None:
    """Delete every generation but the one in use (old ones, and ones left half-written by a killed run)."""
    keep = current_generation(ds_dir)
    for gen in ds_dir.glob("gen-*"):
        if keep is None or gen.name != keep.name:
            shutil.rmtree(gen, ignore_errors=True)
    for stale in ds_dir.glob(".tmp-shard-*"):  # temporary folders of the layout before generations
        shutil.rmtree(stale, ignore_errors=True)


def adopt_legacy(ds_dir: Path, names: tuple[str, ...] = LINKED) -> None:
    """Move the real files (``names``) of a folder written before generations into ``gen-legacy``.

    Each step leaves readers the same content: the tables are hard-linked into the generation and
    ``current`` is set before any name in the dataset folder becomes a link; ``shards/`` is moved
    by one rename and linked right after.
    """
    real = [n for n in names if (ds_dir / n).exists() and not (ds_dir / n).is_symlink()]
    if not real:
        return
    current = ds_dir / CURRENT
    if current.exists() and not current.is_symlink():  # a copy that followed the links: the real names hold it
        shutil.rmtree(current)
    gen = current_generation(ds_dir) or ds_dir / "gen-legacy"
    gen.mkdir(exist_ok=True)
    for name in real:
        if name != "shards" and not (gen / name).exists():
            _link_or_copy(ds_dir / name, gen / name)
    _replace_symlink(ds_dir / CURRENT, gen.name)
    for name in real:
        if name == "shards":
            if (gen / "shards").exists():
                shutil.rmtree(gen / "shards")
            os.replace(ds_dir / "shards", gen / "shards")
            os.symlink(f"{CURRENT}/shards", ds_dir / "shards")
        else:
            _replace_symlink(ds_dir / name, f"{CURRENT}/{name}")
    _fsync_dir(ds_dir)


def link_into(src: Path, dst: Path) -> None:
    """Put file ``src`` at ``dst`` without copying the bytes where the file system allows (a hard link)."""
    _link_or_copy(src, dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(3)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(gen: Path) -> None:
    """The generation's files reach the disk before ``current`` names it."""
    for p in [*(d for d in gen.iterdir() if d.is_dir()), gen]:
        for f in p.iterdir():
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(p)
