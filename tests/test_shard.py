"""Tests of `dds shard` (library level): pure cores on tiny arrays, the readers and run_shard on synthetic
folders and tars made here, and a small slice of the real Fashion-MNIST."""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dds.errors import DdsError
from dds.manifests import add_manifest
from dds.pipeline.shard import encode_png, run_shard
from dds.pipeline.sources import target_mode, typical_size
from dds.pipeline.surgery import carve_val, stratified_subset, symmetric_noise
from dds.shards import ShardWriter, TarWriter, iter_tar_samples
from dds.workspace import Workspace, write_parquet


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _img(rng: np.random.Generator, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> Image.Image:
    chans = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    a = rng.integers(0, 256, size=(size[1], size[0], chans), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if chans == 1 else a, mode=mode)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """imagefolder with 3 classes (5, 3, 2 good images), one garbage file and one truncated PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for cls, n in (("cat", 5), ("dog", 3), ("bird", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            mode = "RGBA" if (cls, i) == ("dog", 0) else "RGB"
            ext, fmt = ("jpg", "JPEG") if (cls, i) == ("cat", 1) else ("png", "PNG")
            _img(rng, mode).save(root / cls / f"img_{i}.{ext}", format=fmt)
    (root / "cat" / "zz_garbage.png").write_bytes(b"this is not an image")
    (root / "dog" / "zz_truncated.png").write_bytes(_png(_img(rng, "RGB", (64, 64)))[:120])
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def _tables(ws: Workspace, name: str) -> dict[str, list[dict]]:
    d = ws.dataset_dir(name)
    return {t: pq.read_table(d / f"{t}.parquet").to_pylist() for t in ("samples", "shards", "rejects")}


def _read_tars(ws: Workspace, name: str, split: str) -> dict[str, tuple[Image.Image, int]]:
    urls = sorted(str(p) for p in ws.shards_dir(name).glob(f"{split}-*.tar"))
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out[s["__key__"]] = (Image.open(io.BytesIO(s["png"])), int(s["cls"].decode()))
    return out


# ---------------------------------------------------------------- pure cores


def test_stratified_subset_exact_proportional_deterministic():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = stratified_subset(labels, 10, seed=3)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    odd = stratified_subset(labels, 7, seed=3)
    counts = np.bincount(labels[odd], minlength=3)
    assert counts.sum() == 7
    assert np.all(np.abs(counts - 7 * np.array([0.5, 0.3, 0.2])) < 1)
    np.testing.assert_array_equal(idx, stratified_subset(labels, 10, seed=3))
    assert not np.array_equal(stratified_subset(labels, 10, seed=4), idx)
    with pytest.raises(ValueError, match="limit"):
        stratified_subset(labels, 101, seed=0)


def test_symmetric_noise_exact_deterministic_never_same_class():
    labels = np.arange(1000) % 7
    noisy = symmetric_noise(labels, 7, 0.3, seed=1)
    flipped = noisy != labels
    assert flipped.sum() == 300
    assert np.all((noisy >= 0) & (noisy < 7))
    np.testing.assert_array_equal(noisy, symmetric_noise(labels, 7, 0.3, seed=1))
    assert not np.array_equal(noisy, symmetric_noise(labels, 7, 0.3, seed=2))
    assert labels.tolist() == (np.arange(1000) % 7).tolist()  # input untouched
    # every other class is reachable: targets spread over all 6 alternatives of class 0
    assert len(set(noisy[flipped & (labels == 0)].tolist())) == 6
    assert (symmetric_noise(labels, 7, 0.0, seed=1) == labels).all()
    with pytest.raises(ValueError, match="2 classes"):
        symmetric_noise(np.zeros(10, np.int64), 1, 0.5, seed=0)


def test_encode_png_is_deterministic_and_converts_modes():
    rng = np.random.default_rng(0)
    rgba = _img(rng, "RGBA")
    assert encode_png(rgba, "RGB") == encode_png(rgba.copy(), "RGB")
    assert Image.open(io.BytesIO(encode_png(rgba, "RGB"))).mode == "RGB"
    assert target_mode(["L", "L"]) == "L" and target_mode(["L", "P"]) == "RGB" and target_mode([]) == "RGB"
    assert typical_size([(12, 10), (12, 10), (5, 40)]) == 12 and typical_size([]) == 0


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_rejects_recorded_and_run_goes_on(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    assert out["dataset"] == "pets" and out["splits"] == {"train": 10} and out["rejects"] == 2
    t = _tables(ws, "pets")
    reasons = {Path(r["source"]).name: r["reason"] for r in t["rejects"]}
    assert set(reasons) == {"zz_garbage.png", "zz_truncated.png"}
    info = json.loads((ws.dataset_dir("pets") / "dataset.json").read_text())
    assert info["classes"] == ["bird", "cat", "dog"] and info["channels"] == 3 and info["image_size"] == 12
    assert info["splits"] == {"train": 10} and info["manifest"] is None
    samples = t["samples"]
    assert [r["idx"] for r in samples] == list(range(10))
    assert np.bincount([r["label"] for r in samples]).tolist() == [2, 5, 3]
    assert all("." not in r["key"] and "/" not in r["key"] for r in samples)
    assert [r["count"] for r in t["shards"]] == [4, 4, 2]
    tars = _read_tars(ws, "pets", "train")
    assert set(tars) == {r["key"] for r in samples}
    for r in samples:
        img, cls = tars[r["key"]]
        assert cls == r["label"] and img.mode == "RGB" and img.size == (12, 10)
        assert Path(r["source"]).parent.name == info["classes"][r["label"]]


def test_rerun_same_keys_sha_and_no_duplicate_rows(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False, name="p")
    first = _tables(ws, "p")
    time.sleep(1.1)  # a clock-dependent byte (e.g. a tar mtime) would now differ
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False, name="p")
    second = _tables(ws, "p")
    assert first == second
    assert len({r["key"] for r in second["samples"]}) == len(second["samples"]) == 10
    assert len(list(ws.dataset_dir("p").glob("gen-*"))) == 1


def test_split_layout_second_split_keeps_first(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "digits"
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                _img(rng, "L").save(root / split / cls / f"{i}.png")
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{root}", split="train", label_noise=0.25, seed=5, progress=False)
    out = run_shard(ws, f"imagefolder:{root}", split="test", progress=False)
    assert out["splits"] == {"test": 4} and out["noise_flipped"] == 0
    t = _tables(ws, "digits")
    by_split = {s: [r for r in t["samples"] if r["split"] == s] for s in ("train", "test")}
    assert len(by_split["train"]) == 8 and len(by_split["test"]) == 4
    assert sum(r["label"] != r["label_orig"] for r in by_split["train"]) == 2
    assert all(r["label"] == r["label_orig"] for r in by_split["test"])
    assert {r["split"] for r in t["shards"]} == {"train", "test"}
    info = json.loads((ws.dataset_dir("digits") / "dataset.json").read_text())
    assert info["splits"] == {"train": 8, "test": 4} and info["channels"] == 1
    assert info["label_noise"] == {"fraction": 0.25, "kind": "symmetric", "seed": 5}
    assert {k: v[0].mode for k, v in _read_tars(ws, "digits", "test").items()} == {r["key"]: "L" for r in by_split["test"]}


def test_failed_run_leaves_previous_shards_intact(tmp_path, folder, monkeypatch):
    import dds.pipeline.shard as shard_mod

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    before = _tables(ws, "pets")
    tars = {p.name: p.read_bytes() for p in ws.shards_dir("pets").glob("*.tar")}

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr(shard_mod, "write_split", boom)
    with pytest.raises(RuntimeError):
        run_shard(ws, f"imagefolder:{folder}", shard_size=3, label_noise=0.5, progress=False)
    assert _tables(ws, "pets") == before
    assert {p.name: p.read_bytes() for p in ws.shards_dir("pets").glob("*.tar")} == tars
    assert len(list(ws.dataset_dir("pets").glob("gen-*"))) == 1


def _snapshot(ws: Workspace, name: str) -> dict:
    """Everything a reader sees of a dataset: its tables, dataset.json and the bytes of every tar."""
    d = ws.dataset_dir(name)
    return {**_tables(ws, name), "info": (d / "dataset.json").read_text(),
            "tars": {p.name: p.read_bytes() for p in ws.shards_dir(name).glob("*.tar")}}


# each point is a step between the first new file and the commit; a kill there must leave the old dataset
@pytest.mark.parametrize("point", ["write_split", "_merge", "check_disjoint_splits", "_link_kept_tars",
                                   "atomic_write_json", "_invalidate_derived", "commit"])
def test_kill_before_the_commit_leaves_the_old_dataset_whole(tmp_path, folder, monkeypatch, point):
    import dds.generations as gens
    import dds.pipeline.shard as shard_mod

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    before = _snapshot(ws, "pets")
    calls = {"n": 0}
    module = gens if point == "commit" else shard_mod
    real = getattr(module, point)

    def kill_after_first(*args, **kwargs):  # write_split / _merge write part of the new files first
        calls["n"] += 1
        if point == "write_split" or (point == "_merge" and calls["n"] == 1):
            out = real(*args, **kwargs)
            if point == "_merge":
                return out
        raise KeyboardInterrupt("killed")

    if point == "commit":  # killed after every link was made, right before `current` is replaced
        monkeypatch.setattr(gens, "_replace_symlink", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    else:
        monkeypatch.setattr(module, point, kill_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_shard(ws, f"imagefolder:{folder}", shard_size=3, label_noise=0.5, progress=False)
    assert _snapshot(ws, "pets") == before
    monkeypatch.undo()
    after = run_shard(ws, f"imagefolder:{folder}", shard_size=3, label_noise=0.5, progress=False)
    assert after["noise_flipped"] == 6 and len(list(ws.dataset_dir("pets").glob("gen-*"))) == 1


def test_kill_after_the_commit_leaves_the_new_dataset_whole(tmp_path, folder, monkeypatch):
    import dds.generations as gens

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    monkeypatch.setattr(gens, "remove_unused", lambda d: None)  # killed before the old generation is deleted
    run_shard(ws, f"imagefolder:{folder}", shard_size=3, label_noise=0.5, progress=False)
    monkeypatch.undo()
    new = _snapshot(ws, "pets")
    assert sum(r["label"] != r["label_orig"] for r in new["samples"]) == 6
    assert {r["shard"] for r in new["shards"]} == {p[:-4] for p in new["tars"]} and len(new["tars"]) == 4
    assert len(list(ws.dataset_dir("pets").glob("gen-*"))) == 2  # the old one is garbage, not in use
    run_shard(ws, f"imagefolder:{folder}", shard_size=3, progress=False)
    assert len(list(ws.dataset_dir("pets").glob("gen-*"))) == 1


def test_a_dataset_written_before_generations_is_adopted(tmp_path):
    from synth import write_dataset

    ws = Workspace(tmp_path / "ws")
    write_dataset(ws, "old", {"train": 30}, classes=3)
    d = ws.dataset_dir("old")
    assert not (d / "shards").is_symlink()
    rng = np.random.default_rng(3)
    root = tmp_path / "held-out"
    for cls in ("c0", "c1", "c2"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            _img(rng, "L", (8, 8)).save(root / cls / f"{i}.png")
    out = run_shard(ws, f"imagefolder:{root}", name="old", split="test", progress=False)
    assert out["splits"] == {"test": 6}
    t = _tables(ws, "old")
    assert sorted({r["split"] for r in t["samples"]}) == ["test", "train"] and len(t["samples"]) == 36
    assert (d / "shards").is_symlink() and len(list(ws.shards_dir("old").glob("train-*.tar"))) == 2


def test_a_workspace_copied_through_the_links_is_adopted(tmp_path, folder):
    import shutil

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    copy = Workspace(tmp_path / "copy")
    shutil.copytree(ws.root, copy.root)  # follows symlinks: `current` and the fixed names become real
    assert not (copy.dataset_dir("pets") / "current").is_symlink()
    before = _snapshot(copy, "pets")
    run_shard(copy, f"imagefolder:{folder}", shard_size=4, progress=False)
    assert _snapshot(copy, "pets") == before and (copy.dataset_dir("pets") / "current").is_symlink()
    assert len(list(copy.dataset_dir("pets").glob("gen-*"))) == 1


def test_concurrent_shard_of_one_dataset_is_refused(tmp_path, folder):
    import subprocess
    import sys

    ws = Workspace(tmp_path / "ws")
    code = ("import sys, time; from dds.workspace import Workspace; ws = Workspace.resolve(sys.argv[1])\n"
            "with ws.lock('pets'):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ws.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # e.g. a first `dds shard` writing its generation
        with pytest.raises(DdsError, match="dataset 'pets' is in use by another dds process"):
            run_shard(ws, f"imagefolder:{folder}", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert run_shard(ws, f"imagefolder:{folder}", progress=False)["splits"] == {"train": 10}


def test_test_split_made_of_the_train_images_is_refused(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", progress=False)
    before = _snapshot(ws, "pets")
    with pytest.raises(DdsError, match="10 of the 10 test images of dataset 'pets' are also train images"):
        run_shard(ws, f"imagefolder:{folder}", split="test", progress=False)
    assert _snapshot(ws, "pets") == before


def test_missing_test_split_never_suggests_sharding_the_train_source_as_test(tmp_path, folder):
    from dds.train.data import open_split

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", progress=False)
    with pytest.raises(DdsError, match="no test split") as e:
        open_split(ws, "pets", "test")
    assert f"imagefolder:{folder} --split test" not in str(e.value) and "never the train images" in str(e.value)


def test_overlap_is_also_refused_when_the_split_is_opened(tmp_path, folder):
    import pyarrow as pa

    from dds.train.data import open_split

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", progress=False)
    path = ws.dataset_dir("pets") / "samples.parquet"  # a table edited by hand: train rows copied as test
    t = pq.read_table(path)
    test = t.set_column(t.schema.get_field_index("split"), "split", pa.array(["test"] * len(t)))
    write_parquet(path, pa.concat_tables([t, test]))
    with pytest.raises(DdsError, match="also train images"):
        open_split(ws, "pets", "test")


@pytest.mark.parametrize("name", ["team/exp1", "../../escape", "exp a"])
def test_dataset_names_that_are_not_one_folder_are_refused(tmp_path, folder, name):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DdsError, match="is not allowed"):
        run_shard(ws, f"imagefolder:{folder}", name=name, progress=False)
    assert not ws.root.exists()


def test_derived_name_of_a_folder_with_spaces_is_made_safe(tmp_path, folder):
    spaced = folder.rename(tmp_path / "my pets")
    out = run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{spaced}", progress=False)
    assert out["dataset"] == "my_pets"


def test_single_class_dataset_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "one"
    (root / "cat").mkdir(parents=True)
    for i in range(3):
        _img(rng).save(root / "cat" / f"{i}.png")
    with pytest.raises(DdsError, match="needs at least 2"):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{root}", progress=False)


def test_a_bug_in_the_decoder_propagates_instead_of_being_a_reject(tmp_path, folder, monkeypatch):
    import dds.pipeline.shard as shard_mod
    import dds.pipeline.sources as sources

    def buggy(*args, **kwargs):
        raise TypeError("a bug, not a bad image")

    monkeypatch.setattr(sources, "_load_file", buggy)
    with pytest.raises(TypeError, match="a bug"):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{folder}", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(shard_mod, "encode_png", buggy)
    with pytest.raises(TypeError, match="a bug"):
        run_shard(Workspace(tmp_path / "ws2"), f"imagefolder:{folder}", progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(sources, "_header", buggy)
    with pytest.raises(TypeError, match="a bug"):
        run_shard(Workspace(tmp_path / "ws3"), f"imagefolder:{folder}", progress=False)


def test_changed_shards_invalidate_their_embeddings(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)
    emb = ws.embed_dir("pets", "enc") / "shards"
    emb.mkdir(parents=True)
    for stem in ("train-000000", "train-000001"):
        write_parquet(emb / f"{stem}.parquet", {"dataset": ["pets"], "encoder": ["enc"], "key": ["k"]})
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, progress=False)  # identical: kept
    assert len(list(emb.glob("*.parquet"))) == 2
    run_shard(ws, f"imagefolder:{folder}", shard_size=4, label_noise=0.5, progress=False)  # labels change
    assert not list(emb.glob("*.parquet"))


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no class folders"),
    (lambda p: (p / "x" / "cls").mkdir(parents=True) or p / "x", "has no images"),
])
def test_imagefolder_errors(tmp_path, make, match):
    with pytest.raises(DdsError, match=match):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{make(tmp_path)}", progress=False)


def test_bad_options_are_errors(tmp_path, folder):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DdsError, match="train split"):
        run_shard(ws, f"imagefolder:{folder}", split="test", label_noise=0.2, progress=False)
    with pytest.raises(DdsError, match="--noise-kind"):
        run_shard(ws, f"imagefolder:{folder}", label_noise=0.2, noise_kind="pairwise", progress=False)
    with pytest.raises(DdsError, match="--shard-size"):
        run_shard(ws, f"imagefolder:{folder}", shard_size=0, progress=False)
    with pytest.raises(DdsError, match="no tar files"):
        run_shard(ws, f"tar:{tmp_path}/*.tar", progress=False)
    assert not ws.root.exists()


def test_split_with_other_classes_than_kept_split_is_refused(tmp_path, folder):
    rng = np.random.default_rng(2)
    other = tmp_path / "other"
    (other / "fish").mkdir(parents=True)
    _img(rng).save(other / "fish" / "0.png")
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", name="pets", progress=False)
    with pytest.raises(DdsError, match="classes"):
        run_shard(ws, f"imagefolder:{other}", name="pets", split="test", progress=False)


# ---------------------------------------------------------------- tar:GLOB


def _write_input_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_tar_source_reencodes_uses_txt_names_and_rejects_bad_labels(tmp_path):
    rng = np.random.default_rng(3)
    names = ["ant", "bee", "cow"]
    good = [{"__key__": f"s{i:03d}", "jpg": _png(_img(rng), "JPEG"), "cls": str(i % 3).encode(),
             "txt": names[i % 3].encode()} for i in range(9)]
    bad = [{"__key__": "neg", "png": _png(_img(rng)), "cls": b"-1"},
           {"__key__": "word", "png": _png(_img(rng)), "cls": b"cat"},
           {"__key__": "noimg", "cls": b"1"}]
    src = tmp_path / "in"
    src.mkdir()
    _write_input_tar(src / "part-0.tar", good[:5] + bad)
    _write_input_tar(src / "part-1.tar", good[5:])
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"tar:{src}/part-*.tar", progress=False)
    assert out["dataset"] == "in" and out["splits"] == {"train": 9} and out["rejects"] == 3
    info = json.loads((ws.dataset_dir("in") / "dataset.json").read_text())
    assert info["classes"] == names
    t = _tables(ws, "in")
    assert sorted(r["source"].split("#")[1] for r in t["rejects"]) == ["neg", "noimg", "word"]
    tars = _read_tars(ws, "in", "train")
    assert [tars[r["key"]][1] for r in t["samples"]] == [i % 3 for i in range(9)]
    assert all(img.format == "PNG" and img.mode == "RGB" for img, _ in tars.values())


def test_tar_source_with_manifest_name_rejects_labels_outside_its_classes(tmp_path):
    rng = np.random.default_rng(4)
    samples = [{"__key__": f"k{i}", "png": _png(_img(rng, "L", (28, 28))), "cls": str(l).encode()}
               for i, l in enumerate([0, 9, 10, 3])]
    _write_input_tar(tmp_path / "train-000000.tar", samples)
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"tar:{tmp_path}/*.tar", name="fashion-mnist", progress=False)
    assert out["splits"] == {"train": 3} and out["rejects"] == 1
    assert "label 10" in _tables(ws, "fashion-mnist")["rejects"][0]["reason"]
    info = json.loads((ws.dataset_dir("fashion-mnist") / "dataset.json").read_text())
    assert len(info["classes"]) == 10 and info["channels"] == 1


# ---------------------------------------------------------------- manifests


def test_manifest_with_missing_files_names_install_hint(tmp_path):
    toml = tmp_path / "m.toml"
    toml.write_text('name = "ghost-set"\nclasses = ["a", "b"]\nformat = "idx-gz"\n'
                    f'root = "{tmp_path}/absent"\ninstall_hint = "apt-get install -y dataset-ghost"\n'
                    '[splits.train]\nimages = "x.gz"\nlabels = "y.gz"\n')
    add_manifest(toml)
    with pytest.raises(DdsError, match="apt-get install -y dataset-ghost"):
        run_shard(Workspace(tmp_path / "ws"), "ghost-set", progress=False)


def test_fashion_mnist_limit_200(tmp_path):
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, "fashion-mnist", limit=200, label_noise=0.1, seed=7, shard_size=150, progress=False)
    assert out["splits"] == {"train": 200, "test": 200} and out["rejects"] == 0 and out["noise_flipped"] == 20
    samples = _tables(ws, "fashion-mnist")["samples"]
    test = [r for r in samples if r["split"] == "test"]
    assert np.bincount([r["label"] for r in test]).tolist() == [20] * 10  # test split is balanced
    assert all(0 <= r["label"] <= 9 and 0 <= r["label_orig"] <= 9 for r in samples)
    assert all(r["label"] == r["label_orig"] for r in test)
    tars = _read_tars(ws, "fashion-mnist", "train")
    assert len(tars) == 200 and all(img.mode == "L" and img.size == (28, 28) for img, _ in tars.values())
    assert {r["key"]: r["label"] for r in samples if r["split"] == "train"} == {k: v[1] for k, v in tars.items()}


def test_carve_val_is_disjoint_stratified_and_keeps_the_limit_subset():
    labels = np.repeat(np.arange(4), 25)
    subset = stratified_subset(labels, 40, seed=0)
    train, val = carve_val(labels, subset, 20, seed=0)
    assert train.tolist() == subset.tolist()  # --limit picks the same train samples with or without --val
    assert not set(train) & set(val) and np.bincount(labels[val]).tolist() == [5] * 4
    train, val = carve_val(labels, np.arange(100), 20, seed=0)  # no --limit: val leaves train
    assert len(train) == 80 and not set(train) & set(val) and len(val) == 20
    with pytest.raises(DdsError, match="--val 61"):
        carve_val(labels, subset, 61, seed=0)


def test_fashion_mnist_val_split_true_labels_and_dropped_on_reshard(tmp_path):
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, "fashion-mnist", split="train", limit=100, val=50, label_noise=0.4, progress=False)
    assert out["splits"] == {"train": 100, "val": 50} and out["noise_flipped"] == 40
    samples = _tables(ws, "fashion-mnist")["samples"]
    val = [r for r in samples if r["split"] == "val"]
    train_src = {r["source"] for r in samples if r["split"] == "train"}
    assert len(val) == 50 and all(r["label"] == r["label_orig"] for r in val)  # val keeps the true labels
    assert not train_src & {r["source"] for r in val}
    assert len(_read_tars(ws, "fashion-mnist", "val")) == 50
    run_shard(ws, "fashion-mnist", split="train", limit=100, progress=False)  # train again, no --val
    assert not list(ws.shards_dir("fashion-mnist").glob("val-*.tar"))
    assert {r["split"] for r in _tables(ws, "fashion-mnist")["samples"]} == {"train"}
    assert "val" not in ws.dataset_info("fashion-mnist")["splits"]
    with pytest.raises(DdsError, match="--val is carved from the train split"):
        run_shard(ws, "fashion-mnist", split="test", val=10, progress=False)


def test_unreadable_or_broken_tars_are_recorded(tmp_path):
    rng = np.random.default_rng(5)
    samples = [{"__key__": f"k{i}", "png": _png(_img(rng)), "cls": str(i % 2).encode()} for i in range(6)]
    _write_input_tar(tmp_path / "a.tar", samples)
    (tmp_path / "b.tar").write_bytes(b"not a tar at all" * 64)
    whole = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(whole[: len(whole) // 2])  # breaks off mid-way
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"tar:{tmp_path}/*.tar", name="t", progress=False)
    rejects = _tables(ws, "t")["rejects"]
    assert {Path(r["source"]).name for r in rejects} == {"b.tar", "c.tar"}
    kept_from_c = out["splits"]["train"] - 6
    assert 0 < kept_from_c < 6 and out["rejects"] == 2


def test_tar_writer_is_atomic_and_reproducible(tmp_path):
    path = tmp_path / "a.tar"
    with pytest.raises(RuntimeError), TarWriter(path) as w:
        w.add("k0", {"png": b"xy"})
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the tar nor its temporary
    with TarWriter(path) as w:
        w.add("k0", {"png": b"xy", "cls": b"3"})
        assert not path.exists()  # nothing under the final name before the commit
        sha = w.commit()
    assert list(tmp_path.iterdir()) == [path] and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(iter_tar_samples(path)) == [("k0", {"png": b"xy", "cls": b"3"})]
    with TarWriter(tmp_path / "b.tar") as w:
        w.add("k0", {"png": b"xy", "cls": b"3"})
        assert w.commit() == sha  # equal content, equal bytes


def test_shard_writer_rolls_over_at_shard_size(tmp_path):
    with ShardWriter(tmp_path, "train", 2) as w:
        stems = [w.add(f"k{i}", {"cls": str(i).encode()}) for i in range(5)]
        rows = w.close()
    assert stems == ["train-000000"] * 2 + ["train-000001"] * 2 + ["train-000002"]
    assert [(r["shard"], r["count"]) for r in rows] == [("train-000000", 2), ("train-000001", 2), ("train-000002", 1)]
    assert [k for k, _ in iter_tar_samples(tmp_path / "train-000001.tar")] == ["k2", "k3"]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x", "test", 2) as w:
        (tmp_path / "x").mkdir()
        w.add("k0", {"cls": b"0"})
        raise RuntimeError("killed mid-shard")
    assert list((tmp_path / "x").iterdir()) == []  # the open tar's temporary is gone


def test_the_train_images_set_the_image_size_and_a_test_split_sharded_alone_keeps_it(tmp_path):
    rng = np.random.default_rng(0)
    for split, size, n in (("train", 8, 6), ("test", 16, 10)):   # more test images, and larger ones
        for cls in ("a", "b"):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(
                    tmp_path / "src" / split / cls / f"{i}.png")
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{tmp_path / 'src'}", name="ds", progress=False)
    assert ws.dataset_info("ds")["image_size"] == 8
    run_shard(ws, f"imagefolder:{tmp_path / 'src'}", name="ds", split="test", progress=False)
    assert ws.dataset_info("ds")["image_size"] == 8


def test_an_imagefolder_split_dds_does_not_read_is_named_in_a_warning(tmp_path, caplog):
    for split in ("train", "test", "val"):
        for cls in ("a", "b"):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(4):
                value = 30 * i + (100 if cls == "b" else 0) + {"train": 0, "test": 5, "val": 10}[split]
                Image.fromarray(np.full((8, 8), value, np.uint8), "L").save(
                    tmp_path / "src" / split / cls / f"{split}{i}.png")
    with caplog.at_level("WARNING", logger="dds"):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{tmp_path / 'src'}", name="ds", progress=False)
    assert any("folder(s) val are not read" in r.getMessage() for r in caplog.records), caplog.text
