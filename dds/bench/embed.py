"""``dds bench-embed``: images/s of the embed pipeline against the bare encoder forward pass."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from dds.errors import DdsError
from dds.pipeline.embed import ShardTask, decode_sample, default_workers, embed_shards, shard_tasks
from dds.shards import TarWriter, iter_tar_samples
from dds.workspace import Workspace, write_parquet


def _copy_subset(ws: Workspace, name: str, tasks: list[ShardTask], dst: Workspace, max_images: int) -> int:
    """Copy the first ``max_images`` train samples (shard boundaries kept) into a fresh workspace ``dst``."""
    src_dir, dst_dir = ws.dataset_dir(name), dst.dataset_dir(name)
    (dst_dir / "shards").mkdir(parents=True)
    shutil.copy(src_dir / "dataset.json", dst_dir / "dataset.json")
    rows, left = [], max_images
    for t in tasks:
        if left <= 0:
            break
        rel = f"shards/{t.stem}.tar"
        n = _write_tar_prefix(t.path, dst_dir / rel, left)
        rows.append({"dataset": name, "split": "train", "shard": t.stem, "path": rel, "count": n, "sha256": ""})
        left -= n
    write_parquet(dst_dir / "shards.parquet", {k: [r[k] for r in rows] for k in rows[0]})
    return max_images - max(left, 0)


def _write_tar_prefix(src: str, dst: Path, limit: int) -> int:
    with TarWriter(dst) as out:
        for key, members in iter_tar_samples(src):
            if out.count >= limit:
                break
            out.add(key, members)
        out.commit()
    return out.count


def bench_embed(ws: Workspace, name: str, *, encoder: str = "lite0-minilm", batch_size: int = 256,
                device: str = "auto", max_images: int = 2000, num_workers: int | None = None) -> dict[str, Any]:
    """Images/s of the bare encoder forward pass vs the full embed path, on the same images, one process.

    The bare pass runs ``encode_images`` on batches decoded beforehand; the pipeline pass runs
    :func:`embed_shards` (tar reading, decode workers, forward, parquet writes) on a temporary workspace
    holding the first ``max_images`` train samples. One warm-up batch precedes both. Target: ratio >= 0.8.

    Returns:
        ``{"encoder", "device", "images", "batch_size", "num_workers", "bare_images_per_s",
        "pipeline_images_per_s", "ratio"}``.
    """
    import torch

    from dds.pipeline.encoders import create_encoder

    ws.dataset_info(name)
    if max_images < 1 or batch_size < 1:
        raise DdsError(f"max_images and batch_size must be positive, got {max_images} and {batch_size}")
    tasks = shard_tasks(ws, name, ("train",))
    enc = create_encoder(encoder, device)
    workers = default_workers(enc.device.type) if num_workers is None else num_workers
    with tempfile.TemporaryDirectory(prefix="dds-bench-") as tmp:
        sub = Workspace(Path(tmp))
        n = _copy_subset(ws, name, tasks, sub, max_images)
        sub_tasks = shard_tasks(sub, name, ("train",))
        images = [decode_sample(m, enc.preprocess)[0] for t in sub_tasks for _, m in iter_tar_samples(t.path)]
        batches = [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        enc.encode_images(batches[0])  # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        for b in batches:
            enc.encode_images(b)
        bare_s = time.perf_counter() - t0
        stats = embed_shards(sub, name, enc, sub_tasks, batch_size=batch_size, num_workers=workers)
    bare, pipe = n / bare_s, stats["images"] / stats["seconds"]
    return {"encoder": enc.name, "device": str(enc.device), "images": n, "batch_size": batch_size,
            "num_workers": workers, "bare_images_per_s": round(bare, 1), "pipeline_images_per_s": round(pipe, 1),
            "ratio": round(pipe / bare, 3)}
