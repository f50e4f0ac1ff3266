"""dds embed: one parquet of image embeddings per shard (resumable), plus class-prompt text embeddings.

Reads ``shards.parquet`` and the WebDataset tars written by ``dds shard``; writes, under
``embed/{encoder_slug(encoder)}/``: ``encoder.json``, ``shards/{stem}.parquet`` (dataset, encoder, key, label,
vector) and ``text.parquet`` (dataset, encoder, label, class_name, vector). Every file is written
atomically, so a file that exists is complete and a killed run, rerun, embeds only the missing shards.

The decode stream is a list of generator stages, each yielding what its comment says::

    iter_tar_samples(tar)          -> (key, {ext: bytes}) per sample, in tar order (dds.shards)
    _shard_batches(task, ...)      -> {"shard", "batch", "keys", "labels", "images", "bad"} per batch,
                                      then {"shard", "end", "seen"} once per worker and shard
    DataLoader(workers)            -> the same dicts, decoded in worker processes
    embed_shards (main process)    -> encoder forward per batch; one parquet per finished shard
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from dds.catalog import refresh
from dds.distributed import barrier, broadcast_object, gather_objects, init as dist_init
from dds.errors import DdsError
from dds.manifests import DEFAULT_TEMPLATES
from dds.pipeline.encoders import create_encoder
from dds.shards import iter_tar_samples, shard_rows
from dds.workspace import Workspace, atomic_write_json, write_parquet

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SHA_META = b"dds.shard_sha256"  # parquet schema metadata: the tar a shard parquet was embedded from


@dataclass(frozen=True)
class ShardTask:
    """One shard to embed."""

    stem: str  # shard file stem, e.g. "train-000000"
    path: str  # absolute path of the tar
    count: int  # samples in the tar, from shards.parquet
    sha256: str  # of the tar, from shards.parquet


# ------------------------------------------------------------------------------------ decode stages


def decode_sample(members: dict[str, bytes], preprocess: Callable[[Any], Any]) -> tuple[Any, int]:
    """Decode one sample's members into ``(preprocess(image), label)``.

    Raises:
        ValueError: no image or no ``.cls`` member, an unreadable image or label.
    """
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None or "cls" not in members:
        raise ValueError(f"sample needs an image and a .cls member, has {sorted(members)}")
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"label {members['cls'][:20]!r} is not a decimal integer") from None
    try:
        with Image.open(io.BytesIO(members[ext])) as img:
            img.load()
            return preprocess(img), label
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"unreadable {ext} image: {e}") from None


def _decode_batch(task: ShardTask, index: int, raw: list, preprocess, image_size: int) -> dict[str, Any]:
    keys, labels, images, bad = [], [], [], []
    for key, members in raw:
        try:
            x, y = decode_sample(members, preprocess)
        except ValueError as e:
            bad.append((key, str(e)))
            continue
        keys.append(key)
        labels.append(y)
        images.append(x)
    stacked = torch.stack(images) if images else torch.empty(0, 3, image_size, image_size)
    return {"shard": task.stem, "batch": index, "keys": keys, "labels": labels, "images": stacked, "bad": bad}


def _shard_batches(task: ShardTask, preprocess, image_size: int, batch_size: int,
                   worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
    """Decode the batches ``b`` of one shard with ``b % num_workers == worker``.

    Yields each such batch as a dict (see :func:`_decode_batch`), then ``{"shard", "end": True, "seen"}``
    with the number of samples this worker found in the tar (every worker reads the whole tar) and, from
    worker 0, the tar's ``sha256``; or ``{"shard", "error"}`` for a tar that is cut short or corrupt
    (raised in the main process).
    """
    raw, current, seen = [], -1, 0
    try:
        for i, sample in enumerate(iter_tar_samples(task.path)):
            seen += 1
            b = i // batch_size
            if b % num_workers != worker:
                continue
            if b != current and raw:
                yield _decode_batch(task, current, raw, preprocess, image_size)
                raw = []
            current = b
            raw.append(sample)
    except DdsError as e:  # one line for the user, not a DataLoader worker's traceback
        yield {"shard": task.stem, "error": str(e)}
        return
    if raw:
        yield _decode_batch(task, current, raw, preprocess, image_size)
    end = {"shard": task.stem, "end": True, "seen": seen}
    if worker == 0:  # the sha256 of the bytes embedded, recorded with the vectors (see _is_done)
        with open(task.path, "rb") as f:
            end["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    yield end


def _make_dataset(tasks: list[ShardTask], preprocess, image_size: int, batch_size: int):
    class ShardBatches(IterableDataset):
        """Every worker walks all shards and decodes its share of each shard's batches."""

        def __iter__(self):
            info = get_worker_info()
            worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
            for task in tasks:
                yield from _shard_batches(task, preprocess, image_size, batch_size, worker, n)

    return ShardBatches()


# ------------------------------------------------------------------------------------ pure cores


def vectors_table(dataset: str, encoder: str, keys: list[str], labels, vectors: np.ndarray,
                  extra: dict[str, Any] | None = None):
    """Rows of the embeddings table as a ``pyarrow.Table``.

    Args:
        keys: N sample keys (or class names when ``extra`` holds them).
        labels: N integer labels.
        vectors: ``(N, D)`` float array, rows already L2-normalised.
        extra: more columns, inserted after ``label``.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * d)
    cols = {"dataset": pa.array([dataset] * n, pa.string()), "encoder": pa.array([encoder] * n, pa.string())}
    if keys is not None:
        cols["key"] = pa.array(keys, pa.string())
    cols["label"] = pa.array(np.asarray(labels, dtype=np.int32), pa.int32())
    cols.update(extra or {})
    cols["vector"] = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))
    return pa.table(cols)


def class_prompts(info: dict[str, Any]) -> list[list[str]]:
    """For each class of ``dataset.json`` (label order), its prompts: every template x the prompt name."""
    names = info.get("prompt_names") or [str(c).lower() for c in info["classes"]]
    templates = info.get("templates") or DEFAULT_TEMPLATES
    return [[t.format(n) for t in templates] for n in names]


def average_prompts(vectors: np.ndarray) -> np.ndarray:
    """Mean of the L2-normalised prompt embeddings per class, re-normalised.

    Args:
        vectors: ``(C, T, D)`` float array, T prompts (templates) per class.

    Returns:
        ``(C, D)`` float32 array with unit-norm rows.
    """
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    m = v.mean(axis=1)
    return (m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


# ------------------------------------------------------------------------------------ I/O shell


def shard_tasks(ws: Workspace, name: str, splits: tuple[str, ...]) -> list[ShardTask]:
    """The shards of ``splits`` listed in ``shards.parquet``, in order; missing splits are logged."""
    rows = shard_rows(ws, name, splits)
    tasks = []
    for split in splits:
        mine = [r for r in rows if r["split"] == split]
        if not mine:
            log.warning("dataset '%s' has no %s shards; skipping that split", name, split)
        for r in mine:
            path = r["url"]
            if not path.exists():
                raise DdsError(f"shard {path} listed in shards.parquet is missing; run `dds shard` for '{name}' again")
            tasks.append(ShardTask(r["shard"], str(path), int(r["count"]), str(r.get("sha256") or "")))
    if not tasks:
        raise DdsError(f"dataset '{name}' has no shards for split(s) {', '.join(splits)}; "
                       f"run `dds shard SOURCE --name {name} --split {splits[0]}` first")
    return tasks


def _is_done(path: Path, task: ShardTask) -> bool:
    """An output parquet exists and was embedded from the same tar: the sha256 of the bytes it was
    embedded from (in its metadata) is the one ``shards.parquet`` lists, so a tar damaged when it
    was embedded and repaired by `dds shard` since is embedded again."""
    if not path.exists():
        return False
    meta = pq.read_schema(path).metadata or {}
    done_sha = meta.get(SHA_META, b"").decode()
    if done_sha and task.sha256 and done_sha != task.sha256:
        log.info("shard %s changed since it was embedded; embedding it again", task.stem)
        return False
    return True


def check_encoder_json(out_dir: Path, desc: dict[str, Any]) -> None:
    """Write ``encoder.json`` for a new folder; for an existing one, check it was made by the same weights.

    Raises:
        DdsError: the folder holds vectors from other weights, or shard files with no ``encoder.json``.
    """
    path = out_dir / "encoder.json"
    if path.exists():
        old = json.loads(path.read_text())
        keys = ("weights", "dim", "image_size")
        diff = [k for k in keys if old.get(k) != desc.get(k)]
        if diff:
            raise DdsError(
                f"{out_dir} holds vectors from encoder weights '{old.get('weights')}' "
                f"(dim {old.get('dim')}, image_size {old.get('image_size')}), but '{desc['encoder']}' now loads "
                f"'{desc['weights']}' (dim {desc['dim']}, image_size {desc['image_size']}); delete {out_dir} "
                "to embed again with the new weights")
        return
    if any((out_dir / "shards").glob("*.parquet")):
        raise DdsError(f"{out_dir} has shard embeddings but no encoder.json, so their weights are unknown; "
                       f"delete {out_dir} and run dds embed again")
    atomic_write_json(path, desc)


@dataclass
class _ShardState:
    task: ShardTask
    parts: dict[int, tuple] = field(default_factory=dict)  # batch index -> (keys, labels, vectors)
    ends: int = 0  # workers that finished reading this shard's tar
    seen: int = 0
    sha256: str = ""  # of the tar's bytes as read


def embed_shards(ws: Workspace, name: str, encoder, tasks: list[ShardTask], *, batch_size: int,
                 num_workers: int, progress: bool = False) -> dict[str, Any]:
    """Embed ``tasks`` with a loaded ``encoder``; writes one parquet per shard as each one completes.

    Returns:
        ``{"images", "corrupt", "corrupt_keys", "failed", "seconds"}``: images embedded, samples skipped as
        undecodable (first keys), shards not written (tar count mismatch), wall seconds of the loop.
    """
    out = ws.embed_dir(name, encoder.name) / "shards"
    dataset = ws.dataset_info(name).get("name", name)
    meta = {SHA_META: b"", b"dds.encoder_weights": encoder.weights.encode()}
    states = {t.stem: _ShardState(t) for t in tasks}
    n_workers = max(1, num_workers)
    loader = DataLoader(_make_dataset(tasks, encoder.preprocess, encoder.image_size, batch_size),
                        batch_size=None, num_workers=num_workers,
                        pin_memory=encoder.device.type == "cuda", prefetch_factor=2 if num_workers else None)
    stats = {"images": 0, "corrupt": 0, "corrupt_keys": [], "failed": []}
    bar = _bar(sum(t.count for t in tasks), progress, f"embed {name}")
    t0 = time.perf_counter()
    for item in loader:
        if "error" in item:
            raise DdsError(item["error"])
        st = states[item["shard"]]
        if item.get("end"):
            st.ends, st.seen, st.sha256 = st.ends + 1, item["seen"], item.get("sha256") or st.sha256
            if st.ends == n_workers:
                _finish_shard(st, out, dataset, encoder, meta, stats)
                del states[item["shard"]]
            continue
        for key, reason in item["bad"]:
            log.warning("shard %s: skipped sample %s: %s", st.task.stem, key, reason)
            stats["corrupt"] += 1
            stats["corrupt_keys"] = (stats["corrupt_keys"] + [key])[:20]
        vecs = encoder.encode_images(item["images"]).numpy() if item["keys"] else np.zeros((0, encoder.dim))
        st.parts[item["batch"]] = (item["keys"], item["labels"], vecs)
        stats["images"] += len(item["keys"])
        bar.update(len(item["keys"]) + len(item["bad"]))
    bar.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _finish_shard(st: _ShardState, out: Path, dataset: str, encoder, meta: dict, stats: dict) -> None:
    if st.seen != st.task.count:
        log.error("shard %s holds %d samples but shards.parquet says %d; not written", st.task.stem, st.seen,
                  st.task.count)
        stats["failed"].append(st.task.stem)
        return
    order = sorted(st.parts)
    keys = [k for b in order for k in st.parts[b][0]]
    labels = [y for b in order for y in st.parts[b][1]]
    vecs = np.concatenate([st.parts[b][2] for b in order]) if order else np.zeros((0, encoder.dim))
    table = vectors_table(dataset, encoder.name, keys, labels, vecs)
    if st.task.sha256 and st.sha256 != st.task.sha256:
        log.warning("shard %s differs from its sha256 in shards.parquet (changed or damaged since dds shard); "
                    "repair it with dds shard, then dds embed embeds it again", st.task.stem)
    table = table.replace_schema_metadata({**meta, SHA_META: st.sha256.encode()})
    write_parquet(out / f"{st.task.stem}.parquet", table)
    log.info("embedded shard %s: %d vectors", st.task.stem, len(keys))


def _bar(total: int, progress: bool, desc: str):
    return tqdm(total=total, unit="img", desc=desc, disable=not progress, smoothing=0.1)


def write_text_embeddings(path: Path, info: dict[str, Any], encoder) -> None:
    """Embed every class's prompts (templates x prompt name), average per class, write ``text.parquet``."""
    prompts = class_prompts(info)
    flat = [p for ps in prompts for p in ps]
    vecs = encoder.encode_text(flat).numpy().reshape(len(prompts), len(prompts[0]), -1)
    classes = [str(c) for c in info["classes"]]

    table = vectors_table(info.get("name", ""), encoder.name, None, np.arange(len(classes)),
                          average_prompts(vecs), extra={"class_name": pa.array(classes, pa.string())})
    write_parquet(path, table)


def default_workers(device_type: str) -> int:
    """Decode workers: 1 on CPU (2 cores: one decodes, the forward pass keeps the rest), 4 on CUDA."""
    return 4 if device_type == "cuda" else 1


def merge_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``embed_shards`` summary from the ranks' summaries (seconds: the slowest rank's)."""
    return {"images": sum(s["images"] for s in per_rank), "corrupt": sum(s["corrupt"] for s in per_rank),
            "corrupt_keys": [k for s in per_rank for k in s["corrupt_keys"]][:20],
            "failed": [f for s in per_rank for f in s["failed"]],
            "seconds": max(s["seconds"] for s in per_rank)}


def run_embed(ws: Workspace, name: str, *, encoder: str = "lite0-minilm", batch_size: int = 256,
              splits: tuple[str, ...] = ("train",), num_workers: int | None = None, device: str = "auto",
              progress: bool = True, image_size: int | None = None) -> dict[str, Any]:
    """Embed the images of ``splits`` (each shard whose parquet is missing) and the class prompts.

    Under ``torchrun`` (or ``dds embed --nproc N``) the shards still to embed are dealt out to the
    ranks (``todo[rank::world]``); each rank writes its own shard parquet files, rank 0 writes
    ``encoder.json``, the text embeddings and the catalog, and the counts are summed over the ranks.
    Shards are batched the same way in any process, so the vectors equal a single-process run's.

    Args:
        ws: the workspace.
        name: dataset name, as given to ``dds shard``.
        encoder: a registered encoder name (see :func:`dds.pipeline.encoders.list_encoders`).
        batch_size: images per forward pass.
        splits: which splits to embed: ``("train",)``, ``("test",)`` or both.
        num_workers: DataLoader decode workers; None = 1 on CPU, 4 on CUDA; 0 decodes in this process.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show a tqdm bar (images/s).
        image_size: input side for encoders that allow it; None = the encoder's default.

    Returns:
        Summary: encoder, weights, dim, aligned, image_size, device, processes, shards_embedded, shards_skipped, images,
        corrupt (undecodable samples skipped, also logged), corrupt_keys (first 20), images_per_s (embedding loop only), seconds (whole call).

    Raises:
        DdsError: dataset not sharded, unknown encoder, weights unavailable, an embed folder made by other
            weights, or shards whose tar does not match ``shards.parquet``.
    """
    t0 = time.perf_counter()
    d = dist_init(device)  # under torchrun: this process's rank (and its GPU); else a single process
    info = ws.dataset_info(name)
    with ws.lock(name, shared=True, holder=f"dds embed {name}"):   # no dds shard swaps the tars under it
        if batch_size < 1:
            raise DdsError(f"batch_size must be a positive integer, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise DdsError(f"num_workers must be 0 or more, got {num_workers}")
        tasks = shard_tasks(ws, name, tuple(splits))
        enc = create_encoder(encoder, device, image_size=image_size)
        out_dir = ws.embed_dir(name, enc.name)
        if d.is_main:  # rank 0 writes encoder.json; the others then only compare with it
            check_encoder_json(out_dir, enc.describe())
        # rank 0's list of missing shards, so that no rank sees a shard another rank has just written
        todo = broadcast_object(d, [t for t in tasks if not _is_done(out_dir / "shards" / f"{t.stem}.parquet", t)]
                                if d.is_main else None)
        if not d.is_main:
            check_encoder_json(out_dir, enc.describe())
        mine = todo[d.rank::d.world]  # whole shards per rank: each writes its own shard files
        workers = default_workers(enc.device.type) if num_workers is None else num_workers
        stats = {"images": 0, "corrupt": 0, "corrupt_keys": [], "failed": [], "seconds": 0.0}
        if mine:
            log.info("embedding %d of %d shards with %s on %s", len(mine), len(tasks), enc.name, enc.device)
            stats = embed_shards(ws, name, enc, mine, batch_size=batch_size, num_workers=workers,
                                 progress=progress and d.is_main)
        stats = merge_stats(gather_objects(d, stats))
        text_path = out_dir / "text.parquet"
        if d.is_main:
            if not text_path.exists():
                write_text_embeddings(text_path, info, enc)
            refresh(ws)
        barrier(d)  # every rank returns once the whole dataset is embedded
        if stats["failed"]:
            raise DdsError(f"shard(s) {', '.join(stats['failed'])} do not match shards.parquet (sample count); "
                           f"run `dds shard` for '{name}' again, then dds embed resumes")
        return {"encoder": enc.name, "weights": enc.weights, "dim": enc.dim, "aligned": enc.aligned,
                "image_size": enc.image_size, "device": str(enc.device),
                "processes": d.world,
                "shards_embedded": len(todo), "shards_skipped": len(tasks) - len(todo), "images": stats["images"],
                "corrupt": stats["corrupt"], "corrupt_keys": stats["corrupt_keys"],
                "images_per_s": round(stats["images"] / stats["seconds"], 1) if stats["seconds"] else None,
                "seconds": round(time.perf_counter() - t0, 2)}
