"""Readers for the user's own data: ``csv:FILE``, ``torchvision:NAME:ROOT`` and ``hf-disk:PATH``.

Like the readers of :mod:`dds.pipeline.sources`, each lists a source into a
:class:`~dds.pipeline.sources.SourceData` (labels, image mode and size) and decodes pixels later,
one sample at a time. Nothing here downloads: torchvision datasets are opened with
``download=False`` and Hugging Face datasets from a ``save_to_disk`` folder.
"""
from __future__ import annotations

import csv
import difflib
import inspect
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from dds.errors import DdsError
from dds.pipeline.sources import (DECODE_ERRORS, SPLITS, SourceData, SplitData, _header, _keep, _load_bytes, _load_file,
                                  _pick_splits)


def read_user_source(scheme: str, ident: str, split: str | None) -> SourceData:
    """List a ``csv``, ``torchvision`` or ``hf-disk`` source (``ident`` is what follows ``scheme:``)."""
    readers: dict[str, Callable[[str, str | None], SourceData]] = {
        "csv": read_csv, "torchvision": read_torchvision, "hf-disk": read_hf_disk}
    return readers[scheme](ident, split)


def _list_images(refs: list[str], labels: list[int], where: Callable[[int], bytes | Path]) -> SplitData:
    """A split of ``refs`` whose image headers are read now; an unreadable one becomes a reject.

    Images are opened and decoded by the readers of :mod:`dds.pipeline.sources`, like an image folder's.

    Args:
        refs: (N,) where each sample comes from.
        labels: (N,) labels.
        where: sample i's encoded image: its bytes or its file.
    """
    def opener(i: int) -> Image.Image:  # lazily: listing reads the header only
        data = where(i)
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)

    keep, modes, sizes, rejects = [], [], [], []
    for i, ref in enumerate(refs):
        try:
            mode, size = _header(lambda: opener(i))
        except DECODE_ERRORS as e:  # a missing or bad file is recorded, not fatal
            rejects.append((ref, f"unreadable image: {type(e).__name__}: {e}"))
            continue
        keep.append(i)
        modes.append(mode)
        sizes.append(size)

    def load(j: int) -> Image.Image:
        data = where(keep[j])
        return _load_bytes(data) if isinstance(data, bytes) else _load_file(data)

    return SplitData(labels=np.asarray([labels[i] for i in keep], np.int64), refs=[refs[i] for i in keep],
                     load=load, modes=modes, sizes=sizes, rejects=rejects)


def _known_labels(sd: SplitData, num_classes: int) -> SplitData:
    """``sd`` without the samples whose label is not a class (e.g. -1, "no label"); each becomes a reject."""
    bad = (sd.labels < 0) | (sd.labels >= num_classes)
    sd.rejects.extend((sd.refs[i], f"label {sd.labels[i]} outside 0..{num_classes - 1}") for i in np.flatnonzero(bad))
    return _keep(sd, ~bad)


def _class_index(raw: list[str], where: str) -> tuple[list[str], list[int]]:
    """Classes and labels from raw label strings: all integers -> classes "0".."max"; else sorted names.

    Raises:
        DdsError: a negative integer label, or one that makes more classes than there are rows.
    """
    if all(r.lstrip("-").isdigit() for r in raw):
        ints = [int(r) for r in raw]
        if min(ints) < 0:
            raise DdsError(f"{where}: label {min(ints)} is negative; labels are class numbers from 0 or class names")
        if max(ints) >= len(ints):
            raise DdsError(f"{where}, line {ints.index(max(ints)) + 2}: label {max(ints)} makes {max(ints) + 1} "
                           f"classes for {len(ints)} rows; integer labels are class numbers 0..C-1: fix that label")
        return [str(c) for c in range(max(ints) + 1)], ints
    classes = sorted(set(raw))
    pos = {c: i for i, c in enumerate(classes)}
    return classes, [pos[r] for r in raw]


# ---------------------------------------------------------------- csv:FILE


def read_csv(file: str, split: str | None) -> SourceData:
    """Read a CSV with a header ``path,label[,split]``; paths are relative to the CSV's folder.

    Labels are class names (classes sorted by name) or integers (classes "0".."max"); ``split`` is
    ``train`` or ``test`` (no column: every row is ``--split``, default train). A row whose image is
    missing or unreadable becomes a reject.
    """
    path = Path(file)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # -sig: a spreadsheet's byte-order mark is not a column name
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DdsError(f"cannot read CSV {path} ({e}); give csv:FILE with a header line path,label[,split]") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DdsError(f"CSV {path} has no column {' or '.join(missing)} (it has: {', '.join(columns) or 'none'}); "
                       "its first line must be path,label or path,label,split")
    where = f"CSV {path}"
    if not rows:
        raise DdsError(f"{where} has a header but no rows; add one line path,label per image")
    for n, r in enumerate(rows, 2):
        if not (r["path"] or "").strip() or not (r["label"] or "").strip():
            raise DdsError(f"{where}, line {n}: empty path or label; every row needs both")
        s = (r.get("split") or split or "train").strip()
        if s not in SPLITS:
            raise DdsError(f"{where}, line {n}: split {s!r} is not train or test (carve a val split with --val N)")
        r["split"] = s
    classes, labels = _class_index([r["label"].strip() for r in rows], where)
    present = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    splits = {}
    for s in _pick_splits(present, split, where):
        idx = [i for i, r in enumerate(rows) if r["split"] == s]
        files = [path.parent / rows[i]["path"].strip() for i in idx]
        splits[s] = _list_images([str(p) for p in files], [labels[i] for i in idx], lambda i, f=files: f[i])
    return SourceData(kind="csv", default_name=path.stem, classes=classes, splits=splits)


# ---------------------------------------------------------------- torchvision:NAME:ROOT


def _torchvision_split(cls: type, root: str, split: str) -> Any:
    """``cls`` opened on ``root`` for ``split`` with ``download=False``; the error (a str) when it cannot be."""
    params = inspect.signature(cls.__init__).parameters
    kw: dict[str, Any] = {"download": False} if "download" in params else {}
    if "train" in params:
        kw["train"] = split == "train"
    elif "split" in params:
        kw["split"] = split
    elif split != "train":
        return "one split only"  # e.g. ImageFolder: it is the train split
    try:
        return cls(root, **kw)
    except (RuntimeError, ValueError, OSError) as e:  # torchvision: "Dataset not found or corrupted ..."
        return f"{type(e).__name__}: {e}"
    except TypeError as e:  # a dataset that needs arguments dds does not pass (DatasetFolder's loader, video clips)
        return f"it needs arguments dds does not pass ({e}); dds reads classification datasets such as MNIST or CIFAR10"


def _torchvision_labels(ds: Any) -> list[int]:
    for attr in ("targets", "labels"):
        if getattr(ds, attr, None) is not None:
            return [int(y) for y in np.asarray(getattr(ds, attr)).reshape(-1)]
    return [int(ds[i][1]) for i in range(len(ds))]


def read_torchvision(ident: str, split: str | None) -> SourceData:
    """Open ``torchvision.datasets.NAME`` on the local folder ROOT (``ident`` = ``NAME:ROOT``), never downloading.

    Datasets with a ``train`` flag or a ``split`` argument (MNIST, FashionMNIST, CIFAR10, SVHN, ...)
    give train and test; one-split datasets (ImageFolder) give train. Classes come from the
    dataset's ``classes`` ("0".."max" without one).
    """
    import torchvision.datasets as tvd   # only for this source: it imports torch, ~3 s

    name, _, root = ident.partition(":")
    if not root:
        raise DdsError(f"torchvision:{ident} has no ROOT; use torchvision:NAME:ROOT, e.g. torchvision:CIFAR10:/data/cifar")
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        known = [n for n in tvd.__all__ if n[0].isupper()]
        close = [n for n in known if n.lower() == name.lower()] or difflib.get_close_matches(name, known, 1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise DdsError(f"torchvision has no dataset '{name}'; {hint}known: {', '.join(known)}")
    opened = {s: _torchvision_split(cls, root, s) for s in SPLITS}
    present = [s for s, ds in opened.items() if not isinstance(ds, str)]
    if not present:
        raise DdsError(f"torchvision {name} cannot open {root} ({opened['train']}); put the dataset's files there as "
                       f"torchvision lays them out (dds never downloads: run torchvision.datasets.{name}(ROOT, "
                       "download=True) on a machine with internet and copy ROOT)")
    listed = {s: _torchvision_listing(opened[s], f"torchvision:{name}:{root}", s)
              for s in _pick_splits(present, split, f"torchvision {name} at {root}")}
    top = max((int(sd.labels.max()) for sd in listed.values() if len(sd.labels)), default=-1)
    classes = [str(c) for c in getattr(opened[present[0]], "classes", None) or range(top + 1)]
    splits = {s: _known_labels(sd, len(classes)) for s, sd in listed.items()}
    return SourceData(kind="torchvision", default_name=name.lower(), classes=classes, splits=splits)


def _torchvision_listing(ds: Any, where: str, split: str) -> SplitData:
    """Image files (``ds.samples``) get their headers read; in-memory arrays are alike, so sample 0 speaks for all."""
    labels = _torchvision_labels(ds)
    if isinstance(getattr(ds, "samples", None), list):
        files = [Path(p) for p, _ in ds.samples]
        return _list_images([str(p) for p in files], labels, lambda i: files[i])
    refs = [f"{where}#{split}/{i}" for i in range(len(ds))]
    first = ds[0][0]
    return SplitData(labels=np.asarray(labels, np.int64), refs=refs, load=lambda i: ds[i][0],
                     modes=[first.mode] * len(refs), sizes=[first.size] * len(refs))


# ---------------------------------------------------------------- hf-disk:PATH


def _hf_columns(features: Any, where: str) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and its ClassLabel names (None for a plain integer column)."""
    from datasets import ClassLabel, Image as HfImage, Value   # optional: dds[hf]

    image = next((c for c, f in features.items() if isinstance(f, HfImage)), None)
    label = next((c for c, f in features.items() if isinstance(f, ClassLabel)), None)
    if label is None:
        label = next((c for c in ("label", "labels") if isinstance(features.get(c), Value)
                      and features[c].dtype.startswith("int")), None)
    if image is None or label is None:
        raise DdsError(f"{where} needs an Image column and a ClassLabel (or integer 'label') column; it has "
                       f"{', '.join(f'{c}: {type(f).__name__}' for c, f in features.items())}")
    names = features[label].names if isinstance(features[label], ClassLabel) else None
    return image, label, names


def _hf_split(ds: Any, image: str, label: str, where: str) -> SplitData:
    """One ``datasets.Dataset``: labels from its column, images read as stored bytes (or their file path)."""
    from datasets import Image as HfImage   # optional: dds[hf]

    raw = ds.cast_column(image, HfImage(decode=False))
    labels = [int(y) for y in ds.with_format(None)[label]]

    def encoded(i: int) -> bytes | Path:
        cell = raw[i][image]
        if cell is None:
            raise ValueError("the row has no image")
        return cell["bytes"] if cell.get("bytes") else Path(cell["path"])

    return _list_images([f"{where}#{i}" for i in range(len(ds))], labels, encoded)


def read_hf_disk(path: str, split: str | None) -> SourceData:
    """Read a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (a Dataset or a DatasetDict).

    A DatasetDict gives its ``train`` and ``test`` splits; a single Dataset is the train split (or ``--split``).
    The image and label columns are found from the features; ClassLabel names become the class names.
    """
    try:
        import datasets
    except ImportError:
        raise DdsError("hf-disk: sources need the Hugging Face datasets package; install it with "
                       "`pip install datasets`") from None
    where = f"hf-disk:{path}"
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DdsError(f"{where}: {e}; give a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {split or "train": loaded}
    present = [s for s in SPLITS if s in parts]
    if not present:
        raise DdsError(f"{where} has splits {', '.join(parts)}, none called train or test; save them under those names")
    chosen = _pick_splits(present, split, where)
    image, label, names = _hf_columns(parts[chosen[0]].features, where)
    listed = {s: _hf_split(parts[s], image, label, f"{where}/{s}") for s in chosen}
    if names is None:
        top = max((int(sd.labels.max()) for sd in listed.values() if len(sd.labels)), default=-1)
        names = [str(c) for c in range(top + 1)]
    splits = {s: _known_labels(sd, len(names)) for s, sd in listed.items()}
    return SourceData(kind="hf-disk", default_name=Path(path).resolve().name, classes=list(names), splits=splits)
