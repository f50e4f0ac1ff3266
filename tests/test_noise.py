"""Label noise: the injected kinds of `dds shard` and the static verdict of `dds index` (pipeline/verdict.py)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dds.errors import DdsError
from dds.manifests import get_manifest
from dds.pipeline import verdict as V
from dds.pipeline.adapters import ClassScores
from dds.pipeline.index import compute_scores
from dds.pipeline.knn import knn
from dds.pipeline.shard import run_shard
from dds.pipeline.surgery import class_map_noise, inject_noise, noise_map, pairflip_map
from dds.tables import STATUSES
from dds.workspace import Workspace

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")


# ---------------------------------------------------------------- injected noise kinds


def test_pairflip_is_exact_per_class_and_deterministic():
    labels = np.repeat(np.arange(4), [20, 15, 10, 7])
    noisy = inject_noise(labels, 4, 0.3, "pairflip", seed=3, mapping=pairflip_map(4))
    for c, n in enumerate([20, 15, 10, 7]):
        flipped = (labels == c) & (noisy != labels)
        assert flipped.sum() == round(0.3 * n)  # exactly round(F * n_c) of each class ...
        assert (noisy[flipped] == (c + 1) % 4).all()  # ... all to the next class
    np.testing.assert_array_equal(noisy, inject_noise(labels, 4, 0.3, "pairflip", seed=3, mapping=pairflip_map(4)))
    assert not np.array_equal(noisy, inject_noise(labels, 4, 0.3, "pairflip", seed=4, mapping=pairflip_map(4)))
    assert (inject_noise(labels, 4, 0.0, "pairflip", seed=3, mapping=pairflip_map(4)) == labels).all()


def test_class_map_noise_respects_the_mapping_and_leaves_unmapped_classes_clean():
    labels = np.repeat(np.arange(5), 20)
    mapping = {0: 3, 3: 0, 1: 2}
    noisy = class_map_noise(labels, mapping, 0.25, seed=0)
    for c in range(5):
        rows = labels == c
        assert (noisy[rows] != c).sum() == (5 if c in mapping else 0)
        if c in mapping:
            assert set(noisy[rows & (noisy != labels)]) == {mapping[c]}
    np.testing.assert_array_equal(noisy, class_map_noise(labels, mapping, 0.25, seed=0))
    with pytest.raises(ValueError, match="another class"):
        class_map_noise(labels, {2: 2}, 0.1, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        class_map_noise(labels, mapping, 1.5, seed=0)


def test_noise_map_by_kind():
    classes = ["a", "b", "c"]
    assert noise_map("symmetric", classes, None, "src") is None
    assert noise_map("pairflip", classes, None, "src") == {0: 1, 1: 2, 2: 0}
    assert noise_map("asymmetric", classes, {"a": "c", "c": "a"}, "src") == {0: 2, 2: 0}
    with pytest.raises(DdsError, match="needs a class mapping"):
        noise_map("asymmetric", classes, {}, "imagefolder:x")
    with pytest.raises(DdsError, match="unknown classes"):
        noise_map("asymmetric", classes, {"a": "zebra"}, "src")


def test_fashion_mnist_manifest_mapping_pairs_the_look_alikes():
    m = get_manifest("fashion-mnist")
    mp = m.noise_map
    assert set(mp) | set(mp.values()) <= set(m.classes) and all(a != b for a, b in mp.items())
    for a, b in (("T-shirt/top", "Shirt"), ("Pullover", "Coat"), ("Sneaker", "Ankle boot")):
        assert mp[a] == b and mp[b] == a
    assert "Bag" not in mp  # no look-alike: stays clean


def test_asymmetric_without_a_mapping_is_one_clear_error(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / cls / f"{i}.png")
    with pytest.raises(DdsError, match="needs a class mapping"):
        run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{root}", label_noise=0.3, noise_kind="asymmetric",
                  progress=False)
    out = run_shard(Workspace(tmp_path / "ws"), f"imagefolder:{root}", label_noise=0.34, noise_kind="pairflip",
                    progress=False)
    assert out["noise_flipped"] == 2  # round(0.34 * 3) per class


@pytest.mark.skipif(not FMNIST.exists(), reason="needs the Debian package dataset-fashion-mnist")
def test_shard_fashion_mnist_asymmetric_records_the_map(tmp_path):
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, "fashion-mnist", split="train", limit=200, label_noise=0.3, noise_kind="asymmetric", seed=1,
              progress=False)
    info = json.loads((ws.dataset_dir("fashion-mnist") / "dataset.json").read_text())
    mp = get_manifest("fashion-mnist").noise_map
    assert info["label_noise"]["kind"] == "asymmetric" and info["label_noise"]["map"] == dict(sorted(mp.items()))
    s = pq.read_table(ws.dataset_dir("fashion-mnist") / "samples.parquet").to_pandas()
    classes = info["classes"]
    for c, name in enumerate(classes):
        rows = s[s.label_orig == c]
        flipped = rows[rows.label != rows.label_orig]
        assert len(flipped) == (round(0.3 * len(rows)) if name in mp else 0)
        assert set(flipped.label) <= {classes.index(mp[name])} if name in mp else True


# ---------------------------------------------------------------- the verdict


def _evidence_case():
    """Three classes of 40 (held-out evidence); samples 0-3 (labelled 0) are all class 1, samples 4-7
    (labelled 0) all class 2, sample 8 (labelled 0) is split between classes 1 and 2."""
    labels = np.repeat([0, 1, 2], 40)
    probs = np.full((120, 3), 0.05)
    probs[np.arange(120), labels] = 0.9
    votes = np.zeros((120, 3))
    votes[np.arange(120), labels] = 1.0
    probs[0:4], votes[0:4] = [0.005, 0.99, 0.005], [0.0, 1.0, 0.0]  # deep in class 1's cluster
    probs[4:8], votes[4:8] = [0.005, 0.005, 0.99], [0.0, 0.0, 1.0]  # deep in class 2's cluster
    probs[8], votes[8] = [0.04, 0.50, 0.46], [0.0, 0.5, 0.5]  # between classes 1 and 2
    return probs, votes, labels


def test_verdict_known_answers():
    probs, votes, labels = _evidence_case()
    v = V.static_verdict(V.Views.dense(probs, votes), labels)
    assert (v.status[0:8] == "relabel").all() and (v.label_fixed[0:8] == [1] * 4 + [2] * 4).all()
    assert v.status[8] == "suppress" and v.label_fixed[8] == 0  # suppressed keeps the given label
    assert (v.status[9:] == "clean").all() and (v.label_fixed[9:] == labels[9:]).all()
    assert set(v.status) <= set(STATUSES)
    np.testing.assert_allclose(v.transition.sum(1), 1)
    assert ((v.label_posterior >= 0) & (v.label_posterior <= 1)).all() and v.label_posterior[9:].min() > 0.5
    assert v.transition[1, 0] > 0 and v.transition[2, 0] > 0 and v.transition[0, 1] == 0


def test_a_lone_doubt_in_clean_looking_data_stays_clean():
    """The estimated noise model is the prior: where the data show (almost) no noise, a hard sample
    needs overwhelming evidence, so a clean dataset keeps its genuinely ambiguous samples."""
    probs, votes, labels = _evidence_case()
    keep = np.r_[8, 9:120]  # no flips left, only the ambiguous sample
    v = V.static_verdict(V.Views.dense(probs[keep], votes[keep]), labels[keep])
    assert (v.status == "clean").all()


def test_verdict_on_points_through_compute_scores():
    """The same answers from image points (zero-shot, aligned) through the scores of dds index."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 3
    x = np.repeat(centres, 30, axis=0) + 0.3 * rng.standard_normal((90, 16))
    labels = np.repeat([0, 1, 2], 30)
    flips = np.repeat(centres[[1, 2]], 4, axis=0) + 0.3 * rng.standard_normal((8, 16))  # images of 1 and 2 ...
    x = np.vstack([x, flips, (centres[1] + centres[2]) / 2])  # ... and one between 1 and 2, all labelled 0
    labels = np.append(labels, [0] * 9)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    text = np.eye(3, 16, dtype=np.float32)
    class_sims, _ = knn(x, 5, labels=labels)
    _, global_idx = knn(x, 5)
    scores = ClassScores(emb=x, text=text[None], group=np.zeros(len(x), np.int64), tau=np.array([0.05]))
    s = compute_scores(class_sims, global_idx, labels, scores)
    assert (s["status"][90:98] == "relabel").all() and (s["label_fixed"][90:98] == [1] * 4 + [2] * 4).all()
    assert s["status"][98] == "suppress" and s["label_fixed"][98] == 0
    assert (s["status"][:90] == "clean").all()
    assert ((s["region"] == "noisy") == (s["status"] != "clean")).all()


def test_class_scores_no_better_than_a_label_blind_guess_judge_no_label(caplog):
    """An encoder whose class prompts point at the wrong clusters (its scores give the given labels
    less than a guess from the class shares) leaves every label as given, with a warning."""
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 3
    x = np.repeat(centres, 30, axis=0) + 0.3 * rng.standard_normal((90, 16))
    flips = np.repeat(centres[[1, 2]], 4, axis=0) + 0.3 * rng.standard_normal((8, 16))   # labelled 0
    x = np.vstack([x, flips])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = np.append(np.repeat([0, 1, 2], 30), [0] * 8)
    text = np.eye(3, 16, dtype=np.float32)[[1, 2, 0]]   # class c's prompt sits on class c + 1's images
    class_sims, _ = knn(x, 5, labels=labels)
    _, global_idx = knn(x, 5)
    scores = ClassScores(emb=x, text=text[None], group=np.zeros(len(x), np.int64), tau=np.array([0.05]))
    judged = V.static_verdict(V.Views.held_out(scores, global_idx, labels), labels)
    assert (judged.status != "clean").any()   # judged, this evidence would suspect some samples
    s = compute_scores(class_sims, global_idx, labels, scores)
    assert (s["status"] == "clean").all() and (s["label_fixed"] == labels).all() and (s["label_posterior"] == 1).all()
    assert not (s["region"] == "noisy").any()
    guess = np.sum((np.bincount(labels) / labels.size) ** 2)
    assert s["prob_label"].mean() < guess and s["verdict_note"] == V.blind_note(s["prob_label"], labels, "class scores")
    assert f"no better than a label-blind guess ({guess:.3f})" in s["verdict_note"] and s["verdict_note"] in caplog.text
    assert V.blind_note(np.full(98, guess + 0.01), labels, "class scores") is None
    assert V.blind_note(np.full(98, guess), labels, "class scores") is not None


def test_a_blind_first_adapter_pass_trains_no_trimmed_pass(monkeypatch):
    """Embeddings that carry nothing of the labels: the first cross-fitted pass is blind, so no trimmed
    pass is trained and no label is judged; embeddings that separate the classes get every pass."""
    from dds.pipeline import adapters as adapt
    from dds.pipeline.index import TRIM_PASSES, index_arrays

    calls = []
    fit = adapt.crossfit_adapters
    monkeypatch.setattr(adapt, "crossfit_adapters", lambda *a, **k: calls.append(k.get("train_mask")) or fit(*a, **k))
    labels = np.repeat([0, 1, 2], 40)
    text = np.eye(3, 16, dtype=np.float32)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((120, 16)).astype(np.float32)
    for x, passes in ((noise, 1), (np.eye(3, 16, dtype=np.float32)[labels] * 3 + noise * 0.3, 1 + TRIM_PASSES)):
        calls.clear()
        res = index_arrays(x / np.linalg.norm(x, axis=1, keepdims=True), labels, text, k=5, use_adapters=True)
        assert len(calls) == passes and (res["trim"] is None) == (passes == 1)
        assert (res["cols"]["verdict_note"] is not None) == (passes == 1)
    assert (res["cols"]["status"] == "clean").mean() > 0.9   # the separable set is judged, and found clean


def test_verdict_thresholds_follow_the_data():
    """Per-class thresholds are the class means; a clean dataset gives a near-identity noise model."""
    probs, votes, labels = _evidence_case()
    ev = V.combine(probs, votes)
    t = V.class_thresholds(V.Views.dense(probs, votes), labels)
    np.testing.assert_allclose(t[2], ev[labels == 2, 2].mean())
    assert V.confident_labels(ev, t)[0] == 1 and V.trim_mask(V.Views.dense(probs, votes), labels)[0]
    clean = V.static_verdict(V.Views.dense(probs[9:], votes[9:]), labels[9:])
    assert (clean.status == "clean").all() and np.allclose(clean.transition, np.eye(3))


def test_verdict_in_blocks_equals_one_block(monkeypatch):
    """The verdict streams its evidence in row blocks (no (N, C) array is held): tiny blocks give
    exactly the answer of one block, through the per-block adapter probabilities and votes."""
    rng = np.random.default_rng(1)
    n, c = 300, 4
    x = _unit(rng.standard_normal((n, 8)))
    labels = rng.integers(0, c, n)
    scores = ClassScores(emb=x, text=_unit(rng.standard_normal((2, c, 8))), group=rng.integers(0, 2, n),
                         tau=np.array([0.1, 0.2]))
    _, idx = knn(x, 5)
    whole = V.static_verdict(V.Views.held_out(scores, idx, labels), labels)
    cos, probs = scores.dense()
    dense = V.static_verdict(V.Views.dense(probs, V.neighbour_votes(idx, labels, c)), labels)
    monkeypatch.setattr(V, "BLOCK_ELEMENTS", 7 * c)  # 7 rows per block
    views = V.Views.held_out(scores, idx, labels)
    assert len(list(views.blocks())) == -(-n // 7)
    blocked = V.static_verdict(views, labels)
    for v in (dense, blocked):
        assert (v.status == whole.status).all() and (v.label_fixed == whole.label_fixed).all()
        np.testing.assert_allclose(v.label_posterior, whole.label_posterior, rtol=1e-5)  # float32 matmul rounding
        np.testing.assert_allclose(v.transition, whole.transition)
    assert (whole.status != "clean").any()  # random labels: the case is not trivially all clean


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_neighbour_votes_skip_missing_and_trimmed_neighbours():
    idx = np.array([[1, 2, -1], [0, 2, 3], [-1, -1, -1], [0, 1, 2]])
    labels = np.array([0, 1, 1, 0])
    q = V.neighbour_votes(idx, labels, 2)
    np.testing.assert_allclose(q, [[0, 1], [2 / 3, 1 / 3], [0.5, 0.5], [1 / 3, 2 / 3]])
    q = V.neighbour_votes(idx, labels, 2, keep=np.array([True, False, True, True]))
    np.testing.assert_allclose(q[0], [0, 1]) and np.testing.assert_allclose(q[3], [0.5, 0.5])


def test_verdict_never_sees_label_orig():
    """No function of the verdict takes the truth; run_index's result does not change when it is garbage."""
    for fn in (V.static_verdict, V.trim_mask, V.noise_transition, compute_scores):
        assert not any("orig" in p for p in inspect.signature(fn).parameters)
