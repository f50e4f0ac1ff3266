"""Issue 31, cases 6 and 8-11: inputs are checked at the door, the catalog and `dds sql` survive odd paths,
values and broken files, and every corrupt shard is named (one line, rc 2, data intact)."""
import csv
import io
import json
import os
import sys
import tarfile
import threading

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from synth import write_dataset, write_scores
from typer.testing import CliRunner

from dds import catalog
from dds.cli import app, main
from dds.errors import DdsError
from dds.pipeline.shard import run_shard
from dds.shards import iter_tar_samples
from dds.train.data import open_split
from dds.workspace import Workspace, atomic_write_bytes, write_parquet


def _dds(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dds", *args])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def _folder(root, classes=("a", "b"), per_class=3, size=8, value=100):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(_png(np.full((size, size), value + i, np.uint8)))
    return root


def _stored(ws: Workspace, name: str) -> dict[str, np.ndarray]:
    """The images of a dataset's train tars, by key."""
    return {key: np.asarray(Image.open(io.BytesIO(m["png"])))
            for tar in sorted(ws.shards_dir(name).glob("train-*.tar")) for key, m in iter_tar_samples(tar)}


# ---------------------------------------------------------------- case 6: inputs checked at the door


def test_a_16_bit_png_keeps_its_range(tmp_path):
    src = _folder(tmp_path / "src")
    ramp = np.linspace(0, 54000, 64).astype(np.uint16).reshape(8, 8)
    (src / "a" / "deep.png").write_bytes(_png(ramp))
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{src}", name="deep", progress=False)
    assert ws.dataset_info("deep")["channels"] == 1  # greyscale stays greyscale
    deep = next(a for a in _stored(ws, "deep").values() if a.max() > 150)
    np.testing.assert_array_equal(deep, np.rint(ramp * (255 / 65535)).astype(np.uint8))  # 0..210, not 0/255
    assert len(np.unique(deep)) > 50


def test_one_huge_image_does_not_shift_the_normalisation(tmp_path):
    src = _folder(tmp_path / "src", per_class=10, size=28, value=200)
    (src / "b" / "huge.png").write_bytes(_png(np.zeros((1200, 1200), np.uint8)))
    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{src}", name="mixed", progress=False)
    info = ws.dataset_info("mixed")
    assert info["image_size"] == 28
    expected = (sum(200 + i for i in range(10)) * 2 / 255) / 21  # 21 images at 28 px, the huge one black
    assert info["mean"][0] == pytest.approx(expected, abs=1e-3)


def test_a_symlink_back_into_the_image_folder_is_not_followed(tmp_path):
    src = _folder(tmp_path / "src")
    os.symlink(src, src / "self")  # self -> .
    os.symlink(src.parent, src / "a" / "up")  # a folder link to an ancestor, inside a class
    ws = Workspace(tmp_path / "ws")
    summary = run_shard(ws, f"imagefolder:{src}", name="linked", progress=False)
    assert ws.dataset_info("linked")["classes"] == ["a", "b"] and summary["splits"] == {"train": 6}


# ---------------------------------------------------------------- case 8: glob characters in the workspace path


def test_a_workspace_path_with_glob_characters_works_everywhere(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    _folder(src / "train")
    _folder(src / "test", value=150)
    root = tmp_path / "w[s]*?{a,b}'x"
    rc, _, err = _dds(monkeypatch, capsys, "shard", f"imagefolder:{src}", "--name", "toy", "--no-progress",
                      "-w", str(root))
    assert rc == 0, err
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)  # the views users open with the duckdb CLI
    assert con.sql("SELECT count(*) FROM samples").fetchall() == [(12,)]
    con.close()
    rc, out, err = _dds(monkeypatch, capsys, "sql", "-f", "csv", "SELECT count(*) AS n FROM samples",
                        "-w", str(root))
    assert (rc, out.split()) == (0, ["n", "12"]), err
    rc, out, err = _dds(monkeypatch, capsys, "train", "toy", "--policy", "full", "--budget", "1", "--epochs", "1",
                        "--model", "cnn3", "--no-progress", "-w", str(root))
    assert rc == 0, err


# ---------------------------------------------------------------- case 9: values printed as text


def test_sql_prints_values_literally_and_whole(tmp_path):
    runner = CliRunner()
    long_id = "toy-dds-20261206-120000-abcd/" + "x" * 200
    res = runner.invoke(app, ["sql", f"SELECT 'img[cat].png' AS a, '[/bold]' AS b, '{long_id}' AS c",
                              "-w", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "img[cat].png" in res.output and "[/bold]" in res.output and long_id in res.output
    assert "…" not in res.output


def test_sql_csv_quotes_only_where_csv_needs_it(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["sql", "-f", "csv", "SELECT 'toy-dds-20261206-120000-abcd' AS run_id",
                              "-w", str(tmp_path)])
    assert res.exit_code == 0 and res.output.splitlines()[-1] == "toy-dds-20261206-120000-abcd"  # | tail -1
    res = runner.invoke(app, ["sql", "-f", "csv", "SELECT 'a,b' AS x, 'say \"hi\"' AS y, NULL AS z, true AS t",
                              "-w", str(tmp_path)])
    assert list(csv.reader(io.StringIO(res.output))) == [["x", "y", "z", "t"], ["a,b", 'say "hi"', "", "true"]]


def test_class_names_are_drawn_literally_in_figures():
    from dds.train.report import _png as figure_png
    from dds.train.report import fig_class_rates, fig_examples

    classes = ["$\\x$", "a$b", "[c]"]
    assert figure_png(fig_class_rates(np.full((2, 3), 0.5), np.zeros((2, 3)), classes))[:4] == b"\x89PNG"
    grid = {"noisy": [(_png(np.zeros((4, 4), np.uint8)), f"{c} p=0.50") for c in classes]}
    assert figure_png(fig_examples(grid))[:4] == b"\x89PNG"


# ---------------------------------------------------------------- case 10: labels and corrupt shards


def _write_tar(path, samples: list[tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, png, cls in samples:
            for ext, data in (("png", png), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _tar_source(tmp_path, labels: list[bytes]) -> str:
    rows = [(f"s{i:03d}", _png(np.full((8, 8), 10 * i, np.uint8)), cls) for i, cls in enumerate(labels)]
    _write_tar(tmp_path / "data.tar", rows)
    return f"tar:{tmp_path / 'data.tar'}"


def test_a_label_far_above_the_sample_count_is_refused_naming_the_sample(tmp_path, monkeypatch, capsys):
    source = _tar_source(tmp_path, [str(i % 3).encode() for i in range(11)] + [b"1000000"])
    rc, _, err = _dds(monkeypatch, capsys, "shard", source, "--name", "big", "--no-progress",
                      "-w", str(tmp_path / "ws"))
    assert rc == 2 and err.count("\n") == 1, err
    assert "data.tar#s011 has label 1000000" in err and "1000001 classes for 12 samples" in err
    assert not (tmp_path / "ws" / "datasets" / "big").exists()


def test_a_csv_label_far_above_the_row_count_is_refused_naming_the_line(tmp_path):
    src = _folder(tmp_path / "img")
    rows = [f"{p.relative_to(tmp_path).as_posix()},{i % 2}" for i, p in enumerate(sorted(src.rglob("*.png")))]
    rows[3] = rows[3].rsplit(",", 1)[0] + "," + "9" * 20
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DdsError, match=r"line 5: label 9{20} makes 10{20} classes for 6 rows"):
        run_shard(Workspace(tmp_path / "ws"), f"csv:{tmp_path / 'labels.csv'}", progress=False)


def test_a_20_digit_label_is_a_reject_not_an_overflow(tmp_path):
    source = _tar_source(tmp_path, [str(i % 3).encode() for i in range(11)] + [b"9" * 20])
    ws = Workspace(tmp_path / "ws")
    summary = run_shard(ws, source, name="wide", progress=False)
    assert summary["splits"] == {"train": 11} and summary["rejects"] == 1
    (reason,) = catalog.query(ws, "SELECT reason FROM rejects").column("reason").to_pylist()
    assert "99999999999999999999" in reason and "beyond" in reason


def _rewrite(tar_path, change) -> None:
    """Rewrite a tar with ``change(name, data) -> data`` applied to every member."""
    with tarfile.open(tar_path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            data = change(name, data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _broken_png(name: str, data: bytes) -> bytes:
    if name != "train-0000005.png":
        return data
    return data[:60] + bytes(b ^ 0x5A for b in data[60:-20]) + data[-20:]  # header kept, pixel stream broken


def _bad_cls(name: str, data: bytes) -> bytes:
    return b"cat" if name == "train-0000005.cls" else data


@pytest.fixture
def tiny(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    write_dataset(ws, "tiny", {"train": 16, "test": 8}, shard_size=8)
    return ws


@pytest.mark.parametrize("corrupt", ["truncated", "broken png", "bad cls"])
@pytest.mark.parametrize("cache", [True, False])
def test_a_corrupt_shard_names_the_tar_and_the_sample(tiny, corrupt, cache):
    tar = tiny.shards_dir("tiny") / "train-000000.tar"
    if corrupt == "truncated":
        tar.write_bytes(tar.read_bytes()[:3000])
    else:
        _rewrite(tar, _broken_png if corrupt == "broken png" else _bad_cls)
    with pytest.raises(DdsError) as err:
        split = open_split(tiny, "tiny", "train", cache=cache)
        list(split.eval_batches(4))
    msg = str(err.value)
    assert str(tar) in msg and "re-run `dds shard`" in msg and "\n" not in msg
    assert ("after member train-" if corrupt == "truncated" else "sample 'train-0000005'") in msg


def test_a_damaged_member_header_is_an_error_not_a_shorter_shard(tiny):
    from dds.shards import iter_tar_samples

    tar = tiny.shards_dir("tiny") / "train-000000.tar"
    with tarfile.open(tar) as tf:
        third = tf.getmembers()[4]            # the header of the third sample's first member
    data = bytearray(tar.read_bytes())
    data[third.offset + 10] ^= 0xFF           # its checksum no longer matches: tarfile's stream mode would just stop
    tar.write_bytes(bytes(data))
    with pytest.raises(DdsError, match=rf"shard {tar} is truncated or corrupt after member train-\d+\.\w+ "
                                       r"\(no end-of-archive marker where the members end"):
        list(iter_tar_samples(tar))


def test_dds_train_on_a_truncated_tar_is_one_line_and_rc_2(tiny, monkeypatch, capsys):
    tar = tiny.shards_dir("tiny") / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    rc, _, err = _dds(monkeypatch, capsys, "train", "tiny", "--policy", "full", "--budget", "1", "--epochs", "1",
                      "--model", "cnn3", "--no-progress", "-w", str(tiny.root))
    assert rc == 2 and err.count("\n") == 1 and f"shard {tar} is truncated" in err, err


def test_dds_embed_on_a_truncated_tar_is_one_error(tiny):
    from dds.pipeline.embed import run_embed

    tar = tiny.shards_dir("tiny") / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    with pytest.raises(DdsError, match=f"shard {tar} is truncated") as err:
        run_embed(tiny, "tiny", encoder="tiny-clip", batch_size=4, num_workers=1, device="cpu", progress=False)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- case 11: broken tables, temporary names


def test_a_broken_table_file_fails_only_the_queries_that_need_it(tiny, monkeypatch, capsys):
    keys = [f"train-{i:07d}" for i in range(16)]
    write_scores(tiny, "tiny", "lite0-minilm", keys)
    scores = tiny.index_dir("tiny", "lite0-minilm") / "scores.parquet"
    scores.write_bytes(np.random.default_rng(0).bytes(4096))
    assert catalog.query(tiny, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 24}]
    with pytest.raises(DdsError, match=f"{scores} is not a parquet file"):
        catalog.query(tiny, "SELECT count(*) FROM samples JOIN scores USING (key)")
    rc, _, err = _dds(monkeypatch, capsys, "sql", "SELECT * FROM scores", "-w", str(tiny.root))
    assert rc == 2 and err.count("\n") == 1 and str(scores) in err and "dds index" in err, err
    catalog.refresh(tiny)  # the catalog file still gets every other view
    con = duckdb.connect(str(tiny.catalog_path), read_only=True)
    assert con.sql("SELECT count(*) FROM samples").fetchall() == [(24,)]
    con.close()


def test_a_runs_file_with_a_damaged_data_page_fails_only_the_queries_on_runs(tiny):
    path = tiny.root / "runs" / "tiny-full-20260101-000000-abcd" / "run.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"run_id": ["tiny-full-20260101-000000-abcd"], "dataset": ["tiny"], "status": ["done"],
                             "config": ["{}" * 200]}), path, compression="NONE")
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    data[4:len(data) - footer] = bytes(len(data) - footer - 4)   # the pages zeroed, the footer (schema) intact
    path.write_bytes(bytes(data))
    assert catalog.query(tiny, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 24}]
    with pytest.raises(DdsError, match=r"table runs is unreadable .*move the damaged file"):
        catalog.query(tiny, "SELECT * FROM runs")


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    path = tmp_path / "embed" / "x.parquet"
    table = pa.table({"a": list(range(2000))})
    errors: list[BaseException] = []

    def write() -> None:
        for _ in range(30):
            try:
                write_parquet(path, table)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and pq.read_table(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["x.parquet"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"kept": True}))
    with pytest.raises(TypeError):
        atomic_write_bytes(path, 42)  # not bytes: fails while writing
    assert json.loads(path.read_text()) == {"kept": True} and [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
