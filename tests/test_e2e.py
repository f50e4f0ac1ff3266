"""End to end on a real Fashion-MNIST slice through the CLI, in-process, CUDA hidden, offline.

One module-scoped workspace: shard (with injected label noise) -> embed (lite0-minilm) -> index ->
train -> sql. Needs the Debian package dataset-fashion-mnist (scripts/setup.sh installs it).
"""
import json

import pytest
from typer.testing import CliRunner

from dds import catalog
from dds.cli import app
from dds.workspace import Workspace

pytestmark = pytest.mark.integration

NAME = "fm"


def _dds(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--no-progress"] if args[0] != "sql" else list(args))
    assert res.exit_code == 0, f"dds {' '.join(args)} failed:\n{res.output}\n{res.exception!r}"
    return res.output


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    w = ["-w", str(root)]
    _dds("shard", "fashion-mnist", "--name", NAME, "--limit", "600", "--label-noise", "0.3", "--seed", "1", *w)
    _dds("embed", NAME, "--encoder", "lite0-minilm", "--device", "cpu", *w)
    _dds("index", NAME, "--encoder", "lite0-minilm", "--folds", "3", "--device", "cpu", *w)
    return Workspace(root)


def q(ws: Workspace, sql: str) -> list[dict]:
    return catalog.query(ws, sql).to_pylist()


def test_pipeline_tables_are_complete(ws):
    counts = q(ws, "SELECT split, count(*) AS n, sum((label <> label_orig)::INT) AS flipped FROM samples GROUP BY split ORDER BY split")
    assert counts == [{"split": "test", "n": 600, "flipped": 0}, {"split": "train", "n": 600, "flipped": 180}]
    assert q(ws, "SELECT count(*) AS n FROM embeddings")[0]["n"] == 600
    assert q(ws, "SELECT min(len(vector)) AS a, max(len(vector)) AS b FROM embeddings")[0] == {"a": 1280, "b": 1280}
    assert q(ws, "SELECT count(DISTINCT key) AS n FROM scores")[0]["n"] == 600
    assert q(ws, "SELECT count(*) AS n FROM knn WHERE scope = 'class'")[0]["n"] == 600 * 10
    regions = {r["region"] for r in q(ws, "SELECT DISTINCT region FROM scores")}
    assert regions <= {"augment", "keep", "redundant", "noisy"} and "noisy" in regions


def test_consistency_is_lower_for_injected_noise(ws):
    rows = q(ws, """SELECT (s.label <> s.label_orig) AS flipped, avg(c.consistency) AS consistency,
                           avg((c.region = 'noisy')::INT) AS noisy_share
                    FROM samples s JOIN scores c USING (dataset, key) GROUP BY flipped""")
    by = {r["flipped"]: r for r in rows}
    assert by[True]["consistency"] < by[False]["consistency"]
    assert by[True]["noisy_share"] > 2 * by[False]["noisy_share"]


def test_rerunning_stages_changes_nothing(ws):
    before = sorted(p.stat().st_mtime_ns for p in (ws.dataset_dir(NAME) / "embed").rglob("*.parquet"))
    out = _dds("embed", NAME, "--encoder", "lite0-minilm", "--device", "cpu", "-w", str(ws.root))
    after = sorted(p.stat().st_mtime_ns for p in (ws.dataset_dir(NAME) / "embed").rglob("*.parquet"))
    assert before == after, out


def test_sql_json_over_scores(ws):
    out = _dds("sql", "SELECT region, count(*) AS n FROM scores GROUP BY region", "--format", "json", "-w", str(ws.root))
    assert sum(r["n"] for r in json.loads(out)) == 600


def test_stage_order_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["index", "nothing", "-w", str(tmp_path)])
    assert res.exit_code != 0 and "dds shard" in str(res.exception)


def test_train_dds_and_query_history(ws):
    out = _dds("train", NAME, "--policy", "dds", "--budget", "0.5", "--epochs", "4", "--model", "cnn3",
               "--device", "cpu", "-o", "strong_aug=top_q", "-w", str(ws.root))
    run = q(ws, "SELECT run_id, status, budget_spent FROM runs WHERE policy = 'dds'")
    assert len(run) == 1 and run[0]["status"] == "done", out
    assert abs(run[0]["budget_spent"] - 0.5) <= 128 / (4 * 600)
    rid = run[0]["run_id"]
    per_epoch = q(ws, f"SELECT epoch, count(*) AS n, sum(selected::INT) AS sel FROM history WHERE run_id = '{rid}' "
                      "GROUP BY epoch ORDER BY epoch")
    assert [r["n"] for r in per_epoch] == [600] * 4
    assert q(ws, f"SELECT sum(sample_steps) AS s FROM epochs WHERE run_id = '{rid}'")[0]["s"] == sum(
        r["sel"] for r in per_epoch)
    # noisy-flagged samples are never strongly augmented
    strong_noisy = q(ws, f"""SELECT count(*) AS n FROM history h JOIN scores c ON c.dataset = '{NAME}' AND c.key = h.key
                             WHERE h.run_id = '{rid}' AND c.region = 'noisy' AND h.aug = 'strong'""")
    assert strong_noisy[0]["n"] == 0
    assert q(ws, f"SELECT count(*) AS n FROM history WHERE run_id = '{rid}' AND aug = 'strong'")[0]["n"] > 0
    # no warm-up, but a sample never trained on counts as the highest loss: every sample that is not
    # suppressed is trained on at least once
    never = q(ws, f"SELECT count(*) AS n FROM (SELECT key FROM history WHERE run_id = '{rid}' "
                  "GROUP BY key HAVING NOT bool_or(selected) AND bool_and(status <> 'suppress'))")
    assert never[0]["n"] == 0


def test_option_collision_and_resharding_are_clear_errors(ws, tmp_path):
    res = CliRunner().invoke(app, ["train", NAME, "-o", "seed=3", "--epochs", "1", "-w", str(ws.root)])
    assert res.exit_code != 0 and "run settings, not policy options" in str(res.exception)
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ws.root, root)
    _dds("shard", "fashion-mnist", "--name", NAME, "--limit", "600", "--label-noise", "0.3", "--seed", "2",
         "--split", "train", "-w", str(root))
    res = CliRunner().invoke(app, ["train", NAME, "--policy", "dds", "--epochs", "1", "-w", str(root)])
    assert res.exit_code != 0 and f"dds index {NAME}" in str(res.exception)
