"""Tests of dds report, dds audit, dds export on a tiny synthetic workspace."""
from __future__ import annotations

import csv
import json
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synth import write_tar
from PIL import Image
from typer.testing import CliRunner

from dds.bench.training import run_bench
from dds.cli import app
from dds.errors import DdsError
from dds.pipeline.audit import auroc, cleanlab_flags, flag_metrics, named_labels, precision_recall_at_k, run_audit
from dds.train import TrainConfig, run_train
from dds.selector._core import capped_quotas
from dds.train.export import coreset_weights, run_export, select_coreset, selection_stats
from dds.train.report import (ISSUE_COLUMNS, POLICY_COLORS, budget_curve, class_rates, default_epoch, fig_budget,
                              fig_curves, label_issues, pick_examples, policy_colors, suspects_by_epoch,
                              write_report)
from dds.workspace import Workspace

N_TRAIN, N_TEST, SIZE, CLASSES, ENC = 64, 16, 8, 4, "tiny-clip"
FLIPPED = set(range(0, N_TRAIN, 5))  # 13 injected label flips


def _tar(path: Path, rows: list[tuple[str, int]], rng) -> None:
    write_tar(path, rows, rng, SIZE)


def _write_dataset(ws: Workspace, name: str) -> None:
    """Shards, samples (with injected flips in label vs label_orig), dataset.json and full scores."""
    d = ws.dataset_dir(name)
    (d / "shards").mkdir(parents=True)
    rng = np.random.default_rng(0)
    orig = np.arange(N_TRAIN) % CLASSES
    label = np.array([(y + 1) % CLASSES if i in FLIPPED else y for i, y in enumerate(orig)])
    samples, shards = [], []
    for split, n, labels in (("train", N_TRAIN, label), ("test", N_TEST, np.arange(N_TEST) % CLASSES)):
        for s in range(0, n, 40):
            stem, idx = f"{split}-{s // 40:06d}", range(s, min(n, s + 40))
            _tar(d / "shards" / f"{stem}.tar", [(f"{split}-{i:07d}", int(labels[i])) for i in idx], rng)
            samples += [{"dataset": name, "key": f"{split}-{i:07d}", "split": split, "label": int(labels[i]),
                         "label_orig": int(orig[i]) if split == "train" else int(labels[i]), "shard": stem, "idx": i,
                         "source": f"/data/tiny/{split}/{i}.png"}
                        for i in idx]
            shards.append({"dataset": name, "split": split, "shard": stem, "path": f"shards/{stem}.tar",
                           "count": len(idx), "sha256": ""})
    pq.write_table(pa.Table.from_pylist(samples), d / "samples.parquet")
    pq.write_table(pa.Table.from_pylist(shards), d / "shards.parquet")
    (d / "dataset.json").write_text(json.dumps({
        "name": name, "source": "synthetic", "manifest": None, "classes": [f"c{i}" for i in range(CLASSES)],
        "prompt_names": [f"c{i}" for i in range(CLASSES)], "templates": ["a photo of a {}."], "mean": [0.5],
        "std": [0.25], "image_size": SIZE, "channels": 1, "splits": {"train": N_TRAIN, "test": N_TEST},
        "label_noise": {"fraction": len(FLIPPED) / N_TRAIN, "kind": "symmetric", "seed": 0}}))
    # scores: flipped samples get a low probability of their (wrong) label, most are flagged noisy
    prob_label = np.where(np.isin(np.arange(N_TRAIN), list(FLIPPED)), rng.uniform(0.0, 0.3, N_TRAIN),
                          rng.uniform(0.2, 1.0, N_TRAIN)).astype(np.float32)
    probs = np.full((N_TRAIN, CLASSES), 0.0, np.float32)
    probs[np.arange(N_TRAIN), label] = prob_label
    probs[np.arange(N_TRAIN), orig] += 1.0 - prob_label  # the rest on the true class (or on the label itself)
    density = rng.random(N_TRAIN).astype(np.float32)
    region = np.where(prob_label < 0.1, "noisy", np.where(density > 0.7, "redundant",
                                                          np.where(prob_label > 0.7, "augment", "keep")))
    path = ws.index_dir(name, ENC) / "scores.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({
        "dataset": [name] * N_TRAIN, "encoder": [ENC] * N_TRAIN, "key": [f"train-{i:07d}" for i in range(N_TRAIN)],
        "label": label.astype(np.int32), "density": density, "consistency": prob_label - 0.5,
        "margin": np.zeros(N_TRAIN, np.float32), "knn_agreement": np.full(N_TRAIN, 0.5, np.float32),
        "joint": ((1 - density) * prob_label).astype(np.float32), "region": region.tolist(),
        "pred_label": probs.argmax(1).astype(np.int32), "prob_label": prob_label,
        "probs": pa.array(list(probs), pa.list_(pa.float32()))}), path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    _write_dataset(ws, "tiny")
    return ws


@pytest.fixture(scope="module")
def runs(ws) -> list[str]:
    """A dds run and a random run of 3 epochs each (seconds on CPU)."""
    base = dict(dataset="tiny", budget=0.5, epochs=3, model="cnn3", batch_size=16, encoder=ENC, num_threads=1)
    return [run_train(ws, TrainConfig(policy=p, **base), progress=False)["run_id"] for p in ("dds", "random")]


@pytest.fixture(scope="module")
def bench(ws) -> str:
    """A bench of full and dds, one seed of 2 epochs each; returns its bench id."""
    base = dict(batch_size=16, encoder=ENC, num_threads=1)
    run_bench(ws, "tiny", policies=["full", "dds"], budgets=[0.5], epochs=2, seeds=1, model="cnn3", base_config=base,
              progress=False)
    return sorted(p.stem for p in (ws.root / "bench").glob("*.parquet"))[-1]


# ---------------------------------------------------------------- report

def test_report_writes_non_empty_figures_and_a_self_contained_page(ws, runs, tmp_path):
    result = write_report(ws, runs, tmp_path / "rep", top_issues=5)
    names = sorted(Path(p).name for p in result["figures"])
    assert names == ["curves.png", "dds-class_rates.png", "dds-joint.png", "dds-suspects.png", "examples.png",
                     "random-class_rates.png", "random-joint.png"]   # one selection section per policy
    assert any("against the injected flips: precision" in n for n in result["notes"])   # the dds run's verdict
    for p in result["figures"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L"))
        assert arr.shape[0] > 200 and arr.shape[1] > 200 and arr.std() > 5  # something drawn
    page = Path(result["html"]).read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", page)
    assert len(refs) == 7 + 5 + 1   # the figures, a thumbnail per label issue, the link to the CSV
    for ref in refs:  # every reference is a data URI (or a file next to the page)
        assert ref.startswith("data:image/png;base64,") or (Path(result["html"]).parent / ref).exists()
    for ref in refs:
        if ref.startswith("data:"):
            import base64

            assert base64.b64decode(ref.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "label_issues.csv" in refs and Path(result["csv"]).name == "label_issues.csv"
    assert all(r in page for r in runs)


def test_report_of_a_bench_has_a_section_per_policy_and_a_label_issue_gallery(ws, bench, tmp_path):
    result = write_report(ws, [bench], tmp_path / "rep", top_issues=10)
    page = Path(result["html"]).read_text()
    sections = dict(re.findall(r"<h2>([^<]+)</h2>(.*?)(?=<h2>|</body>)", page, re.S))
    assert list(sections) == ["comparison", "policy full", "policy dds", "dataset tiny"]
    assert "alt='budget'" in sections["comparison"] and "alt='curves'" in sections["comparison"]
    # the dds run's selection is shown, full (everything selected) gets a note instead
    assert "alt='dds-joint'" in sections["policy dds"] and "alt='dds-class_rates'" in sections["policy dds"]
    assert "<img" not in sections["policy full"] and "trains on every sample every epoch" in sections["policy full"]
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ISSUE_COLUMNS and [int(r["rank"]) for r in rows] == list(range(1, 11))
    posterior = [float(r["label_posterior"]) for r in rows]
    assert posterior == sorted(posterior)   # most likely mislabelled first
    flipped = [r for r in rows if int(r["key"].split("-")[1]) in FLIPPED]
    assert len(flipped) >= 5   # most injected flips have the lowest posterior in the synthetic scores
    for r in rows:   # a flip's suggested label is the true one (by class name); the others keep theirs
        i = int(r["key"].split("-")[1])
        assert r["source"] == f"/data/tiny/train/{i}.png" and r["source"] in sections["dataset tiny"]
        if r in flipped:
            assert r["given_class"] == f"c{(i % CLASSES + 1) % CLASSES}" and r["suggested_class"] == f"c{i % CLASSES}"
            assert f"{r['given_class']} &rarr; <b>{r['suggested_class']}</b>" in sections["dataset tiny"]
        else:
            assert r["given_class"] == r["suggested_class"] == f"c{i % CLASSES}"
    gallery = sections["dataset tiny"].split("label issues", 1)[1]
    assert gallery.count("<img class='thumb'") == 10 and "href='label_issues.csv'" in gallery


def test_label_issues_suggest_the_verdicts_correction_else_the_prediction():
    import pandas as pd

    df = pd.DataFrame({"key": ["a", "b", "c", "d"], "source": ["a.png", "b.png", "c.png", "d.png"],
                       "label": [0, 1, 2, 0], "pred_label": [2, 0, 2, 0], "status": ["relabel", "suppress", "clean",
                                                                                     "clean"],
                       "label_fixed": [1, 1, 2, 0], "label_posterior": [0.1, 0.05, 0.9, 0.6]})
    out = label_issues(df, ["zero", "one", "two"], top=3)
    assert tuple(out.columns) == ISSUE_COLUMNS and out["key"].tolist() == ["b", "a", "d"]
    # b: no correction, the prediction (0); a: the verdict's label_fixed (1) wins over pred_label (2)
    assert out["suggested_label"].tolist() == [0, 1, 0] and out["suggested_class"].tolist() == ["zero", "one", "zero"]
    assert out["given_class"].tolist() == ["one", "zero", "zero"] and out["rank"].tolist() == [1, 2, 3]


def test_policy_colors_are_fixed_and_shared_by_every_figure():
    import pandas as pd
    from matplotlib.colors import to_rgba

    colors = policy_colors(["random", "dds:strong_aug=top_q", "dds", "full", "dds:x=1"])
    assert colors["dds"] == POLICY_COLORS["dds"] and colors["full"] == POLICY_COLORS["full"]
    assert policy_colors(["dds"])["dds"] == colors["dds"]   # the same whatever else is shown
    assert len(set(colors.values())) == 5
    curve = {"epoch": np.arange(2), "spent": np.array([0.25, 0.5]), "wall": np.array([1.0, 2.0]),
             "acc": np.array([0.5, 0.6]), "loss": np.array([1.0, 0.8])}
    fig = fig_curves([{**curve, "entry": "dds"}, {**curve, "entry": "random"}, {**curve, "entry": "dds"}], colors)
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 3 * 6   # accuracy and loss against epoch, budget and wall-clock, per run
    assert {to_rgba(ln.get_color()) for ln in lines} == {to_rgba(colors["dds"]), to_rgba(colors["random"])}
    rows = pd.DataFrame({"policy": ["full", "dds", "random"], "budget_spent": [1.0, 0.5, 0.5],
                         "acc_mean": [0.9, 0.88, 0.85], "acc_std": [0.01] * 3})
    fig = fig_budget(rows, colors)
    drawn = {to_rgba(ln.get_color()) for ln in fig.axes[0].get_lines()}
    assert {to_rgba(colors[p]) for p in ("full", "dds", "random")} <= drawn


def test_report_errors_are_one_line(ws, runs, tmp_path):
    with pytest.raises(DdsError, match="unknown run id 'nope'"):
        write_report(ws, ["nope"], tmp_path)
    with pytest.raises(DdsError, match=r"--epoch must be in \[0, 2\] .*0-based"):
        write_report(ws, runs[:1], tmp_path, epoch=7)
    res = CliRunner().invoke(app, ["report", runs[0], "--epoch", "3", "-w", str(ws.root), "--out", str(tmp_path)])
    assert isinstance(res.exception, DdsError) and "[0, 2]" in str(res.exception)
    res = CliRunner().invoke(app, ["report", "nope", "-w", str(ws.root), "--out", str(tmp_path)])
    assert isinstance(res.exception, DdsError) and "\n" not in str(res.exception)


def test_report_epochs_are_0_based_like_the_tables(ws, runs, tmp_path):
    res = CliRunner().invoke(app, ["report", runs[0], "--epoch", "0", "--issues", "2", "-w", str(ws.root),
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "selection of epoch 0 " in (tmp_path / "index.html").read_text()


def test_suspects_by_epoch_hand_computed():
    epoch = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    status = np.array(["relabel", "suppress", "clean", "clean", "relabel", "clean", "clean", "clean"])
    flipped = np.array([True, False, True, False] * 2)
    fixed_right = np.array([True, False, False, False, False, False, False, False])
    out = suspects_by_epoch(epoch, status, flipped, fixed_right, 2)
    assert out["relabel"].tolist() == [1, 1] and out["suppress"].tolist() == [1, 0]
    assert np.allclose(out["precision"], [0.5, 1.0]) and np.allclose(out["recall"], [0.5, 0.5])
    assert np.allclose(out["relabel_acc"], [1.0, 0.0])
    assert set(suspects_by_epoch(epoch, status, None, None, 2)) == {"relabel", "suppress"}   # no truth: counts only


def test_report_pure_cores():
    spent, wall = budget_curve(np.array([10, 5, 5]), np.array([1.0, 0.5, 0.5]), epochs=4, n=10)
    assert spent.tolist() == [0.25, 0.375, 0.5] and wall.tolist() == [1.0, 1.5, 2.0]
    # epoch 0: class 0 rows (sel, strong) = (T,T),(F,F); class 1 = (T,F); epoch 1: class 0 (T,F),(T,F)
    sel, strong = class_rates(np.array([0, 0, 0, 1, 1]), np.array([0, 0, 1, 0, 0]),
                              np.array([1, 0, 1, 1, 1], bool), np.array([1, 0, 0, 0, 0], bool), 2, 2)
    assert sel[0].tolist() == [0.5, 1.0] and strong[0].tolist() == [0.5, 0.0]
    assert sel[1, 0] == 1.0 and np.isnan(sel[1, 1])
    picks = pick_examples(np.array(["noisy", "keep", "noisy", "redundant"]),
                          {"joint": np.zeros(4), "prob_label": np.array([0.3, 0.9, 0.1, 0.5]),
                           "density": np.array([0, 0, 0, 0.9])}, per_region=5)
    assert list(picks) == ["keep", "redundant", "noisy"]
    assert picks["noisy"].tolist() == [2, 0]  # most suspicious (lowest prob_label) first
    assert default_epoch(np.array([64, 32, 32])) == 1
    assert default_epoch(np.array([64, 64, 0, 0])) == 0   # budgeted's empty epochs would show no selection
    assert default_epoch(np.array([0, 0])) == 0


# ---------------------------------------------------------------- audit

def test_audit_metrics_match_a_hand_computed_case():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = np.array([1, 0, 1, 0, 0], bool)
    # positive 0.9 beats 3 negatives, 0.7 beats 2 of 3: 5 of 6 pairs
    assert auroc(score, truth) == pytest.approx(5 / 6)
    assert auroc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool)) == pytest.approx(0.75)  # tie counts 1/2
    assert np.isnan(auroc(score, np.ones(5, bool)))
    assert precision_recall_at_k(score, truth, 2) == (0.5, 0.5)
    assert precision_recall_at_k(score, truth, 3) == (pytest.approx(2 / 3), 1.0)
    m = flag_metrics(np.array([1, 1, 0, 0, 1], bool), truth)
    assert m["flagged"] == 3 and m["precision"] == pytest.approx(1 / 3) and m["recall"] == 0.5
    with pytest.raises(ValueError, match="k must be"):
        precision_recall_at_k(score, truth, 0)


def test_auroc_keeps_its_value_on_tied_random_scores():
    rng = np.random.default_rng(0)
    score, truth = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3
    # the value of a rank-sum (Mann-Whitney) computation with average ranks over ties
    assert auroc(score, truth) == pytest.approx(0.47565469140676403, abs=1e-12)


def test_audit_ranks_injected_noise_and_compares_with_cleanlab(ws):
    result = run_audit(ws, "tiny", encoder=ENC)
    ranking = result["ranking"]
    assert len(ranking) == N_TRAIN and ranking["suspicion"].is_monotonic_decreasing
    assert ranking["rank"].tolist() == list(range(1, N_TRAIN + 1))
    assert {"key", "label", "pred_label", "suspicion", "prob_label", "region"} <= set(ranking.columns)
    assert result["has_noise"] and result["metrics"]["ranking"]["k"] == len(FLIPPED)
    assert result["metrics"]["ranking"]["auroc"] > 0.9  # flipped samples got low prob_label
    assert set(result["metrics"]) == {"ranking", "noisy_region", "cleanlab"}
    assert result["metrics"]["cleanlab"]["flagged"] == int(ranking["cleanlab_flag"].sum())
    assert result["notes"] == []


def test_a_skipped_verdict_is_a_note_of_audit_and_report_not_a_list_of_issues(ws, runs, tmp_path, monkeypatch):
    said = "the class scores give the given labels a mean probability of 0.085, no better than a guess"
    monkeypatch.setattr("dds.pipeline.audit.index_info", lambda *a: {"verdict": f"skipped: {said}"})
    assert f"no label verdict: {said}" in run_audit(ws, "tiny", encoder=ENC)["notes"]
    result = write_report(ws, runs[:1], tmp_path / "rep", top_issues=5)
    assert f"no label verdict: {said}: no label issues" in result["notes"] and result["csv"] is None


def test_audit_without_cleanlab_is_a_note(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert cleanlab_flags(np.array([0, 1]), np.eye(2)) is None
    result = run_audit(ws, "tiny", encoder=ENC)
    assert "cleanlab" not in result["metrics"] and "ranking" in result["metrics"]
    assert any("pip install 'dds[audit]'" in n for n in result["notes"])
    res = CliRunner().invoke(app, ["audit", "tiny", "-e", ENC, "--top", "3", "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    assert "pip install 'dds[audit]'" in res.output and "auroc" in res.output


def test_audit_prints_class_names(ws):
    assert named_labels(np.array([3, 0]), ["a", "b", "c", "Dress"]) == ["3 Dress", "0 a"]
    res = CliRunner().invoke(app, ["audit", "tiny", "-e", ENC, "--top", "4", "--no-cleanlab", "-w", str(ws.root)])
    assert res.exit_code == 0, res.output
    rows = re.findall(r"^\s*\d+\s+train-\d+\s+(\d) (c\d)\s+(\d) (c\d)\s+[0-9.]+\s+\w+\s+(\d) (c\d)", res.output, re.M)
    assert len(rows) == 4, res.output   # label, pred_label and label_fixed as "number name"
    assert all(name == f"c{num}" for row in rows for num, name in zip(row[::2], row[1::2]))


def test_audit_without_scores_is_an_error(ws):
    with pytest.raises(DdsError, match="no scores under encoder lite0-minilm"):
        run_audit(ws, "tiny", encoder="lite0-minilm")


# ---------------------------------------------------------------- export

def test_export_quotas_are_the_selectors_water_filling():
    # export places its class quotas with dds.selector._core.capped_quotas (one water-filling in the code base)
    assert capped_quotas(6, np.array([10, 10, 10]), np.array([10, 10, 10])).tolist() == [2, 2, 2]
    assert capped_quotas(9, np.array([10, 10, 10]), np.array([1, 10, 10])).tolist() == [1, 4, 4]
    assert capped_quotas(3, np.array([20, 10]), np.array([20, 10])).tolist() == [2, 1]
    labels = np.repeat([0, 1, 2], [10, 10, 10])
    noisy = np.zeros(30, bool)
    noisy[1:10] = True  # class 0 has one clean sample: its gap goes to the others, noisy ones fill nothing
    chosen = select_coreset(labels, 3, noisy, np.zeros(30, np.int64), np.zeros(30), 0.3)
    assert np.bincount(labels[chosen], minlength=3).tolist() == [1, 4, 4]


@pytest.mark.parametrize("budget", [0.01, 0.1, 0.37, 0.5, 0.8, 0.95, 1.0])
def test_select_coreset_respects_the_budget_exactly(budget):
    rng = np.random.default_rng(1)
    n = 203
    labels = rng.integers(0, 5, n)
    noisy = rng.random(n) < 0.15
    chosen = select_coreset(labels, 5, noisy, rng.integers(0, 4, n), rng.random(n), budget)
    assert len(chosen) == round(budget * n) and len(np.unique(chosen)) == len(chosen)
    if len(chosen) <= (~noisy).sum():
        assert not noisy[chosen].any()  # noisy samples only fill what the clean ones cannot
    else:
        assert (~noisy).sum() == (~noisy[chosen]).sum()


def test_select_coreset_ranks_by_times_selected_then_joint_per_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    times = np.array([3, 1, 3, 0, 0, 2, 2, 1])
    joint = np.array([0.1, 0.9, 0.5, 0.9, 0.9, 0.2, 0.3, 0.0])
    noisy = np.array([0, 0, 0, 0, 0, 0, 1, 0], bool)
    # class 0: times 3,3 -> joint 0.5 (2) before 0.1 (0); class 1: 6 is noisy, so 5 then 7
    assert select_coreset(labels, 2, noisy, times, joint, 0.5).tolist() == [0, 2, 5, 7]
    w = coreset_weights(labels, np.array([0, 2, 4]), 2, "class")
    assert w.tolist() == [2.0, 2.0, 4.0]  # N_c / n_c
    assert coreset_weights(labels, np.array([0, 2, 4]), 2, "uniform").tolist() == [1, 1, 1]


def test_selection_stats():
    times, mean = selection_stats(np.array([1, 0, 1, 1], bool), np.array([2.0, np.nan, 4.0, 1.0]),
                                  np.array([0, 1, 0, 2]), 4)
    assert times.tolist() == [2, 0, 1, 0] and mean[0] == 3.0 and mean[2] == 1.0
    assert np.isnan(mean[1]) and np.isnan(mean[3])


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_export_budget_outside_0_1_is_an_error(ws, runs, tmp_path, budget):
    with pytest.raises(DdsError, match=r"--budget must be in \(0, 1\]"):
        run_export(ws, runs[0], budget, tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_export_errors(ws, runs, tmp_path):
    with pytest.raises(DdsError, match="rounds to 0 samples"):
        run_export(ws, runs[0], 0.001, tmp_path / "x.parquet")
    with pytest.raises(DdsError, match="unknown run id"):
        run_export(ws, "tiny-dds-0", 0.5, tmp_path / "x.parquet")
    res = CliRunner().invoke(app, ["export", runs[0], "--budget", "2", "--out", str(tmp_path / "x.parquet"),
                                   "-w", str(ws.root)])
    assert isinstance(res.exception, DdsError)


def test_export_refuses_a_shards_folder_that_already_holds_tars(ws, runs, tmp_path):
    shards = tmp_path / "shards"
    run_export(ws, runs[0], 0.5, tmp_path / "a.parquet", shards=shards, shard_size=8)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    with pytest.raises(DdsError, match=r"already holds \d+ tar\(s\).*empty or new folder"):
        run_export(ws, runs[0], 0.1, tmp_path / "b.parquet", shards=shards)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before and not (tmp_path / "b.parquet").exists()


def test_export_writes_the_budget_and_shards_that_dds_shard_reads_back(ws, runs, tmp_path):
    out, shards = tmp_path / "core.parquet", tmp_path / "shards"
    result = run_export(ws, runs[0], 0.3, out, weighting="class", shards=shards, shard_size=8)
    table = pq.read_table(out).to_pandas()
    assert list(table.columns) == ["key", "label", "weight", "region", "times_selected", "mean_loss"]
    assert len(table) == round(0.3 * N_TRAIN) == result["samples"]
    assert (table["region"] != "noisy").all() and table["key"].is_unique
    assert (table["mean_loss"].isna() == (table["times_selected"] == 0)).all()
    train_labels = [(y + 1) % CLASSES if i in FLIPPED else y for i, y in enumerate(np.arange(N_TRAIN) % CLASSES)]
    n_c = np.bincount(train_labels, minlength=CLASSES)  # class weights N_c / n_c sum to the class size N_c
    assert table.groupby("label")["weight"].sum().to_numpy() == pytest.approx(n_c[sorted(set(table["label"]))])
    in_tars = []
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            in_tars += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".png")]
    assert sorted(in_tars) == sorted(table["key"]) and len(list(shards.glob("train-*.tar"))) == 3
    assert (shards / "test-000000.tar").exists()
    res = CliRunner().invoke(app, ["shard", f"tar:{shards}/*.tar", "--name", "core", "-w", str(ws.root),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    back = pq.read_table(ws.dataset_dir("core") / "samples.parquet").to_pandas()
    assert (back["split"] == "train").sum() == len(table) and (back["split"] == "test").sum() == N_TEST
    assert json.loads((ws.dataset_dir("core") / "dataset.json").read_text())["classes"] == \
        [f"c{i}" for i in range(CLASSES)]
