"""dds.selector.DropIn: the same plans as dds train, the verdict in the labels, resume, DDP parts, the examples."""
from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from synth import write_dataset, write_scores
from test_distributed import _assert_same_state, _torchrun
from torch.utils.data import DataLoader

from dds.errors import DdsError
from dds.pipeline import verdict as V
from dds.pipeline.knn import knn
from dds.selector import DropIn, SampleInfo, Selector, embedding_scores, workspace_scores
from dds.selector.torch import state_to_numpy
from dds.tables import RELABEL, STATUSES
from dds.train.data import load_sample_info
from dds.workspace import Workspace

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples"
N = 60
ENCODER = "lite0-minilm"


def fake_losses(ids: np.ndarray, epoch: int) -> np.ndarray:
    """A loss per (sample, epoch): what a model would report, reproducible from the sample alone."""
    return (np.sin(ids * 1.7 + epoch) + 1.2).astype(np.float32)


class IndexSet(torch.utils.data.Dataset):
    """``ds[i] = (tensor(i), label)``: the batch itself says which samples the loader yielded."""

    def __init__(self, labels: np.ndarray) -> None:
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return torch.tensor(i), int(self.targets[i])


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    """A tiny workspace whose scores carry a verdict: samples 3 and 7 are relabelled, 5 suppressed."""
    ws = Workspace(tmp_path / "ws")
    write_dataset(ws, "tiny", {"train": N, "test": 8})
    write_scores(ws, "tiny", ENCODER, [f"train-{i:07d}" for i in range(N)])
    path = ws.index_dir("tiny", ENCODER) / "scores.parquet"
    table = pq.read_table(path)
    labels = table["label"].to_numpy()
    status = np.array(["clean"] * N, dtype=object)
    status[[3, 7]], status[5] = "relabel", "suppress"
    fixed = labels.copy()
    fixed[[3, 7]] = (labels[[3, 7]] + 1) % 4
    region = np.where(status == "clean", np.where(table["region"].to_numpy(False) == "noisy", "keep",
                                                  table["region"].to_numpy(False)), "noisy")
    table = table.set_column(table.schema.get_field_index("region"), "region", pa.array(region.tolist()))
    pq.write_table(table.append_column("status", pa.array(status.tolist())).append_column(
        "label_fixed", pa.array(fixed, pa.int32())), path)
    return ws


def _train(ds: DropIn, epochs: range, batch_size: int = 7, drop_last: bool = False) -> list[list[int]]:
    """A user's loop with fake losses; the sample indices the loader yielded per epoch."""
    seen = []
    for epoch in epochs:
        seen.append([])
        for x, _ in DataLoader(ds, batch_size=batch_size, sampler=ds.sampler, drop_last=drop_last):
            seen[-1] += x.tolist()
            ds.update(torch.from_numpy(fake_losses(x.numpy(), epoch)))
    return seen


@pytest.mark.parametrize("policy, scored, options", [("dds", True, {"strong_aug": "none"}),
                                                     ("dds", False, {"strong_aug": "none"}),
                                                     ("infobatch", False, {}), ("ucb", False, {"epsilon": 0.2})])
def test_dropin_plans_equal_the_selector_as_dds_train_drives_it(ws, policy, scored, options):
    epochs, budget, seed = 5, 0.5, 3
    # dds train's side (train/loop.py: _setup, then plan / observe(plan.indices, losses, plan.aug) per epoch)
    info = load_sample_info(ws, "tiny", ENCODER, need_scores=scored)
    if not scored:
        info = SampleInfo(labels=info.labels, num_classes=info.num_classes)
    sel = Selector(policy, info, epochs=epochs, budget=budget, seed=seed, **options)
    want = []
    for epoch in range(epochs):
        plan = sel.plan(epoch)
        want.append(plan.indices.tolist())
        sel.observe(plan.indices, fake_losses(plan.indices, epoch), plan.aug)
    # the drop-in's side: the same losses, reported batch by batch through update()
    scores = workspace_scores("tiny", ENCODER, workspace=str(ws.root)) if scored else None
    ds = DropIn(IndexSet(info.labels), policy, epochs=epochs, budget=budget, seed=seed, scores=scores, **options)
    assert len(ds.sampler) == len(want[0])
    assert _train(ds, range(epochs)) == want
    _assert_same_state(ds.selector.state_dict(), sel.state_dict())


def test_dropin_selects_what_dds_train_selected_from_the_losses_it_logged(ws):
    """A real ``dds train`` run; its history's per-sample losses replayed through the drop-in's update()."""
    from dds.catalog import query
    from dds.train import TrainConfig, run_train

    cfg = TrainConfig(dataset="tiny", policy="dds", budget=0.5, epochs=3, model="cnn3", batch_size=16, seed=3,
                      policy_options={"strong_aug": "none"})   # what DropIn runs: no strong views, no probes
    run_id = run_train(ws, cfg, progress=False)["run_id"]
    hist = query(ws, f"SELECT epoch, key, selected, loss FROM history WHERE run_id = '{run_id}' ORDER BY epoch, key")
    idx = {k: i for i, k in enumerate(ws.split_samples("tiny", "train", ["key"])["key"])}
    loss = np.zeros((3, N), np.float32)
    selected: list[set] = [set(), set(), set()]
    for e, key, sel, value in zip(*(hist[c].to_pylist() for c in ("epoch", "key", "selected", "loss"))):
        if sel:
            loss[e, idx[key]] = value
            selected[e].add(idx[key])
    ds = DropIn(IndexSet(load_sample_info(ws, "tiny", ENCODER).labels), "dds", epochs=3, budget=0.5, seed=3,
                scores=workspace_scores("tiny", ENCODER, workspace=str(ws.root)))
    for epoch in range(3):
        seen = []
        for x, _ in DataLoader(ds, batch_size=16, sampler=ds.sampler):
            seen += x.tolist()
            ds.update(torch.from_numpy(loss[epoch, x.numpy()]))
        assert set(seen) == selected[epoch] and len(seen) == len(selected[epoch])


def test_the_verdict_reaches_the_loss_through_the_labels(ws):
    ds = DropIn(IndexSet(load_sample_info(ws, "tiny", ENCODER).labels), epochs=3,
                scores=workspace_scores("tiny", ENCODER, workspace=str(ws.root)))
    info = ds.selector.info
    status = ds.selector.status()
    assert status[3] == status[7] == RELABEL and STATUSES[status[5]] == "suppress"
    for i in range(N):
        assert ds[i][1] == (info.label_fixed[i] if i in (3, 7) else info.labels[i])
    used = np.where(status == RELABEL, info.label_fixed, info.labels)
    for _ in range(3):   # the loader delivers the corrected labels; the suppressed sample never comes
        for x, y in DataLoader(ds, batch_size=16, sampler=ds.sampler):
            assert 5 not in x.tolist() and y.tolist() == used[x.numpy()].tolist()
            ds.update(torch.ones(len(x)))


def test_update_weights_the_batch_loss_like_weighted_mean():
    labels = np.arange(40) % 4
    ds = DropIn(IndexSet(labels), "dds", epochs=4, budget=0.5, loss_rescale="const")
    x, _ = next(iter(DataLoader(ds, batch_size=8, sampler=ds.sampler)))
    loss = torch.arange(8, dtype=torch.float32, requires_grad=True)
    out = ds.update(loss)
    assert torch.isclose(out, loss.detach().mean() * 40 / 20)          # N / size = 2 in pruned epochs
    out.backward()
    assert torch.allclose(loss.grad, torch.full((8,), 2 / 8)) and loss.grad_fn is None


@pytest.mark.parametrize("drop_last", [False, True])
def test_state_dict_resumes_to_the_uninterrupted_plans(drop_last):
    labels = np.arange(50) % 5
    whole = DropIn(IndexSet(labels), epochs=5, budget=0.4, seed=1)
    want = _train(whole, range(5), drop_last=drop_last)
    first = DropIn(IndexSet(labels), epochs=5, budget=0.4, seed=1)
    assert _train(first, range(2), drop_last=drop_last) == want[:2]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)                     # tensors only: torch.load's weights_only default reads it
    again = DropIn(IndexSet(labels), epochs=5, budget=0.4, seed=1)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert _train(again, range(2, 5), drop_last=drop_last) == want[2:]


def test_embedding_scores_find_the_mislabelled_from_image_features_alone():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 16)) * 4
    emb = centres[truth] + rng.normal(size=(120, 16))
    labels = truth.copy()
    flipped = np.arange(0, 120, 10)                      # 12 samples given the next class's label
    labels[flipped] = (truth[flipped] + 1) % 4
    info = embedding_scores(torch.from_numpy(emb), labels, 4, k=10)
    assert info.has_scores and info.status is not None
    suspects = set(np.flatnonzero(info.status != 0).tolist())
    assert suspects <= set(flipped.tolist()) and len(suspects) >= 9     # no clean sample, most mislabelled ones
    relabelled = info.status == RELABEL
    assert relabelled.any() and (info.label_fixed[relabelled] == truth[relabelled]).all()
    assert info.consistency[flipped].max() < info.consistency[np.setdiff1d(np.arange(120), flipped)].min()
    ds = DropIn(IndexSet(labels), epochs=3, scores=emb, k=10)   # the same scores, computed by the drop-in
    np.testing.assert_array_equal(ds.selector.status(), info.status)


def test_embedding_scores_judge_no_label_when_the_neighbours_ignore_the_labels(caplog):
    """Clusters that hold every class alike: the neighbour votes give the given labels less than a
    label-blind guess, and judged by them every sample would be suppressed; instead all stay clean."""
    rng = np.random.default_rng(0)
    emb = (rng.normal(size=(4, 16)) * 4)[np.repeat(np.arange(4), 30)] + rng.normal(size=(120, 16))
    labels = np.tile(np.arange(30) % 4, 4)
    _, idx = knn((emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), 10)

    def votes(rows):
        v = V.neighbour_votes(idx[rows], labels, 4)
        return v, v

    assert (V.static_verdict(V.Views(120, 4, votes), labels).status != "clean").all()   # judged: all suspected
    info = embedding_scores(emb, labels, 4, k=10)
    assert (info.status == 0).all() and (info.label_fixed == labels).all()
    assert "neighbour votes give the given labels a mean probability of" in caplog.text


def test_bad_input_gets_one_sentence():
    labels = np.arange(20) % 2
    with pytest.raises(DdsError, match="has no `targets`: pass labels="):
        DropIn(list(zip(range(20), labels)), epochs=2)
    with pytest.raises(DdsError, match="the dataset has 20 samples but the labels/scores 19"):
        DropIn(IndexSet(labels), epochs=2, labels=labels[:19])
    with pytest.raises(DdsError, match=r"the scores and the dataset's labels differ \(3 labels\)"):
        DropIn(IndexSet(labels), epochs=2, scores=SampleInfo(np.where(np.arange(20) < 3, 1 - labels, labels), 2))
    with pytest.raises(DdsError, match="strong_aug needs `dds train`"):
        DropIn(IndexSet(labels), epochs=2, scores=embedding_scores(np.eye(20), labels, 2, k=3), strong_aug="top_q")
    with pytest.raises(DdsError, match="world_size=2 needs torch.distributed"):
        DropIn(IndexSet(labels), epochs=2, rank=1, world_size=2)
    ds = DropIn(IndexSet(labels), epochs=1, budget=0.5)
    with pytest.raises(DdsError, match="update before any epoch"):
        ds.update(torch.ones(4))
    list(DataLoader(ds, batch_size=4, sampler=ds.sampler))
    with pytest.raises(DdsError, match=r"update takes the \(B,\) per-sample losses"):
        ds.update(torch.ones(4, 2))
    with pytest.raises(DdsError, match="update got 12 losses in epoch 1 but this rank's plan has 10 samples"):
        ds.update(torch.ones(12))
    with pytest.raises(DdsError, match="iterated for epoch 2 but DropIn was built for epochs=1"):
        list(DataLoader(ds, batch_size=4, sampler=ds.sampler))


def test_two_gloo_processes_train_disjoint_parts_that_cover_each_plan(tmp_path):
    sys.path.insert(0, str(HERE))
    from dist_worker import fake_losses as worker_losses

    _torchrun(str(HERE / "dist_worker.py"), "dropin", str(tmp_path))
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    sel = Selector("dds", SampleInfo(np.arange(41) % 3, 3), epochs=3, budget=0.5, seed=2, strong_aug="none")
    for epoch in range(3):
        plan = sel.plan(epoch).indices
        sel.observe(plan, worker_losses(plan))
        p0, p1 = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(p0) == len(p1) == -(-len(plan) // 2)
        assert set(p0) | set(p1) == set(plan.tolist())            # covering
        padding = len(p0) + len(p1) - len(plan)                    # an odd plan repeats its first sample once
        assert padding in (0, 1) and len(set(p0) & set(p1)) == padding
    for rank in ranks:   # every rank observed every rank's losses: the selectors agree with one process
        _assert_same_state(state_to_numpy(rank["state"])["selector"], sel.state_dict())


def test_under_ddp_every_ranks_state_holds_the_losses_drop_last_left_pending(tmp_path):
    """With drop_last=True the epoch's losses are still pending when the loop ends: state_dict() gathers
    them on every rank, so rank 0's file (what a DDP job saves) holds the other rank's losses too."""
    _torchrun(str(HERE / "dist_worker.py"), "dropin_drop_last", str(tmp_path))
    states = [state_to_numpy(pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())["state"]) for r in range(2)]
    for state in states:
        assert len(state["pending"]["indices"]) == 0 and int(state["next_epoch"]) == 1
    _assert_same_state(states[0]["selector"], states[1]["selector"])
    # epoch 0 plans 21 samples, 11 per rank; two full batches of 4 per rank: 16 losses, both ranks' of them
    assert states[0]["selector"]["policy_state"]["loss"]["seen"].sum() == 16


# ---------------------------------------------------------------- the examples, on tiny generated images


@pytest.fixture()
def counted_updates(monkeypatch) -> list[int]:
    """Batch sizes of every ``DropIn.update`` call: proof that the example's loss went through the drop-in."""
    calls: list[int] = []
    update = DropIn.update
    monkeypatch.setattr(DropIn, "update", lambda self, loss: calls.append(len(loss)) or update(self, loss))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return calls


def test_plain_pytorch_example_with_a_timm_model(counted_updates, tmp_path):
    import plain_loop

    out = plain_loop.main(["--synthetic", "48", "--epochs", "2", "--batch-size", "16"])
    assert out["budget_spent"] == 0.5 and sum(counted_updates) == 48 and 0 <= out["test_acc"] <= 1
    emb = np.random.default_rng(0).normal(size=(48, 8)) + np.arange(48)[:, None] % 4 * 3
    np.save(tmp_path / "emb.npy", emb)
    counted_updates.clear()
    out = plain_loop.main(["--synthetic", "48", "--epochs", "2", "--batch-size", "16", "--embeddings",
                           str(tmp_path / "emb.npy")])
    assert out["budget_spent"] == 0.5 and sum(counted_updates) == 48


def test_hugging_face_trainer_example(counted_updates):
    import hf_trainer   # transformers' Trainer also needs accelerate: both come with pip install '.[test]' 

    out = hf_trainer.main(["--synthetic", "48", "--epochs", "2", "--batch-size", "16"])
    assert out["budget_spent"] == 0.5 and sum(counted_updates) == 48 and 0 <= out["test_acc"] <= 1
