"""dds bench-index: synthetic data, recall@k, and the command on a tiny size."""
import numpy as np
import pytest
from typer.testing import CliRunner

from dds.cli import app
from dds.errors import DdsError
from dds.bench.index import bench_index, recall_at_k, synthetic_embeddings


def test_recall_at_k_on_a_constructed_case():
    exact = np.array([[1, 2, 3], [1, 2, 3], [4, 5, -1], [-1, -1, -1]])
    approx = np.array([[3, 2, 1],  # all three, order ignored: 1
                       [7, 8, 9],  # none: 0
                       [5, -1, -1]])  # one of the two exact neighbours; -1 never counts: 1/2
    approx = np.vstack([approx, [[1, 2, 3]]])  # the last row has no exact neighbour: left out
    assert recall_at_k(approx, exact) == pytest.approx((1 + 0 + 0.5) / 3)
    assert recall_at_k(exact[:3], exact[:3]) == 1.0
    assert np.isnan(recall_at_k(exact[3:], exact[3:]))
    with pytest.raises(DdsError, match="same rows"):
        recall_at_k(approx[:2], exact)


def test_synthetic_embeddings_are_unit_balanced_and_flipped():
    d = synthetic_embeddings(1000, 128, 5, flip=0.1, seed=3)
    assert d["img"].shape == (1000, 128) and d["img"].dtype == np.float32 and d["text"].shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(d["img"], axis=1), 1, atol=1e-5)
    assert np.bincount(d["labels"]).tolist() == [200] * 5
    assert 0.05 < d["flipped"].mean() < 0.15
    own = (d["img"] @ d["text"].T).argmax(1) == d["labels"]  # the prompts sit near their class's clusters
    assert own[~d["flipped"]].mean() > 0.95 and own[d["flipped"]].mean() < 0.05
    again = synthetic_embeddings(1000, 128, 5, flip=0.1, seed=3)
    np.testing.assert_array_equal(again["img"], d["img"])


def test_bench_index_takes_the_approximate_path_above_the_threshold(monkeypatch):
    from dds.pipeline import knn as knn_mod

    monkeypatch.setattr(knn_mod, "EXACT_MAX_ROWS", 1000)
    out = bench_index(3000, 16, 3, use_adapters=False, queries=500)  # classes of 1000 rows stay exact
    assert out["knn_backend"].startswith(
        "global: ivf (approximate: 219 lists, nprobe 16) merged with the per-class graph; per class: torch (exact)")
    assert out["queries"] == 500 and out["recall_at_k"] > 0.9
    small = bench_index(900, 16, 3, use_adapters=False, queries=100)
    assert small["knn_backend"].startswith("global: torch (exact)") and small["recall_at_k"] == 1.0


def test_bench_index_command_prints_phases_and_recall():
    res = CliRunner().invoke(app, ["bench-index", "--n", "2000", "--dim", "32", "--classes", "10", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for field in ("knn_class_s", "knn_global_s", "adapters_s", "verdict_s", "regions_s", "peak_rss_gib",
                  "recall_at_k", "noise_precision", "off (zero-shot)"):
        assert field in res.output
    res = CliRunner().invoke(app, ["bench-index", "--n", "5", "--classes", "10"])
    assert isinstance(res.exception, DdsError) and "--n must be at least --classes (10), got 5" in str(res.exception)
