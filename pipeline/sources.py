"""Source readers for ``dds shard``: a manifest's IDX files, an image folder, or existing WebDataset tars
(the user's own formats are :mod:`dds.pipeline.user_sources`; ``dds.pipeline.shard.open_source`` picks the reader).

Each reader lists a source cheaply (labels, and for image files their header: mode and size) into a
:class:`SourceData`; pixels are decoded later, one sample at a time, by ``SplitData.load(i)``. Inputs
that cannot even be listed (unreadable header, bad ``.cls``) are collected as rejects, not raised.
"""
from __future__ import annotations

import glob as globlib
import gzip
import io
import logging
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dds.errors import DdsError
from dds.manifests import Manifest
from dds.shards import parse_label

#: what reading or decoding a corrupt image or tar member raises (PIL's UnidentifiedImageError is an
#: OSError, a bad label a ValueError); any other exception is a bug and propagates
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, tarfile.TarError,
                 Image.DecompressionBombError)

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
#: image members recognised in a WebDataset sample, in order of preference
TAR_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


@dataclass
class SplitData:
    """One split of a source, listed but not decoded."""

    labels: np.ndarray  # (N,) int64, labels as the source gives them
    refs: list[str]  # (N,) where each sample comes from (file path, tar#key, idx file#row)
    load: Callable[[int], Image.Image]  # decodes sample i; raises on a corrupt image
    modes: list[str] = field(default_factory=list)  # (N,) PIL mode per sample (empty when a manifest says)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (N,) (width, height) per sample
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) found while listing


@dataclass
class SourceData:
    """What a reader found: class names, per-split samples, and what is known about the images."""

    kind: str  # manifest | imagefolder | tar
    default_name: str  # dataset name when --name is not given
    classes: list[str]  # class names in label order
    splits: dict[str, SplitData]  # only the splits asked for
    manifest: Manifest | None = None  # the manifest the classes and normalisation come from


def _pick_splits(available: list[str], split: str | None, where: str) -> list[str]:
    if split is None:
        return available
    if split not in available:
        raise DdsError(f"{where} has no '{split}' split (it has: {', '.join(available)}); pick one of those with --split")
    return [split]


# ---------------------------------------------------------------- manifest, format idx-gz


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """Parse an (uncompressed) IDX file of unsigned bytes into an array of its shape.

    Raises:
        DdsError: the header is not a ubyte IDX header or the size does not match.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DdsError(f"{what} is not an IDX file of unsigned bytes; reinstall the dataset")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    start = 4 + 4 * ndim
    if len(data) - start != int(np.prod(shape)):
        raise DdsError(f"{what} holds {len(data) - start} bytes of data, its header says {shape}; reinstall the dataset")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(shape)


def read_manifest(m: Manifest, split: str | None) -> SourceData:
    """Read a manifest's files (format ``idx-gz``: gzip IDX image and label files per split)."""
    if m.format != "idx-gz":
        raise DdsError(f"manifest '{m.name}' has no built-in reader (format '{m.format}'); "
                       "shard its files with imagefolder:PATH or tar:GLOB")
    splits = {}
    for s in _pick_splits(list(m.splits), split, f"manifest '{m.name}'"):
        files = {k: Path(m.root) / m.splits[s][k] for k in ("images", "labels")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise DdsError(f"dataset files for '{m.name}' are missing ({missing[0]}); install them with "
                           f"`{m.install_hint}`" if m.install_hint else f"dataset files for '{m.name}' are missing: {missing[0]}")
        try:
            raw = {k: gzip.decompress(p.read_bytes()) for k, p in files.items()}
        except (OSError, EOFError) as e:
            raise DdsError(f"cannot read {files['images']} or {files['labels']} ({e}); reinstall with `{m.install_hint}`") from None
        images = parse_idx(raw["images"], str(files["images"]))
        labels = parse_idx(raw["labels"], str(files["labels"]))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DdsError(f"{files['images']} ({images.shape}) and {files['labels']} ({labels.shape}) do not match; "
                           f"reinstall with `{m.install_hint}`")
        refs = [f"{files['images'].name}#{i}" for i in range(len(labels))]
        sd = SplitData(labels=labels.astype(np.int64), refs=refs, load=lambda i, a=images: Image.fromarray(a[i]),
                       sizes=[(images.shape[2], images.shape[1])] * len(labels))
        bad = sd.labels >= len(m.classes)
        sd.rejects.extend((sd.refs[i], f"label {sd.labels[i]} outside 0..{len(m.classes) - 1}") for i in np.flatnonzero(bad))
        splits[s] = _keep(sd, ~bad)
    return SourceData(kind="manifest", default_name=m.name, classes=list(m.classes), splits=splits, manifest=m)


# ---------------------------------------------------------------- imagefolder:PATH


def _image_exts() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _loops_back(path: Path, root: Path) -> bool:
    """Whether ``path`` is a symlink to ``root``, to a folder inside it or to one of its ancestors:
    walking it would list the same images again (``self -> .`` would become a class of every image)."""
    if not path.is_symlink():
        return False
    target, top = path.resolve(), root.resolve()
    return target == top or top in target.parents or target in top.parents


def _class_dirs(path: Path, root: Path) -> list[Path]:
    """The class folders in ``path`` (a split folder of the image folder ``root``), by name; symlinks
    that loop back into ``root`` are not followed."""
    dirs = []
    for p in sorted(path.iterdir(), key=lambda p: p.name):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if _loops_back(p, root):
            log.warning("not following %s: a symlink back into %s", p, root)
            continue
        dirs.append(p)
    return dirs


def _is_split_layout(root: Path) -> bool:
    return any((root / s).is_dir() and _class_dirs(root / s, root) for s in SPLITS)


def _header(open_fn: Callable[[], Image.Image]) -> tuple[str, tuple[int, int]]:
    with open_fn() as img:  # reads the header only
        return img.mode, img.size


def _load_file(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def read_imagefolder(root: Path, split: str | None) -> SourceData:
    """Read ``ROOT/CLASS/*`` (one split) or ``ROOT/{train,test}/CLASS/*``; classes sorted by folder name."""
    if not root.is_dir():
        raise DdsError(f"imagefolder path {root} does not exist or is not a folder; give a folder with one sub-folder per class")
    if _is_split_layout(root):
        present = [s for s in SPLITS if (root / s).is_dir()]
        others = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in SPLITS and _class_dirs(d, root))
        if others:  # e.g. ImageNet's val/: dds's own val split is carved from train with --val N
            log.warning("imagefolder %s: folder(s) %s are not read (dds reads train/ and test/); rename the held-out "
                        "one to test/, or shard it alone as imagefolder:%s --split test", root, ", ".join(others),
                        root / others[0])
        bases = {s: root / s for s in _pick_splits(present, split, f"imagefolder {root}")}
        classes = sorted({d.name for s in present for d in _class_dirs(root / s, root)})
    else:
        dirs = _class_dirs(root, root)
        if not dirs:
            raise DdsError(f"imagefolder {root} has no class folders; put images in {root}/CLASS/ or {root}/train/CLASS/")
        bases = {split or "train": root}
        classes = [d.name for d in dirs]
    exts = _image_exts()
    splits = {s: _list_imagefolder_split(base, classes, exts) for s, base in bases.items()}
    return SourceData(kind="imagefolder", default_name=root.resolve().name, classes=classes, splits=splits)


def _list_imagefolder_split(base: Path, classes: list[str], exts: set[str]) -> SplitData:
    labels, refs, paths = [], [], []
    sd = SplitData(labels=np.zeros(0, np.int64), refs=refs, load=lambda i: _load_file(paths[i]))
    for label, cls in enumerate(classes):
        cdir = base / cls
        if not cdir.is_dir():
            continue  # a class absent from this split
        files = sorted((p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in exts),
                       key=lambda p: p.relative_to(cdir).as_posix())
        if not files:
            raise DdsError(f"class folder {cdir} has no images; add images or remove the folder")
        for p in files:
            try:
                mode, size = _header(lambda: Image.open(p))
            except DECODE_ERRORS as e:  # a bad file is recorded, not fatal
                sd.rejects.append((str(p), f"unreadable image: {type(e).__name__}: {e}"))
                continue
            sd.modes.append(mode)
            sd.sizes.append(size)
            labels.append(label)
            refs.append(str(p))
            paths.append(p)
    sd.labels = np.asarray(labels, dtype=np.int64)
    return sd


# ---------------------------------------------------------------- tar:GLOB

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path up to the first dot of the basename


def _tar_default_name(pattern: str) -> str:
    parts = Path(pattern).parts
    stem = Path(pattern).name.split(".")[0]
    if stem and not globlib.has_magic(stem):
        return stem
    dirs = [p for p in parts[:-1] if not globlib.has_magic(p)]
    while dirs and dirs[-1] == "shards":
        dirs.pop()
    return dirs[-1] if dirs and dirs[-1] not in ("/", "") else "tars"


def _tar_split_of(path: str) -> str | None:
    m = re.match(r"^(train|test)[-_.]", Path(path).name)
    return m.group(1) if m else None


class _TarReader:
    """Keeps the tars of a source open and reads members on demand."""

    def __init__(self) -> None:
        self._open: dict[str, tarfile.TarFile] = {}

    def tar(self, path: str) -> tarfile.TarFile:
        if path not in self._open:
            self._open[path] = tarfile.open(path, "r:*")
        return self._open[path]

    def read(self, path: str, member: tarfile.TarInfo) -> bytes:
        f = self.tar(path).extractfile(member)
        if f is None:
            raise OSError(f"member {member.name} is not a file")
        return f.read()


def _tar_samples(path: str, rejects: list[tuple[str, str]]) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """The samples of one tar in tar order: (key, {extension: member}).

    A tar that cannot be read, or breaks off, adds a row to ``rejects``; the samples before the break are kept.
    """
    order: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                m = _KEY_RE.match(member.name)
                if member.isfile() and m:
                    order.setdefault(m.group(1), {})[m.group(2).lower()] = member
    except (tarfile.TarError, OSError, EOFError) as e:
        rejects.append((path, f"unreadable tar after {len(order)} sample(s): {type(e).__name__}: {e}"))
        if order:  # the last sample may be incomplete
            order.pop(next(reversed(order)))
    return list(order.items())


def read_tars(pattern: str, split: str | None, manifest: Manifest | None) -> SourceData:
    """Read WebDataset tars matching ``pattern``; tars named ``train-*``/``test-*`` give their split."""
    paths = sorted(globlib.glob(pattern))
    if not paths:
        raise DdsError(f"no tar files match '{pattern}'; give tar:GLOB matching existing WebDataset shards")
    by_tar = [_tar_split_of(p) for p in paths]
    named = [Path(p).name for p, b in zip(paths, by_tar) if b]
    untagged = [Path(p).name for p, b in zip(paths, by_tar) if not b]
    if named and untagged:  # folding them into one split would mix test (or val) images into train
        raise DdsError(f"tar:{pattern} mixes tars named train-*/test-* ({named[0]}) with others ({untagged[0]}, "
                       f"{len(untagged)} in all; a val-* tar is dds's own held-out split: carve one with --val N); "
                       "give a glob that matches one kind, e.g. 'DIR/train-*.tar'")
    if all(by_tar):
        present = [s for s in SPLITS if s in by_tar]
        groups = {s: [p for p, b in zip(paths, by_tar) if b == s] for s in _pick_splits(present, split, f"tar:{pattern}")}
    else:
        groups = {split or "train": paths}
    reader = _TarReader()
    listed = {s: _list_tar_split(ps, reader) for s, ps in groups.items()}
    if manifest is not None:
        classes = list(manifest.classes)
    else:
        all_labels = np.concatenate([sd.labels for sd, _ in listed.values()])
        classes = _tar_classes(all_labels, [entry for _, names in listed.values() for entry in names])
        _check_class_count(len(classes), [sd for sd, _ in listed.values()])
    splits = {}
    for s, (sd, _) in listed.items():
        bad = (sd.labels < 0) | (sd.labels >= len(classes))
        for i in np.flatnonzero(bad):
            sd.rejects.append((sd.refs[i], f"label {sd.labels[i]} outside 0..{len(classes) - 1}"))
        splits[s] = _keep(sd, ~bad)
    if not any(len(sd.labels) for sd in splits.values()) and not any(sd.rejects for sd in splits.values()):
        raise DdsError(f"the tars matching '{pattern}' hold no samples with an image and a .cls label")
    return SourceData(kind="tar", default_name=_tar_default_name(pattern), classes=classes, splits=splits,
                      manifest=manifest)


def _list_tar_split(paths: list[str], reader: _TarReader) -> tuple[SplitData, list[tuple[int, str]]]:
    labels, refs, where, names = [], [], [], []
    sd = SplitData(labels=np.zeros(0, np.int64), refs=refs,
                   load=lambda i: _load_bytes(reader.read(*where[i])))
    for path in paths:
        for key, members in _tar_samples(path, sd.rejects):
            ref = f"{path}#{key}"
            ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
            try:
                missing = [m for m, ok in ((".cls", "cls" in members), ("image", ext is not None)) if not ok]
                if missing:
                    raise ValueError(f"sample has no {' or '.join(missing)} member")
                label = parse_label(reader.read(path, members["cls"]))
                data = reader.read(path, members[ext])
                mode, size = _header(lambda: Image.open(io.BytesIO(data)))
                text = reader.read(path, members["txt"]).decode("utf-8").strip() if "txt" in members else None
            except DECODE_ERRORS as e:  # bad member or unreadable header: record it, keep going
                sd.rejects.append((ref, f"{type(e).__name__}: {e}"))
                continue
            sd.modes.append(mode)
            sd.sizes.append(size)
            labels.append(label)
            refs.append(ref)
            where.append((path, members[ext]))
            if text:
                names.append((label, text))
    sd.labels = np.asarray(labels, dtype=np.int64)
    return sd, names


def _tar_classes(labels: np.ndarray, names: list[tuple[int, str]]) -> list[str]:
    """Class names for labels 0..max: the samples' ``.txt`` when every label maps to one text, else "0", "1", ...

    Args:
        labels: (N,) int64, every label listed (all splits).
        names: (label, text) for the samples that carry a ``.txt``.
    """
    valid = labels[labels >= 0]
    n = int(valid.max()) + 1 if len(valid) else 0
    by_label: dict[int, set[str]] = {}
    for label, text in names:
        by_label.setdefault(label, set()).add(text)
    if by_label and all(len(v) == 1 for v in by_label.values()):
        return [next(iter(by_label[i])) if i in by_label else str(i) for i in range(n)]
    if by_label:
        log.info("the tars' .txt members are not one name per label; classes are named by number")
    return [str(i) for i in range(n)]


def _check_class_count(num_classes: int, splits: list[SplitData]) -> None:
    """Refuse more classes (largest ``.cls`` + 1) than samples: such a label is not a class index.

    Raises:
        DdsError: naming the sample with the largest label and its value.
    """
    n = sum(len(sd.labels) for sd in splits)
    if num_classes <= n:
        return
    sd = max((sd for sd in splits if len(sd.labels)), key=lambda sd: sd.labels.max())
    i = int(np.argmax(sd.labels))
    raise DdsError(f"{sd.refs[i]} has label {sd.labels[i]}, which makes {num_classes} classes for {n} samples; "
                   ".cls labels are class indices 0..C-1: fix that label or remove the sample")


def _load_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img


def _keep(sd: SplitData, mask: np.ndarray) -> SplitData:
    """``sd`` restricted to the samples where ``mask`` (N,) bool is true."""
    if mask.all():
        return sd
    idx = np.flatnonzero(mask)
    load = sd.load
    return SplitData(labels=sd.labels[idx], refs=[sd.refs[i] for i in idx], load=lambda i: load(int(idx[i])),
                     modes=[sd.modes[i] for i in idx] if sd.modes else [],
                     sizes=[sd.sizes[i] for i in idx] if sd.sizes else [], rejects=sd.rejects)


#: greyscale modes of more than 8 bits and the value each one's white has (I and F: see :func:`to_8bit`)
HIGH_BIT_WHITE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def target_mode(modes: list[str]) -> str:
    """"L" when every image is greyscale ("L" or a high-bit-depth grey mode), else "RGB" (every other
    mode is converted to RGB)."""
    return "L" if modes and all(m == "L" or m in HIGH_BIT_WHITE for m in modes) else "RGB"


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (modes of :data:`HIGH_BIT_WHITE`) as an "L" image, its range kept:
    values are scaled by the mode's white (65535 for 16 bits, 1.0 for float), not clipped at 255.

    32-bit ``I`` and float ``F`` images whose values go beyond that white are scaled by their own
    maximum; negative values become black. Any other image is returned as it is.
    """
    if img.mode not in HIGH_BIT_WHITE:
        return img
    a = np.asarray(img, dtype=np.float64)
    white = max(HIGH_BIT_WHITE[img.mode], float(a.max()) if a.size else 0.0)
    return Image.fromarray(np.clip(np.rint(a * (255.0 / white)), 0, 255).astype(np.uint8), "L")


def typical_size(sizes: list[tuple[int, int]]) -> int:
    """The longer side of the most common (width, height); 0 for no images."""
    if not sizes:
        return 0
    (w, h), _ = Counter(sizes).most_common(1)[0]
    return int(max(w, h))


def default_prompt_names(classes: list[str]) -> list[str]:
    """Prompt names for classes without a manifest: ``golden_retriever`` -> ``golden retriever``."""
    return [re.sub(r"[_\-]+", " ", c).strip().lower() or c for c in classes]

