"""dds index: kNN backends, density, cross-fitted adapters, regions, and run_index on a tiny workspace."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dds import catalog
from dds.errors import DdsError
from dds.pipeline import adapters as adapt
from dds.pipeline import knn as knn_mod
from dds.pipeline.index import assign_regions, compute_scores, joint_score, knn_agreement, local_density, run_index
from dds.pipeline.knn import knn
from dds.tables import REGIONS
from dds.workspace import Workspace, atomic_write_json, write_parquet


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(x, k, labels=None):
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    if labels is not None:
        s[labels[:, None] != labels[None, :]] = -np.inf
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


# ------------------------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_exact_against_brute_force(backend):
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((80, 16)))
    labels = rng.integers(0, 3, 80)
    sims, idx = knn(x, 5, backend=backend)
    ref_s, ref_i = _brute(x, 5)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert not (idx == np.arange(80)[:, None]).any()  # self excluded
    sims_c, idx_c = knn(x, 5, labels=labels, backend=backend)
    ref_s, ref_i = _brute(x, 5, labels)
    np.testing.assert_array_equal(idx_c, ref_i)
    np.testing.assert_allclose(sims_c, ref_s, atol=1e-5)
    assert (labels[idx_c] == labels[:, None]).all()  # per-class neighbours share the label
    assert np.all(np.diff(sims_c, axis=1) <= 1e-6)  # descending


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_duplicates_and_small_classes(backend):
    x = _unit(np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0.1, 1]], dtype=np.float32))
    sims, idx = knn(x, 2, backend=backend)
    assert not (idx == np.arange(5)[:, None]).any()  # duplicates of a row do not hide the exclusion
    assert set(idx[0]) == {1, 2} and np.allclose(sims[0], 1.0)
    labels = np.array([0, 0, 0, 1, 2])
    sims_c, idx_c = knn(x, 3, labels=labels, backend=backend)
    assert set(idx_c[0, :2]) == {1, 2} and idx_c[0, 2] == -1 and np.isnan(sims_c[0, 2])
    assert idx_c[3, 0] == -1 and (idx_c[4] == -1).all()  # singleton classes: no neighbours


def test_knn_ivf_probing_every_list_is_exact(monkeypatch):
    from dds.pipeline import knn as knn_mod

    monkeypatch.setattr(knn_mod, "IVF_NPROBE", 10_000)  # every list probed: the list-by-list scan is exhaustive
    rng = np.random.default_rng(1)
    x = _unit(rng.standard_normal((300, 8)))
    sims, idx = knn(x, 4, backend="ivf")
    ref_s, ref_i = _brute(x, 4)
    assert knn_mod.ivf_params(300) == (69, 69)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    np.testing.assert_array_equal(idx, ref_i)
    x[7] = x[3]  # a duplicate is still a neighbour, only the row itself is excluded
    _, idx = knn(x, 4, backend="ivf")
    assert not (idx == np.arange(300)[:, None]).any() and idx[3, 0] == 7 and idx[7, 0] == 3
    labels = rng.integers(0, 3, 300)
    sims_c, idx_c = knn(x, 4, labels=labels, backend="ivf")
    np.testing.assert_allclose(sims_c, _brute(x, 4, labels)[0], atol=1e-5)
    assert (labels[idx_c] == labels[:, None]).all()


def test_knn_ivf_few_lists_leave_empty_slots(monkeypatch):
    from dds.pipeline import knn as knn_mod

    x = _unit(np.array([[1, 0.01 * i] for i in range(6)] + [[0.01 * i, 1] for i in range(6)], np.float32))
    monkeypatch.setattr(knn_mod, "ivf_params", lambda n: (2, 1))  # two lists of 6 rows, each searches its own
    sims, idx = knn(x, 8, backend="ivf")
    assert (idx[:, 5:] == -1).all() and np.isnan(sims[:, 5:]).all()  # 5 other rows per list, the rest empty
    assert set(idx[0, :5]) == {1, 2, 3, 4, 5}


def test_auto_is_exact_up_to_the_threshold_and_ivf_above(monkeypatch):
    from dds.pipeline import knn as knn_mod

    monkeypatch.setattr(knn_mod, "EXACT_MAX_ROWS", 50)
    assert knn_mod.resolve_backend("auto", "cpu", 50) == "torch"
    assert knn_mod.resolve_backend("auto", "cpu", 51) == "ivf"
    assert knn_mod.resolve_backend("torch", "cpu", 10**7) == "torch"  # explicit backends are kept
    assert knn_mod.describe_backend("auto", "cpu", 51).startswith("ivf (approximate: 29 lists, nprobe 16)")
    calls = []
    for name in ("_search_torch", "_search_ivf"):  # record which search runs on how many rows
        real = getattr(knn_mod, name)
        monkeypatch.setattr(knn_mod, name, lambda x, *a, _r=real, _n=name: calls.append((_n, len(x))) or _r(x, *a))
    x = _unit(np.random.default_rng(0).standard_normal((80, 8)))
    labels = np.arange(80) % 2  # two classes of 40 rows: exact within each, approximate globally
    knn(x, 3, labels=labels)
    knn(x, 3)
    assert calls == [("_search_torch", 40), ("_search_torch", 40), ("_search_ivf", 80)]


def test_merge_graphs_keeps_the_best_distinct_neighbours():
    a = (np.array([[0.9, 0.5, np.nan], [0.8, 0.7, 0.1]], np.float32), np.array([[3, 4, -1], [5, 6, 7]]))
    b = (np.array([[0.95, 0.9], [0.75, np.nan]], np.float32), np.array([[7, 3], [6, -1]]))
    s, i = knn_mod.merge_graphs(a, b)
    assert i.tolist() == [[7, 3, 4], [5, 6, 7]]  # 3 found by both counts once; empty slots never win
    np.testing.assert_allclose(s, [[0.95, 0.9, 0.5], [0.8, 0.7, 0.1]])
    s, i = knn_mod.merge_graphs((a[0][:1, :1], a[1][:1, :1] * 0 - 1), (a[0][:1, :1] * np.nan, a[1][:1, :1] * 0 - 1))
    assert i.tolist() == [[-1]] and np.isnan(s).all()


def test_index_merges_the_approximate_global_graph_with_the_class_graph(monkeypatch):
    """Above the exact threshold the global graph is ivf merged with the exact per-class graph: it finds
    at least what ivf alone found, and every same-label neighbour the exact search would give."""
    from dds.bench.index import synthetic_embeddings
    from dds.pipeline.index import index_arrays

    d = synthetic_embeddings(3000, 16, 3, seed=0)
    monkeypatch.setattr(knn_mod, "EXACT_MAX_ROWS", 1000)
    res = index_arrays(d["img"], d["labels"], d["text"], k=5, use_adapters=False)
    assert "merged with the per-class graph" in res["knn_backend"]
    _, exact = knn(d["img"], 5, backend="torch")
    _, alone = knn(d["img"], 5, backend="ivf")
    hits = lambda idx: np.mean([len(set(a) & set(e)) for a, e in zip(idx, exact)])  # noqa: E731
    assert hits(res["global_idx"]) >= hits(alone)
    same = d["labels"][exact] == d["labels"][:, None]
    for row in range(0, 3000, 97):
        assert set(exact[row][same[row]]) <= set(res["global_idx"][row])


def test_knn_rejects_bad_input():
    with pytest.raises(DdsError, match="unknown kNN backend 'annoy'; known: auto, torch, faiss, ivf"):
        knn(np.zeros((3, 2), np.float32), 1, backend="annoy")
    with pytest.raises(DdsError, match="k must be a positive integer"):
        knn(np.zeros((3, 2), np.float32), 0)


# -------------------------------------------------------------------------------------- density


def test_local_density_per_class_and_dense_clusters_score_higher():
    rng = np.random.default_rng(1)
    tight = _unit(np.array([1.0, 0, 0, 0]) + 0.02 * rng.standard_normal((10, 4)))
    loose = _unit(np.array([1.0, 0, 0, 0]) + 0.5 * rng.standard_normal((10, 4)))
    other = _unit(np.array([0, 0, 0, 1.0]) + 0.9 * rng.standard_normal((10, 4)))  # a much wider class
    x = np.concatenate([tight, loose, other])
    labels = np.repeat([0, 0, 1], 10)
    sims, _ = knn(x, 3, labels=labels)
    d = local_density(sims, labels)
    assert d.dtype == np.float32 and d.min() >= 0 and d.max() <= 1
    for c in (0, 1):  # min-max normalised within each class
        assert d[labels == c].min() == pytest.approx(0) and d[labels == c].max() == pytest.approx(1)
    assert d[:10].min() > d[10:20].max()  # the tight cluster is denser than the loose points
    # a singleton class has no neighbours: sparsest
    sims1, _ = knn(x[:3], 2, labels=np.array([0, 0, 1]))
    assert local_density(sims1, np.array([0, 0, 1]))[2] == 0


def test_knn_agreement_and_joint():
    labels = np.array([0, 0, 1, 1])
    idx = np.array([[1, 2], [0, 3], [3, -1], [-1, -1]])
    np.testing.assert_allclose(knn_agreement(idx, labels), [0.5, 0.5, 1.0, 1.0])
    j = joint_score(np.array([0.0, 1.0, 0.2, 0.5]), np.array([0.9, 0.9, 0.5, 0.02]))
    np.testing.assert_allclose(j, [0.9, 0.0, 0.4, 0.01], atol=1e-6)


# ------------------------------------------------------------------------------------- adapters


def test_stratified_folds_disjoint_cover_and_balanced():
    labels = np.repeat(np.arange(4), [10, 7, 5, 3])
    fold = adapt.stratified_folds(labels, 3, seed=0)
    assert fold.shape == labels.shape and set(fold) == {0, 1, 2}  # every sample in exactly one fold
    for c in range(4):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(fold, adapt.stratified_folds(labels, 3, seed=0))
    assert not np.array_equal(fold, adapt.stratified_folds(labels, 3, seed=1))
    with pytest.raises(DdsError, match="at least 2"):
        adapt.stratified_folds(labels, 1, seed=0)


def _clusters(n_per, C=3, D=24, Dt=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((C, D)) * 2
    img = _unit(np.repeat(centres, n_per, axis=0) + rng.standard_normal((C * n_per, D)))
    labels = np.repeat(np.arange(C), n_per)
    text = _unit(rng.standard_normal((C, Dt)))  # an unaligned text tower: random class vectors
    return img, labels, text


def test_crossfit_learns_unaligned_towers():
    img, labels, text = _clusters(60)
    fit = adapt.crossfit_adapters(img, labels, text, folds=3, seed=0, epochs=30, batch_size=64)
    cos, probs = fit.scores.dense()
    assert fit.u.shape == (180, 24) and fit.text.shape == (3, 3, 24) and probs.shape == (180, 3)
    np.testing.assert_allclose(np.linalg.norm(fit.u, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == labels).mean() > 0.9
    own = cos[np.arange(180), labels]
    np.testing.assert_allclose(own, np.einsum("ns,ns->n", fit.u, fit.text[fit.fold, labels]), atol=1e-5)


def test_crossfit_outputs_of_a_fold_do_not_depend_on_its_labels():
    img, labels, text = _clusters(30)
    fold = adapt.stratified_folds(labels, 3, seed=0)
    a = adapt.crossfit_adapters(img, labels, text, folds=3, seed=0, epochs=5, batch_size=32, fold=fold)
    flipped = labels.copy()
    flipped[fold == 0] = (flipped[fold == 0] + 1) % 3  # relabel every sample of fold 0
    b = adapt.crossfit_adapters(img, flipped, text, folds=3, seed=0, epochs=5, batch_size=32, fold=fold)
    held = fold == 0
    pa, pb = a.scores.dense()[1], b.scores.dense()[1]
    np.testing.assert_allclose(pa[held], pb[held], atol=1e-6)  # fold 0 is scored by unseen adapters
    assert not np.allclose(pa[~held], pb[~held], atol=1e-3)  # the others saw fold 0's labels


def test_zero_shot_needs_aligned_towers():
    img = _unit(np.eye(3, 4, dtype=np.float32) + 0.1)
    cos, probs = adapt.zero_shot(img, _unit(np.eye(3, 4, dtype=np.float32))).dense()
    assert (probs.argmax(1) == [0, 1, 2]).all()
    with pytest.raises(DdsError, match="aligned"):
        adapt.zero_shot(img, np.ones((3, 5), np.float32))


# -------------------------------------------------------------------------------------- regions


def _constructed():
    """Two classes in 16-d: per class 5 near-duplicates, 15 spread points and one isolated point;
    plus one mislabelled image in each class."""
    rng = np.random.default_rng(3)
    e = np.eye(16)
    rows, labels = [], []
    for c, (axis, off, far) in enumerate([(0, 5, 7), (1, 6, 8)]):
        rows += [e[axis] + 0.3 * e[off] + 1e-3 * rng.standard_normal(16) for _ in range(5)]  # duplicates
        rows += [e[axis] + 0.25 * rng.standard_normal(16) * (np.arange(16) > 8) for _ in range(15)]  # spread
        rows += [e[axis] + 0.7 * e[far]]  # isolated but clearly of its class
        labels += [c] * 21
    rows += [e[1] + 0.05 * rng.standard_normal(16), e[0] + 0.05 * rng.standard_normal(16)]  # images of 1, 0 ...
    labels += [0, 1]  # ... labelled 0, 1
    return _unit(np.array(rows)), np.array(labels), _unit(e[:2])


def test_regions_on_constructed_points():
    x, labels, text = _constructed()
    class_sims, _ = knn(x, 3, labels=labels)
    _, global_idx = knn(x, 3)
    s = compute_scores(class_sims, global_idx, labels, adapt.zero_shot(x, text))
    region = s["region"]
    assert set(region) <= set(REGIONS)
    assert region[42] == "noisy" and region[43] == "noisy"  # the mislabelled images
    assert s["margin"][42] < 0 and s["pred_label"][42] == 1 and s["knn_agreement"][42] == 0
    assert region[20] == "augment" and region[41] == "augment"  # the isolated clean points
    assert (region[0:5] == "redundant").all() and (region[21:26] == "redundant").all()  # duplicate clusters
    assert (region[:42] != "noisy").all()  # no clean point is flagged
    assert s["density"][20] < s["density"][:5].min()


def test_assign_regions_thresholds():
    labels = np.zeros(10, int)
    density = np.linspace(0, 1, 10)
    joint = 1 - density
    prob = np.full(10, 0.9)
    prob[0] = 0.05  # a low probability alone does not make a sample noisy: the verdict does
    suspect = np.zeros(10, bool)
    r = assign_regions(density, joint, prob, suspect, labels)
    assert r[0] != "noisy"
    suspect[0] = True
    r = assign_regions(density, joint, prob, suspect, labels)
    assert r[0] == "noisy"
    assert list(r[1:]).count("augment") == round(0.3 * 9) and r[1] == "augment"
    assert r[9] == "redundant"


# ----------------------------------------------------------------------------------- run_index


def _workspace(tmp_path, *, aligned=False, n_per=20, C=3, embed=True):
    ws = Workspace(tmp_path / "ws")
    name, enc = "toy", "toy-enc"
    ddir = ws.dataset_dir(name)
    classes = [f"c{i}" for i in range(C)]
    atomic_write_json(ddir / "dataset.json", {"name": name, "classes": classes, "splits": {"train": n_per * C}})
    D, Dt = (8, 8) if aligned else (12, 6)
    img, labels, text = _clusters(n_per, C=C, D=D, Dt=Dt, seed=5)
    if aligned:
        text = _unit(np.stack([img[labels == c].mean(0) for c in range(C)]))
    n = len(labels)
    keys = [f"train-{i:07d}" for i in range(n)]
    shard = ["train-000000" if i < n // 2 else "train-000001" for i in range(n)]
    write_parquet(ddir / "samples.parquet", {
        "dataset": [name] * n, "key": keys, "split": ["train"] * n, "label": pa.array(labels, pa.int32()),
        "label_orig": pa.array(labels, pa.int32()), "shard": shard, "idx": pa.array(np.arange(n), pa.int64())})
    if embed:
        edir = ws.embed_dir(name, enc)
        atomic_write_json(edir / "encoder.json", {"encoder": enc, "weights": "test", "dim": D, "aligned": aligned,
                                                  "image_size": 8})
        for s in ("train-000000", "train-000001"):
            rows = [i for i in range(n) if shard[i] == s][::-1]  # file order differs from split order
            write_parquet(edir / "shards" / f"{s}.parquet", {
                "dataset": [name] * len(rows), "encoder": [enc] * len(rows), "key": [keys[i] for i in rows],
                "label": pa.array(labels[rows], pa.int32()),
                "vector": pa.array([img[i].tolist() for i in rows], pa.list_(pa.float32()))})
        write_parquet(edir / "text.parquet", {
            "dataset": [name] * C, "encoder": [enc] * C, "label": pa.array(np.arange(C), pa.int32()),
            "class_name": classes, "vector": pa.array([t.tolist() for t in text], pa.list_(pa.float32()))})
    return ws, name, enc, keys, labels


SCORE_COLUMNS = ["dataset", "encoder", "key", "label", "density", "consistency", "margin", "knn_agreement", "joint",
                 "region", "pred_label", "prob_label", "probs", "status", "label_fixed", "label_posterior"]
KNN_COLUMNS = ["dataset", "encoder", "key", "neighbor", "rank", "similarity", "scope"]


@pytest.mark.parametrize("aligned", [False, True])
def test_run_index_writes_contract_tables(tmp_path, aligned):
    ws, name, enc, keys, labels = _workspace(tmp_path, aligned=aligned)
    summary = run_index(ws, name, encoder=enc, k=4, folds=3, device="cpu", progress=False)
    assert summary["n"] == 60 and summary["k"] == 4 and sum(summary["regions"].values()) == 60
    assert summary["adapters"].startswith("off" if aligned else "on") and summary["verdict"] == "judged"
    out = ws.index_dir(name, enc)
    scores = pq.read_table(out / "scores.parquet")
    assert scores.column_names == SCORE_COLUMNS
    assert scores.schema.field("label").type == pa.int32() and scores.schema.field("pred_label").type == pa.int32()
    assert scores.schema.field("prob_label").type == pa.float32()
    assert scores.schema.field("probs").type == pa.list_(pa.float32())
    assert scores.column("key").to_pylist() == keys  # split order
    assert scores.column("label").to_pylist() == labels.tolist()
    assert set(scores.column("region").to_pylist()) <= set(REGIONS)
    probs = np.array(scores.column("probs").to_pylist())
    assert probs.shape == (60, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
    status = np.array(scores.column("status").to_pylist(), object)
    fixed = np.array(scores.column("label_fixed").to_pylist())
    assert set(status) <= {"clean", "relabel", "suppress"} and scores.schema.field("label_fixed").type == pa.int32()
    assert (fixed[status != "relabel"] == labels[status != "relabel"]).all()  # the given label unless relabelled
    assert (fixed[status == "relabel"] != labels[status == "relabel"]).all()
    region = np.array(scores.column("region").to_pylist(), object)
    assert ((region == "noisy") == (status != "clean")).all()
    assert sum(summary["status"].values()) == 60
    knn_t = pq.read_table(out / "knn.parquet")
    assert knn_t.column_names == KNN_COLUMNS and knn_t.num_rows == 60 * 4 * 2
    assert knn_t.schema.field("rank").type == pa.int32() and knn_t.schema.field("similarity").type == pa.float32()
    rows = knn_t.filter(pa.compute.equal(knn_t["scope"], "class")).to_pylist()
    lab = dict(zip(keys, labels))
    assert all(lab[r["key"]] == lab[r["neighbor"]] and r["key"] != r["neighbor"] for r in rows)
    assert json.loads((out / "index.json").read_text())["k"] == 4
    n = catalog.query(ws, f"SELECT count(*) AS n FROM scores WHERE encoder = '{enc}'").column("n")[0].as_py()
    assert n == 60


def test_index_before_embed_and_incomplete_embed(tmp_path):
    ws, name, enc, *_ = _workspace(tmp_path, embed=False)
    with pytest.raises(DdsError, match=f"run `dds embed {name} --encoder {enc}` first"):
        run_index(ws, name, encoder=enc, progress=False)
    ws, name, enc, *_ = _workspace(tmp_path / "b")
    (ws.embed_dir(name, enc) / "shards" / "train-000001.parquet").unlink()
    with pytest.raises(DdsError, match="1 of 2 train shards"):
        run_index(ws, name, encoder=enc, progress=False)
    with pytest.raises(DdsError, match="not in workspace"):
        run_index(ws, "nope", encoder=enc, progress=False)


def test_run_index_rejects_zero_shot_on_unaligned_towers(tmp_path):
    ws, name, enc, *_ = _workspace(tmp_path)
    with pytest.raises(DdsError, match="not aligned"):
        run_index(ws, name, encoder=enc, adapters="off", device="cpu", progress=False)


def test_run_index_verdict_ignores_label_orig(tmp_path):
    """Replacing label_orig by garbage changes nothing in the scores: the verdict never reads the truth."""
    ws, name, enc, keys, labels = _workspace(tmp_path)
    flipped = labels.copy()
    flipped[[0, 21, 42]] = (flipped[[0, 21, 42]] + 1) % 3  # some given labels are wrong
    path = ws.dataset_dir(name) / "samples.parquet"
    t = pq.read_table(path)
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(flipped, pa.int32()))
    write_parquet(path, t)
    run_index(ws, name, encoder=enc, k=4, folds=3, device="cpu", progress=False)
    a = pq.read_table(ws.index_dir(name, enc) / "scores.parquet")
    garbage = np.random.default_rng(9).integers(-5, 50, len(labels))
    t = t.set_column(t.schema.get_field_index("label_orig"), "label_orig", pa.array(garbage, pa.int32()))
    write_parquet(path, t)
    run_index(ws, name, encoder=enc, k=4, folds=3, device="cpu", progress=False)
    b = pq.read_table(ws.index_dir(name, enc) / "scores.parquet")
    assert a.equals(b)
    status = a.column("status").to_pylist()
    # on this 60-sample toy the adapters are weak: the flips are flagged far more often than clean samples
    # (the known-answer cases of tests/test_noise.py check each status exactly)
    flagged = np.array([x != "clean" for x in status])
    flips = np.zeros(len(status), bool)
    flips[[0, 21, 42]] = True
    assert flagged[flips].mean() > 3 * flagged[~flips].mean() and flagged[flips].any()
