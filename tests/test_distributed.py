"""torch.distributed: plan parts, loss gather, and 2-process (gloo, CPU) selector, train and embed runs."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from synth import write_dataset, write_scores

from dds.catalog import query
from dds.distributed import Dist, gather_part, interleave, part_positions, part_size, plan_checksum
from dds.pipeline.embed import run_embed
from dds.selector import Selector
from dds.selector._selector import synthetic_info
from dds.workspace import Workspace

HERE = Path(__file__).parent
N_TRAIN = 48


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args])


def _dds(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dds", *args])


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize("m, world", [(12, 2), (13, 2), (13, 4), (1, 3), (0, 2), (1000, 8)])
def test_parts_are_disjoint_equal_and_cover_the_plan(m, world):
    parts = [part_positions(m, r, world) for r in range(world)]
    assert {len(p) for p in parts} == {part_size(m, world)}
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == world * part_size(m, world)  # disjoint positions
    assert flat.max(initial=-1) < m + world - 1 and world * part_size(m, world) - m < world  # padding < world
    if m:
        assert set((flat % m).tolist()) == set(range(m))  # every plan entry is trained


def test_interleave_puts_gathered_parts_back_in_plan_order():
    m, world = 11, 3
    plan_values = np.arange(100, 100 + m)
    parts = np.stack([plan_values[part_positions(m, r, world) % m] for r in range(world)])
    assert interleave(parts, m).tolist() == plan_values.tolist()
    single = torch.arange(5.0)
    assert torch.equal(gather_part(Dist(), single, 5), single)  # one process: nothing to gather


def test_plan_sampler_yields_the_rank_part():
    from dds.selector._base import make_plan
    from dds.selector.torch import PlanSampler

    plan = make_plan(0, np.array([5, 3, 9, 1, 7]))
    parts = [list(PlanSampler(plan, rank=r, world=2)) for r in range(2)]
    assert parts == [[5, 9, 7], [3, 1, 5]] and len(PlanSampler(plan, rank=1, world=2)) == 3
    assert list(PlanSampler(plan)) == [5, 3, 9, 1, 7]


def test_rank_batches_together_are_the_single_process_batch():
    m, world, batch = 1000, 4, 64
    parts = [part_positions(m, r, world) for r in range(world)]
    for k in range(part_size(m, world) // (batch // world)):
        sl = slice(k * (batch // world), (k + 1) * (batch // world))
        together = np.sort(np.concatenate([p[sl] for p in parts]))
        assert together.tolist() == list(range(k * batch, (k + 1) * batch))


def test_plan_checksum_sees_order_and_content():
    a = np.arange(1000)
    assert plan_checksum(a) == plan_checksum(a.copy())
    assert plan_checksum(a) != plan_checksum(a[::-1])
    assert plan_checksum(a) != plan_checksum(a[:-1])
    b = a.copy()
    b[500] = 1000
    assert plan_checksum(a) != plan_checksum(b)
    aug, w = np.zeros(1000, np.uint8), np.ones(1000, np.float32)
    assert plan_checksum(a, aug, w) != plan_checksum(a, aug + (a == 7), w)
    assert plan_checksum(a, aug, w) != plan_checksum(a, aug, w * 2)


# ---------------------------------------------------------------- 2 processes, gloo


def test_selector_state_after_gathered_epochs_equals_single_process(tmp_path):
    sys.path.insert(0, str(HERE))
    from dist_worker import fake_losses

    _torchrun(str(HERE / "dist_worker.py"), "selector", str(tmp_path))
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    sel = Selector("dds", synthetic_info(1001, 7), epochs=4, budget=0.5, seed=5, warmup_epochs=1)
    for epoch in range(2):
        plan = sel.plan(epoch)
        sel.observe(plan.indices, fake_losses(plan.indices))
        # the two ranks' parts are disjoint and together cover the plan (no padding needed when even)
        p0, p1 = ranks[0]["parts"][epoch], ranks[1]["parts"][epoch]
        assert len(p0) == len(p1) == -(-len(plan) // 2)
        assert set(p0) | set(p1) == set(plan.indices.tolist())
    want = sel.state_dict()
    for rank in ranks:
        _assert_same_state(rank["state"], want)


def _assert_same_state(got, want, where: str = "state") -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _assert_same_state(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, err_msg=where)
    else:
        assert got == want, where


@pytest.fixture()
def tiny(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    write_dataset(ws, "tiny", {"train": N_TRAIN, "test": 16})
    write_scores(ws, "tiny", "lite0-minilm", [f"train-{i:07d}" for i in range(N_TRAIN)])
    return ws


def _history(ws: Workspace, run_id: str):
    return query(ws, f"SELECT epoch, key, selected, weight, aug, loss FROM history WHERE run_id = '{run_id}' "
                     "ORDER BY epoch, key")


def test_two_process_train_writes_one_history_and_resumes(tiny, tmp_path):
    common = ["train", "tiny", "--policy", "dds", "--budget", "0.5", "--epochs", "3", "-m", "cnn3",
              "-o", "strong_aug=top_q", "--batch-size", "16", "--seed", "3", "--nproc", "2", "--no-progress", "-w", str(tiny.root)]
    _dds(*common)
    (run,) = query(tiny, "SELECT run_id, status, epochs_done, test_acc FROM runs").to_pylist()
    assert run["status"] == "done" and run["epochs_done"] == 3 and 0 <= run["test_acc"] <= 1
    full = _history(tiny, run["run_id"])
    assert full.num_rows == 3 * N_TRAIN  # one history, written once (rank 0), one row per sample and epoch
    epochs = query(tiny, f"SELECT epoch, sample_steps FROM epochs WHERE run_id = '{run['run_id']}' ORDER BY epoch")
    assert epochs["epoch"].to_pylist() == [0, 1, 2]
    _assert_single_process_plans(tiny, full, epochs["sample_steps"].to_pylist())

    # killed after epoch 1 (stop_after), then resumed under torchrun: the same history
    _torchrun(str(HERE / "dist_worker.py"), "train", str(tmp_path), str(tiny.root))
    run_id = (tmp_path / "run_id").read_text()
    _dds("train", "tiny", "--resume", run_id, "--nproc", "2", "--no-progress", "-w", str(tiny.root))
    resumed = _history(tiny, run_id)
    assert resumed.num_rows == full.num_rows
    for col in ("epoch", "key", "selected", "aug"):
        assert resumed[col].to_pylist() == full[col].to_pylist(), col
    np.testing.assert_allclose(np.asarray(resumed["loss"].to_pylist(), dtype=float),
                               np.asarray(full["loss"].to_pylist(), dtype=float), rtol=1e-5)


def _assert_single_process_plans(ws: Workspace, hist, sample_steps: list[int]) -> None:
    """A single-process selector given the losses the 2-process run observed plans what that run trained:
    the same samples, weights and augmentation every epoch, and the same sample-steps (plan + padding)."""
    from dds.train.data import load_sample_info

    sel = Selector("dds", load_sample_info(ws, "tiny", "lite0-minilm"), epochs=3, budget=0.5, seed=3,
                   strong_aug="top_q")
    keys = np.asarray(ws.split_samples("tiny", "train", ["key"])["key"], dtype=str)
    rows = hist.to_pandas()
    for epoch in range(3):
        plan = sel.plan(epoch)
        got = rows[(rows["epoch"] == epoch) & rows["selected"]].set_index("key")
        planned = keys[plan.indices]
        assert len(set(planned)) == len(planned)  # no sample twice: the history's per-sample loss is exact
        assert sorted(got.index) == sorted(planned), f"epoch {epoch}: other samples than one process plans"
        np.testing.assert_allclose(got.loc[planned, "weight"].to_numpy(float), plan.weights, rtol=1e-6)
        assert (got.loc[planned, "aug"] == "strong").tolist() == (plan.aug >= 1).tolist()  # codes 1..AUG_LEVELS: strong
        assert sample_steps[epoch] == 2 * part_size(len(plan.indices), 2)
        sel.observe(plan.indices, got.loc[planned, "loss"].to_numpy(np.float32), plan.aug)


def test_two_process_embed_equals_single_process_and_resumes(tmp_path):
    one, two = Workspace(tmp_path / "one"), Workspace(tmp_path / "two")
    for ws in (one, two):
        write_dataset(ws, "toy", {"train": 40, "test": 8}, shard_size=10)  # 4 train shards
    run_embed(one, "toy", encoder="tiny-clip", batch_size=8, num_workers=0, progress=False)
    out = _dds("embed", "toy", "--encoder", "tiny-clip", "-b", "8", "--workers", "0", "--nproc", "2",
               "--no-progress", "-w", str(two.root))
    assert "processes" in out.stdout
    files = sorted(p.name for p in (one.embed_dir("toy", "tiny-clip") / "shards").glob("*.parquet"))
    assert len(files) == 4
    for name in files:
        a, b = (pq.read_table(ws.embed_dir("toy", "tiny-clip") / "shards" / name) for ws in (one, two))
        assert a["key"].to_pylist() == b["key"].to_pylist() and a["label"].to_pylist() == b["label"].to_pylist()
        np.testing.assert_allclose(np.asarray(a["vector"].to_pylist()), np.asarray(b["vector"].to_pylist()),
                                   rtol=1e-5, atol=1e-6)
    assert (two.embed_dir("toy", "tiny-clip") / "text.parquet").exists()

    # a crash lost one shard's file: the re-run embeds only that shard
    shards = two.embed_dir("toy", "tiny-clip") / "shards"
    (shards / files[1]).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}
    _dds("embed", "toy", "--encoder", "tiny-clip", "-b", "8", "--workers", "0", "--nproc", "2",
         "--no-progress", "-w", str(two.root))
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}
    assert sorted(after) == files and all(after[k] == v for k, v in before.items())


def test_two_process_errors_are_one_line_and_keep_the_exit_status(tiny):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    bad = subprocess.run([sys.executable, "-m", "dds", "train", "tiny", "--batch-size", "15", "--nproc", "2",
                          "-w", str(tiny.root)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == ("dds: error: --batch-size 15 is the global batch and "
                                                          "must split evenly over --nproc 2")
    missing = subprocess.run([sys.executable, "-m", "dds", "train", "nosuch", "--nproc", "2", "-w", str(tiny.root)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "dds: error: dataset 'nosuch' is not in workspace" in missing.stderr
