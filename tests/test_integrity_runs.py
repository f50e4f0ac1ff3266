"""Issue 31, part A: a run is bound to its data, outputs never land in the workspace, every stage commits
whole, and a run's status is always true. Each test replays one failing scenario of the issue on a tiny
image folder sharded with `dds shard` (8x8 grey squares, 2 classes), CPU only."""
from __future__ import annotations

import errno
import hashlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import dds.workspace
from dds.catalog import query
from dds.cli import main
from dds.errors import DdsError
from dds.pipeline.shard import run_shard
from dds.tables import load_run
from dds.train import TrainConfig, resume_train, run_train
from dds.workspace import Workspace

N_TRAIN, N_TEST = 24, 8  # per class


def _folder(root: Path) -> Path:
    """imagefolder with train/ and test/, two classes of 8x8 grey squares whose brightness follows the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c, cls in enumerate(("dark", "light")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 120 * c, 30, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(root / split / cls / f"{i:03d}.png")
    return root


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{_folder(tmp_path / 'src')}", name="ds", progress=False)
    return ws


def _source(ws: Workspace) -> str:
    return f"imagefolder:{ws.root.parent / 'src'}"


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(dataset="ds", policy="random", budget=0.5, epochs=2, model="cnn3", batch_size=16,
                                 seed=0), **kw})


@pytest.fixture
def cli(ws, capsys, monkeypatch):
    """``cli(*args)`` runs ``dds ARGS -w WS`` in-process as the console script does; returns (rc, stderr)."""
    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["dds", *args, "-w", str(ws.root)])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr().err
    return run


def _one_line_error(result: tuple[int, str], *expected: str) -> None:
    """The CLI refused with rc 2 and one line that holds every ``expected`` text."""
    rc, err = result
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("dds: error: "), err
    for text in expected:
        assert text in lines[0], lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generation(ws: Workspace) -> str:
    return json.loads((ws.dataset_dir("ds") / "dataset.json").read_text())["generation"]


# ---------------------------------------------------------------- case 1: resume after a re-shard

def test_resume_refuses_another_dataset_generation_naming_both(ws, cli):
    run_id = run_train(ws, _cfg(), progress=False, stop_after=1)["run_id"]
    first = _generation(ws)
    run_shard(ws, _source(ws), name="ds", label_noise=0.3, progress=False)   # same N, flipped labels
    second = _generation(ws)
    assert first != second
    with pytest.raises(DdsError, match=rf"run {run_id} trained on generation {first} .* now holds generation "
                                       rf"{second} \(re-sharded since\).*re-shard 'ds' back.*start a new run"):
        resume_train(ws, run_id, progress=False)
    _one_line_error(cli("train", "ds", "--resume", run_id, "--no-progress"), first, second)
    assert load_run(ws, run_id)["status"] == "stopped"   # the refusal changed nothing
    run_shard(ws, _source(ws), name="ds", progress=False)   # the same data again: the same generation id
    assert _generation(ws) == first
    assert resume_train(ws, run_id, progress=False)["status"] == "done"


# ---------------------------------------------------------------- case 2: shard under a live run; report/export

def test_a_live_run_locks_its_dataset_and_records_its_generations(ws, cli, monkeypatch):
    import dds.train.loop as loop

    refused = []
    train_epoch = loop.train_epoch

    def shard_meanwhile(*a, **kw):   # another process re-shards while the run trains its first epoch
        if not refused:
            with pytest.raises(DdsError) as e:
                run_shard(ws, _source(ws), name="ds", label_noise=0.3, progress=False)
            refused.append(str(e.value))
        return train_epoch(*a, **kw)

    monkeypatch.setattr(loop, "train_epoch", shard_meanwhile)
    before = _generation(ws)
    run_id = run_train(ws, _cfg(), progress=False)["run_id"]
    assert refused == [f"dataset 'ds' is in use by another dds process (run {run_id}, pid {dds.workspace.os.getpid()}); "
                       "wait for it to finish, then try again"]
    assert _generation(ws) == before
    row = query(ws, f"SELECT dataset_generation, index_generation, status FROM runs WHERE run_id = '{run_id}'")
    assert row.to_pylist() == [{"dataset_generation": before, "index_generation": None, "status": "done"}]
    assert load_run(ws, run_id)["dataset_generation"] == before
    run_shard(ws, _source(ws), name="ds", label_noise=0.3, progress=False)   # the run is over: allowed
    out = ws.root.parent / "out"
    _one_line_error(cli("report", run_id, "--out", str(out)), f"run {run_id} trained on generation {before}")
    _one_line_error(cli("export", run_id, "--budget", "0.5", "--out", str(out / "x.parquet")),
                    "re-sharded since")
    assert not out.exists()


# ---------------------------------------------------------------- case 3: outputs inside the workspace

def test_outputs_inside_the_workspace_are_refused_and_exports_rename_whole_files(ws, cli):
    run_id = run_train(ws, _cfg(epochs=1), progress=False)["run_id"]
    ddir = ws.dataset_dir("ds")
    tables = {p: _sha(p) for p in [*ddir.glob("*.parquet"), *(ddir / "shards").glob("*.tar")]}
    for args in (["export", run_id, "--budget", "0.5", "--out", str(ws.root.parent / "x.parquet"),
                  "--shards", str(ddir / "shards")],
                 ["export", run_id, "--budget", "0.5", "--out", str(ddir / "samples.parquet")],
                 ["audit", "ds", "--out", str(ddir / "index" / "lite0-minilm" / "scores.parquet")],
                 ["report", run_id, "--out", str(ws.run_dir(run_id))],
                 ["bench", "ds", "--results", str(ws.root / "runs" / "x.jsonl")]):
        _one_line_error(cli(*args), "lies inside the workspace's own", "give a path outside")
    assert {p: _sha(p) for p in tables} == tables
    out = ws.root.parent / "subset"
    rc, err = cli("export", run_id, "--budget", "0.5", "--out", str(out / "subset.parquet"), "--shards", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["subset.parquet", "test-000000.tar", "train-000000.tar"]
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 3 * N_TRAIN   # half of 2 x N_TRAIN samples, 3 members each


def test_run_bench_refuses_results_inside_the_workspace_before_training(ws):
    from dds.bench.training import run_bench   # the path of the benchmarks/ scripts, which skip the CLI
    with pytest.raises(DdsError, match="lies inside the workspace's own runs"):
        run_bench(ws, "ds", policies=["full"], budgets=[0.5], epochs=1, seeds=1, progress=False,
                  results=ws.root / "runs" / "x.jsonl")
    assert not (ws.root / "runs" / "x.jsonl").exists()
    assert not list(ws.root.glob("runs/*/run.json"))   # refused before any run started


# ---------------------------------------------------------------- case 4: a damaged checkpoint

def test_resume_refuses_a_checkpoint_that_fails_its_checksum(ws, cli):
    run_id = run_train(ws, _cfg(), progress=False, stop_after=1)["run_id"]
    ckpt = ws.run_dir(run_id) / "checkpoint.pt"
    good = ckpt.read_bytes()
    side = json.loads((ws.run_dir(run_id) / "checkpoint.json").read_text())
    assert side["sha256"] == hashlib.sha256(good).hexdigest()
    middle = len(good) // 2
    ckpt.write_bytes(good[:middle] + bytes(64) + good[middle + 64:])
    _one_line_error(cli("train", "ds", "--resume", run_id, "--no-progress"),
                    f"checkpoint {ckpt}", "sha256 differs from the one in checkpoint.json", "start a new run")
    ckpt.write_bytes(good)
    sidecar = ws.run_dir(run_id) / "checkpoint.json"
    sidecar.unlink()   # a checksummed checkpoint without its sidecar is not taken unverified
    _one_line_error(cli("train", "ds", "--resume", run_id, "--no-progress"), "checkpoint.json is missing",
                    "start a new run")
    sidecar.write_text("{not json")
    _one_line_error(cli("train", "ds", "--resume", run_id, "--no-progress"), "checkpoint.json is unreadable")
    # killed between the sidecar and the checkpoint: the sidecar names the next one, the previous still verifies
    (ws.run_dir(run_id) / "checkpoint.json").write_text(json.dumps({"sha256": "0" * 64, "previous": side["sha256"]}))
    assert resume_train(ws, run_id, progress=False)["status"] == "done"


def test_resharding_new_labels_removes_the_whole_index_generation(ws):
    from dds.pipeline.embed import run_embed
    from dds.pipeline.index import run_index

    run_embed(ws, "ds", encoder="tiny-clip", batch_size=16, num_workers=0, device="cpu", progress=False)
    run_index(ws, "ds", encoder="tiny-clip", k=4, folds=2, device="cpu", progress=False)
    idir = ws.index_dir("ds", "tiny-clip")
    assert (idir / "index.json").exists()
    run_shard(ws, _source(ws), name="ds", label_noise=0.3, progress=False)
    assert sorted(p.name for p in idir.iterdir()) == [".lock"]   # no index.json or generation of the old labels


def test_train_refuses_scores_computed_on_other_train_images(ws, tmp_path):
    import shutil

    from dds.pipeline.embed import run_embed
    from dds.pipeline.index import run_index

    run_embed(ws, "ds", encoder="tiny-clip", batch_size=16, num_workers=0, device="cpu", progress=False)
    run_index(ws, "ds", encoder="tiny-clip", k=4, folds=2, device="cpu", progress=False)
    idir = ws.index_dir("ds", "tiny-clip")
    shutil.copytree(idir, tmp_path / "old-index", symlinks=True)
    image = ws.root.parent / "src" / "train" / "dark" / "000.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8), "L").save(image)    # same keys and labels, another image
    run_shard(ws, _source(ws), name="ds", progress=False)
    shutil.rmtree(idir)
    shutil.copytree(tmp_path / "old-index", idir, symlinks=True)       # an index left from before the re-shard
    with pytest.raises(DdsError, match=r"scores of 'ds' \(tiny-clip\) were computed on train samples of generation"):
        run_train(ws, _cfg(policy="dds", encoder="tiny-clip"), progress=False)


def test_a_tar_glob_that_mixes_split_tars_with_others_is_refused(ws, tmp_path):
    shards = ws.dataset_dir("ds") / "shards"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for tar in shards.glob("*.tar"):
        (mixed / tar.name).write_bytes(tar.read_bytes())
    (mixed / "val-000000.tar").write_bytes(next(shards.glob("test-*.tar")).read_bytes())
    with pytest.raises(DdsError, match=r"mixes tars named train-\*/test-\* .* with others \(val-000000.tar"):
        run_shard(ws, f"tar:{mixed}/*.tar", name="copy", progress=False)
    assert not ws.dataset_dir("copy").joinpath("dataset.json").exists()


# ---------------------------------------------------------------- case 5: a kill inside dds index

def test_index_switches_knn_scores_and_index_json_at_once(ws, monkeypatch):
    import dds.pipeline.index as index
    from dds.pipeline.embed import run_embed

    run_embed(ws, "ds", encoder="tiny-clip", batch_size=16, num_workers=0, device="cpu", progress=False)
    first = index.run_index(ws, "ds", encoder="tiny-clip", k=4, folds=2, device="cpu", progress=False)
    idir = ws.index_dir("ds", "tiny-clip")
    files = {f: _sha(idir / f) for f in ("knn.parquet", "scores.parquet", "index.json")}
    write = index.write_parquet

    def killed_after_knn(path, table):   # kill -9 between the kNN and the scores writes
        if path.name == "scores.parquet":
            raise KeyboardInterrupt
        write(path, table)

    monkeypatch.setattr(index, "write_parquet", killed_after_knn)
    with pytest.raises(KeyboardInterrupt):
        index.run_index(ws, "ds", encoder="tiny-clip", k=2, folds=2, device="cpu", progress=False)
    assert {f: _sha(idir / f) for f in files} == files   # the previous consistent three, all in use
    knn = pq.read_table(idir / "knn.parquet").to_pandas()
    assert knn.groupby(["key", "scope"]).size().eq(4).all()
    assert json.loads((idir / "index.json").read_text())["k"] == 4
    assert sorted(p.name for p in idir.glob("gen-*")) == [first["generation"]]
    monkeypatch.setattr(index, "write_parquet", write)
    second = index.run_index(ws, "ds", encoder="tiny-clip", k=2, folds=2, device="cpu", progress=False)
    assert second["generation"] != first["generation"]
    assert pq.read_table(idir / "knn.parquet").to_pandas().groupby(["key", "scope"]).size().eq(2).all()
    assert sorted(p.name for p in idir.glob("gen-*")) == [second["generation"]]


# ---------------------------------------------------------------- case 7: stale embeddings, split rows

def test_embed_redoes_a_shard_that_was_damaged_when_embedded_once_dds_shard_repairs_it(ws):
    from dds.pipeline.embed import run_embed

    tar_path = ws.shards_dir("ds") / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    damaged = bytearray(tar_path.read_bytes())
    damaged[member.offset_data:member.offset_data + 8] = bytes(8)   # the PNG signature zeroed
    tar_path.write_bytes(bytes(damaged))
    kw = dict(encoder="tiny-clip", batch_size=16, num_workers=0, device="cpu", progress=False)
    assert run_embed(ws, "ds", **kw)["corrupt"] == 1
    run_shard(ws, _source(ws), name="ds", progress=False)   # the same source again: the tar is repaired
    again = run_embed(ws, "ds", **kw)
    assert (again["shards_embedded"], again["corrupt"]) == (1, 0)
    got = query(ws, "SELECT count(*) AS n FROM embeddings WHERE encoder = 'tiny-clip'").to_pylist()
    assert got == [{"n": 2 * N_TRAIN}]
    assert run_embed(ws, "ds", **kw)["shards_embedded"] == 0


def test_resharding_one_split_refuses_to_drop_the_rows_of_the_other(ws):
    ddir = ws.dataset_dir("ds")
    before = (_generation(ws), (ddir / "current").resolve())
    (ddir / "samples.parquet").unlink()
    with pytest.raises(DdsError, match=r"lists split\(s\) test \(0 of 16 rows\) that samples.parquet no longer "
                                       r"holds.*shard every split again \(omit --split\)"):
        run_shard(ws, f"imagefolder:{ws.root.parent / 'src' / 'train'}", name="ds", split="train", progress=False)
    assert (_generation(ws), (ddir / "current").resolve()) == before
    run_shard(ws, _source(ws), name="ds", progress=False)   # every split: consistent again
    samples = pq.read_table(ddir / "samples.parquet").to_pandas()
    assert samples["split"].value_counts().to_dict() == {"train": 2 * N_TRAIN, "test": 2 * N_TEST}


# ---------------------------------------------------------------- case 12: run status and Ctrl-C

def test_a_run_that_fills_the_disk_is_marked_failed_with_the_reason(ws, monkeypatch):
    real_open = open

    def disk_full_open(path, mode="r", *a, **kw):
        """A disk with no room from the first checkpoint on: its partial file holds the last free bytes."""
        f = real_open(path, mode, *a, **kw)
        path = Path(path)
        partial = [p for p in path.parent.iterdir() if "checkpoint.pt" in p.name and p.name.endswith(".tmp")]
        if "w" in mode and ("checkpoint.pt" in path.name or partial):
            write = f.write

            def full(data):
                write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = full
        return f

    monkeypatch.setattr(dds.workspace, "open", disk_full_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        run_train(ws, _cfg(), progress=False)
    monkeypatch.undo()
    run_id = next(p.name for p in (ws.root / "runs").iterdir())
    row = load_run(ws, run_id)
    assert row["status"] == "failed" and "No space left on device" in row["reason"]
    got = query(ws, "SELECT status, reason FROM runs").to_pylist()
    assert got == [{"status": "failed", "reason": "OSError: [Errno 28] No space left on device"}]
    assert not [p for p in ws.run_dir(run_id).iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_outside_a_commands_own_handler_still_says_one_line(ws, cli, monkeypatch):
    """typer turns a KeyboardInterrupt it catches into a silent exit 130: main() says the generic line."""
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("dds.catalog.query_all", interrupted)
    rc, err = cli("sql", "SELECT 1")
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1 and lines[0].startswith("dds: interrupted; "), err


@pytest.mark.parametrize("command, patch, kept", [
    (["shard", "imagefolder:SRC", "--name", "ds"], "dds.pipeline.shard.run_shard", "the dataset was left as it was"),
    (["embed", "ds"], "dds.pipeline.embed.run_embed", "the shards embedded so far are kept; run dds embed ds again"),
    (["index", "ds"], "dds.pipeline.index.run_index", "still the one in use; run dds index ds again"),
    (["train", "ds", "--model", "cnn3"], "dds.train.loop._setup", "nothing was written (the run had not started)"),
])
def test_ctrl_c_says_what_was_kept_and_exits_130(ws, cli, monkeypatch, command, patch, kept):
    module, _, name = patch.rpartition(".")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(module + "." + name, interrupted)
    args = [a.replace("SRC", str(ws.root.parent / "src")) for a in command]
    rc, err = cli(*args, "--no-progress")
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1 and lines[0].startswith("dds: interrupted; ") and kept in lines[0], err
