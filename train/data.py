"""Reading a split of a sharded dataset: streamed from the WebDataset tars, or decoded once into RAM.

Streaming is a list of generator stages, each a plain function over an iterator of sample dicts
with the sample ``__key__`` kept in every dict (STYLE rule 7)::

    shard_list -> open_tar -> filter_keys -> reorder -> decode -> batched -> augment

The in-memory cache (:class:`CachedSplit`) decodes every sample of the split once into a uint8
tensor ``(N, C, H, W)`` ordered by ``samples.idx``, gathers each batch from it and feeds the same
``augment`` tail (whole batches at a time), so both paths yield identical batches for a plan.

:class:`Prefetcher` runs such a pipeline in a background thread a few batches ahead of the trainer.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from dds.errors import DdsError
from dds.pipeline.sources import DECODE_ERRORS
from dds.selector._scores import load_sample_info  # noqa: F401  (the trainer's name for it: dds.train.load_sample_info)
from dds.shards import iter_tar_samples, parse_label, shard_rows
from dds.tables import check_disjoint_splits
from dds.train.augment import Augmenter, epoch_aug_seeds
from dds.workspace import Workspace

log = logging.getLogger(__name__)

Sample = dict[str, Any]


# ---------------------------------------------------------------- stages (plain generators)

def shard_list(ws: Workspace, name: str, split: str) -> Iterator[Sample]:
    """Yields ``dict(url=Path, shard=stem)`` for each shard of ``split``, in shard order."""
    for row in shard_rows(ws, name, [split]):
        yield {"url": row["url"], "shard": row["shard"]}


def open_tar(src: Iterable[Sample]) -> Iterator[Sample]:
    """Yields ``dict(__key__, shard, url, png=bytes, cls=bytes)``: the members of one sample, undecoded."""
    for shard in src:
        for key, members in iter_tar_samples(shard["url"]):  # sequential read: members in tar order
            yield {"__key__": key, "shard": shard["shard"], "url": shard["url"], **members}


def filter_keys(src: Iterable[Sample], keys: set[str]) -> Iterator[Sample]:
    """Yields only the samples whose key is in ``keys`` (before decoding, so the rest costs no decode)."""
    for sample in src:
        if sample["__key__"] in keys:
            yield sample


def reorder(src: Iterable[Sample], keys: np.ndarray, indices: np.ndarray) -> Iterator[Sample]:
    """Yields the samples in plan order, adding ``pos`` (plan position) and ``index`` (split position).

    Buffers the encoded samples of one epoch's plan (PNG bytes, a few hundred bytes each for
    28 px images): shards are read sequentially, the plan order is a random permutation.
    A key planned twice is yielded twice.
    """
    buffer = {s["__key__"]: s for s in src}
    for pos, (key, index) in enumerate(zip(keys, indices)):
        if key not in buffer:
            raise DdsError(f"planned sample '{key}' is not in the shards; re-run `dds shard` for this dataset")
        yield {**buffer[key], "pos": pos, "index": int(index)}


def decode(src: Iterable[Sample], channels: int, image_size: int, workers: int = 0) -> Iterator[Sample]:
    """Yields the sample with ``image`` (uint8 ``(C, H, W)``) and ``label`` (int) instead of png/cls bytes.

    With ``workers`` > 0 the images are decoded by that many threads (PIL and the resize release the
    GIL), at most ``4 * workers`` samples ahead; the order stays the input order.
    """
    def one(sample: Sample) -> Sample:
        png, cls = sample.pop("png", None), sample.pop("cls", None)
        where = f"sample '{sample['__key__']}' in shard {sample['url']}"
        if png is None or cls is None:
            raise DdsError(f"{where} lacks .png or .cls; re-run `dds shard` for this dataset")
        try:
            return {**sample, "image": decode_png(png, channels, image_size), "label": parse_label(cls)}
        except DECODE_ERRORS as e:  # a corrupt PNG stream or label: the tar no longer holds what dds shard wrote
            raise DdsError(f"{where} is unreadable ({type(e).__name__}: {e}); re-run `dds shard` for this "
                           "dataset") from None

    if workers <= 0:
        yield from map(one, src)
        return

    with ThreadPoolExecutor(workers, thread_name_prefix="dds-decode") as pool:
        window: deque = deque()
        for sample in src:
            window.append(pool.submit(one, sample))
            if len(window) >= 4 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def augment(batches: Iterable[Sample], augmenter: Augmenter, codes: np.ndarray, weights: np.ndarray,
            seeds: np.ndarray) -> Iterator[Sample]:
    """Yields each batch with ``image`` augmented per its samples' plan positions ``pos`` (dropped), and
    ``weight``/``aug`` added: one :meth:`Augmenter.batch` call a batch."""
    for batch in batches:
        pos = batch.pop("pos").numpy()
        yield {**batch, "image": augmenter.batch(batch["image"], codes[pos], seeds[pos]),
               "weight": torch.from_numpy(np.asarray(weights[pos], dtype=np.float32)),
               "aug": torch.from_numpy(np.asarray(codes[pos], dtype=np.uint8))}


def batched(src: Iterable[Sample], batch_size: int) -> Iterator[Sample]:
    """Yields batch dicts: ``__key__`` (list), ``image`` uint8 ``(B, C, H, W)``, ``label`` int64 ``(B,)``
    and, when the samples carry them, ``index``, ``pos`` int64, ``weight`` float32, ``aug`` uint8 ``(B,)``."""
    buf: list[Sample] = []
    for sample in src:
        buf.append(sample)
        if len(buf) == batch_size:
            yield _collate(buf)
            buf = []
    if buf:
        yield _collate(buf)


def _collate(samples: list[Sample]) -> Sample:
    out: Sample = {"__key__": [s["__key__"] for s in samples],
                   "image": torch.stack([s["image"] for s in samples]),
                   "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64)}
    for name, dtype in (("index", torch.int64), ("pos", torch.int64), ("weight", torch.float32), ("aug", torch.uint8)):
        if name in samples[0]:
            out[name] = torch.tensor([s[name] for s in samples], dtype=dtype)
    return out


def decode_png(data: bytes, channels: int, image_size: int) -> torch.Tensor:
    """PNG bytes -> uint8 ``(channels, image_size, image_size)``; other sizes are resized + centre-cropped."""
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    image = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)
    if image.shape[-2:] != (image_size, image_size):
        image = F.center_crop(F.resize(image, image_size, antialias=True), [image_size, image_size])
    return image.contiguous()


class Prefetcher:
    """Iterates over ``src`` in a background thread, up to ``depth`` items ahead of the consumer.

    Yields the items of ``src`` in their order (the thread only runs ahead; it changes nothing).
    An exception raised by ``src`` is raised by ``next()`` in the consumer, the same object with
    its original type and traceback, after the items produced before it. :meth:`close` (also on
    leaving ``with``, and so on an exception or KeyboardInterrupt in the consumer) stops the
    thread: it finishes the item it is making, closes ``src`` and ends; a consumer that stops early
    does not hang.

    Whatever ``src`` runs must be safe next to the consumer's work: the trainer's batches are,
    since :class:`dds.train.augment.Augmenter` draws from per-sample generators, not torch's global
    one. torch kernels release the GIL, so the thread's batch assembly overlaps the consumer's
    forward and backward passes.

    Args:
        src: the iterable to run ahead (iterated in the thread only).
        depth: items kept ready, >= 1 (a bounded queue: memory stays at ``depth`` + 2 batches).
    """

    _POLL_S = 0.1  # how often a blocked thread looks whether it was closed

    def __init__(self, src: Iterable, depth: int = 2, *, name: str = "dds-prefetch") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(src,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, src: Iterable) -> None:
        it = None
        try:
            it = iter(src)
            for item in it:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put(("error", e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator pipeline: run its finally blocks (open tar files) in this thread

    def _put(self, msg: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(msg, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if kind == "item":
            return value
        self._done = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread and wait up to ``timeout`` seconds for it to end (it is a daemon: an
        item that takes longer to make cannot keep the process alive)."""
        self._done = True
        self._stop.set()
        while True:  # free a thread blocked on a full queue (it polls the stop flag anyway)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("prefetch thread still running %.0f s after close; left to end on its own", timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- split sources

def missing_split_hint(info: dict[str, Any], name: str, split: str) -> str:
    """How to add a missing ``split``; never "shard the same source as test", which would make the train
    images the test set (a source with its own test split is a manifest, or was sharded with it)."""
    manifest = info.get("manifest")
    if split == "val":
        source = info.get("source") or "SOURCE"
        return f"run dds shard {source} --split train --val N --name {name} to carve one off train"
    if manifest:
        return f"run `dds shard {manifest} --split {split} --name {name}`"
    return (f"run dds shard imagefolder:HELD_OUT_DIR --split {split} --name {name} with held-out images (never "
            "the train images), or carve a val split with `dds shard ... --val N` and train with --eval-split val")


def _read_samples(ws: Workspace, name: str):
    path = ws.dataset_dir(name) / "samples.parquet"
    cols = [c for c in ("split", "image_sha") if c in pq.read_schema(path).names]
    return pq.read_table(path, columns=cols).to_pandas()


class _Split:
    """Keys and labels of one split, in ``samples.idx`` order, and the dataset's image geometry."""

    def __init__(self, ws: Workspace, name: str, split: str) -> None:
        info = ws.dataset_info(name)
        self.ws, self.name, self.split = ws, name, split
        self.channels, self.image_size = int(info["channels"]), int(info["image_size"])
        self.mean, self.std = list(info["mean"]), list(info["std"])
        table = ws.split_samples(name, split, ["key", "label"])
        if len(table) == 0:
            raise DdsError(f"dataset {name} has no {split} split; {missing_split_hint(info, name, split)}")
        if split != "train":
            check_disjoint_splits(_read_samples(ws, name), name)
        if not np.array_equal(table["idx"].to_numpy(), np.arange(len(table))):
            raise DdsError(f"samples.parquet of {name}: idx of the {split} split is not 0..n-1; re-run `dds shard`")
        self.keys = table["key"].to_numpy().astype(str)  # (N,) keys in idx order
        self.labels = table["label"].to_numpy().astype(np.int64)  # (N,) training labels
        self.n = len(self.keys)

    def plan_batches(self, plan, *, seed: int, augmenter: Augmenter, batch_size: int,
                     positions: np.ndarray | None = None) -> Iterator[Sample]:
        """Augmented batches of ``plan`` (an EpochPlan), in plan order; see :func:`batched` for the fields.

        ``positions`` (a distributed rank's part, :func:`dds.distributed.part_positions`) trains only
        plan entries ``positions % M``, in that order, each augmented under the seed of its position,
        so a sample gets the same augmentation as in a single-process run.
        """
        m = len(plan.indices)
        if positions is None:
            seeds, take = epoch_aug_seeds(seed, plan.epoch, m), slice(None)
        else:
            positions = np.asarray(positions, dtype=np.int64)
            end = int(positions.max()) + 1 if positions.size else 0
            seeds, take = epoch_aug_seeds(seed, plan.epoch, end)[positions], positions % max(m, 1)
        batches = self._plan_batches(np.asarray(plan.indices, dtype=np.int64)[take], batch_size)
        return augment(batches, augmenter, np.asarray(plan.aug)[take], np.asarray(plan.weights)[take], seeds)

    def _plan_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Sample]:
        """Unaugmented batches of the split's samples ``indices``, in that order, with ``pos`` (position
        in ``indices``) and ``index``; see :func:`batched`."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> Iterator[Sample]:
        """Unaugmented batches of the whole split in idx order (``image`` uint8, ``label``)."""
        raise NotImplementedError


class StreamingSplit(_Split):
    """Reads the shards every epoch, decoding only the planned samples (in ``decode_workers`` threads)."""

    def __init__(self, ws: Workspace, name: str, split: str, decode_workers: int = 0) -> None:
        super().__init__(ws, name, split)
        self.decode_workers = decode_workers

    def _plan_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Sample]:
        keys = self.keys[indices]
        stages = shard_list(self.ws, self.name, self.split)  # dict(url, shard) per shard
        stages = open_tar(stages)  # dict(__key__, shard, png, cls) per sample, undecoded
        stages = filter_keys(stages, set(keys.tolist()))  # only this epoch's planned keys
        stages = reorder(stages, keys, indices)  # the same, in plan order, with pos and index
        stages = decode(stages, self.channels, self.image_size, self.decode_workers)  # with image and label
        return batched(stages, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[Sample]:
        stages = open_tar(shard_list(self.ws, self.name, self.split))  # undecoded samples, idx order
        return batched(decode(stages, self.channels, self.image_size, self.decode_workers), batch_size)


class CachedSplit(_Split):
    """Decodes the whole split once into ``images`` uint8 ``(N, C, H, W)`` (``idx`` order) in RAM."""

    def __init__(self, ws: Workspace, name: str, split: str) -> None:
        super().__init__(ws, name, split)
        position = {k: i for i, k in enumerate(self.keys)}
        size_gb = self.n * self.channels * self.image_size ** 2 / 1e9
        if size_gb > 8:
            log.warning("caching %s/%s takes %.1f GB of RAM; set cache=False to stream the shards", name, split, size_gb)
        self.images = torch.zeros((self.n, self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        seen = np.zeros(self.n, dtype=bool)
        for sample in decode(open_tar(shard_list(ws, name, split)), self.channels, self.image_size):
            i = position.get(sample["__key__"])
            if i is None:
                continue  # in a tar but not in samples.parquet: not part of the dataset
            if sample["label"] != self.labels[i]:
                raise DdsError(f"label of '{sample['__key__']}' differs between its shard and samples.parquet; "
                               "re-run `dds shard`")
            self.images[i], seen[i] = sample["image"], True
        if not seen.all():
            missing = self.keys[~seen][:3].tolist()
            raise DdsError(f"{(~seen).sum()} samples of {name}/{split} are listed in samples.parquet but not in its "
                           f"shards (e.g. {missing}); re-run `dds shard`")
        log.info("cached %s/%s: %d samples, %.1f MB", name, split, self.n, self.images.numel() / 1e6)

    def _plan_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Sample]:
        for start in range(0, len(indices), batch_size):   # one gather a batch, no per-sample dicts
            idx = indices[start:start + batch_size]
            yield {"__key__": self.keys[idx].tolist(), "image": self.images[torch.from_numpy(idx)],
                   "label": torch.from_numpy(self.labels[idx]), "index": torch.from_numpy(idx.copy()),
                   "pos": torch.arange(start, start + len(idx))}

    def eval_batches(self, batch_size: int) -> Iterator[Sample]:
        for start in range(0, self.n, batch_size):
            sl = slice(start, start + batch_size)
            yield {"__key__": self.keys[sl].tolist(), "image": self.images[sl],
                   "label": torch.from_numpy(self.labels[sl])}


def open_split(ws: Workspace, name: str, split: str, *, cache: bool = True, decode_workers: int = 0) -> _Split:
    """The split as a :class:`CachedSplit` (``cache=True``) or a :class:`StreamingSplit` decoding in
    ``decode_workers`` threads (0: in the thread that reads the shards).

    Raises:
        DdsError: the dataset is not sharded, or has no such split (the message says how to add it).
    """
    return CachedSplit(ws, name, split) if cache else StreamingSplit(ws, name, split, decode_workers)
