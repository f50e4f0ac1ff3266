"""Read throughput of dds's tar reader against webdataset's, on the same shards. One JSON line.

    python benchmarks/tar_read.py [--dir DIR] [--samples 20000] [--shards 4] [--reps 3]
                                  [--out benchmarks/results/tar-read.jsonl]

Needs webdataset (``pip install 'dds[test]'``). Writes ``--samples`` small grayscale PNG samples
(28 px, ``KEY.png`` + ``KEY.cls``, like a sharded Fashion-MNIST) into ``--shards`` tars, then times
three readers over all tars, alternating them ``--reps`` times so machine drift hits each alike;
every reader yields each sample's bytes and nothing is decoded:

* ``dds``: :func:`dds.shards.iter_tar_samples` per tar (checks that each tar is whole);
* ``wds``: ``webdataset.WebDataset(urls, shardshuffle=False)``, the user-facing dataset;
* ``wds_pipeline``: ``webdataset.DataPipeline(SimpleShardList(urls), tarfile_to_samples())``, its
  reader stage alone.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dds.shards import iter_tar_samples


def write_shards(out: Path, samples: int, shards: int) -> list[str]:
    """``shards`` tars of ``samples`` random 28x28 grayscale PNGs with labels; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    urls = []
    for s in range(shards):
        url = str(out / f"train-{s:05d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(s * per, min(samples, (s + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"train-{i:07d}", "png": buf.getvalue(), "cls": str(i % 10).encode()})
        urls.append(url)
    return urls


def read_dds(urls: list[str]) -> int:
    return sum(len(members["png"]) > 0 for url in urls for _, members in iter_tar_samples(url))


def read_wds(urls: list[str]) -> int:
    return sum(len(sample["png"]) > 0 for sample in wds.WebDataset(urls, shardshuffle=False))


def read_wds_pipeline(urls: list[str]) -> int:
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
    return sum(len(sample["png"]) > 0 for sample in pipeline)


READERS = {"dds": read_dds, "wds": read_wds, "wds_pipeline": read_wds_pipeline}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write the shards [default: a new temporary folder]")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    args = ap.parse_args()

    urls = write_shards(args.dir or Path(tempfile.mkdtemp(prefix="dds-tar-read-")), args.samples, args.shards)
    for read in READERS.values():  # warm the page cache and check every reader sees every sample
        if read(urls) != args.samples:
            sys.exit(f"{read.__name__} did not read {args.samples} samples")
    times: dict[str, list[float]] = {name: [] for name in READERS}
    for _ in range(args.reps):
        for name, read in READERS.items():
            t0 = time.perf_counter()
            read(urls)
            times[name].append(time.perf_counter() - t0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "commit": commit,
           "samples": args.samples, "shards": args.shards, "tar_mb": round(sum(map(os.path.getsize, urls)) / 2**20, 1),
           "reps": args.reps, "cpus": os.cpu_count(), "webdataset": wds.__version__}
    for name, ts in times.items():
        row[f"{name}_s"] = [round(t, 3) for t in ts]
        row[f"{name}_samples_per_s"] = round(args.samples / min(ts))
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
