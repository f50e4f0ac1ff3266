"""``dds`` with ``strong_aug=gap``: strong views where the held-out gap opens (probes, codes, budget, resume)."""
from __future__ import annotations

import numpy as np
import pytest

from dds.selector import AUG_LEVELS, SampleInfo, Selector
from dds.selector._dds import gap_codes, held_out_gap


def test_gap_codes_are_a_pure_function_of_gap_suitability_and_phase():
    s = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
    assert gap_codes(0.9, s, 0, 1.0, full=1.0).tolist() == [0, 0, 0, 0]     # warm-up
    assert gap_codes(0.9, s, 2, 1.0, full=1.0).tolist() == [0, 0, 0, 0]     # annealing
    assert gap_codes(0.1, s, 1, 1.0, full=1.0).tolist() == [0, 0, 0, 0]     # a small gap keeps base views
    assert gap_codes(0.03, s, 1, 1.0).tolist() == [0, 0, 0, 0]              # under gap_full / 8 (default 0.25)
    mid, high = gap_codes(0.5, s, 1, 1.0, full=1.0), gap_codes(1.0, s, 1, 1.0, full=1.0)
    assert mid[0] == high[0] == 0                                  # suitability 0 (suspects): never
    assert (high >= mid).all() and high[-1] == AUG_LEVELS and (np.diff(high.astype(int)) >= 0).all()
    assert gap_codes(0.25, s, 1, 1.0, full=0.25).tolist() == high.tolist()   # full strength from gap_full on
    assert held_out_gap(np.array([2.0]), np.array([0.5])) == pytest.approx(0.75)
    assert held_out_gap(np.array([1.0]), np.array([3.0])) == pytest.approx(-2.0)   # signed
    assert held_out_gap(np.zeros(0), np.ones(2)) is None


def _gap_run(epochs: int, anchor_factor, seed: int = 0):
    """A dds run with strong_aug=gap whose trained samples' losses are ``anchor_factor`` times the
    held-out ones (the probes: weight 0 = held out); a sequence gives one factor per epoch."""
    labels = np.arange(1000) % 5
    info = SampleInfo(labels=labels, num_classes=5)
    sel = Selector("dds", info, epochs=epochs, budget=0.5, seed=seed, strong_aug="gap")
    factors = np.broadcast_to(np.asarray(anchor_factor, np.float32), (epochs,))
    plans = []
    for e in range(epochs):
        plan = sel.plan(e)
        plans.append(plan)
        losses = np.ones(len(plan), np.float32)
        losses[plan.weights > 0] = factors[e]
        sel.observe(plan.indices, losses, plan.aug)
    return sel, plans


def test_gap_plans_probe_sets_every_pruned_epoch_and_spend_the_budget():
    sel, plans = _gap_run(8, 0.2)
    held = set(plans[0].indices[plans[0].weights == 0].tolist())
    assert len(held) == 50   # probe_size
    for plan in plans[:-1]:
        probe = plan.weights == 0
        assert set(plan.indices[probe].tolist()) == held and (plan.aug[probe] == 0).all()
    assert (plans[0].aug == 0).all()                                  # no gap measured yet
    assert all((p.aug > 0).mean() > 0.5 for p in plans[1:-1])         # a wide gap: strong views
    assert (plans[-1].aug == 0).all() and (plans[-1].weights == 1).all()   # annealing: base, all trained
    assert sel.spent() == sel.total_sample_steps


def test_gap_state_round_trip_repeats_the_plans():
    labels = np.arange(1000) % 5
    info = SampleInfo(labels=labels, num_classes=5)
    first = Selector("dds", info, epochs=8, budget=0.5, seed=2)
    for e in range(3):
        plan = first.plan(e)
        first.observe(plan.indices, np.where(plan.weights > 0, 0.5, 1.0).astype(np.float32), plan.aug)
    again = Selector("dds", info, epochs=8, budget=0.5, seed=2)
    again.load_state_dict(first.state_dict())
    want, got = first.plan(3), again.plan(3)
    assert (want.aug > 0).any() and np.array_equal(want.indices, got.indices) and np.array_equal(want.aug, got.aug)


def test_probes_are_never_drawn_twice_when_the_epoch_outgrows_the_clean_samples():
    from dds.selector import synthetic_info

    info = synthetic_info(1000, 5, noisy_fraction=0.1)
    sel = Selector("dds", info, epochs=6, budget=0.95, seed=0)
    for e in range(6):
        plan = sel.plan(e)
        assert np.unique(plan.indices).size == len(plan)
        sel.observe(plan.indices, np.ones(len(plan), np.float32), plan.aug)
    assert sel.spent() == sel.total_sample_steps


def test_gap_keeps_base_views_while_the_model_generalises():
    _, plans = _gap_run(8, 1.0)   # trained and held-out losses alike: no gap
    assert all((p.aug == 0).all() for p in plans)


def test_one_chance_high_gap_leaves_base_views_and_a_low_one_cancels_it():
    # epoch 0's gap 0.15 alone, the next ones as far below 0: averaged signed, no epoch goes strong
    _, plans = _gap_run(8, [0.85, 1.15, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert all((p.aug == 0).all() for p in plans)
    # the same 0.15 epoch after epoch (a gap that stays open) does bring strong views in
    _, plans = _gap_run(12, 0.85)
    assert (plans[0].aug == 0).all() and (plans[1].aug == 0).all() and (plans[9].aug > 0).mean() > 0.3


def _verdict_workspace(tmp_path):
    from synth import write_dataset, write_scores, write_verdict

    from dds.workspace import Workspace

    ws = Workspace(tmp_path)
    write_dataset(ws, "verdict", {"train": 96, "test": 8})
    keys = [f"train-{i:07d}" for i in range(96)]
    write_scores(ws, "verdict", "lite0-minilm", keys)
    status = np.array(["clean", "clean", "suppress"] * 32, dtype=object)
    write_verdict(ws, "verdict", "lite0-minilm", status)
    return ws, keys, status


def test_a_run_with_strong_aug_gap_trains_probes_augments_clean_samples_only_and_resumes(tmp_path):
    from dds.catalog import query
    from dds.tables import load_history, trained_rows
    from dds.train import TrainConfig, resume_train, run_train

    ws, keys, status = _verdict_workspace(tmp_path)
    cfg = TrainConfig(dataset="verdict", policy="dds", budget=0.6, epochs=8, model="cnn3", batch_size=16, seed=1,
                      policy_options={"strong_aug": "gap", "gap_full": 0.01})
    whole = run_train(ws, cfg, progress=False)
    h = query(ws, f"SELECT epoch, key, weight, aug, status FROM history WHERE run_id = '{whole['run_id']}' "
                  "AND selected").to_pandas()
    assert not (h["status"] == "suppress").any()                          # suspects: never trained
    assert (h["aug"] == "strong").any() and (h.loc[h["aug"] == "strong", "status"] == "clean").all()
    held = h[(h["weight"] == 0)]
    assert held["epoch"].nunique() == 7 and (held["aug"] == "base").all()  # every pruned epoch, base views
    assert not (h[h["epoch"] == 7]["aug"] == "strong").any()             # annealing: base views
    hist = load_history(ws, whole["run_id"])   # what export and report count as trained: not the held-out set
    assert trained_rows(hist).sum() == len(h) - len(held) == int((hist["selected"] & (hist["weight"] > 0)).sum())
    part = run_train(ws, cfg, progress=False, stop_after=3)
    again = resume_train(ws, part["run_id"], progress=False)
    assert again["test_acc"] == whole["test_acc"] and again["budget_spent"] == whole["budget_spent"]
