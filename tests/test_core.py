"""The shared core: registry, workspace, catalog, manifests, validation and the CLI shell."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dds import catalog
from dds._validate import check_fraction, parse_source
from dds.cli import app
from dds.errors import DdsError
from dds.manifests import add_manifest, get_manifest, list_manifests
from dds.registry import Registry
from dds.workspace import Workspace, slug, write_parquet


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


def test_cli_sql_formats_and_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "SELECT 1 AS a, 'x' AS b", "--format", "json", "-w", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == [{"a": 1, "b": "x"}]
    res = runner.invoke(app, ["sql", "SELECT 2 AS n", "--format", "csv", "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.split() == ['"n"', "2"]
    res = runner.invoke(app, ["sql", "SELECT [1, 2] AS l, {'k': 'v'} AS s", "--format", "csv", "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.splitlines() == ['"l","s"', '"[1, 2]","{""k"": ""v""}"'], res.output


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
