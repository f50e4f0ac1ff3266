"""Suspects as unlabeled data (dds ``suspects=unlabeled``): plans, pseudo-labels, un-suspecting, budget."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dds.errors import DdsError
from dds.selector import UNLABELED, SampleInfo, Selector
from dds.selector._dds import agreement_counts, pseudo_threshold, unlabeled_split
from dds.tables import CLEAN, RELABEL, SUPPRESS


def _info(n: int = 400, classes: int = 4, suspects: int = 80, seed: int = 0) -> SampleInfo:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes)
    status = np.full(n, CLEAN, np.int8)
    status[:suspects] = SUPPRESS
    status[suspects:suspects + 20] = RELABEL
    fixed = labels.copy()
    fixed[suspects:suspects + 20] = (labels[suspects:suspects + 20] + 1) % classes
    return SampleInfo(labels=labels, num_classes=classes, status=status, label_fixed=fixed)


def _run(sel: Selector, epochs: int, target_of=None, seed: int = 0) -> list:
    """Plan and observe every epoch; UNLABELED samples get ``target_of(indices)`` as their pseudo-labels."""
    rng, plans = np.random.default_rng(seed), []
    for e in range(epochs):
        plan = sel.plan(e)
        plans.append(plan)
        targets = None
        if plan.labels is not None and target_of is not None:
            targets = np.where(plan.labels == UNLABELED, target_of(plan.indices), plan.labels)
        sel.observe(plan.indices, rng.gamma(2.0, 0.5, len(plan)).astype(np.float32), plan.aug, targets)
    return plans


def test_suspects_are_planned_unlabeled_at_strong_views_with_their_share():
    info = _info()
    plans = _run(Selector("dds", info, suspects="unlabeled", epochs=8, budget=0.5, seed=1), 8)
    assert plans[0].labels is None or not (plans[0].labels == UNLABELED).any()   # no threshold before any loss
    for plan in plans[1:-1]:
        unl = plan.labels == UNLABELED
        assert unl.any() and (info.status[plan.indices[unl]] == SUPPRESS).all()
        assert (plan.aug[unl] > 0).all() and 0 < plan.pseudo_threshold < 1
        assert not (info.status[plan.indices[~unl]] == SUPPRESS).any()     # suspects never with their label
    assert plans[-1].labels is not None and not (plans[-1].labels == UNLABELED).any()   # annealing: none
    assert not (info.status[plans[-1].indices] == SUPPRESS).any()


def test_budget_charges_the_weak_forwards_and_is_spent_exactly():
    info = _info()
    sel = Selector("dds", info, suspects="unlabeled", epochs=8, budget=0.5, seed=2, forward_cost=0.5)
    plans = _run(sel, 8)
    for plan in plans:
        u = 0 if plan.labels is None else int((plan.labels == UNLABELED).sum())
        assert plan.extra_steps == math.ceil(u * 0.5)
    assert sel.spent() == sum(len(p) + p.extra_steps for p in plans) == sel.total_sample_steps
    assert unlabeled_split(1000, 100, 1000, 0.25) == (80, 20)   # 80 samples x 1.25 = 100 = their share
    assert unlabeled_split(1000, 0, 1000, 0.25) == (0, 0)


def test_a_suspect_whose_pseudo_labels_keep_naming_its_label_is_cleared():
    info = _info()
    agreeing = np.zeros(info.n, bool)
    agreeing[:40] = True   # half the suspects: the model keeps predicting their given label
    wrong = (info.labels + 1) % info.num_classes
    sel = Selector("dds", info, suspects="unlabeled", epochs=12, budget=0.8, seed=3, unsuspect_after=2)
    _run(sel, 12, target_of=lambda idx: np.where(agreeing[idx], info.labels[idx], wrong[idx]))
    status = sel.status()
    assert (status[agreeing] == CLEAN).mean() > 0.5      # cleared once seen twice in a row
    assert (status[:80][~agreeing[:80]] == SUPPRESS).all()   # disagreeing suspects stay suspects
    assert (status[80:100] == RELABEL).all()
    never = Selector("dds", info, suspects="unlabeled", epochs=12, budget=0.8, seed=3, unsuspect_after=0)
    _run(never, 12, target_of=lambda idx: info.labels[idx])
    assert (never.status()[:80] == SUPPRESS).all()


def test_agreement_counts_and_threshold_are_pure():
    counts = np.array([0, 1, 2, 1])
    out = agreement_counts(counts, targets=np.array([3, 3, -1, 2]), given=np.array([3, 3, 0, 1]))
    assert out.tolist() == [1, 2, 2, 0] and counts.tolist() == [0, 1, 2, 1]
    assert pseudo_threshold(np.zeros(0, np.float32)) is None
    assert pseudo_threshold(np.array([0.0, np.log(2)], np.float32)) == pytest.approx(0.75)


def test_without_suspects_unlabeled_plans_equal_drop_plans():
    labels = np.arange(300) % 3
    info = SampleInfo(labels=labels, num_classes=3)
    a = _run(Selector("dds", info, suspects="unlabeled", epochs=6, budget=0.5, seed=4), 6)
    b = _run(Selector("dds", info, epochs=6, budget=0.5, seed=4), 6)
    assert all(np.array_equal(p.indices, q.indices) and p.extra_steps == q.extra_steps == 0 for p, q in zip(a, b))


def test_resume_mid_run_repeats_the_uninterrupted_plans():
    info = _info()
    target_of = lambda idx: info.labels[idx]   # noqa: E731
    whole = _run(Selector("dds", info, suspects="unlabeled", epochs=8, budget=0.5, seed=5), 8, target_of)
    first = Selector("dds", info, suspects="unlabeled", epochs=8, budget=0.5, seed=5)
    rng = np.random.default_rng(0)
    for e in range(4):   # the same observations as _run's first four epochs
        plan = first.plan(e)
        targets = None if plan.labels is None else np.where(plan.labels == UNLABELED, target_of(plan.indices), plan.labels)
        first.observe(plan.indices, rng.gamma(2.0, 0.5, len(plan)).astype(np.float32), plan.aug, targets)
    again = Selector("dds", info, suspects="unlabeled", epochs=8, budget=0.5, seed=5)
    again.load_state_dict(first.state_dict())
    plan = again.plan(4)
    assert np.array_equal(plan.indices, whole[4].indices) and np.array_equal(plan.labels, whole[4].labels)
    first.plan(4)   # suspects are cleared when an epoch is planned
    assert np.array_equal(again.status(), first.status())


def test_observe_checks_targets():
    sel = Selector("dds", _info(), suspects="unlabeled", epochs=4, budget=0.5)
    plan = sel.plan(0)
    with pytest.raises(DdsError, match="targets"):
        sel.observe(plan.indices, np.ones(len(plan), np.float32), plan.aug, np.ones(3, np.int64))


class _Constant(torch.nn.Module):
    """Predicts class ``k`` with probability ~1 for every image; counts its forwards and their mode."""

    def __init__(self, classes: int, k: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.bias = torch.full((classes,), -50.0)
        self.bias[k] = 50.0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.bias.expand(x.shape[0], -1) + self.w * x.flatten(1).mean(1, keepdim=True)


def test_pseudo_labels_replace_the_given_labels_and_never_read_them():
    from dds.train.loop import pseudo_label

    model = _Constant(4, k=2)
    y = torch.tensor([0, 1, 3, 3])
    unl = torch.tensor([False, True, False, True])
    weak = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    stats = dict(mean=torch.zeros(1, 1, 1, 1), std=torch.ones(1, 1, 1, 1))
    y2, w2 = pseudo_label(model, weak, unl, y, torch.ones(4), 0.9, **stats)
    assert y2.tolist() == [0, 2, 3, 2] and w2.tolist() == [1, 1, 1, 1] and y.tolist() == [0, 1, 3, 3]
    assert model.modes == [False] and model.training   # predicted in eval mode, train mode restored
    garbage = y.clone()
    garbage[unl] = -7   # whatever sits at the unlabeled entries is never read
    assert torch.equal(pseudo_label(model, weak, unl, garbage, torch.ones(4), 0.9, **stats)[0], y2)
    _, w3 = pseudo_label(model, weak, unl, y, torch.ones(4), 1.1, **stats)   # below the threshold: weight 0
    assert w3.tolist() == [1, 0, 1, 0]


# ---- strong_aug=gap: strong views where the held-out gap opens ----

def test_gap_codes_are_a_pure_function_of_gap_suitability_and_phase():
    from dds.selector import AUG_LEVELS
    from dds.selector._dds import gap_codes, held_out_gap

    s = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    assert gap_codes(0.9, s, 0, 1.0).tolist() == [0, 0, 0, 0]     # warm-up
    assert gap_codes(0.9, s, 2, 1.0).tolist() == [0, 0, 0, 0]     # annealing
    assert gap_codes(0.1, s, 1, 1.0).tolist() == [0, 0, 0, 0]     # a small gap keeps base views
    mid, high = gap_codes(0.5, s, 1, 1.0), gap_codes(1.0, s, 1, 1.0)
    assert mid[0] == high[0] == 0                                  # suitability 0 (suspects): never
    assert (high >= mid).all() and high[-1] == AUG_LEVELS and (np.diff(high.astype(int)) >= 0).all()
    assert held_out_gap(np.array([2.0]), np.array([0.5])) == pytest.approx(0.75)
    assert held_out_gap(np.array([1.0]), np.array([3.0])) == 0.0 and held_out_gap(np.zeros(0), np.ones(2)) is None


def _gap_run(epochs: int, anchor_factor: float, seed: int = 0):
    """A dds run with strong_aug=gap whose trained samples' losses are ``anchor_factor`` times the
    held-out ones (the probes: weight 0 = held out)."""
    labels = np.arange(1000) % 5
    info = SampleInfo(labels=labels, num_classes=5)
    sel = Selector("dds", info, epochs=epochs, budget=0.5, seed=seed, strong_aug="gap")
    plans = []
    for e in range(epochs):
        plan = sel.plan(e)
        plans.append(plan)
        losses = np.ones(len(plan), np.float32)
        losses[plan.weights > 0] = anchor_factor
        sel.observe(plan.indices, losses, plan.aug)
    return sel, plans


def test_gap_plans_probe_sets_every_pruned_epoch_and_spend_the_budget():
    sel, plans = _gap_run(8, 0.2)
    held = set(plans[0].indices[plans[0].weights == 0].tolist())
    assert len(held) == 50   # 2 % of 1000, at least PROBE_MIN
    for plan in plans[:-1]:
        probe = plan.weights == 0
        assert set(plan.indices[probe].tolist()) == held and (plan.aug[probe] == 0).all()
    assert (plans[0].aug == 0).all()                                  # no gap measured yet
    assert all((p.aug > 0).mean() > 0.5 for p in plans[1:-1])         # a wide gap: strong views
    assert (plans[-1].aug == 0).all() and (plans[-1].weights == 1).all()   # annealing: base, all trained
    assert sel.spent() == sel.total_sample_steps


def test_gap_keeps_base_views_while_the_model_generalises():
    _, plans = _gap_run(8, 1.0)   # trained and held-out losses alike: no gap
    assert all((p.aug == 0).all() for p in plans)


# ---- end to end through `dds train`'s loop ----

def _verdict_workspace(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from synth import write_dataset, write_scores

    from dds.workspace import Workspace

    ws = Workspace(tmp_path)
    write_dataset(ws, "verdict", {"train": 96, "test": 8})
    keys = [f"train-{i:07d}" for i in range(96)]
    write_scores(ws, "verdict", "lite0-minilm", keys)
    path = ws.index_dir("verdict", "lite0-minilm") / "scores.parquet"
    t = pq.read_table(path)
    status = np.array(["clean", "clean", "suppress"] * 32, dtype=object)
    pq.write_table(t.append_column("status", pa.array(status)).append_column("label_fixed", t["label"]), path)
    return ws, keys, status


def test_a_run_trains_suspects_on_pseudo_labels_and_charges_their_forwards(tmp_path):
    from dds.catalog import query
    from dds.train import TrainConfig, run_train

    ws, keys, status = _verdict_workspace(tmp_path)
    cfg = TrainConfig(dataset="verdict", policy="dds", budget=0.6, epochs=8, model="cnn3", batch_size=16, seed=1,
                      policy_options={"suspects": "unlabeled", "forward_cost": 0.5, "unsuspect_after": 0})
    result = run_train(ws, cfg, progress=False)
    h = query(ws, f"SELECT epoch, key, selected, aug, label_used, status FROM history WHERE run_id = "
                  f"'{result['run_id']}' AND selected ORDER BY epoch, key").to_pandas()
    given = dict(zip(keys, status))
    sus = h[h["key"].map(given) == "suppress"]
    assert len(sus) and (sus["epoch"] > 0).all() and (sus["aug"] == "strong").all()   # unlabeled, strong views
    assert not (sus["epoch"] == 7).any()                           # annealing (epoch 7) leaves them out
    e = query(ws, f"SELECT epoch, sample_steps FROM epochs WHERE run_id = '{result['run_id']}' ORDER BY epoch")
    extra = result["total_sample_steps"] - e.to_pandas()["sample_steps"].sum()
    assert extra > 0 and result["budget_spent"] == result["total_sample_steps"] / (96 * 8)   # forwards charged


def test_a_run_with_strong_aug_gap_measures_probes_and_resumes(tmp_path):
    from dds.train import TrainConfig, resume_train, run_train

    ws, _, _ = _verdict_workspace(tmp_path)
    cfg = TrainConfig(dataset="verdict", policy="dds", budget=0.6, epochs=4, model="cnn3", batch_size=16, seed=1,
                      policy_options={"strong_aug": "gap"})
    whole = run_train(ws, cfg, progress=False)
    part = run_train(ws, cfg, progress=False, stop_after=2)
    again = resume_train(ws, part["run_id"], progress=False)
    assert again["test_acc"] == whole["test_acc"] and again["budget_spent"] == whole["budget_spent"]
