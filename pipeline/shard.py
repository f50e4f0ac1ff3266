"""``dds shard``: write a source as WebDataset tars plus the shards, samples and rejects tables.

The surgery on which samples and labels are written (subset, val split, label noise) is the pure
:mod:`dds.pipeline.surgery`; :func:`encode_png` is the image core; :func:`run_shard` is the I/O shell.
Under the dataset's lock, every run writes a complete new generation (:mod:`dds.generations`): the
new tars, hard links to the kept splits' tars, and tables whose rows of the split(s) written are
replaced (so sharding ``--split test`` after ``train`` keeps train); one atomic rename then makes it
the dataset, so a kill leaves either all old or all new. Tars are byte-for-byte reproducible (fixed
tar headers, fixed PNG settings): a re-run gives the same keys, labels and sha256s. Each sample's
``image_sha`` (hash of its stored PNG) finds the test or val images that repeat train images: a few
are dropped from the evaluation split (``overlap="drop"``, each recorded in ``rejects``) or kept
with a warning (``"keep"``); a split made mostly of train images is refused. ``--class-names`` /
``--templates`` files set the prompts ``dds embed`` uses.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps
from tqdm import tqdm

from dds import catalog, generations
from dds._validate import check_choice, check_fraction, check_positive_int, parse_source
from dds.errors import DdsError
from dds.manifests import DEFAULT_TEMPLATES, add_manifest, get_manifest, list_manifests
from dds.pipeline.prompts import looks_like_ids, names_for, parse_class_names, parse_templates, read_text_file
from dds.pipeline.sources import (DECODE_ERRORS, SPLITS, SourceData, SplitData, default_prompt_names, read_imagefolder,
                                  read_manifest, read_tars, target_mode, to_8bit, typical_size)
from dds.pipeline.surgery import NOISE_KINDS, carve_val, inject_noise, noise_map, stratified_subset
from dds.pipeline.user_sources import read_user_source
from dds.shards import ShardWriter
from dds.tables import REJECTS_SCHEMA, SAMPLES_SCHEMA, SHARDS_SCHEMA, check_disjoint_splits, check_shared
from dds.workspace import Workspace, atomic_write_json, check_dataset_name, safe_default_name, write_parquet

log = logging.getLogger(__name__)

#: what to do with test/val images that repeat train images exactly: leave them out, or keep them
OVERLAP_MODES = ("drop", "keep")
PNG_COMPRESS_LEVEL = 6  # fixed so that re-runs give identical bytes


# ---------------------------------------------------------------- images

def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as ``mode`` ("L" or "RGB"); high-bit-depth grey keeps its range (:func:`to_8bit`)."""
    img = to_8bit(img)
    if img.mode != mode:
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")  # alpha is dropped onto black, not mixed into the colours
        img = img.convert(mode)
    return img


def encode_png(img: Image.Image, mode: str) -> bytes:
    """PNG bytes of ``img`` converted to ``mode`` (:func:`convert_image`), with fixed settings (reproducible)."""
    buf = io.BytesIO()
    convert_image(img, mode).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def image_sha(png: bytes) -> str:
    """The content hash of a stored image (64 bits of sha256 of its PNG bytes, which are reproducible)."""
    return hashlib.sha256(png).hexdigest()[:16]


def sample_key(split: str, source_index: int) -> str:
    """The stable key of sample ``source_index`` (its position in the listed source) of ``split``."""
    return f"{split}-{source_index:07d}"


@dataclass
class SplitResult:
    """What writing one split produced."""

    samples: dict[str, list] = field(default_factory=lambda: {k: [] for k in ("key", "label", "label_orig", "shard",
                                                                             "source", "image_sha")})
    shards: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    repeated: int = 0  # images left out because they repeat a train image
    pixel_sum: np.ndarray | None = None  # (channels,) float64 sums of pixel values in [0, 1]
    pixel_sq: np.ndarray | None = None
    pixel_n: int = 0


def decoded(sd: SplitData, order: np.ndarray, on_error: Callable[[str, Exception], None]) -> Iterator[tuple[int, Image.Image]]:
    """Yields ``(source_index, image)`` for ``order``; a sample that fails to decode goes to ``on_error``."""
    for i in order:
        try:
            img = sd.load(int(i))
        except DECODE_ERRORS as e:  # corrupt data; a bug in our code (any other type) propagates
            on_error(sd.refs[int(i)], e)
            continue
        yield int(i), img


def write_split(split: str, sd: SplitData, order: np.ndarray, labels: np.ndarray, *, mode: str, out_dir: Path,
                shard_size: int, stats: bool, progress: bool, desc: str, image_size: int,
                drop: dict[str, str] | None = None) -> SplitResult:
    """Decode, PNG-encode and write the samples ``order`` of ``sd`` as tars in ``out_dir``.

    Args:
        order: (M,) int64 source indices to write, in shard order.
        labels: (M,) training labels for ``order`` (after noise); ``sd.labels[order]`` is label_orig.
        mode: "L" or "RGB", the mode of every stored PNG.
        stats: accumulate per-channel pixel sums for mean/std.
        image_size: the dataset's image size; the sums are taken over each image at that size, as
            training sees it, so one huge image does not outweigh the rest (0: as stored).
        drop: ``image_sha`` -> train key of the images this split leaves out (each becomes a reject).
    """
    res = SplitResult()
    label_of = dict(zip(order.tolist(), labels.tolist()))

    def reject(ref: str, e: Exception) -> None:
        log.warning("rejected %s: %s", ref, e)
        res.rejects.append((ref, f"unreadable image: {type(e).__name__}: {e}"))

    with tqdm(total=len(order), desc=desc, unit="img", disable=not progress) as bar, \
            ShardWriter(out_dir, split, shard_size) as writer:
        for i, img in decoded(sd, order, reject):
            bar.update(1)
            try:
                img = convert_image(img, mode)
                png = encode_png(img, mode)
            except DECODE_ERRORS as e:  # e.g. truncated pixel data PIL only meets when converting
                reject(sd.refs[i], e)
                continue
            sha = image_sha(png)
            if drop and sha in drop:
                res.repeated += 1
                res.rejects.append((sd.refs[i], f"repeats train image {drop[sha]} exactly; left out of {split} "
                                                f"(--overlap keep keeps it)"))
                continue
            if stats:
                _add_stats(res, img, image_size)
            shard = writer.add(sample_key(split, i), {"png": png, "cls": str(int(label_of[i])).encode("ascii")})
            for k, v in (("key", sample_key(split, i)), ("label", label_of[i]), ("label_orig", int(sd.labels[i])),
                         ("shard", shard), ("source", sd.refs[i]), ("image_sha", sha)):
                res.samples[k].append(v)
        bar.update(len(order) - bar.n)
        res.shards = [{**row, "path": f"shards/{row['shard']}.tar"} for row in writer.close()]
    log.info("%s: %d images in %d tars, %d rejected", desc, len(res.samples["key"]), len(res.shards), len(res.rejects))
    return res


def _add_stats(res: SplitResult, img: Image.Image, image_size: int) -> None:
    if image_size and img.size != (image_size, image_size):
        img = ImageOps.fit(img, (image_size, image_size))  # as training decodes it: resized, centre-cropped
    a = np.asarray(img, dtype=np.float64).reshape(img.height * img.width, -1) / 255.0
    if res.pixel_sum is None:
        res.pixel_sum, res.pixel_sq = np.zeros(a.shape[1]), np.zeros(a.shape[1])
    res.pixel_sum += a.sum(0)
    res.pixel_sq += (a * a).sum(0)
    res.pixel_n += a.shape[0]


# ---------------------------------------------------------------- opening a source

def open_source(source: str, *, split: str | None = None, name: str | None = None) -> SourceData:
    """List ``source``: a manifest name or ``.toml`` file, ``imagefolder:PATH``, ``tar:GLOB``, or a user source
    (``csv:FILE``, ``torchvision:NAME:ROOT``, ``hf-disk:PATH``: :mod:`dds.pipeline.user_sources`).

    Args:
        source: the SOURCE argument of ``dds shard``.
        split: ``train`` or ``test`` to read one split; None reads every split the source has.
        name: the ``--name`` given; when it names a manifest, a ``tar:`` source takes its classes from it.

    Raises:
        DdsError: the source does not exist, is empty, or lacks the split asked for.
    """
    scheme, ident = parse_source(source)
    if scheme == "manifest":
        return read_manifest(get_manifest(ident), split)
    if scheme == "manifest-file":
        return read_manifest(add_manifest(ident), split)
    if scheme in ("csv", "torchvision", "hf-disk"):
        return read_user_source(scheme, ident, split)
    if scheme == "imagefolder":
        return read_imagefolder(Path(ident), split)
    manifest = get_manifest(name) if name and name in list_manifests() else None
    return read_tars(ident, split, manifest)


# ---------------------------------------------------------------- the stage

def _check_options(split: str | None, limit: int | None, val: int | None, shard_size: int, label_noise: float,
                   noise_kind: str, overlap: str) -> None:
    if split is not None:
        check_choice("--split", split, SPLITS)
    check_positive_int("--limit", limit)
    check_positive_int("--val", val)
    if val and split == "test":
        raise DdsError("--val is carved from the train split; drop --split test or --val")
    check_positive_int("--shard-size", shard_size)
    check_fraction("--label-noise", label_noise, allow_zero=True, allow_one=False)
    check_choice("--noise-kind", noise_kind, NOISE_KINDS)
    check_choice("--overlap", overlap, OVERLAP_MODES)
    if split == "test" and label_noise > 0:
        raise DdsError("label noise is only injected into the train split; drop --label-noise when sharding --split test")


def _choose(sd: SplitData, split: str, limit: int | None, seed: int) -> np.ndarray:
    n = len(sd.labels)
    if limit is None or limit >= n:
        if limit is not None:
            log.warning("--limit %d >= the %d readable samples of split %s: keeping all of them", limit, n, split)
        return np.arange(n, dtype=np.int64)
    return stratified_subset(sd.labels, limit, seed)


def run_shard(ws: Workspace, source: str, *, name: str | None = None, split: str | None = None,
              limit: int | None = None, val: int | None = None, shard_size: int = 5000, label_noise: float = 0.0,
              noise_kind: str = "symmetric", seed: int = 0, class_names: str | Path | None = None,
              templates: str | Path | None = None, overlap: str = "drop", progress: bool = True) -> dict[str, Any]:
    """Shard ``source`` into dataset ``name`` of workspace ``ws`` (see the module docstring).

    Args:
        source: a manifest name (``fashion-mnist``), ``imagefolder:PATH`` or ``tar:GLOB``.
        name: dataset name; default the manifest name, else the folder / glob stem.
        split: ``train`` or ``test``; None shards every split the source has.
        limit: keep a class-stratified subset of this many samples per split (all when larger).
        val: carve a class-stratified ``val`` split of this many train samples (true labels), for
            picking constants without touching test; drawn outside the ``limit`` subset when there
            is one. Re-sharding train without ``val`` removes an old ``val`` split.
        shard_size: samples per tar.
        label_noise: fraction of train labels to flip (``label_orig`` keeps the truth); never on test.
        noise_kind: ``symmetric`` (exactly ``round(F*N)`` flips, each to a uniformly drawn other class),
            ``pairflip`` (exactly ``round(F*n_c)`` of every class ``c`` to ``(c+1) mod C``) or ``asymmetric``
            (the same per class along the manifest's ``noise_map``; unmapped classes stay clean).
        seed: seed of ``limit`` and ``label_noise``.
        class_names: a file naming the classes for prompts (``id name`` or ``id,name`` lines, or a JSON
            object; :func:`dds.pipeline.prompts.parse_class_names`), e.g. ImageNet synset -> name.
            Stored as ``prompt_names`` in ``dataset.json``; ``classes`` keep the source's ids.
        templates: a file of prompt templates, one per line with ``{}`` for the class name.
        overlap: ``drop`` leaves the test/val images that repeat a train image exactly out of that
            split (each one a ``rejects`` row), ``keep`` keeps them (with a warning). Either way a split
            most of whose images are train images is refused.
        progress: show a tqdm bar while writing.

    Returns:
        A summary: dataset, splits (samples per split written), shards, rejects, noise_flipped, seconds,
        path (the dataset folder), workspace.

    Raises:
        DdsError: bad options, a missing/empty source, or a split that does not fit the dataset's other splits.
    """
    t0 = time.perf_counter()
    _check_options(split, limit, val, shard_size, label_noise, noise_kind, overlap)
    if name is not None:
        check_dataset_name(name)
    src = _open_checked(source, split, name, label_noise, val)
    prompts = _given_prompts(src, class_names, templates)
    ws.check_writable()  # after the source is listed (bad sources create nothing), before any image is written
    name = name or safe_default_name(src.default_name)
    with ws.lock(name):
        results = _write_generation(ws, src, name, source, limit=limit, val=val, shard_size=shard_size,
                                    label_noise=label_noise, noise_kind=noise_kind, seed=seed, progress=progress,
                                    prompts=prompts, overlap=overlap)
    ds_dir = ws.dataset_dir(name)
    catalog.refresh(ws)
    return {
        "dataset": name,
        "splits": {s: len(r.samples["key"]) for s, r in results.items()},
        "shards": {s: len(r.shards) for s, r in results.items()},
        "rejects": sum(len(r.rejects) for r in results.values()),
        "repeated_dropped": {s: r.repeated for s, r in results.items() if r.repeated},
        "noise_flipped": int(sum(np.sum(np.asarray(r.samples["label"]) != np.asarray(r.samples["label_orig"]))
                                 for r in results.values())),
        "seconds": round(time.perf_counter() - t0, 2),
        "path": str(ds_dir),
        "workspace": str(ws.root),
    }


def _write_generation(ws: Workspace, src: SourceData, name: str, source: str, *, limit: int | None,
                      val: int | None, shard_size: int, label_noise: float, noise_kind: str, seed: int,
                      progress: bool, prompts: dict[str, list[str]], overlap: str) -> dict[str, SplitResult]:
    """Write a new generation of dataset ``name`` and commit it (the caller holds the dataset lock)."""
    ds_dir = ws.dataset_dir(name)
    old = _read_json(ds_dir / "dataset.json")
    mode = _dataset_mode(src)
    _check_compatible(old, src, mode, name)
    _check_kept_rows(old, src, ds_dir, name)
    prompts = _prompt_info(old, src, prompts, name)
    train_images = _train_images(_read_table(ds_dir / "samples.parquet")) if overlap == "drop" else None
    mapping = noise_map(noise_kind, list(src.classes), src.manifest.noise_map if src.manifest else None, source)
    # the size the model trains at comes from the train images; a split written alone keeps the dataset's
    sized = [src.splits["train"]] if "train" in src.splits else []
    image_size = (typical_size([sz for sd in sized for sz in sd.sizes]) or old.get("image_size", 0)
                  or typical_size([sz for sd in src.splits.values() for sz in sd.sizes]))
    gen = generations.new_generation(ds_dir)
    try:
        results = _write_all_splits(src, gen, name, mode=mode, limit=limit, val=val, shard_size=shard_size,
                                    label_noise=label_noise, seed=seed, progress=progress,
                                    noise=(noise_kind, mapping), image_size=image_size, train_images=train_images)
        samples, shards = _write_tables(ds_dir, gen, name, results)
        check_disjoint_splits(samples, name)
        _link_kept_tars(ds_dir, gen, shards, results)
        info = _dataset_info(old, src, name, source, mode, results, label_noise, noise_kind, seed,
                             dict(limit=limit, shard_size=shard_size, seed=seed, overlap=overlap), prompts,
                             image_size)
        info["generation"] = generations.content_id(samples)
        atomic_write_json(gen / "dataset.json", info)
        write_parquet(gen / "dataset.parquet", pa.table({
            "name": [name], "num_samples": pa.array([sum(info["splits"].values())], pa.int64()),
            "num_classes": pa.array([len(info["classes"])], pa.int32()),
            "classes": pa.array([info["classes"]], pa.list_(pa.string())), "source": [source],
            "generation": [info["generation"]]}))
        # derived files of changed tars go before the commit: a kill in between only costs a re-embed
        _invalidate_derived(ds_dir, _changed_shards(_read_table(ds_dir / "shards.parquet"), shards),
                            prompts_changed=bool(old) and any(old.get(k) != info[k]
                                                              for k in ("classes", "prompt_names", "templates")))
        generations.commit(ds_dir, gen)
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    return results


def _open_checked(source: str, split: str | None, name: str | None, label_noise: float, val: int | None) -> SourceData:
    """List the source; every split asked for must hold readable samples of at least two classes."""
    src = open_source(source, split=split, name=name)
    if len(src.classes) < 2:
        raise DdsError(f"{source} has {len(src.classes)} class(es) ({', '.join(map(str, src.classes))}); a classifier "
                       "needs at least 2: add the other class folders (or labels)")
    for s, sd in src.splits.items():
        if not len(sd.labels):
            first = f"; first: {sd.rejects[0][0]}: {sd.rejects[0][1]}" if sd.rejects else ""
            raise DdsError(f"split '{s}' of {source} has no readable samples ({len(sd.rejects)} rejected{first})")
        if s == "train" and len(np.unique(sd.labels)) < 2:
            raise DdsError(f"the train split of {source} holds readable images of one class only "
                           f"({src.classes[int(sd.labels[0])]}); a classifier needs at least 2")
    if label_noise > 0 and "train" not in src.splits:
        raise DdsError(f"--label-noise applies to the train split, and {source} has none; drop --label-noise")
    if val and "train" not in src.splits:
        raise DdsError(f"--val is carved from the train split, and {source} has none; drop --val")
    return src


def _write_all_splits(src: SourceData, gen: Path, name: str, *, mode: str, limit: int | None, val: int | None,
                      shard_size: int, label_noise: float, seed: int, progress: bool,
                      noise: tuple[str, dict[int, int] | None] = ("symmetric", None),
                      image_size: int, train_images: dict[str, str] | None = None) -> dict[str, SplitResult]:
    """Write every split's tars into ``gen/shards``; returns the result per split.

    ``val`` carves a ``val`` split off train (:func:`carve_val`); it keeps the true labels, like test.
    With ``train_images`` (``image_sha`` -> key of the dataset's train images; None keeps repeats),
    test and val leave out the images that repeat a train image: the train split written here
    (written first) replaces the dataset's old one.
    """
    results = {}
    for s, sd in sorted(src.splits.items(), key=lambda kv: kv[0] != "train"):
        parts = {s: _choose(sd, s, limit, seed)}
        if s == "train" and val:
            parts["train"], parts["val"] = carve_val(sd.labels, parts["train"], val, seed)
        for part, order in parts.items():
            orig = sd.labels[order]
            labels = (inject_noise(orig, len(src.classes), label_noise, noise[0], seed, noise[1])
                      if part == "train" else orig)
            res = write_split(part, sd, order, labels, mode=mode, out_dir=gen / "shards", shard_size=shard_size,
                              stats=not (src.manifest and src.manifest.states_normalisation), progress=progress,
                              desc=f"shard {name}/{part}", image_size=image_size, drop=train_images if part != "train" else None)
            if part == "train" and train_images is not None:
                train_images = dict(zip(res.samples["image_sha"], res.samples["key"]))
            if res.repeated:
                n = res.repeated + len(res.samples["key"])
                check_shared(part, res.repeated, n, name)
                log.warning("left %d of the %d %s images of %s out: they repeat train images exactly (listed in "
                            "rejects; --overlap keep keeps them)", res.repeated, n, part, name)
            if part == s:
                res.rejects[:0] = sd.rejects  # found while listing, before those found while decoding
            results[part] = res
    return results


def _train_images(samples: pa.Table | None) -> dict[str, str]:
    """``image_sha`` -> key of the train samples of a samples table (empty without one)."""
    if samples is None or "image_sha" not in samples.schema.names:
        return {}
    rows = samples.filter(pc.equal(samples["split"], "train")).select(["image_sha", "key"]).to_pylist()
    return {r["image_sha"]: r["key"] for r in rows if r["image_sha"] is not None}


def _given_prompts(src: SourceData, class_names: str | Path | None, templates: str | Path | None) -> dict[str, list[str]]:
    """``prompt_names`` and/or ``templates`` read from the ``--class-names`` / ``--templates`` files given."""
    out = {}
    if class_names is not None:
        mapping = parse_class_names(read_text_file(class_names, "class-names"), str(class_names))
        out["prompt_names"] = names_for(list(src.classes), mapping, str(class_names))
    if templates is not None:
        out["templates"] = parse_templates(read_text_file(templates, "templates"), str(templates))
    return out


def _prompt_info(old: dict[str, Any], src: SourceData, given: dict[str, list[str]], name: str) -> dict[str, list[str]]:
    """The dataset's ``prompt_names`` and ``templates``: from the files given, else the manifest's, else the
    dataset's own (names only while its classes are the same), else the defaults. Warns when the
    names look like ids (``n01440764``, ``7``)."""
    m = src.manifest
    same_classes = old.get("classes") == list(src.classes)
    names = (given.get("prompt_names") or (list(m.prompt_names) if m else None)
             or (old.get("prompt_names") if same_classes else None) or default_prompt_names(src.classes))
    templates = (given.get("templates") or (list(m.templates) if m else None) or old.get("templates")
                 or list(DEFAULT_TEMPLATES))
    if looks_like_ids(names):
        log.warning("the class names of %s look like ids (%s, ...), so prompts such as %r tell a text encoder "
                    "nothing; give readable names with --class-names FILE (lines 'id name')",
                    name, ", ".join(names[:3]), templates[0].format(names[0]))
    return {"prompt_names": names, "templates": templates}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _dataset_mode(src: SourceData) -> str:
    if src.manifest is not None and src.kind == "manifest":
        return "L" if src.manifest.channels == 1 else "RGB"
    return target_mode([m for sd in src.splits.values() for m in sd.modes])


def _check_compatible(old: dict[str, Any], src: SourceData, mode: str, name: str) -> None:
    """A split written next to other, kept splits must share their classes and channels."""
    kept = [s for s in old.get("splits", {}) if s not in src.splits]
    if not kept:
        return
    if old.get("classes") != src.classes:
        raise DdsError(f"dataset '{name}' has split(s) {', '.join(kept)} with classes {old.get('classes')}, "
                       f"but this source has {src.classes}; shard every split again (omit --split) or use another --name")
    channels = 1 if mode == "L" else 3
    if old.get("channels", channels) != channels:
        raise DdsError(f"dataset '{name}' has split(s) {', '.join(kept)} with {old['channels']} channel(s), but these "
                       f"images give {channels}; shard every split again (omit --split) or use another --name")


def _check_kept_rows(old: dict[str, Any], src: SourceData, ds_dir: Path, name: str) -> None:
    """The splits this write keeps must still have all their rows in the samples table it merges with.

    Raises:
        DdsError: ``dataset.json`` lists a kept split whose rows are gone from ``samples.parquet``
            (e.g. the file was deleted): writing would silently drop them.
    """
    kept = {s: n for s, n in old.get("splits", {}).items()
            if s not in src.splits and not (s == "val" and "train" in src.splits)}
    if not kept:
        return
    path = ds_dir / "samples.parquet"
    have = pc.value_counts(pq.read_table(path, columns=["split"])["split"]).to_pylist() if path.exists() else []
    have = {c["values"]: c["counts"] for c in have}
    short = [f"{s} ({have.get(s, 0)} of {n} rows)" for s, n in kept.items() if have.get(s, 0) != n]
    if short:
        raise DdsError(f"dataset '{name}' lists split(s) {', '.join(short)} that samples.parquet no longer holds; "
                       "sharding only some splits would drop them: shard every split again (omit --split)")


def _dropped(results: dict[str, SplitResult]) -> list[str]:
    """Old splits that go with this write: ``val`` is carved from train, so a new train without it drops it."""
    return ["val"] if "train" in results and "val" not in results else []


def _link_kept_tars(ds_dir: Path, gen: Path, shards: pa.Table, results: dict[str, SplitResult]) -> None:
    """Hard-link the tars of the splits this run keeps from the generation in use into ``gen``."""
    for row in shards.to_pylist():
        if row["split"] not in results:
            src = ds_dir / row["path"]
            if not src.exists():
                raise DdsError(f"shard {src} of the kept split '{row['split']}' is missing; shard every split "
                               "again (omit --split)")
            (gen / row["path"]).parent.mkdir(parents=True, exist_ok=True)
            generations.link_into(src, gen / row["path"])


def _changed_shards(old: pa.Table | None, new: pa.Table) -> set[str]:
    """Stems of the tars that are new, gone, or whose sha256 changed."""
    old_sha = dict(zip(old["shard"].to_pylist(), old["sha256"].to_pylist())) if old is not None else {}
    new_sha = dict(zip(new["shard"].to_pylist(), new["sha256"].to_pylist()))
    return {s for s in old_sha.keys() | new_sha.keys() if old_sha.get(s) != new_sha.get(s)}


def _read_table(path: Path) -> pa.Table | None:
    return pq.read_table(path) if path.exists() else None


def _merge(old_path: Path, path: Path, new: pa.Table, splits: list[str], sort: list[tuple[str, str]]) -> pa.Table:
    """Write ``new`` plus the rows of ``old_path`` whose split is not in ``splits``, sorted, to ``path``.

    Columns an older table lacks (e.g. ``image_sha``) are null in its kept rows. Returns the table written.
    """
    old = _read_table(old_path)
    if old is not None:
        keep = old.filter(pc.invert(pc.is_in(old["split"], pa.array(splits, pa.string()))))
        cols = [keep[f.name] if f.name in keep.schema.names else pa.nulls(len(keep), f.type) for f in new.schema]
        new = pa.concat_tables([pa.table(cols, names=new.schema.names).cast(new.schema), new])
    new = new.sort_by(sort)
    write_parquet(path, new)
    return new


def _write_tables(ds_dir: Path, gen: Path, name: str, results: dict[str, SplitResult]) -> tuple[pa.Table, pa.Table]:
    """The samples, shards and rejects tables of the new generation ``gen``; returns (samples, shards)."""
    splits = list(results) + _dropped(results)
    samples = {k: [] for k in SAMPLES_SCHEMA.names}
    shards = {k: [] for k in SHARDS_SCHEMA.names}
    rejects = {k: [] for k in REJECTS_SCHEMA.names}
    for s, r in results.items():
        n = len(r.samples["key"])
        samples["dataset"] += [name] * n
        samples["split"] += [s] * n
        samples["idx"] += list(range(n))
        for k, v in r.samples.items():
            samples[k] += v
        for row in r.shards:
            for k in SHARDS_SCHEMA.names:
                shards[k].append({"dataset": name, "split": s}.get(k, row.get(k)))
        for ref, reason in r.rejects:
            for k, v in (("dataset", name), ("source", ref), ("reason", reason), ("split", s)):
                rejects[k].append(v)
    merged = [_merge(ds_dir / f"{table}.parquet", gen / f"{table}.parquet", pa.table(cols, schema=schema), splits,
                     [("split", "descending"), (order, "ascending")])
              for table, cols, schema, order in (("samples", samples, SAMPLES_SCHEMA, "idx"),
                                                 ("shards", shards, SHARDS_SCHEMA, "shard"),
                                                 ("rejects", rejects, REJECTS_SCHEMA, "source"))]
    return merged[0], merged[1]


def _norm_stats(results: dict[str, SplitResult]) -> tuple[list[float], list[float]] | None:
    """Per-channel mean/std over the train split written (else any split written); None without images."""
    for s in ("train", *results):
        r = results.get(s)
        if r is not None and r.pixel_n:
            mean = r.pixel_sum / r.pixel_n
            std = np.sqrt(np.maximum(r.pixel_sq / r.pixel_n - mean**2, 0.0))
            return [round(float(x), 4) for x in mean], [round(float(x), 4) for x in std]
    return None


def _dataset_info(old: dict[str, Any], src: SourceData, name: str, source: str, mode: str,
                  results: dict[str, SplitResult], label_noise: float, noise_kind: str, seed: int,
                  options: dict[str, Any], prompts: dict[str, list[str]], image_size: int) -> dict[str, Any]:
    """The new ``dataset.json``: this run's splits merged over the old file's other splits."""
    m = src.manifest
    splits = {s: n for s, n in old.get("splits", {}).items() if s not in results and s not in _dropped(results)}
    splits.update({s: len(r.samples["key"]) for s, r in results.items()})
    info: dict[str, Any] = {
        "name": name, "source": source, "manifest": m.name if m else None, "classes": list(src.classes),
        "prompt_names": prompts["prompt_names"], "templates": prompts["templates"],
        "channels": 1 if mode == "L" else 3,
        "splits": dict(sorted(splits.items(), key=lambda kv: (SPLITS + (kv[0],)).index(kv[0]))),
        "label_noise": (_noise_info(src, source, label_noise, noise_kind, seed) if "train" in results
                        else old.get("label_noise", {"fraction": 0.0, "kind": noise_kind, "seed": seed})),
        "shard_options": {**old.get("shard_options", {}), **{s: {**options, "source": source} for s in results}},
    }
    if m is not None and m.states_normalisation:
        info.update(mean=list(m.mean), std=list(m.std), image_size=m.image_size or image_size)
    else:
        stats = None if (old and "train" not in results and "mean" in old) else _norm_stats(results)
        mean, std = stats if stats else (old.get("mean", [0.5]), old.get("std", [0.5]))
        info.update(mean=mean, std=std, image_size=image_size)
    return info


def _noise_info(src: SourceData, source: str, fraction: float, kind: str, seed: int) -> dict[str, Any]:
    """``dataset.json``'s ``label_noise``: fraction, kind, seed and, for mapped kinds, the class mapping by name."""
    info: dict[str, Any] = {"fraction": fraction, "kind": kind, "seed": seed}
    mapping = noise_map(kind, list(src.classes), src.manifest.noise_map if src.manifest else None, source)
    if mapping is not None:
        info["map"] = {src.classes[a]: src.classes[b] for a, b in sorted(mapping.items())}
    return info


def _invalidate_derived(ds_dir: Path, changed: set[str], *, prompts_changed: bool) -> None:
    """Delete embeddings / scores made from tars (or classes, prompt names, templates) that changed:
    later stages would otherwise reuse them."""
    removed = [p for stem in changed for p in ds_dir.glob(f"embed/*/shards/{stem}.parquet")]
    if any(stem.startswith("train-") for stem in changed) or prompts_changed:  # the whole index: links and generations
        removed += [p for d in ds_dir.glob("index/*") for p in d.iterdir()
                    if p.name in (*generations.INDEX_LINKED, generations.CURRENT) or p.name.startswith("gen-")]
    if prompts_changed:
        removed += list(ds_dir.glob("embed/*/text.parquet"))
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if removed:
        log.warning("removed %d embedding/index file(s) made from the previous shards; run dds embed / dds index again",
                    len(removed))
