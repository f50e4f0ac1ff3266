"""Tests of the encoder registry and `dds embed` (library level), on a tiny workspace built here from
synthetic PNGs written as WebDataset tars plus the contract's parquet/json files (no dependency on
`dds shard`), with the tiny random CLIP; one test loads the offline lite0-minilm pair."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dds.bench.embed import bench_embed
from dds.errors import DdsError
from dds.pipeline.embed import average_prompts, class_prompts, run_embed
from dds.shards import iter_tar_samples
from dds.pipeline.encoders import (Preprocess, create_encoder, list_encoders, map_lite0_state_dict,
                                   parse_openclip_spec)
from dds.workspace import Workspace, atomic_write_json, write_parquet

CLASSES = ["T-shirt/top", "Trouser", "Bag"]
PROMPT_NAMES = ["t-shirt", "pair of trousers", "bag"]
TEMPLATES = ["a photo of a {}.", "a grayscale photo of a {}."]


# ---------------------------------------------------------------- tiny workspace (the shard contract)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(ws: Workspace, name: str = "toy", counts: dict[str, list[int]] | None = None,
                 corrupt_key: str | None = None, seed: int = 0) -> dict[str, list[tuple[str, int, np.ndarray]]]:
    """Write a sharded dataset following the data contract; returns split -> [(key, label, pixels)]."""
    counts = counts or {"train": [7, 7, 5], "test": [4]}
    rng = np.random.default_rng(seed)
    ddir = ws.dataset_dir(name)
    (ddir / "shards").mkdir(parents=True)
    shards, samples, out = [], [], {}
    for split, sizes in counts.items():
        idx = 0
        out[split] = []
        for si, n in enumerate(sizes):
            stem = f"{split}-{si:06d}"
            path = ddir / "shards" / f"{stem}.tar"
            with tarfile.open(path, "w") as tf:
                for _ in range(n):
                    key, label = f"{split}-{idx:07d}", int(rng.integers(0, len(CLASSES)))
                    pix = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
                    png = b"not a png" if key == corrupt_key else _png(pix)
                    for ext, data in (("cls", str(label).encode()), ("png", png)):
                        ti = tarfile.TarInfo(f"{key}.{ext}")
                        ti.size = len(data)
                        tf.addfile(ti, io.BytesIO(data))
                    samples.append(dict(dataset=name, key=key, split=split, label=label, label_orig=label,
                                        shard=stem, idx=idx))
                    out[split].append((key, label, pix))
                    idx += 1
            shards.append(dict(dataset=name, split=split, shard=stem, path=f"shards/{stem}.tar", count=n,
                               sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    write_parquet(ddir / "shards.parquet", {k: [r[k] for r in shards] for k in shards[0]})
    write_parquet(ddir / "samples.parquet", {k: [r[k] for r in samples] for k in samples[0]})
    atomic_write_json(ddir / "dataset.json", {
        "name": name, "source": "synthetic", "manifest": None, "classes": CLASSES, "prompt_names": PROMPT_NAMES,
        "templates": TEMPLATES, "mean": [0.5], "std": [0.5], "image_size": 28, "channels": 1,
        "splits": {s: sum(c) for s, c in counts.items()}, "label_noise": {"fraction": 0.0, "kind": "symmetric",
                                                                          "seed": 0}})
    return out


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "work")


def _outputs(ws: Workspace, enc: str = "tiny-clip", name: str = "toy") -> dict[str, Path]:
    return {p.stem: p for p in sorted((ws.embed_dir(name, enc) / "shards").glob("*.parquet"))}


def _mtimes(paths) -> dict[str, int]:
    return {str(p): os.stat(p).st_mtime_ns for p in paths}


# ---------------------------------------------------------------- pure cores


def test_average_prompts_is_normalised_mean_of_normalised():
    v = np.array([[[3.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 5.0]]])  # (C=2, T=2, D=2)
    out = average_prompts(v)
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]], atol=1e-6)
    assert out.dtype == np.float32


def test_class_prompts_templates_times_names():
    info = {"classes": CLASSES, "prompt_names": PROMPT_NAMES, "templates": TEMPLATES}
    p = class_prompts(info)
    assert len(p) == 3 and p[1] == ["a photo of a pair of trousers.", "a grayscale photo of a pair of trousers."]
    assert class_prompts({"classes": ["Cat"]}) == [["a photo of a cat."]]


def test_parse_openclip_spec():
    assert parse_openclip_spec("ViT-B-32/laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_openclip_spec("ViT-B-32//ck/pt.bin") == ("ViT-B-32", "/ck/pt.bin")
    assert parse_openclip_spec("local-dir:/m/x") == ("local-dir:/m/x", None)
    for bad in ("ViT-B-32", "ViT-B-32/", "/tag", "local-dir:"):
        with pytest.raises(DdsError, match="openclip:"):
            parse_openclip_spec(bad)


def test_map_lite0_state_dict_renames_in_order_and_rejects_mismatch():
    src = {"_conv_stem.weight": torch.ones(2, 3), "_bn0.bias": torch.zeros(2), "_fc.weight": torch.ones(5, 2)}
    dst = {"conv_stem.weight": torch.empty(2, 3), "bn1.bias": torch.empty(2)}
    out = map_lite0_state_dict(src, dst)
    assert list(out) == ["conv_stem.weight", "bn1.bias"] and torch.equal(out["conv_stem.weight"], torch.ones(2, 3))
    with pytest.raises(DdsError, match="does not fit"):
        map_lite0_state_dict(src, {"conv_stem.weight": torch.empty(3, 3), "bn1.bias": torch.empty(2)})


def test_preprocess_grey_equals_rgb_and_normalises():
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 256, (10, 14), dtype=np.uint8), "L")  # 14 wide, 10 high
    pp = Preprocess(8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    x = pp(grey)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, pp(grey.convert("RGB")), atol=1e-5, rtol=0)
    same = Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8), "RGB")
    torch.testing.assert_close(pp(same)[:, 0, 0], torch.tensor([2.5, 2.4, 1.4]))


# ---------------------------------------------------------------- registry


def test_unknown_encoder_lists_known_names():
    assert {"lite0-minilm", "tiny-clip", "openclip:ARCH/PRETRAINED"} <= set(list_encoders())
    with pytest.raises(DdsError, match=r"unknown encoder 'clip-tiny'.*known: lite0-minilm, openclip:ARCH/PRETRAINED, "
                                       r"tiny-clip"):
        create_encoder("clip-tiny")


def test_openclip_tag_offline_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub  # noqa: F401  (import time is not what is measured: retries are ~47 s)
    import open_clip  # noqa: F401

    t0 = time.perf_counter()
    with pytest.raises(DdsError, match=r"HF_HUB_OFFLINE.*lite0-minilm.*local checkpoint") as e:
        create_encoder("openclip:ViT-B-32/laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 5
    assert "\n" not in str(e.value)
    with pytest.raises(DdsError, match="neither an open_clip tag.*lite0-minilm"):
        create_encoder("openclip:ViT-B-32/no_such_tag_or_file")
    with pytest.raises(DdsError, match="must look like openclip:ARCH/PRETRAINED"):
        create_encoder("openclip:ViT-B-32")


def test_tiny_clip_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    t0 = time.perf_counter()
    a = create_encoder("tiny-clip")
    assert time.perf_counter() - t0 < 5  # <1 s once open_clip is imported; slack for a busy machine
    assert torch.equal(torch.rand(1), before)
    b = create_encoder("tiny-clip")
    x = torch.randn(3, 3, a.image_size, a.image_size)
    assert torch.equal(a.encode_images(x), b.encode_images(x))
    assert a.aligned and a.dim == a.text_dim == 32


def _tiny_local_dir(tmp_path: Path) -> Path:
    """An open_clip `local-dir:` folder holding the tiny-clip config and weights."""
    d = tmp_path / "tiny-openclip"
    d.mkdir()
    cfg = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                                         "image_size": 32},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                      "layers": 1}}}
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(create_encoder("tiny-clip").image_model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d


@pytest.mark.parametrize("name", list_encoders())
def test_every_encoder_follows_the_interface_offline(name, tmp_path, monkeypatch):
    """Each registered entry (openclip through a local-dir of tiny weights) builds offline and embeds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = f"openclip:local-dir:{_tiny_local_dir(tmp_path)}" if name.startswith("openclip:") else name
    enc = create_encoder(spec, device="cpu")
    rng = np.random.default_rng(0)
    grey = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L") for _ in range(32)]
    x = torch.stack([enc.preprocess(im) for im in grey])
    assert x.shape == (32, 3, enc.image_size, enc.image_size) and x.dtype == torch.float32
    v = enc.encode_images(x)
    t = enc.encode_text(["a photo of a bag.", "a photo of a coat."])
    assert v.shape == (32, enc.dim) and v.dtype == torch.float32
    assert t.shape == (2, enc.text_dim) and t.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(32))
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))
    assert enc.weights and enc.name == spec
    if name == "lite0-minilm":
        assert (enc.dim, enc.text_dim, enc.aligned, enc.image_size) == (1280, 384, False, 64)
        assert "efficientnet-lite0-57934424.pth" in enc.weights and "all-MiniLM-L6-v2" in enc.weights
        assert not torch.allclose(v[0], v[1])  # real features, not a constant
    else:
        assert enc.aligned and enc.dim == enc.text_dim == 32
    if name.startswith("openclip:"):  # same weights as tiny-clip -> same text vectors
        torch.testing.assert_close(t, create_encoder("tiny-clip").encode_text(["a photo of a bag.",
                                                                               "a photo of a coat."]))


# ---------------------------------------------------------------- run_embed


def test_embed_before_shard_is_a_clear_error(ws):
    with pytest.raises(DdsError, match="run `dds shard"):
        run_embed(ws, "toy", encoder="tiny-clip", progress=False)


def test_embed_writes_unit_vectors_one_parquet_per_shard(ws):
    data = make_dataset(ws)
    s = run_embed(ws, "toy", encoder="tiny-clip", batch_size=3, num_workers=2, device="cpu", progress=False)
    assert s["shards_embedded"] == 3 and s["shards_skipped"] == 0 and s["images"] == 19 and s["dim"] == 32
    outs = _outputs(ws)
    assert list(outs) == ["train-000000", "train-000001", "train-000002"]  # test split not asked for
    enc = create_encoder("tiny-clip")
    rows = [r for p in outs.values() for r in pq.read_table(p).to_pylist()]
    assert [r["key"] for r in rows] == [k for k, _, _ in data["train"]]  # tar order, across 2 workers
    assert [r["label"] for r in rows] == [y for _, y, _ in data["train"]]
    assert {r["dataset"] for r in rows} == {"toy"} and {r["encoder"] for r in rows} == {"tiny-clip"}
    vec = np.array([r["vector"] for r in rows], dtype=np.float32)
    assert vec.shape == (19, 32)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    direct = enc.encode_images(torch.stack([enc.preprocess(Image.fromarray(p, "L")) for _, _, p in data["train"]]))
    np.testing.assert_allclose(vec, direct.numpy(), atol=1e-5)
    schema = pq.read_schema(outs["train-000000"])
    assert pa.types.is_list(schema.field("vector").type) and schema.field("vector").type.value_type == pa.float32()
    assert schema.field("label").type == pa.int32()
    info = json.loads((ws.embed_dir("toy", "tiny-clip") / "encoder.json").read_text())
    assert info["encoder"] == "tiny-clip" and info["dim"] == 32 and info["aligned"] is True
    assert info["image_size"] == 32 and "seed" in info["weights"]
    text = pq.read_table(ws.embed_dir("toy", "tiny-clip") / "text.parquet").to_pylist()
    assert [(t["label"], t["class_name"]) for t in text] == list(enumerate(CLASSES))
    tv = np.array([t["vector"] for t in text])
    expect = average_prompts(enc.encode_text([p for ps in class_prompts(
        {"classes": CLASSES, "prompt_names": PROMPT_NAMES, "templates": TEMPLATES}) for p in ps]).numpy()
        .reshape(3, 2, 32))
    np.testing.assert_allclose(tv, expect, atol=1e-5)
    from dds.catalog import query
    got = query(ws, "SELECT count(*) AS n FROM embeddings WHERE encoder = 'tiny-clip'").to_pylist()
    assert got == [{"n": 19}]


def test_resume_embeds_only_missing_shards_and_rerun_changes_nothing(ws):
    make_dataset(ws)
    run_embed(ws, "toy", encoder="tiny-clip", batch_size=4, num_workers=0, device="cpu", progress=False)
    outs = _outputs(ws)
    extra = [ws.embed_dir("toy", "tiny-clip") / f for f in ("encoder.json", "text.parquet")]
    before = _mtimes(list(outs.values()) + extra)
    time.sleep(0.02)
    s = run_embed(ws, "toy", encoder="tiny-clip", batch_size=4, device="cpu", progress=False)
    assert (s["shards_embedded"], s["shards_skipped"], s["images"]) == (0, 3, 0)
    assert _mtimes(list(outs.values()) + extra) == before
    victim = outs["train-000001"]
    old = pq.read_table(victim)
    victim.unlink()
    s = run_embed(ws, "toy", encoder="tiny-clip", batch_size=4, device="cpu", progress=False)
    assert (s["shards_embedded"], s["shards_skipped"], s["images"]) == (1, 2, 7)
    after = _mtimes(list(outs.values()) + extra)
    changed = {p for p in after if after[p] != before[p]}
    assert changed == {str(victim)}
    assert pq.read_table(victim).equals(old)


def test_other_weights_in_the_folder_is_an_error(ws):
    make_dataset(ws, counts={"train": [3]})
    run_embed(ws, "toy", encoder="tiny-clip", num_workers=0, device="cpu", progress=False)
    path = ws.embed_dir("toy", "tiny-clip") / "encoder.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "weights": "something else"}))
    with pytest.raises(DdsError, match="something else.*delete"):
        run_embed(ws, "toy", encoder="tiny-clip", num_workers=0, device="cpu", progress=False)


def test_corrupt_image_is_skipped_and_recorded(ws, caplog):
    make_dataset(ws, counts={"train": [4, 3]}, corrupt_key="train-0000002")
    s = run_embed(ws, "toy", encoder="tiny-clip", batch_size=2, num_workers=1, device="cpu", progress=False)
    assert s["images"] == 6 and s["corrupt"] == 1
    keys = [r["key"] for p in _outputs(ws).values() for r in pq.read_table(p).to_pylist()]
    assert keys == ["train-0000000", "train-0000001", "train-0000003", "train-0000004", "train-0000005",
                    "train-0000006"]


def test_both_splits_and_tar_reader(ws):
    data = make_dataset(ws)
    s = run_embed(ws, "toy", encoder="tiny-clip", splits=("train", "test"), num_workers=0, device="cpu",
                  progress=False)
    assert s["images"] == 23 and "test-000000" in _outputs(ws)
    keys = [k for k, _ in iter_tar_samples(ws.shards_dir("toy") / "test-000000.tar")]
    assert keys == [k for k, _, _ in data["test"]]


def test_bench_embed_reports_both_rates(ws):
    make_dataset(ws)
    r = bench_embed(ws, "toy", encoder="tiny-clip", batch_size=4, device="cpu", max_images=10, num_workers=0)
    assert r["images"] == 10 and r["bare_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["pipeline_images_per_s"] / r["bare_images_per_s"], rel=0.01)
    assert not _outputs(ws)  # the benchmark writes only to a temporary workspace
