"""The shared core: registry, workspace, catalog, manifests, validation and the CLI shell."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dds import catalog
from dds._validate import check_fraction, parse_source
from dds.cli import app
from dds.errors import DdsError
from dds.manifests import add_manifest, get_manifest, list_manifests
from dds.registry import Registry
from dds.workspace import Workspace, encoder_slug, slug, write_parquet


def test_registry_lists_known_names_and_suggests():
    reg: Registry = Registry("policy")
    reg.register("dds")(lambda: 1)
    reg.register("random")(lambda: 2)
    assert reg.create("dds") == 1
    with pytest.raises(DdsError, match=r"unknown policy 'dsd' \(did you mean 'dds'\?\); known: dds, random"):
        reg.get("dsd")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("dds")(lambda: 3)


def test_parse_source_and_fraction():
    assert parse_source("fashion-mnist") == ("manifest", "fashion-mnist")
    assert parse_source("imagefolder:/data/x") == ("imagefolder", "/data/x")
    assert parse_source("tar:a/*.tar") == ("tar", "a/*.tar")
    with pytest.raises(DdsError, match="no path"):
        parse_source("tar:")
    with pytest.raises(DdsError, match="unknown source scheme"):
        parse_source("http://x")
    with pytest.raises(DdsError, match=r"budget must be in \(0, 1\], got 1.5"):
        check_fraction("budget", 1.5)
    assert check_fraction("noise", 0.0, allow_zero=True) == 0.0


def test_manifest_fashion_mnist_and_user_manifest(tmp_path):
    m = get_manifest("fashion-mnist")
    assert len(m.classes) == 10 and len(m.prompts()) == 10
    assert m.prompts()[9][0] == "a photo of a ankle boot."
    assert "fashion-mnist" in list_manifests()
    p = tmp_path / "toy.toml"
    p.write_text('name = "toy"\nclasses = ["Cat", "Dog"]\ntemplates = ["a {}"]\n')
    assert add_manifest(p).prompts() == [["a cat"], ["a dog"]]
    p.write_text('name = "bad"\nclasses = ["a"]\ncolour = 1\n')
    with pytest.raises(DdsError, match="unknown fields"):
        add_manifest(p)


def test_workspace_resolution_and_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("DDS_WORKSPACE", str(tmp_path / "ws"))
    ws = Workspace.resolve()
    assert ws.root == (tmp_path / "ws").resolve()
    assert slug("openclip:ViT-B-32/laion2b") == "openclip_ViT-B-32_laion2b"
    with pytest.raises(DdsError, match="run `dds shard SOURCE --name nope` first"):
        ws.dataset_info("nope")


def test_catalog_views_empty_then_over_parquet(tmp_path):
    ws = Workspace(tmp_path)
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 0}]
    write_parquet(ws.dataset_dir("toy") / "samples.parquet",
                  {"dataset": ["toy"] * 2, "key": ["a", "b"], "split": ["train"] * 2, "label": [0, 1],
                   "label_orig": [0, 0], "shard": ["train-000000"] * 2})
    rows = catalog.query(ws, "SELECT key FROM samples WHERE label <> label_orig").to_pylist()
    assert rows == [{"key": "b"}]
    assert not list(tmp_path.rglob("*.tmp"))
    catalog.refresh(ws)
    import duckdb

    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    assert con.execute("SELECT count(*) FROM samples").fetchone() == (2,)
    con.close()


@pytest.mark.parametrize("stmt", ["DROP VIEW samples", "CREATE TABLE t (a INT)", "SELECT 1; DELETE FROM samples",
                                  "COPY samples TO 'x.csv'", "ATTACH 'x.db'"])
def test_sql_refuses_writes(tmp_path, stmt):
    with pytest.raises(DdsError, match="read-only|does not parse"):
        catalog.query(Workspace(tmp_path), stmt)


def _toy_dataset(ws: Workspace) -> Path:
    path = ws.dataset_dir("toy") / "samples.parquet"
    write_parquet(path, {"dataset": ["toy"] * 2, "key": ["a", "b"], "split": ["train"] * 2, "label": [0, 1],
                         "label_orig": [0, 0], "shard": ["train-000000"] * 2})
    return path


@pytest.mark.parametrize("attack", [
    "EXPLAIN ANALYZE COPY (SELECT 42) TO '{tmp}/x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT * FROM samples WHERE false) TO '{samples}' (FORMAT parquet)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM glob('{tmp}/*')",
    "SELECT * FROM read_parquet('https://example.com/x.parquet')",
    "SELECT * FROM read_parquet('{samples}')",
])
def test_sql_cannot_touch_files_or_the_network(tmp_path, attack):
    ws = Workspace(tmp_path / "ws")
    samples = _toy_dataset(ws)
    before = samples.read_bytes()
    with pytest.raises(DdsError, match="disabled by configuration"):
        catalog.query(ws, attack.format(tmp=tmp_path, samples=samples))
    assert samples.read_bytes() == before and not (tmp_path / "x.csv").exists()
    assert catalog.query(ws, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize("stmt", ["SET enable_external_access = true", "SET lock_configuration = false",
                                  "SET autoinstall_known_extensions = true"])
def test_sql_configuration_is_locked(tmp_path, stmt):
    import duckdb

    with pytest.raises(DdsError, match="read-only"):  # the CLI runs queries only
        catalog.query(Workspace(tmp_path), stmt)
    con = catalog.connect(Workspace(tmp_path))  # and the connection itself refuses to be unlocked
    with pytest.raises(duckdb.Error, match="configuration has been locked"):
        con.execute(stmt)
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path}/y.csv'")


def test_sql_prints_every_statement_and_names_a_missing_workspace(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "SELECT 1 AS a; SELECT 2 AS b", "--format", "csv", "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.split() == ["a", "1", "b", "2"], res.output
    with pytest.raises(DdsError, match="does not exist"):
        catalog.query(Workspace(tmp_path / "typo"), "SELECT 1")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DdsError, match="is a file"):
        catalog.query(Workspace(tmp_path / "file"), "SELECT 1")


def test_readme_queries_still_work(tmp_path):
    ws = Workspace(tmp_path)
    _toy_dataset(ws)
    for sql in ('SELECT region, count(*) FROM scores GROUP BY region',
                "SELECT run_id, policy, status, budget_spent, test_acc FROM runs",
                "SELECT split, label, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL"):
        catalog.query(ws, sql)


def test_empty_views_have_every_declared_column(tmp_path):
    from dds.tables import TABLES

    for name, table in TABLES.items():
        got = catalog.query(Workspace(tmp_path), f"SELECT * FROM {name}").schema
        assert got.names == table.schema.names, name


def test_stale_runs_show_as_stale(tmp_path):
    import socket

    ws = Workspace(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    rows = {"dead": (dead.pid, host, "running"), "alive": (os.getpid(), host, "running"),
            "elsewhere": (dead.pid, host + "-other", "running"), "old": (None, None, "running"),
            "done": (dead.pid, host, "done")}
    for run_id, (pid, h, status) in rows.items():
        cols = {"run_id": [run_id], "status": [status], "policy": ["full"]}
        if pid is not None:
            cols.update(pid=[pid], host=[h])
        write_parquet(ws.run_dir(run_id) / "run.parquet", cols)
    got = dict(catalog.query(ws, "SELECT run_id, status FROM runs").to_pandas().values.tolist())
    assert got == {"dead": "stale", "alive": "running", "elsewhere": "running", "old": "running", "done": "done"}
    from dds.tables import load_run  # what dds report and dds export read

    (ws.run_dir("dead") / "run.json").write_text(json.dumps({"run_id": "dead", "status": "running", "config": "{}",
                                                              "pid": dead.pid, "host": host}))
    assert load_run(ws, "dead")["status"] == "stale"


@pytest.mark.parametrize("name", ["team/exp1", "../../escape", "exp a", "", ".hidden", "a..b", "x" * 101])
def test_bad_dataset_names_are_refused(tmp_path, name):
    with pytest.raises(DdsError, match="is not allowed"):
        Workspace(tmp_path).dataset_dir(name)


def test_names_never_share_a_folder(tmp_path):
    ws = Workspace(tmp_path)
    assert ws.dataset_dir("exp_a") != ws.dataset_dir("exp-a")
    assert encoder_slug("lite0-minilm") == "lite0-minilm"
    pairs = [("openclip:a/b", "openclip:a_b"), ("a b", "a_b"), ("x:y", "x_y")]
    for one, other in pairs:
        assert ws.embed_dir("d", one) != ws.embed_dir("d", other)
        assert ws.index_dir("d", one).name == ws.embed_dir("d", one).name
    legacy = ws.dataset_dir("d") / "embed" / slug("openclip:a/b")  # a workspace from before the hash
    legacy.mkdir(parents=True)
    (legacy / "encoder.json").write_text(json.dumps({"encoder": "openclip:a/b"}))
    assert ws.embed_dir("d", "openclip:a/b") == legacy and ws.embed_dir("d", "openclip:a_b") != legacy


def test_check_run_id_accepts_only_issued_runs(tmp_path):
    ws = Workspace(tmp_path)
    good = "toy-dds-20261202-014500-ab12"
    (ws.run_dir(good)).mkdir(parents=True)
    assert ws.check_run_id(good) == good
    for bad in ("../../etc", "toy-dds-20261202-014500-ab12/..", "/tmp/x", "toy-dds-20261202-014500-ab13", "x"):
        with pytest.raises(DdsError):
            ws.check_run_id(bad)
    with pytest.raises(DdsError, match="did you mean toy-dds-20261202-014500-ab12"):
        ws.check_run_id("toy-dds-20261202-014500-ab13")


def test_lock_is_exclusive_and_released(tmp_path):
    ws = Workspace(tmp_path)
    code = ("import sys, time; from dds.workspace import Workspace; ws = Workspace.resolve(sys.argv[1])\n"
            "with ws.lock('toy'):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DdsError, match="dataset 'toy' is in use by another dds process"):
            with ws.lock("toy"):
                pass
    finally:
        holder.kill()  # like kill -9: the lock goes with the process
        holder.wait()
    with ws.lock("toy"), pytest.raises(DdsError, match="in use"):
        with ws.lock(ws.run_dir("r"), "run r"):
            with ws.lock(ws.run_dir("r"), "run r"):
                pass


def test_workspace_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    for args in (["sql", "SELECT 1"], ["index", "toy"], ["embed", "toy"], ["shard", "fashion-mnist"]):
        res = subprocess.run([sys.executable, "-m", "dds", *args, "-w", str(tmp_path / "f")],
                             capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "is a file" in res.stderr, (args, res.stderr)
    with pytest.raises(DdsError, match="lies under a file"):
        Workspace(tmp_path / "f" / "sub").check_writable()


def test_cli_sql_formats_and_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "SELECT 1 AS a, 'x' AS b", "--format", "json", "-w", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == [{"a": 1, "b": "x"}]
    res = runner.invoke(app, ["sql", "SELECT 2 AS n", "--format", "csv", "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.split() == ["n", "2"]
    res = runner.invoke(app, ["sql", "SELECT [1, 2] AS l, {'k': 'v'} AS s", "--format", "csv", "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.splitlines() == ['l,s', '"[1, 2]","{""k"": ""v""}"'], res.output


def test_cli_main_prints_one_line_and_exits_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dds", "sql", "DROP VIEW samples", "-w", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("dds: error: dds sql is read-only")
    res = subprocess.run([sys.executable, "-m", "dds", "train", "x", "--budget", "0", "-w", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--budget must be in (0, 1], got 0.0" in res.stderr


def test_cli_import_is_light():
    code = "import dds.cli, sys; assert 'torch' not in sys.modules and 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
