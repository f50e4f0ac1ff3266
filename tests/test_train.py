"""Tests of dds.train on a tiny synthetic sharded dataset (8x8 grey PNGs), CPU only."""
from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest
from synth import write_dataset, write_scores, write_verdict
import torch

from dds.catalog import query
from dds.errors import DdsError
from dds.selector import AUG_LEVELS, DdsConfig, InfoBatchConfig, RandomConfig, list_policies
from dds.bench.training import format_bench_table, lossless_budget, run_bench, summarise
from dds.options import parse_entry
from dds.train import (TrainConfig, create_augment, create_model, list_augments, list_models, load_sample_info, lr_at,
                       open_split, resume_train, run_train)
from dds.train.augment import Augmenter, crop_flip_params, epoch_aug_seeds
from dds.train.loop import epoch_line, history_columns
from dds.workspace import Workspace

N_TRAIN, N_TEST, SIZE, CLASSES = 64, 32, 8, 4


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    write_dataset(ws, "tiny", {"train": N_TRAIN, "test": N_TEST})
    write_scores(ws, "tiny", "lite0-minilm", [f"train-{i:07d}" for i in range(N_TRAIN)])
    return ws


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="tiny", policy="random", budget=0.5, epochs=2, model="cnn3", batch_size=16, seed=3)
    return TrainConfig(**{**base, **kw})


def _table(ws: Workspace, sql: str):
    return query(ws, sql).to_pandas()


def test_smoke_run_writes_runs_epochs_history(ws):
    result = run_train(ws, _cfg(), progress=False)
    run_id = result["run_id"]
    assert result["status"] == "done" and result["epochs_done"] == 2
    assert 0 <= result["test_acc"] <= 1
    runs = _table(ws, f"SELECT * FROM runs WHERE run_id = '{run_id}'")
    assert {"run_id", "dataset", "policy", "budget", "epochs", "seed", "status", "config", "budget_spent",
            "test_acc", "wall_s"} <= set(runs.columns)
    assert runs.loc[0, "status"] == "done"
    resolved = dataclasses.replace(_cfg(), policy_options=dataclasses.asdict(RandomConfig()))  # defaults filled in
    assert TrainConfig.from_json(runs.loc[0, "config"]) == resolved
    epochs = _table(ws, f"SELECT * FROM epochs WHERE run_id = '{run_id}' ORDER BY epoch")
    assert {"run_id", "epoch", "selected", "sample_steps", "train_loss", "test_acc", "wall_s", "data_s", "compute_s",
            "select_s", "eval_s"} <= set(epochs.columns)
    assert epochs["epoch"].tolist() == [0, 1]
    hist = _table(ws, f"SELECT * FROM history WHERE run_id = '{run_id}'")
    assert {"run_id", "epoch", "key", "selected", "weight", "aug", "loss"} <= set(hist.columns)
    assert len(hist) == 2 * N_TRAIN  # one row per train sample per epoch
    assert hist.groupby("epoch")["key"].nunique().tolist() == [N_TRAIN, N_TRAIN]
    sel = hist[hist["selected"]]
    assert sel["loss"].notna().all() and sel["aug"].isin(["base", "strong"]).all()
    assert hist.loc[~hist["selected"], ["loss", "weight", "aug"]].isna().all().all()
    assert hist.groupby("epoch")["selected"].sum().tolist() == epochs["selected"].tolist()
    # budget: random at 0.5 spends half the full-data sample-steps, and says so
    assert epochs["sample_steps"].sum() == round(0.5 * 2 * N_TRAIN)
    assert result["budget_spent"] == pytest.approx(0.5)
    assert runs.loc[0, "budget_spent"] == pytest.approx(0.5)
    # "never selected" is answerable in SQL
    never = _table(ws, f"SELECT key FROM history WHERE run_id = '{run_id}' GROUP BY key HAVING NOT bool_or(selected)")
    assert len(never) == N_TRAIN - hist[hist["selected"]]["key"].nunique()


def test_lr_at_is_cosine_with_warmup():
    total = 1000
    lrs = [lr_at(s, total, lr=0.1) for s in range(0, total + 1, 10)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(total // 2, total, lr=0.1) == pytest.approx(0.05)
    assert lr_at(2 * total, total, lr=0.1) == pytest.approx(0.0, abs=1e-12)  # past the end: held at the end
    warm = [lr_at(s, total, lr=0.1, warmup=0.1) for s in (0, 50, 100, 1000)]
    assert warm[0] == 0 and warm[1] == pytest.approx(0.05) and warm[2] == pytest.approx(0.1) and warm[3] < 1e-12


@pytest.mark.parametrize("policy", list_policies())
def test_lr_reaches_its_final_value_at_the_last_step(ws, policy):
    """The loop counts its steps from the plan: whatever a policy spends, its last step runs at the
    schedule's final value (0 for cosine) and its first near the peak."""
    result = run_train(ws, _cfg(policy=policy, epochs=4, budget=0.4), progress=False)
    e = _table(ws, f"SELECT epoch, steps, total_steps, lr_first, lr_last, sample_steps FROM epochs "
                   f"WHERE run_id = '{result['run_id']}' ORDER BY epoch")
    trained = e[e["steps"] > 0]
    assert e["steps"].sum() == result["steps"] == result["total_steps"] == trained["total_steps"].iloc[-1]
    assert (e["steps"] == np.ceil(e["sample_steps"] / 16)).all()
    assert trained["lr_last"].iloc[-1] == pytest.approx(0.0, abs=1e-12)
    # the first step at the first count of the run's steps (exact from the start unless sizes follow losses)
    assert trained["lr_first"].iloc[0] == pytest.approx(lr_at(1, trained["total_steps"].iloc[0], lr=0.1))
    if policy != "infobatch":
        assert (trained["total_steps"] == result["steps"]).all()
    lrs = trained[["lr_first", "lr_last"]].to_numpy().ravel()
    assert (np.diff(lrs) <= 1e-12).all() and lrs[0] > 0.09
    if policy == "budgeted":   # 0.4 of 4 epochs x 64 = 102 sample-steps: one full pass, then 38, then nothing
        assert e["sample_steps"].tolist() == [64, 38, 0, 0] and result["budget_spent"] == pytest.approx(102 / 256)
    if policy in ("full", "infobatch"):   # they do not follow the budget
        assert result["budget"] == 1.0


def test_resume_repeats_an_uninterrupted_run(ws):
    # the policy with the most state: loss EMAs, strong augmentation
    cfg = _cfg(policy="dds", epochs=3, policy_options={"strong_aug": "top_q"})
    full = run_train(ws, cfg, progress=False)
    part = run_train(ws, cfg, progress=False, stop_after=2)
    assert part["status"] == "stopped" and part["epochs_done"] == 2
    resumed = resume_train(ws, part["run_id"], progress=False)
    assert resumed["run_id"] == part["run_id"] and resumed["status"] == "done"

    def rows(run_id):
        h = _table(ws, f"SELECT epoch, key, selected, weight, aug, loss FROM history WHERE run_id = '{run_id}' "
                       "ORDER BY epoch, key")
        e = _table(ws, f"SELECT epoch, selected, sample_steps, train_loss, test_acc FROM epochs "
                       f"WHERE run_id = '{run_id}' ORDER BY epoch")
        return h, e

    (h1, e1), (h2, e2) = rows(full["run_id"]), rows(part["run_id"])
    assert len(h2) == 3 * N_TRAIN and not h2.duplicated(["epoch", "key"]).any()
    assert h1.equals(h2)  # identical selections, weights, augmentations and losses
    assert (h1["aug"] == "strong").any()
    assert e1.equals(e2)  # identical test accuracies
    assert resumed["test_acc"] == full["test_acc"]
    status = _table(ws, f"SELECT status FROM runs WHERE run_id = '{part['run_id']}'")
    assert status["status"].tolist() == ["done"]


def test_runs_config_holds_the_resolved_policy_config_and_old_checkpoints_still_resume(ws):
    from dds.train.loop import load_trained, save_checkpoint

    cfg = _cfg(policy="dds", epochs=3, policy_options={"warmup_epochs": 1})
    full = run_train(ws, cfg, progress=False)
    resolved = dataclasses.asdict(DdsConfig(warmup_epochs=1))
    assert resolved["delta"] == 0.875 and len(resolved) > 1   # every option, defaults filled in
    stored = json.loads(_table(ws, f"SELECT config FROM runs WHERE run_id = '{full['run_id']}'")["config"][0])
    assert stored == {**dataclasses.asdict(cfg), "policy_options": resolved}
    assert load_trained(ws.run_dir(full["run_id"]) / "checkpoint.pt")[1]["config"] == stored
    # a checkpoint of an older dds: the raw -o options and the budget fields in its state
    part = run_train(ws, cfg, progress=False, stop_after=1)
    run_dir = ws.run_dir(part["run_id"])
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["config"] = cfg.to_json()
    ckpt["state"].update(budget=0.5, total_sample_steps=96, follows_budget=True, budget_spent=full["budget_spent"])
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    save_checkpoint(run_dir, buf.getvalue())
    resumed = resume_train(ws, part["run_id"], progress=False)
    assert resumed["status"] == "done" and resumed["test_acc"] == full["test_acc"]
    assert {k: resumed[k] for k in ("budget", "total_sample_steps", "follows_budget", "budget_spent")} == \
        {"budget": 0.5, "total_sample_steps": 96, "follows_budget": True, "budget_spent": full["budget_spent"]}
    assert json.loads(_table(ws, f"SELECT config FROM runs WHERE run_id = '{part['run_id']}'")["config"][0]) == stored


def test_streaming_and_cache_yield_the_same_batches(ws):
    from dds.selector import EpochPlan

    rng = np.random.default_rng(1)
    indices = rng.permutation(N_TRAIN)[:40].astype(np.int64)
    plan = EpochPlan(epoch=5, indices=indices, weights=rng.random(40).astype(np.float32),
                     aug=(rng.random(40) < 0.5).astype(np.uint8))
    cached = open_split(ws, "tiny", "train", cache=True)
    aug = Augmenter(SIZE)
    a = list(cached.plan_batches(plan, seed=7, augmenter=aug, batch_size=16))
    assert [len(x["label"]) for x in a] == [16, 16, 8]
    for workers in (0, 3):  # decoded in the reading thread, or in 3 decode threads: the same batches, in order
        streamed = open_split(ws, "tiny", "train", cache=False, decode_workers=workers)
        b = list(streamed.plan_batches(plan, seed=7, augmenter=aug, batch_size=16))
        for x, y in zip(a, b, strict=True):
            assert x["__key__"] == y["__key__"]
            for field in ("image", "label", "index", "weight", "aug"):
                assert torch.equal(x[field], y[field]), field
    assert torch.equal(torch.cat([x["index"] for x in a]), torch.from_numpy(indices))
    # other seed -> other augmentation
    c = next(iter(cached.plan_batches(plan, seed=8, augmenter=aug, batch_size=16)))
    assert not torch.equal(a[0]["image"], c["image"])
    ea = list(open_split(ws, "tiny", "test", cache=True).eval_batches(10))
    eb = list(open_split(ws, "tiny", "test", cache=False).eval_batches(10))
    for x, y in zip(ea, eb, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def _seeded_global(aug: Augmenter, image, code, seed):
    """The recipe the Augmenter used before prefetching: seed torch's global generator, transform, restore."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        return aug.transforms[int(code)](image)
    finally:
        torch.set_rng_state(state)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmenter_draws_from_its_own_generator_even_while_another_thread_draws(channels):
    """Bit for bit the images of the global-generator recipe, for every aug code, without touching the global
    generator; and the same while the main thread keeps drawing from it (as dropout in a training step would)."""
    import threading

    aug = Augmenter(16, channels=channels)
    image = torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    jobs = [(code, int(seed)) for code in range(AUG_LEVELS + 1) for seed in epoch_aug_seeds(3, 0, 8)]
    expected = [_seeded_global(aug, image, c, s) for c, s in jobs]
    assert any(not torch.equal(expected[0], e) for e in expected[1:])
    before = torch.get_rng_state()
    assert all(torch.equal(aug(image, c, s), e) for (c, s), e in zip(jobs, expected))
    assert torch.equal(torch.get_rng_state(), before)   # never read nor advanced: nothing escapes to it
    got, stop = [], threading.Event()
    worker = threading.Thread(target=lambda: (got.extend(aug(image, c, s) for c, s in jobs * 2), stop.set()))
    torch.manual_seed(0)
    draws = 0
    worker.start()
    while not stop.is_set():   # the main thread draws from the global generator all along
        torch.rand(8)
        draws += 1
    worker.join()
    after = torch.get_rng_state()
    assert draws > 0 and len(got) == 2 * len(jobs)
    assert all(torch.equal(g, e) for g, e in zip(got, expected * 2))
    torch.manual_seed(0)
    for _ in range(draws):
        torch.rand(8)
    assert torch.equal(torch.get_rng_state(), after)   # nor was the main thread's stream disturbed


def _v2_cases():
    from torchvision.transforms import v2

    return [v2.RandomCrop(16, padding=3), v2.RandomResizedCrop(16, antialias=True),
            v2.RandomResizedCrop(16, scale=(0.95, 1.0), ratio=(3.0, 4.0), antialias=True),   # ten misses: central crop
            v2.RandomHorizontalFlip(p=0.3), v2.RandomAffine(degrees=20, translate=(0.2, 0.1), scale=(0.8, 1.2), shear=10),
            v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2),
            v2.RandomErasing(p=0.7, scale=(0.1, 0.5), value="random"), v2.RandomErasing(p=1.0, scale=(0.9, 1.0)),
            v2.RandomChoice([v2.Identity(), v2.RandomAffine(degrees=45)], p=[0.2, 0.8])]


@pytest.mark.parametrize("case", range(9))
def test_apply_seeded_draws_what_the_v2_transform_draws_after_manual_seed(case):
    """Every transform dds can seed, options beyond the shipped ones included: the pixels of
    ``manual_seed(s); t(image)``, bit for bit, for many seeds, on a 20 px colour image."""
    from dds.train.augment import apply_seeded

    t = _v2_cases()[case]
    image = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in range(40):
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        expected = t(image)
        torch.set_rng_state(state)
        got = apply_seeded(t, image, torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected), seed
        outs.append(got)
    assert case == 2 or any(not torch.equal(outs[0], o) for o in outs[1:])   # case 2 is always the central crop


def test_an_augmentation_dds_cannot_seed_is_refused_by_name(monkeypatch):
    from torchvision.transforms import v2

    from dds.train.augment import AUGMENTS

    monkeypatch.setitem(AUGMENTS._entries, "blur", lambda image_size, channels, magnitude: v2.GaussianBlur(3))
    with pytest.raises(DdsError, match="'blur' uses GaussianBlur, whose random parameters"):
        Augmenter(28, channels=1, names=("blur", "strong"))


@pytest.mark.parametrize("size,channels", [(28, 1), (16, 3), (40, 3)])
def test_batched_augmentation_equals_the_per_sample_transforms(size, channels):
    """Augmenter.batch (at <= 32 px the gathered crop + flip for every code and the strong views' affine
    operations in one grid_sample) is bit for bit the per-sample path, for all-base batches and for
    batches mixing every strong code over enough samples to draw every operation many times."""
    from torchvision.transforms import v2

    aug = Augmenter(size, channels=channels)
    n = 24 * (AUG_LEVELS + 1) * 4
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    seeds = epoch_aug_seeds(9, 1, n)
    for codes in (np.zeros(n, np.uint8), (np.arange(n) % (AUG_LEVELS + 1)).astype(np.uint8)):
        expected = torch.stack([aug(images[i], int(codes[i]), int(seeds[i])) for i in range(n)])
        got = aug.batch(images, codes, seeds)
        assert got.dtype == torch.uint8 and torch.equal(got, expected)
    flips = crop_flip_params(seeds, 5)[2]
    assert 0 < flips.sum() < n   # both branches of the flip are exercised
    if size <= 32:   # the batched strong path ran, affine operations included
        assert aug._choices is not None and aug._affine_ok
        assert any(type(op) is v2.RandomAffine for op in aug._choices[1][0].transforms)


def test_batched_augmentation_of_another_strong_pair_runs_per_sample(monkeypatch):
    """A strong augmentation other than the shipped one (registered by a user) is applied per sample to
    the raw image, so batch and per-sample agree there too."""
    from torchvision.transforms import v2

    from dds.train.augment import AUGMENTS

    monkeypatch.setitem(AUGMENTS._entries, "rotate_only",
                        lambda image_size, channels, magnitude: v2.RandomAffine(degrees=90 * magnitude))
    aug = Augmenter(28, channels=1, names=("base", "rotate_only"))
    assert aug._choices is None
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    codes, seeds = (np.arange(20) % (AUG_LEVELS + 1)).astype(np.uint8), epoch_aug_seeds(1, 0, 20)
    expected = torch.stack([aug(images[i], int(codes[i]), int(seeds[i])) for i in range(20)])
    assert torch.equal(aug.batch(images, codes, seeds), expected)
    # the shipped pair where torchvision's private affine functions cannot be imported: affine views per sample
    monkeypatch.setattr("dds.train.augment._affine_grid", None)
    aug = Augmenter(28, channels=1)
    assert aug._choices is not None and not aug._affine_ok
    expected = torch.stack([aug(images[i], int(codes[i]), int(seeds[i])) for i in range(20)])
    assert torch.equal(aug.batch(images, codes, seeds), expected)


def _strong_plan(n: int, m: int, epoch: int = 1):
    from dds.selector._base import make_plan

    rng = np.random.default_rng(4)
    return make_plan(epoch, rng.choice(n, m), weights=rng.random(m), aug=np.arange(m) % (AUG_LEVELS + 1))


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("distributed", [False, True])
def test_prefetch_yields_the_plain_batches_in_order(ws, cache, distributed):
    """Prefetched batches (strong codes 1..AUG_LEVELS included) equal the training thread's own, while the consumer
    draws from the global generator between batches."""
    from dds.distributed import part_positions
    from dds.train.data import Prefetcher

    split = open_split(ws, "tiny", "train", cache=cache)
    plan = _strong_plan(N_TRAIN, 45)   # indices with repeats; 45: a short last batch
    assert set(plan.aug.tolist()) == set(range(AUG_LEVELS + 1))
    positions = part_positions(45, 1, 2) if distributed else None
    aug = Augmenter(SIZE)

    def batches():
        return split.plan_batches(plan, seed=5, augmenter=aug, batch_size=8, positions=positions)

    plain = list(batches())
    torch.manual_seed(0)
    with Prefetcher(batches(), depth=2) as feed:
        fetched = []
        for b in feed:
            fetched.append(b)
            torch.rand(100)   # as a training step with dropout would
    assert len(plain) == len(fetched) == (3 if distributed else 6)
    for x, y in zip(plain, fetched, strict=True):
        assert x["__key__"] == y["__key__"]
        for name in ("image", "label", "index", "weight", "aug"):
            assert torch.equal(x[name], y[name]), name
    assert set(torch.cat([b["aug"] for b in fetched]).tolist()) == set(range(AUG_LEVELS + 1))


def test_prefetch_raises_producer_errors_in_the_consumer_and_stops_its_thread():
    import threading
    import time

    from dds.train.data import Prefetcher

    class Broken(Exception):
        pass

    def items():
        yield from range(3)
        raise Broken("batch 3")

    with Prefetcher(items(), depth=2) as feed:
        got = []
        with pytest.raises(Broken, match="batch 3"):
            for x in feed:
                got.append(x)
    assert got == [0, 1, 2] and not feed._thread.is_alive()

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):   # the consumer stops early: the thread ends, nothing hangs
        with Prefetcher(endless(), depth=2) as feed:
            assert next(feed) == 0 and next(feed) == 1
            raise KeyboardInterrupt
    assert not feed._thread.is_alive() and closed.is_set() and time.perf_counter() - t0 < 5
    with pytest.raises(ValueError):
        Prefetcher([], depth=0)


def test_prefetch_trains_the_same_epoch_as_the_training_thread(ws):
    from dds.train.loop import train_epoch

    train = open_split(ws, "tiny", "train")
    plan = _strong_plan(N_TRAIN, 40)
    out = {}
    for prefetch in (0, 2):
        torch.manual_seed(0)
        model = create_model("cnn3", CLASSES, 1, SIZE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses, timing = train_epoch(model, opt, train, plan, cfg=_cfg(prefetch=prefetch), device=torch.device("cpu"),
                                     augmenter=Augmenter(SIZE), steps_done=0, total_steps=10, progress=False)
        out[prefetch] = losses, [p.detach().clone() for p in model.parameters()]
        assert timing["data_s"] >= 0 and timing["compute_s"] > 0
    assert torch.equal(out[0][0], out[2][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[2][1]))
    with pytest.raises(DdsError, match="prefetch must be at least 0"):
        _cfg(prefetch=-1).validate()
    with pytest.raises(DdsError, match="prefetch must be an integer"):
        _cfg(prefetch=1.5).validate()
    from dds.train.loop import prefetch_depth

    assert _cfg(prefetch=None).validate().prefetch is None   # the default: by device
    assert prefetch_depth(None, torch.device("cpu")) == 0 and prefetch_depth(None, torch.device("cuda")) == 2
    assert prefetch_depth(3, torch.device("cpu")) == 3 and prefetch_depth(0, torch.device("cuda")) == 0


def test_no_test_split_is_an_error(tmp_path):
    ws = Workspace(tmp_path)
    write_dataset(ws, "trainonly", {"train": 16})
    with pytest.raises(DdsError, match="dataset trainonly has no test split; run dds shard .* --split test"):
        run_train(ws, TrainConfig(dataset="trainonly", policy="full", budget=1.0, epochs=1, model="cnn3"),
                  progress=False)


def test_eval_split_val_and_per_policy_bench_options(tmp_path, ws):
    tiny, ws = ws, Workspace(tmp_path)
    write_dataset(ws, "withval", {"train": 32, "val": 12, "test": 5})
    write_scores(ws, "withval", "lite0-minilm", [f"train-{i:07d}" for i in range(32)])
    result = run_train(ws, _cfg(dataset="withval", eval_split="val", epochs=1), progress=False)
    assert result["test_acc"] * 12 == pytest.approx(round(result["test_acc"] * 12))  # a count out of the 12 val
    assert result["test_acc"] * 5 != pytest.approx(round(result["test_acc"] * 5)) or result["test_acc"] in (0, 1)
    rows = run_bench(ws, "withval", policies=["random", "dds"], budgets=[0.5], epochs=2, seeds=1, model="cnn3",
                     base_config={"seed": 4, "eval_split": "val"}, policy_options={"dds": {"warmup_epochs": 0}},
                     progress=False)
    runs = _table(ws, "SELECT run_id, seed, config FROM runs")
    dds_cfg = json.loads(runs.set_index("run_id").loc[rows[1]["run_ids"][0], "config"])
    assert dds_cfg["policy_options"] == dataclasses.asdict(DdsConfig(warmup_epochs=0)) and dds_cfg["seed"] == 4
    assert dds_cfg["eval_split"] == "val"
    with pytest.raises(DdsError, match="options given for ucb"):
        run_bench(ws, "withval", policies=["random"], budgets=[0.5], epochs=1, seeds=1, policy_options={"ucb": {}})
    with pytest.raises(DdsError, match="no val split; run dds shard .* --split train --val N"):
        run_train(tiny, _cfg(eval_split="val"), progress=False)


def test_unknown_names_and_bad_config_are_errors(ws):
    with pytest.raises(DdsError, match="unknown model 'resnet21'.*known: .*resnet20"):
        create_model("resnet21", 10, 1, 28)
    with pytest.raises(DdsError, match="unknown model"):
        run_train(ws, _cfg(model="nope"), progress=False)
    with pytest.raises(DdsError, match="unknown policy"):
        run_train(ws, _cfg(policy="nope"), progress=False)
    with pytest.raises(DdsError, match="budget must be in"):
        run_train(ws, _cfg(budget=1.5), progress=False)
    with pytest.raises(DdsError, match="epochs must be a positive integer"):
        run_train(ws, _cfg(epochs=0), progress=False)
    with pytest.raises(DdsError, match="unknown train config key"):
        TrainConfig.from_dict({"dataset": "tiny", "learning_rate": 0.1})
    with pytest.raises(DdsError, match="is not a run id"):
        resume_train(ws, "no-such-run", progress=False)
    with pytest.raises(DdsError, match="no run 'tiny-dds-20200101-000000-abcd' in workspace"):
        resume_train(ws, "tiny-dds-20200101-000000-abcd", progress=False)


def test_resume_loads_only_tensors_and_only_runs_of_the_workspace(ws, tmp_path):
    import pickle

    run_id = run_train(ws, _cfg(epochs=1), progress=False)["run_id"]
    for bad in ("../../x", f"../{run_id}", "/etc/passwd", f"{run_id}/../{run_id}"):
        with pytest.raises(DdsError, match="is not a run id"):
            resume_train(ws, bad, progress=False)
    marker = tmp_path / "pwned"

    class Evil:   # unpickling this would run os.system
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    ckpt = ws.run_dir(run_id) / "checkpoint.pt"
    torch.save({"config": Evil()}, ckpt, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(DdsError, match="not a dds checkpoint"):
        resume_train(ws, run_id, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("name", list_models())
def test_models_build_for_grey_and_rgb(name):
    small = name in ("resnet20", "cnn3")
    size = 8 if small else 32
    for channels in (1, 3) if small else (1,):  # torchvision nets: only the grey stem is ours
        model = create_model(name, 5, channels, size).eval()
        with torch.no_grad():
            assert model(torch.randn(2, channels, size, size)).shape == (2, 5)
    if name == "resnet20":
        assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6


def test_strong_ops_fit_the_channels_and_scale_with_the_magnitude():
    from torchvision.transforms import v2

    from dds.train.augment import strong_ops

    def colour(ops):
        return [o for o in ops if isinstance(o, v2.ColorJitter) and (o.saturation or o.hue)]
    assert not colour(strong_ops(1, 1.0)) and len(colour(strong_ops(3, 1.0))) == 2   # no colour ops on greyscale
    rotate = lambda m: next(o for o in strong_ops(1, m) if isinstance(o, v2.RandomAffine) and o.degrees[1] > 0)
    assert rotate(0.25).degrees[1] == pytest.approx(7.5) and rotate(1.0).degrees[1] == pytest.approx(30.0)
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    aug = Augmenter(28, channels=1)
    assert len(aug.transforms) == AUG_LEVELS + 1
    for code in range(AUG_LEVELS + 1):
        out = aug(image, code, 5)
        assert out.shape == image.shape and out.dtype == torch.uint8


@pytest.mark.parametrize("name", list_augments())
def test_augments_keep_shape_dtype_and_follow_the_seed(name):
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    aug = Augmenter(28, channels=1, names=(name, name))
    before = torch.get_rng_state()
    outs = [aug(image, 0, s) for s in (1, 1, 2, 3, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])
    assert create_augment(name, 64)(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)).shape == (3, 64, 64)
    seeds = epoch_aug_seeds(0, 2, 10)
    assert np.array_equal(seeds[:4], epoch_aug_seeds(0, 2, 4)) and not np.array_equal(seeds, epoch_aug_seeds(0, 3, 10))


def test_history_columns_one_row_per_sample():
    cols = history_columns(5, np.array([3, 1, 3]), np.array([1.0, 2.0, 3.0], np.float32),
                           np.array([0, 2, 0], np.uint8), np.array([0.5, 1.0, 1.5], np.float32))
    assert cols["selected"].to_pylist() == [False, True, False, True, False]
    assert cols["count"].to_pylist() == [0, 1, 0, 2, 0]
    assert cols["weight"].to_pylist() == [None, 2.0, None, 2.0, None]
    assert cols["loss"].to_pylist() == [None, 1.0, None, 1.0, None]
    assert cols["aug"].to_pylist() == [None, "strong", None, "base", None]
    assert cols["magnitude"].to_pylist() == [None, 2 / AUG_LEVELS, None, 0.0, None]


def test_epoch_line_of_a_trained_and_an_empty_epoch():
    row = {"sample_steps": 200, "train_loss": 0.5, "test_acc": None, "data_s": 1.0, "compute_s": 1.0, "wall_s": 2.5}
    assert epoch_line("dds", 2, 8, row) == "dds epoch 3/8: 200 samples, loss 0.5000, 100 img/s, 2.5 s"
    empty = {**row, "sample_steps": 0, "train_loss": float("nan"), "test_acc": 0.8125, "data_s": 0.0,
             "compute_s": 0.0}   # budgeted after its budget is spent
    assert epoch_line("budgeted", 7, 8, empty) == "budgeted epoch 8/8: nothing planned, acc 0.8125"


def test_load_sample_info_joins_scores_in_idx_order(tmp_path):
    from dds.tables import REGIONS

    ws = Workspace(tmp_path)
    write_dataset(ws, "scored", {"train": 12, "test": 4})
    info = load_sample_info(ws, "scored", "enc")
    assert info.density is None and info.labels.tolist() == [i % CLASSES for i in range(12)]
    keys = [f"train-{i:07d}" for i in range(12)][::-1]  # scores in another order than samples.idx
    write_scores(ws, "scored", "enc", keys)
    regions = [REGIONS[i % len(REGIONS)] for i in range(12)]
    info = load_sample_info(ws, "scored", "enc")
    assert info.consistency.tolist() == list(range(11, -1, -1))  # key train-0000000 had consistency 11
    assert [REGIONS[c] for c in info.region] == regions[::-1]


def test_bench_rows_budgets_entries_and_table(ws):
    rows = run_bench(ws, "tiny", policies=["full", "random", "infobatch:prune_ratio=0.8"], budgets=[0.6, 0.3],
                     epochs=2, seeds=2, model="cnn3", base_config={"batch_size": 32}, progress=False)
    assert [(r["policy"], r["budget"]) for r in rows] == [("full", None), ("random", 0.3), ("random", 0.6),
                                                          ("infobatch:prune_ratio=0.8", None)]
    full, r3, r6, ib = rows
    assert full["budget_spent"] == pytest.approx(1.0) and r3["budget_spent"] == pytest.approx(round(0.3 * 128) / 128)
    assert r6["budget_spent"] == pytest.approx(round(0.6 * 128) / 128) and len(r6["run_ids"]) == 2
    assert ib["budget_spent"] <= 1.0
    runs = _table(ws, "SELECT run_id, config FROM runs")
    cfg = json.loads(runs.set_index("run_id").loc[ib["run_ids"][0], "config"])
    assert cfg["policy"] == "infobatch"
    assert cfg["policy_options"] == dataclasses.asdict(InfoBatchConfig(prune_ratio=0.8))

    def train_s(run_ids):   # recomputed from the epochs table, independently of the bench's own sums
        ids = ", ".join(f"'{r}'" for r in run_ids)
        e = _table(ws, f"SELECT run_id, sum(data_s + compute_s + select_s) AS s FROM epochs WHERE run_id IN ({ids}) "
                       "GROUP BY run_id")
        return e["s"].mean()

    # seed by seed, the second round rotated by half: full 0, r3 1, r6 2, ib 3 | r6 4, ib 5, full 6, r3 7
    assert [r["orders"] for r in rows] == [[0, 6], [1, 7], [2, 4], [3, 5]]
    per_run = [train_s([a]) / train_s([f]) for a, f in zip(r3["run_ids"], full["run_ids"])]   # the full of its round
    assert r3["wall_ratio"] == pytest.approx(np.mean(per_run), rel=1e-6)
    assert (r3["wall_ratio_min"], r3["wall_ratio_max"]) == pytest.approx((min(per_run), max(per_run)), rel=1e-6)
    f0, f1 = (train_s([f]) for f in full["run_ids"])   # ib's seed 0 (order 3) is as near to both fulls: their mean
    ib_runs = [train_s([ib["run_ids"][0]]) / ((f0 + f1) / 2), train_s([ib["run_ids"][1]]) / f1]
    assert ib["wall_ratio"] == pytest.approx(np.mean(ib_runs), rel=1e-6) and full["wall_ratio"] == pytest.approx(1.0)
    assert all(0 <= r["acc_mean"] <= 1 and r["acc_std"] >= 0 and len(r["accs"]) == 2 for r in rows)
    bench = _table(ws, "SELECT * FROM bench")
    assert {"bench_id", "dataset", "policy", "budget", "seeds", "acc_mean", "acc_std", "budget_spent", "wall_ratio",
            "select_s", "lossless_budget"} <= set(bench.columns)
    table = format_bench_table(rows)
    assert "infobatch:prune_ratio=0.8" in table and "lossless at" in table
    r3_line = next(ln for ln in table.splitlines() if ln.startswith("random ") and " 0.3 " in ln)
    assert r3_line.endswith(" 1,7") and f"{r3['wall_ratio_min']:.3f}-{r3['wall_ratio_max']:.3f}" in r3_line


def test_bench_run_order_rotates_each_seed_and_ratios_take_the_nearest_full():
    from dds.bench.training import nearest_runs, run_order

    assert run_order(3, 3) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (0, 1), (2, 2), (0, 2), (1, 2)]
    assert [g for g, s in run_order(6, 3) if s == 1][0] == 2 and run_order(2, 1) == [(0, 0), (1, 0)]
    refs = [{"order": 0}, {"order": 4}, {"order": 9}]
    assert nearest_runs(3, refs) == [{"order": 4}] and nearest_runs(2, refs) == [{"order": 0}, {"order": 4}]

    def res(order, seconds):
        return {"test_acc": 0.9, "budget_spent": 1.0, "data_s": 0.0, "compute_s": seconds, "select_s": 0.0,
                "eval_s": 0.0, "run_id": f"r{order}", "order": order}

    # a machine that slows to half speed: full takes 10 s early and 20 s late, random 5 s and 10 s
    rows = summarise([("full", None, [res(0, 10.0), res(3, 20.0)]), ("random", 0.5, [res(1, 5.0), res(2, 10.0)])])
    assert rows[1]["wall_ratio"] == pytest.approx(0.5) and rows[1]["orders"] == [1, 2]
    assert (rows[1]["wall_ratio_min"], rows[1]["wall_ratio_max"]) == pytest.approx((0.5, 0.5))


def test_cli_bench_prints_the_run_order_and_the_ratio_spread(ws):
    from typer.testing import CliRunner

    from dds.cli import app

    res = CliRunner().invoke(app, ["bench", "tiny", "--policies", "full,random", "--budgets", "0.5", "--epochs", "1",
                                   "--seeds", "2", "--model", "cnn3", "-w", str(ws.root), "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("policy ")):]   # the table (logs before it)
    assert "min-max" in lines[0] and lines[0].rstrip().endswith("run order")
    full, rnd = lines[2:4]
    assert full.endswith(" 0,3") and rnd.endswith(" 1,2")   # the second seed's round starts with random
    mean, low, high = map(float, re.search(r" (\d+\.\d{3}) +(\d+\.\d{3})-(\d+\.\d{3}) ", rnd).groups())
    assert low <= mean <= high and "1.000-1.000" in full
    assert "nearest to it in the run order" in res.output


def test_report_of_a_bench_draws_accuracy_against_budget(tmp_path):
    from PIL import Image

    from dds.train.report import write_report

    ws = Workspace(tmp_path / "ws")   # no scores: the report notes it and draws the curves
    write_dataset(ws, "tiny", {"train": N_TRAIN, "test": N_TEST})
    run_bench(ws, "tiny", policies=["full", "random"], budgets=[0.3, 0.6], epochs=1, seeds=1, model="cnn3",
              progress=False)
    bench = _table(ws, "SELECT bench_id, run_ids FROM bench ORDER BY bench_id DESC LIMIT 1")
    out = write_report(ws, [bench["bench_id"][0]], tmp_path / "rep")
    budget_png = tmp_path / "rep" / "budget.png"
    assert str(budget_png) in out["figures"] and Image.open(budget_png).size[0] > 300
    html = (tmp_path / "rep" / "index.html").read_text()
    assert html.count("data:image/png;base64") == len(out["figures"])
    assert all(r[-4:] in html for r in bench["run_ids"][0])   # every run of the bench is in the page


def test_bench_writes_one_result_line_per_run(ws, tmp_path):
    out = tmp_path / "results" / "b.jsonl"
    run_bench(ws, "tiny", policies=["full", "budgeted"], budgets=[0.5], epochs=1, seeds=2, model="cnn3",
              progress=False, results=out, command="dds bench tiny")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["policy"], x["seed"], x["order"]) for x in lines] == [("full", 0, 0), ("budgeted", 0, 1),
                                                                     ("budgeted", 1, 2), ("full", 1, 3)]
    assert {"command", "commit", "budget", "budget_spent", "acc", "train_s", "run_id"} <= set(lines[0])
    assert lines[2]["budget"] == 0.5 and lines[2]["budget_spent"] == pytest.approx(0.5, abs=1 / 64)
    from dds.bench.training import table_from_results

    md = table_from_results(lines).splitlines()
    assert len(md) == 4 and md[2].startswith("| tiny | 1 | full | - | 2 |") and "| budgeted | 0.5 | 2 |" in md[3]
    ratio = lines[1]["train_s"] / lines[0]["train_s"]    # each budgeted run against the full run nearest in order
    ratio2 = lines[2]["train_s"] / lines[3]["train_s"]
    assert f"| {(ratio + ratio2) / 2:.3f} |" in md[3]
    old = [{k: v for k, v in x.items() if k != "order"} for x in lines]   # rows written before runs had an order
    full_mean = (lines[0]["train_s"] + lines[3]["train_s"]) / 2
    assert f"| {(lines[1]['train_s'] + lines[2]['train_s']) / 2 / full_mean:.3f} |" in table_from_results(old)


def test_lossless_budget_on_a_constructed_table():
    def res(acc, spent):
        return {"test_acc": acc, "budget_spent": spent, "data_s": 1.0, "compute_s": spent, "select_s": 0.0,
                "eval_s": 0.1, "run_id": "r", "order": 0}

    runs = [("full", None, [res(0.900, 1.0), res(0.904, 1.0)]),          # mean 0.902: lossless = >= 0.901
            ("random", 0.3, [res(0.880, 0.3)]), ("random", 0.5, [res(0.9012, 0.5)]), ("random", 0.7, [res(0.91, 0.7)]),
            ("budgeted", 0.5, [res(0.8999, 0.5)]),
            ("infobatch", None, [res(0.903, 0.71)])]
    rows = summarise(runs)
    got = {(r["policy"], r["budget"]): r["lossless_budget"] for r in rows}
    assert got[("random", 0.3)] == got[("random", 0.7)] == pytest.approx(0.5)   # the smallest lossless spend
    assert got[("budgeted", 0.5)] is None and got[("infobatch", None)] == pytest.approx(0.71)
    assert lossless_budget([(0.5, 0.95)], 0.9, tol=0.001) == 0.5 and lossless_budget([], 0.9) is None
    assert "> 0.50" in format_bench_table(rows)   # budgeted: not lossless at the largest spend it ran
    assert parse_entry("infobatch:prune_ratio=0.8:delta=0.9") == ("infobatch", {"prune_ratio": 0.8, "delta": 0.9})
    with pytest.raises(DdsError, match="NAME:KEY=VALUE"):
        parse_entry("infobatch:0.8")


def test_cli_train_prints_the_run_id_refuses_resume_mismatch_and_hints_on_ctrl_c(ws, monkeypatch):
    from typer.testing import CliRunner

    import dds.train.loop as loop
    from dds.cli import app

    runner = CliRunner()
    args = ["train", "tiny", "--policy", "random", "--epochs", "2", "--model", "cnn3", "--batch-size", "16",
            "-w", str(ws.root), "--no-progress"]
    train_epoch = loop.train_epoch

    def interrupted(*a, **kw):   # Ctrl-C after the run exists, before any epoch is trained
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupted)
    res = runner.invoke(app, args)
    assert res.exit_code == 130
    run_id = res.output.split("run ", 1)[1].split(" ", 1)[0]
    assert f"resume with: dds train tiny --resume {run_id}" in res.output.splitlines()[-1]
    status = _table(ws, f"SELECT status FROM runs WHERE run_id = '{run_id}'")["status"].tolist()
    assert status == ["stopped"]
    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    res = runner.invoke(app, ["train", "tiny", "--resume", run_id, "--epochs", "5", "-w", str(ws.root)])
    assert res.exit_code != 0 and "--resume continues a run with its saved options; drop --epochs" in str(res.exception)
    res = runner.invoke(app, ["train", "other", "--resume", run_id, "-w", str(ws.root)])
    assert "trained on dataset tiny, not other" in str(res.exception)
    res = runner.invoke(app, ["train", "tiny", "--resume", run_id, "-w", str(ws.root), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert _table(ws, f"SELECT status FROM runs WHERE run_id = '{run_id}'")["status"].tolist() == ["done"]


def test_bench_train_reports_bare_step_and_loop_side_by_side(ws):
    from dds.device import amp_allowed, cpu_has_amx, uses_bf16
    from dds.bench.training import bench_train

    rows = bench_train(ws, "tiny", model="cnn3", batch_size=8, samples=64, device="cpu", repeats=1)
    bare = [r for r in rows if r["what"] == "bare"]
    half_variants = {(True, True), (False, True)} if amp_allowed() else set()   # none under DDS_AMP=0
    assert {(r["channels_last"], r["bf16"]) for r in bare} == {(True, False), (False, False)} | half_variants
    # fp32: as many steps as the loop; bf16 without AMX (several times slower): a quarter of them, at least 3
    half = 8 if cpu_has_amx() else 3
    assert {r["steps"] for r in bare if not r["bf16"]} == {8}
    assert {r["steps"] for r in bare if r["bf16"]} == ({half} if half_variants else set())
    loops = [r for r in rows if r["what"] == "loop"]
    assert [r["prefetch"] for r in loops] == [0, 2] and rows[-2:] == loops
    trainer_bf16 = uses_bf16(torch.device("cpu"), True)
    mine = next(r for r in bare if r["channels_last"] and r["bf16"] == trainer_bf16)  # the trainer's own setting
    for loop in loops:
        assert loop["channels_last"] and loop["bf16"] == trainer_bf16 and loop["steps"] == 8
        assert 0 <= loop["data_share"] < 1 and loop["img_s"] > 0
        assert loop["vs_bare"] == pytest.approx(loop["img_s"] / mine["img_s"], rel=1e-2)
    assert all(r["img_s"] > 0 for r in rows) and {r["source"] for r in loops} == {"cached"}
    streamed = bench_train(ws, "tiny", model="cnn3", batch_size=8, samples=64, device="cpu", repeats=1, bf16=False,
                           cache=False, decode_workers=2)
    assert [(r["source"], r["prefetch"]) for r in streamed if r["what"] == "loop"] == [
        ("cached", 0), ("cached", 2), ("streamed", 2)]


def test_bf16_only_where_it_is_fast_and_fp32_elsewhere(tmp_path, monkeypatch):
    """CPU bf16 autocast needs AMX; without it (or with amp off, or where cpuinfo is unreadable) training is fp32."""
    from dds import device as D
    from dds.train import loop as L

    amx, plain = tmp_path / "cpuinfo-amx", tmp_path / "cpuinfo-plain"
    amx.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert D.cpu_has_amx(str(amx))
    plain.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert not D.cpu_has_amx(str(plain)) and not D.cpu_has_amx(str(tmp_path / "missing"))
    cpu = torch.device("cpu")
    monkeypatch.delenv("DDS_AMP", raising=False)
    for amx in (True, False):
        monkeypatch.setattr(D, "cpu_has_amx", lambda amx=amx: amx)
        assert D.uses_bf16(cpu, True) is amx and not D.uses_bf16(cpu, False)
        with L._autocast(cpu, True):
            out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
        assert out.dtype == (torch.bfloat16 if amx else torch.float32)
    assert D.uses_bf16(torch.device("cuda"), True) and not D.uses_bf16(torch.device("cuda"), False)
    monkeypatch.setenv("DDS_AMP", "0")   # off everywhere, whatever the device
    assert not D.uses_bf16(cpu, True) and not D.uses_bf16(torch.device("cuda"), True)


def test_relabelled_samples_train_on_the_corrected_label_and_history_records_it(tmp_path):
    import pyarrow.parquet as pq

    ws = Workspace(tmp_path)
    write_dataset(ws, "verdict", {"train": 48, "test": 8})
    keys = [f"train-{i:07d}" for i in range(48)]
    write_scores(ws, "verdict", "lite0-minilm", keys)
    label = np.asarray(pq.read_table(ws.index_dir("verdict", "lite0-minilm") / "scores.parquet")["label"])
    status = np.array(["clean", "relabel", "suppress"] * 16, dtype=object)
    fixed = np.where(status == "relabel", (label + 1) % CLASSES, label)
    write_verdict(ws, "verdict", "lite0-minilm", status, fixed)
    result = run_train(ws, _cfg(dataset="verdict", policy="dds", epochs=3, budget=0.6,
                                policy_options={"strong_aug": "top_q"}), progress=False)
    h = _table(ws, f"SELECT epoch, key, selected, aug, label_used, status FROM history "
                   f"WHERE run_id = '{result['run_id']}' ORDER BY epoch, key")
    by_key = dict(zip(keys, fixed)), dict(zip(keys, status))
    sel = h[h["selected"]]
    assert (sel["label_used"] == sel["key"].map(by_key[0])).all()          # relabelled: trained on label_fixed
    assert (h["status"] == h["key"].map(by_key[1])).all()
    assert (sel.loc[sel["status"] == "relabel", "label_used"] != sel.loc[sel["status"] == "relabel", "key"].map(
        dict(zip(keys, label)))).all() and (sel["status"] == "relabel").any()
    assert not sel["status"].eq("suppress").any()      # no warm-up: suppressed samples are never trained on
    assert not sel.loc[sel["status"] != "clean", "aug"].eq("strong").any()  # suspects never strongly augmented
    assert h["label_used"][~h["selected"]].isna().all()


def test_the_loop_trains_on_the_plan_labels(ws, monkeypatch):
    """The targets the loss sees are the plan's labels, not the shards' (a spy on cross_entropy)."""
    import torch.nn.functional as F

    from dds.selector._base import make_plan
    from dds.train.loop import train_epoch

    train = open_split(ws, "tiny", "train")
    idx = np.arange(0, N_TRAIN, 2)
    flipped = (train.labels[idx] + 1) % CLASSES
    seen, real = [], F.cross_entropy

    def spy(logits, y, **kw):
        seen.append(y.clone())
        return real(logits, y, **kw)

    monkeypatch.setattr(F, "cross_entropy", spy)
    model = create_model("cnn3", CLASSES, 1, SIZE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, opt, train, make_plan(0, idx, labels=flipped), cfg=_cfg(), device=torch.device("cpu"),
                augmenter=Augmenter(SIZE), steps_done=0, total_steps=10, progress=False)
    assert torch.equal(torch.cat(seen), torch.from_numpy(flipped))


def test_a_run_being_trained_cannot_be_resumed_twice(ws):
    run_id = run_train(ws, _cfg(epochs=2), progress=False, stop_after=1)["run_id"]
    with ws.lock(ws.run_dir(run_id), f"run {run_id}"):   # as a live `dds train --resume` holds it
        with pytest.raises(DdsError, match=f"run {run_id}"):
            resume_train(ws, run_id, progress=False)
    assert resume_train(ws, run_id, progress=False)["status"] == "done"
