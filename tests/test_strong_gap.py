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
    assert held_out_gap(2.0, 0.5) == pytest.approx(0.75)
    assert held_out_gap(1.0, 1.5) == pytest.approx(-0.5)   # signed
    assert held_out_gap(1.0, 3.0) == -1.0                  # held at -1 as at 1 above
    assert held_out_gap(0.0, 1.0) == 0.0


INFO = SampleInfo(labels=np.arange(1000) % 5, num_classes=5)   # no scores: suitability 1 for every sample


def _gap_run(epochs: int, anchor_factor, seed: int = 0, observe_held: bool = True):
    """A dds run with strong_aug=gap whose trained samples' losses are ``anchor_factor`` times the
    held-out ones (the probes: weight 0 = held out); a sequence gives one factor per epoch. Without
    ``observe_held`` the held-out losses are never reported."""
    sel = Selector("dds", INFO, epochs=epochs, budget=0.5, seed=seed, strong_aug="gap", gap_min_passes=0)
    factors = np.broadcast_to(np.asarray(anchor_factor, np.float32), (epochs,))
    plans = []
    for e in range(epochs):
        plan = sel.plan(e)
        plans.append(plan)
        losses = np.ones(len(plan), np.float32)
        losses[plan.weights > 0] = factors[e]
        keep = slice(None) if observe_held else plan.weights > 0
        sel.observe(plan.indices[keep], losses[keep], plan.aug[keep])
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
    first = Selector("dds", INFO, epochs=8, budget=0.5, seed=2, gap_min_passes=0)
    for e in range(3):
        plan = first.plan(e)
        first.observe(plan.indices, np.where(plan.weights > 0, 0.5, 1.0).astype(np.float32), plan.aug)
    again = Selector("dds", INFO, epochs=8, budget=0.5, seed=2, gap_min_passes=0)
    again.load_state_dict(first.state_dict())
    want, got = first.plan(3), again.plan(3)
    assert (want.aug > 0).any() and np.array_equal(want.indices, got.indices) and np.array_equal(want.aug, got.aug)


def test_the_gap_moves_once_per_epoch_however_the_losses_are_observed():
    whole, parts = (Selector("dds", INFO, epochs=10, budget=0.5, seed=3, gap_min_passes=0) for _ in range(2))
    rng, seen_strong = np.random.default_rng(0), False
    for e in range(10):
        a, b = whole.plan(e), parts.plan(e)
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.aug, b.aug)
        losses = np.where(a.weights > 0, 0.7, 1.0).astype(np.float32) * rng.uniform(0.5, 1.5, len(a)).astype(np.float32)
        whole.observe(a.indices, losses)   # without codes: no per-call deflation, only the gap could differ
        for chunk in np.array_split(np.arange(len(b)), 7):   # a loop that observes batch by batch
            parts.observe(b.indices[chunk], losses[chunk])
        seen_strong = e > 0 and ((a.aug > 0).any() or seen_strong)
    assert seen_strong   # the gap did open, so equal codes mean equal gaps


def test_a_checkpoint_of_the_older_gap_restarts_it_from_0_with_a_warning(caplog):
    sel = Selector("dds", INFO, epochs=8, budget=0.5, seed=2, gap_min_passes=0)
    plan = sel.plan(0)
    sel.observe(plan.indices, np.where(plan.weights > 0, 0.2, 1.0).astype(np.float32), plan.aug)
    state = sel.state_dict()
    policy = state["policy_state"]
    policy["gap"] = policy.pop("held_out_gap")
    del policy["probe_sums"]
    fresh = Selector("dds", INFO, epochs=8, budget=0.5, seed=2, gap_min_passes=0)
    with caplog.at_level("WARNING"):
        fresh.load_state_dict(state)
    assert "older dds" in caplog.text and (fresh.plan(1).aug == 0).all() and (sel.plan(1).aug > 0).any()


def test_probes_are_never_drawn_twice_when_the_epoch_outgrows_the_clean_samples():
    from dds.selector import synthetic_info

    info = synthetic_info(1000, 5, noisy_fraction=0.1)
    sel = Selector("dds", info, epochs=6, budget=0.95, seed=0, gap_min_passes=0)
    for e in range(6):
        plan = sel.plan(e)
        assert np.unique(plan.indices).size == len(plan)
        sel.observe(plan.indices, np.ones(len(plan), np.float32), plan.aug)
    assert sel.spent() == sel.total_sample_steps


def test_a_run_too_short_for_views_plans_what_strong_aug_none_plans(caplog):
    # 8 epochs at budget 0.5 train each sample 4 times, under gap_min_passes (16): no probes, base views
    with caplog.at_level("INFO"):
        short = Selector("dds", INFO, epochs=8, budget=0.5, seed=4)
    assert "gap_min_passes" in caplog.text
    none = Selector("dds", INFO, epochs=8, budget=0.5, seed=4, strong_aug="none")
    for e in range(8):
        a, b = short.plan(e), none.plan(e)
        assert np.array_equal(a.indices, b.indices) and (a.aug == 0).all() and (a.weights > 0).all()
        losses = np.where(np.arange(len(a)) % 2 == 0, 0.2, 1.0).astype(np.float32)   # a wide spread
        short.observe(a.indices, losses, a.aug)
        none.observe(b.indices, losses, b.aug)
    # 32 epochs at budget 0.5 train each sample 16 times: the probes come in from the first pruned epoch
    long_run = Selector("dds", INFO, epochs=32, budget=0.5, seed=4)
    assert (long_run.plan(0).weights == 0).sum() == 50
    assert short.held_out_gap() is None and long_run.held_out_gap() == 0.0   # what the epochs table records
    assert Selector("random", INFO, epochs=32, budget=0.5).held_out_gap() is None


def test_gap_keeps_base_views_while_the_model_generalises():
    _, plans = _gap_run(8, 1.0)   # trained and held-out losses alike: no gap
    assert all((p.aug == 0).all() for p in plans)


def test_the_gap_waits_for_losses_of_both_probe_sets():
    _, plans = _gap_run(8, 0.2, observe_held=False)   # a wide gap, but no held-out loss ever reported
    assert all((p.aug == 0).all() for p in plans)


def test_one_chance_high_gap_leaves_base_views_and_a_low_one_cancels_it():
    # gaps of +0.15 and -0.15 in turn: averaged signed they cancel and no epoch goes strong (clipped at
    # 0 before averaging, the same epochs would average about +0.05 and go strong from the fourth plan)
    _, plans = _gap_run(8, [0.85, 1.15] * 4)
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
    import pyarrow.parquet as pq

    from dds.catalog import query
    from dds.train import TrainConfig, resume_train, run_train
    from dds.train.export import run_export

    ws, keys, status = _verdict_workspace(tmp_path)
    cfg = TrainConfig(dataset="verdict", policy="dds", budget=0.6, epochs=8, model="cnn3", batch_size=16, seed=1,
                      policy_options={"strong_aug": "gap", "gap_full": 0.01, "gap_min_passes": 0})
    whole = run_train(ws, cfg, progress=False)
    h = query(ws, f"SELECT epoch, key, weight, aug, status FROM history WHERE run_id = '{whole['run_id']}' "
                  "AND selected").to_pandas()
    assert not (h["status"] == "suppress").any()                          # suspects: never trained
    assert (h["aug"] == "strong").any() and (h.loc[h["aug"] == "strong", "status"] == "clean").all()
    held = h[(h["weight"] == 0)]
    assert held["epoch"].nunique() == 7 and (held["aug"] == "base").all()  # every pruned epoch, base views
    assert not (h[h["epoch"] == 7]["aug"] == "strong").any()             # annealing: base views
    gap = query(ws, f"SELECT epoch, held_out_gap FROM epochs WHERE run_id = '{whole['run_id']}' "
                    "ORDER BY epoch").to_pandas().set_index("epoch")["held_out_gap"]
    assert gap.notna().all() and gap[0] == 0                              # from 0, recorded every epoch
    assert (gap[sorted(set(h.loc[h["aug"] == "strong", "epoch"]))] > 0).all()   # views only where it is open
    out = tmp_path / "core.parquet"   # dds export counts the epochs a sample trained in, not those it was measured in
    run_export(ws, whole["run_id"], 0.6, out)
    table = pq.read_table(out).to_pandas().set_index("key")
    trained = h[h["weight"] > 0].groupby("key").size()
    shown = table.index.intersection(held["key"].unique())
    assert len(shown) and (table.loc[shown, "times_selected"] == 1).all()   # annealing only, not 7 + 1
    assert (table["times_selected"] == trained.reindex(table.index, fill_value=0)).all()
    part = run_train(ws, cfg, progress=False, stop_after=3)
    again = resume_train(ws, part["run_id"], progress=False)
    assert again["test_acc"] == whole["test_acc"] and again["budget_spent"] == whole["budget_spent"]


def test_a_run_saved_before_gap_min_passes_resumes_with_its_probes():
    import dataclasses

    from dds.selector._dds import DdsConfig
    from dds.train import TrainConfig
    from dds.train.loop import _as_saved

    resolved = dataclasses.asdict(DdsConfig())
    del resolved["gap_min_passes"]   # every option a dds saved before gap_min_passes
    old = TrainConfig(dataset="d", policy="dds", policy_options=resolved)
    assert _as_saved(old).policy_options == {**resolved, "gap_min_passes": 0.0}
    raw = TrainConfig(dataset="d", policy="dds", policy_options={"warmup_epochs": 1})   # older still: -o only
    assert _as_saved(raw) == raw
    new = TrainConfig(dataset="d", policy="dds", policy_options={"strong_aug": "gap", "gap_min_passes": 10.0})
    assert _as_saved(new) == new
    other = TrainConfig(dataset="d", policy="random", policy_options={})
    assert _as_saved(other) == other
