"""Tests of the user's sources (csv:, torchvision:, hf-disk:, a manifest file), class names and prompt
templates, and overlapping splits; each source on data generated here goes through shard, embed
(tiny-clip), index and a 1-epoch training run."""
from __future__ import annotations

import gzip
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dds._validate import parse_source
from dds.cli import app
from dds.errors import DdsError
from dds.pipeline.embed import average_prompts, run_embed
from dds.pipeline.encoders import create_encoder
from dds.pipeline.index import run_index
from dds.pipeline.prompts import looks_like_ids, parse_class_names, parse_templates
from dds.pipeline.shard import run_shard
from dds.train import TrainConfig, run_train
from dds.workspace import Workspace

SIZE = 8


def _pixels(label: int, i: int) -> np.ndarray:
    """An 8x8 grey image whose brightness follows the label (distinct per ``i``)."""
    rng = np.random.default_rng(1000 * label + i)
    return np.clip(rng.normal(40 + 60 * label, 20, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def _write_pngs(folder: Path, label: int, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{start + i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        Image.fromarray(_pixels(label, start + i), "L").save(p)
    return paths


def _pipeline(ws: Workspace, name: str) -> dict:
    """Embed (tiny-clip), index and train one epoch on dataset ``name``; returns the training summary."""
    run_embed(ws, name, encoder="tiny-clip", splits=("train", "test"), num_workers=0, device="cpu", progress=False)
    run_index(ws, name, encoder="tiny-clip", k=2, folds=2, device="cpu", progress=False)
    return run_train(ws, TrainConfig(dataset=name, policy="dds", epochs=1, model="cnn3", batch_size=8,
                                     encoder="tiny-clip", device="cpu"), progress=False)


def _info(ws: Workspace, name: str) -> dict:
    return json.loads((ws.dataset_dir(name) / "dataset.json").read_text())


def _rejects(ws: Workspace, name: str) -> list[dict]:
    return pq.read_table(ws.dataset_dir(name) / "rejects.parquet").to_pylist()


def test_source_forms_are_parsed_in_one_place():
    assert parse_source("csv:data/list.csv") == ("csv", "data/list.csv")
    assert parse_source("torchvision:CIFAR10:/data/c") == ("torchvision", "CIFAR10:/data/c")
    assert parse_source("hf-disk:/data/hf") == ("hf-disk", "/data/hf")
    assert parse_source("my/set.toml") == ("manifest-file", "my/set.toml")
    with pytest.raises(DdsError, match="use csv:FILE"):
        parse_source("csv:")


# ---------------------------------------------------------------- csv:FILE


def test_csv_source_shards_embeds_indexes_and_trains(tmp_path):
    rows = ["path,label,split"]
    for label, cls in enumerate(["cat", "dog", "owl"]):
        rows += [f"imgs/{cls}/{p.name},{cls},train" for p in _write_pngs(tmp_path / "imgs" / cls, label, 6)]
        rows += [f"imgs/{cls}/{p.name},{cls},test" for p in _write_pngs(tmp_path / "imgs" / cls, label, 2, start=6)]
    rows.append("imgs/cat/missing.png,cat,train")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"csv:{tmp_path / 'list.csv'}", progress=False)
    assert out["dataset"] == "list" and out["splits"] == {"train": 18, "test": 6} and out["rejects"] == 1
    assert _info(ws, "list")["classes"] == ["cat", "dog", "owl"] and _info(ws, "list")["channels"] == 1
    assert "missing.png" in _rejects(ws, "list")[0]["source"]
    result = _pipeline(ws, "list")
    assert result["status"] == "done" and 0 <= result["test_acc"] <= 1


def test_csv_integer_labels_and_bad_rows(tmp_path):
    _write_pngs(tmp_path / "a", 0, 2)
    _write_pngs(tmp_path / "b", 1, 2)
    (tmp_path / "ok.csv").write_text("path,label\na/img_0.png,0\na/img_1.png,0\nb/img_0.png,2\nb/img_1.png,2\n")
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"csv:{tmp_path / 'ok.csv'}", progress=False)
    assert _info(ws, "ok")["classes"] == ["0", "1", "2"] and _info(ws, "ok")["splits"] == {"train": 4}
    (tmp_path / "nolabel.csv").write_text("file,label\na/img_0.png,0\n")
    with pytest.raises(DdsError, match="no column path"):
        run_shard(ws, f"csv:{tmp_path / 'nolabel.csv'}", progress=False)
    (tmp_path / "val.csv").write_text("path,label,split\na/img_0.png,0,valid\n")
    with pytest.raises(DdsError, match=r"line 2: split 'valid' is not train or test"):
        run_shard(ws, f"csv:{tmp_path / 'val.csv'}", progress=False)
    with pytest.raises(DdsError, match="cannot read CSV"):
        run_shard(ws, f"csv:{tmp_path / 'absent.csv'}", progress=False)


# ---------------------------------------------------------------- torchvision:NAME:ROOT


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_root(root: Path, folder: str = "MNIST") -> Path:
    """torchvision's MNIST layout (ROOT/MNIST/raw/*-ubyte), 10 classes, 4 train and 1 test image each."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class, start in (("train", 4, 0), ("t10k", 1, 100)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.stack([_pixels(y % 4, start + i) for i, y in enumerate(labels)])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


def test_torchvision_mnist_from_a_local_root(tmp_path):
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"torchvision:MNIST:{_mnist_root(tmp_path / 'data')}", progress=False)
    assert out["dataset"] == "mnist" and out["splits"] == {"train": 40, "test": 10}
    info = _info(ws, "mnist")
    assert info["classes"][:2] == ["0 - zero", "1 - one"] and info["channels"] == 1 and info["image_size"] == SIZE
    result = _pipeline(ws, "mnist")
    assert result["status"] == "done"


def test_torchvision_never_downloads_and_names_what_is_wrong(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DdsError, match="dds never downloads"):
        run_shard(ws, f"torchvision:FashionMNIST:{tmp_path / 'empty'}", progress=False)
    with pytest.raises(DdsError, match="torchvision has no dataset 'Mnist'; did you mean MNIST"):
        run_shard(ws, f"torchvision:Mnist:{tmp_path}", progress=False)
    with pytest.raises(DdsError, match="has no ROOT"):
        run_shard(ws, "torchvision:MNIST", progress=False)
    assert not (tmp_path / "empty").exists()


def test_torchvision_image_folder_is_one_train_split(tmp_path):
    for label, cls in enumerate(["b", "a"]):
        _write_pngs(tmp_path / "folder" / cls, label, 3)
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"torchvision:ImageFolder:{tmp_path / 'folder'}", name="tvf", progress=False)
    assert out["splits"] == {"train": 6} and _info(ws, "tvf")["classes"] == ["a", "b"]
    with pytest.raises(DdsError, match="has no 'test' split"):
        run_shard(ws, f"torchvision:ImageFolder:{tmp_path / 'folder'}", split="test", progress=False)


# ---------------------------------------------------------------- hf-disk:PATH


def test_hf_disk_dataset_dict_with_class_labels(tmp_path):
    import datasets   # in the test extra: a missing package is a failure, not a skip

    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["ant", "bee", "cow"])})

    def part(per_class: int, start: int) -> "datasets.Dataset":
        rows = [(Image.fromarray(_pixels(y, start + i), "L"), y) for y in range(3) for i in range(per_class)]
        return datasets.Dataset.from_dict({"img": [r[0] for r in rows], "y": [r[1] for r in rows]}, features=features)

    test = datasets.concatenate_datasets([part(2, 10), datasets.Dataset.from_dict(
        {"img": [Image.fromarray(_pixels(0, 99), "L")], "y": [-1]}, features=features)])  # an unlabeled row
    datasets.DatasetDict({"train": part(6, 0), "test": test}).save_to_disk(str(tmp_path / "zoo"))
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, f"hf-disk:{tmp_path / 'zoo'}", progress=False)
    assert out["dataset"] == "zoo" and out["splits"] == {"train": 18, "test": 6} and out["rejects"] == 1
    assert _info(ws, "zoo")["classes"] == ["ant", "bee", "cow"]
    assert "label -1" in _rejects(ws, "zoo")[0]["reason"]
    assert _pipeline(ws, "zoo")["status"] == "done"
    part(2, 50).save_to_disk(str(tmp_path / "one"))  # a single Dataset: the split asked for
    assert run_shard(ws, f"hf-disk:{tmp_path / 'one'}", split="test", progress=False)["splits"] == {"test": 6}


def test_hf_disk_without_the_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DdsError, match="pip install datasets"):
        run_shard(Workspace(tmp_path / "ws"), f"hf-disk:{tmp_path}", progress=False)


# ---------------------------------------------------------------- a manifest file


def test_manifest_from_a_file_path_with_a_relative_root(tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    for split, n, start in (("train", 12, 0), ("test", 4, 100)):
        labels = np.arange(n) % 2
        images = np.stack([_pixels(y, start + i) for i, y in enumerate(labels)])
        (data / f"{split}-images.gz").write_bytes(gzip.compress(_idx(images)))
        (data / f"{split}-labels.gz").write_bytes(gzip.compress(_idx(labels)))
    toml = data / "toy.toml"
    toml.write_text('name = "toy-file"\nclasses = ["Dark", "Light"]\nformat = "idx-gz"\nroot = "."\n'
                    'templates = ["a {} square."]\nimage_size = 8\nchannels = 1\n'
                    '[splits.train]\nimages = "train-images.gz"\nlabels = "train-labels.gz"\n'
                    '[splits.test]\nimages = "test-images.gz"\nlabels = "test-labels.gz"\n')
    ws = Workspace(tmp_path / "ws")
    out = run_shard(ws, str(toml), progress=False)
    assert out["dataset"] == "toy-file" and out["splits"] == {"train": 12, "test": 4}
    info = _info(ws, "toy-file")
    assert info["prompt_names"] == ["dark", "light"] and info["templates"] == ["a {} square."]
    assert _pipeline(ws, "toy-file")["status"] == "done"
    with pytest.raises(DdsError, match="cannot read manifest file"):
        run_shard(ws, str(tmp_path / "absent.toml"), progress=False)
    # without image_size and mean/std the images give both (not 0 px and a 0.5/0.5 guess)
    toml.write_text(toml.read_text().replace('name = "toy-file"', 'name = "toy-bare"').replace("image_size = 8\n", ""))
    run_shard(ws, str(toml), progress=False)
    bare = _info(ws, "toy-bare")
    assert bare["image_size"] == 8 and bare["mean"] != [0.5] and bare["std"] != [0.5]
    for bad, why in (('classes = ["Dark", "Light"]', "classes must be a list"), ('name = "toy-bare"', "no name")):
        toml.write_text(toml.read_text().replace(bad, ""))
        with pytest.raises(DdsError, match=why):
            run_shard(ws, str(toml), progress=False)
        toml.write_text(toml.read_text().replace("format =", f"{bad}\nformat =", 1))


# ---------------------------------------------------------------- class names and templates


def test_class_name_files_in_every_form():
    assert parse_class_names("n01440764 tench, Tinca tinca\nn01443537 goldfish\n", "f") == {
        "n01440764": "tench, Tinca tinca", "n01443537": "goldfish"}
    assert parse_class_names("id,name\n0,airplane\n1,\"sports car\"\n# comment\n\n", "f") == {
        "0": "airplane", "1": "sports car"}
    assert parse_class_names('{"n01440764": "tench"}', "f") == {"n01440764": "tench"}
    with pytest.raises(DdsError, match="line 2: expected 'id name'"):
        parse_class_names("a b\nlonely\n", "f")
    with pytest.raises(DdsError, match="named twice"):
        parse_class_names("a b\na c\n", "f")
    assert parse_templates("a photo of a {}.\n# note\nart of the {}\n", "t") == ["a photo of a {}.", "art of the {}"]
    for bad in ("no slot", "{} and {}", "a {0} b", ""):
        with pytest.raises(DdsError, match="template|no template"):
            parse_templates(bad, "t")
    assert looks_like_ids(["n01440764", "n01443537", "tench"]) and looks_like_ids(["0", "1"])
    assert not looks_like_ids(["cat", "dog", "7"])


def _synset_folder(root: Path) -> Path:
    for label, synset in enumerate(["n01440764", "n01443537"]):
        _write_pngs(root / synset, label, 3)
    return root


def test_class_names_and_templates_reach_the_prompts_dds_embed_uses(tmp_path, caplog):
    folder = _synset_folder(tmp_path / "syn")
    ws = Workspace(tmp_path / "ws")
    with caplog.at_level(logging.WARNING):
        run_shard(ws, f"imagefolder:{folder}", progress=False)
    assert "look like ids (n01440764, n01443537" in caplog.text and "--class-names" in caplog.text
    run_embed(ws, "syn", encoder="tiny-clip", num_workers=0, device="cpu", progress=False)
    (tmp_path / "names.txt").write_text("n01440764 tench\nn01443537 goldfish\nn99999999 unused\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na fish called {}.\n")
    caplog.clear()
    res = CliRunner().invoke(app, ["shard", f"imagefolder:{folder}", "--class-names", str(tmp_path / "names.txt"),
                                   "--templates", str(tmp_path / "templates.txt"), "-w", str(ws.root), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "look like ids" not in caplog.text
    info = _info(ws, "syn")
    assert info["classes"] == ["n01440764", "n01443537"] and info["prompt_names"] == ["tench", "goldfish"]
    assert info["templates"] == ["a photo of a {}.", "a fish called {}."]
    text_path = ws.embed_dir("syn", "tiny-clip") / "text.parquet"
    assert not text_path.exists()  # made from the old prompts: removed, so dds embed makes it again
    run_embed(ws, "syn", encoder="tiny-clip", num_workers=0, device="cpu", progress=False)
    enc = create_encoder("tiny-clip")
    prompts = ["a photo of a tench.", "a fish called tench.", "a photo of a goldfish.", "a fish called goldfish."]
    want = average_prompts(enc.encode_text(prompts).numpy().reshape(2, 2, -1))
    got = np.array(pq.read_table(text_path).column("vector").to_pylist())
    np.testing.assert_allclose(got, want, atol=1e-5)
    run_shard(ws, f"imagefolder:{folder}", progress=False)  # re-sharding without the files keeps them
    assert _info(ws, "syn")["prompt_names"] == ["tench", "goldfish"]


def test_class_names_file_must_name_every_class(tmp_path):
    folder = _synset_folder(tmp_path / "syn")
    (tmp_path / "names.txt").write_text("n01440764 tench\n")
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(DdsError, match="names no class n01443537"):
        run_shard(ws, f"imagefolder:{folder}", class_names=tmp_path / "names.txt", progress=False)
    assert not ws.root.exists()


# ---------------------------------------------------------------- overlapping splits


def _split_folder(root: Path, repeated: int) -> Path:
    """train/ with 10 images per class, test/ with 5 held-out images per class plus ``repeated`` train copies."""
    for label, cls in enumerate(["a", "b"]):
        _write_pngs(root / "train" / cls, label, 10)
        _write_pngs(root / "test" / cls, label, 5, start=100)
        for i in range(repeated):
            Image.fromarray(_pixels(label, i), "L").save(root / "test" / cls / f"dup_{i}.png")
    return root


def test_a_few_repeated_test_images_are_dropped_and_recorded(tmp_path, caplog):
    folder = _split_folder(tmp_path / "ds", repeated=1)
    ws = Workspace(tmp_path / "ws")
    with caplog.at_level(logging.WARNING):
        out = run_shard(ws, f"imagefolder:{folder}", progress=False)
    assert out["splits"] == {"train": 20, "test": 10} and out["repeated_dropped"] == {"test": 2}
    assert "left 2 of the 12 test images of ds out" in caplog.text
    rejects = _rejects(ws, "ds")
    assert sorted(Path(r["source"]).name for r in rejects) == ["dup_0.png", "dup_0.png"]
    assert all(r["split"] == "test" and "repeats train image train-" in r["reason"] for r in rejects)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = run_shard(ws, f"imagefolder:{folder}", overlap="keep", progress=False)
    assert kept["splits"] == {"train": 20, "test": 12} and kept["rejects"] == 0
    assert "2 of the 12 test images of ds repeat train images exactly and count in test accuracy" in caplog.text


def test_a_test_split_sharded_later_drops_images_of_the_kept_train_split(tmp_path):
    folder = _split_folder(tmp_path / "ds", repeated=2)
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{folder}", split="train", progress=False)
    out = run_shard(ws, f"imagefolder:{folder}", split="test", progress=False)
    assert out["splits"] == {"test": 10} and out["repeated_dropped"] == {"test": 4}


def test_a_split_mostly_made_of_train_images_is_refused(tmp_path):
    folder = _split_folder(tmp_path / "ds", repeated=6)  # 12 of 22 test images
    ws = Workspace(tmp_path / "ws")
    for overlap in ("drop", "keep"):
        with pytest.raises(DdsError, match="12 of the 22 test images of dataset 'ds' are also train images"):
            run_shard(ws, f"imagefolder:{folder}", overlap=overlap, progress=False)
    with pytest.raises(DdsError, match="--overlap must be one of drop, keep"):
        run_shard(ws, f"imagefolder:{folder}", overlap="ignore", progress=False)
