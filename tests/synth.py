"""Synthetic WebDataset shards for tests: grey squares whose brightness follows the label."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_tar(path: Path, rows: list[tuple[str, int]], rng: np.random.Generator, size: int) -> None:
    """Write ``rows`` of ``(key, label)`` as ``key.png`` + ``key.cls`` members of a tar at ``path``."""
    with tarfile.open(path, "w") as tar:
        for key, y in rows:
            pixels = np.clip(rng.normal(40 + 50 * y, 30, (size, size)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, "L").save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(y).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_dataset(ws, name: str, splits: dict[str, int], shard_size: int = 24, *, classes: int = 4, size: int = 8) -> None:
    """A dataset following the shard contract: tars of KEY.png + KEY.cls, samples/shards parquet, dataset.json."""
    d = ws.dataset_dir(name)
    (d / "shards").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples, shards = [], []
    for split, n in splits.items():
        labels = np.arange(n) % classes
        for s in range(0, n, shard_size):
            stem = f"{split}-{s // shard_size:06d}"
            rows = [(f"{split}-{i:07d}", int(labels[i])) for i in range(s, min(n, s + shard_size))]
            write_tar(d / "shards" / f"{stem}.tar", rows, rng, size)
            samples += [{"dataset": name, "key": key, "split": split, "label": y, "label_orig": y,
                         "shard": stem, "idx": i} for i, (key, y) in zip(range(s, s + len(rows)), rows)]
            shards.append({"dataset": name, "split": split, "shard": stem, "path": f"shards/{stem}.tar",
                           "count": min(n, s + shard_size) - s, "sha256": ""})
    pq.write_table(pa.Table.from_pylist(samples), d / "samples.parquet")
    pq.write_table(pa.Table.from_pylist(shards), d / "shards.parquet")
    (d / "dataset.json").write_text(json.dumps({
        "name": name, "source": "synthetic", "manifest": None, "classes": [f"c{i}" for i in range(classes)],
        "prompt_names": [f"c{i}" for i in range(classes)], "templates": ["a photo of a {}."], "mean": [0.5],
        "std": [0.25], "image_size": size, "channels": 1, "splits": splits,
        "label_noise": {"fraction": 0.0, "kind": "symmetric", "seed": 0}}))


def write_scores(ws, name: str, encoder: str, keys: list[str]) -> None:
    """A scores.parquet with random density/consistency/joint and every region represented."""
    from dds.tables import REGIONS

    n, rng = len(keys), np.random.default_rng(1)
    samples = pq.read_table(ws.dataset_dir(name) / "samples.parquet").to_pylist()
    label_of = {r["key"]: r["label"] for r in samples}
    path = ws.index_dir(name, encoder) / "scores.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"dataset": [name] * n, "encoder": [encoder] * n, "key": keys,
                             "label": pa.array([label_of[k] for k in keys], pa.int32()),
                             "density": rng.random(n).astype(np.float32),
                             "consistency": np.arange(n, dtype=np.float32),
                             "joint": rng.random(n).astype(np.float32),
                             "region": [REGIONS[i % len(REGIONS)] for i in range(n)]}), path)


def write_verdict(ws, name: str, encoder: str, status: np.ndarray, fixed: np.ndarray | None = None) -> None:
    """Add a label verdict to ``write_scores``' file: ``status`` (N,) names and ``label_fixed`` (the given
    labels where ``fixed`` is None)."""
    path = ws.index_dir(name, encoder) / "scores.parquet"
    t = pq.read_table(path)
    label_fixed = t["label"] if fixed is None else pa.array(fixed, pa.int32())
    pq.write_table(t.append_column("status", pa.array(status)).append_column("label_fixed", label_fixed), path)
