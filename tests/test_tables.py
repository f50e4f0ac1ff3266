"""The table contract: what every writer produces is declared in dds.tables (the one home of the schemas)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from synth import write_dataset, write_scores
from typer.testing import CliRunner

from dds import catalog, generations
from dds.cli import app
from dds.tables import TABLES, load_scores, table_files
from dds.workspace import Workspace


def _folder(root: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in sizes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(60 + 60 * len(cls), 30, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def full_ws(tmp_path_factory) -> Workspace:
    """Every table written by its real writer: shard, embed, index, train and bench on a tiny dataset."""
    from dds.pipeline.embed import run_embed
    from dds.pipeline.index import run_index
    from dds.pipeline.shard import run_shard
    from dds.train import TrainConfig, run_train
    from dds.bench.training import run_bench

    tmp = tmp_path_factory.mktemp("tables")
    ws = Workspace(tmp / "ws")
    run_shard(ws, f"imagefolder:{_folder(tmp / 'train', {'a': 12, 'bb': 12})}", name="toy", progress=False)
    run_shard(ws, f"imagefolder:{_folder(tmp / 'held-out', {'a': 3, 'bb': 3}, seed=1)}", name="toy", split="test",
              progress=False)
    run_embed(ws, "toy", encoder="tiny-clip", batch_size=8, num_workers=0, splits=("train",), progress=False)
    run_index(ws, "toy", encoder="tiny-clip", k=3, adapters="off", progress=False)
    base = dict(dataset="toy", budget=0.5, epochs=1, model="cnn3", batch_size=8, encoder="tiny-clip", num_threads=1)
    run_train(ws, TrainConfig(policy="dds", **base), progress=False)
    run_bench(ws, "toy", policies=["full"], budgets=[0.5], epochs=1, seeds=1, model="cnn3",
              base_config={"encoder": "tiny-clip", "batch_size": 8, "num_threads": 1}, progress=False)
    return ws


@pytest.mark.parametrize("name", list(TABLES))
def test_every_written_column_is_declared(full_ws, name):
    files = table_files(full_ws, name)
    assert files, f"no {name} files written"
    declared = TABLES[name].schema
    for f in files:
        for field in pq.read_schema(f):
            assert field.name in declared.names, f"{name}: column {field.name} of {f} is not in dds.tables"
            want, got = declared.field(field.name).type, field.type
            if pa.types.is_list(want) and pa.types.is_list(got):  # the item's name differs between writers
                want, got = want.value_type, got.value_type
            assert got == want or pa.types.is_null(got), f"{name}.{field.name}: {got} != {want}"
    view = catalog.query(full_ws, f"SELECT * FROM {name} LIMIT 1").schema
    assert view.names == declared.names


def test_index_k_larger_than_the_smallest_class_is_one_line(tmp_path):
    from dds.pipeline.shard import run_shard

    ws = Workspace(tmp_path / "ws")
    run_shard(ws, f"imagefolder:{_folder(tmp_path / 'src', {'a': 6, 'bb': 3})}", name="toy", progress=False)
    res = CliRunner().invoke(app, ["index", "toy", "--k", "3", "-w", str(ws.root)])
    assert res.exit_code != 0 and isinstance(res.exception, Exception)
    assert "--k 3 needs more than 3 train samples in every class, but class 'bb' has 3; use --k 2 or less" \
        in str(res.exception)


def test_load_scores_reads_the_generation_in_use(tmp_path):
    ws = Workspace(tmp_path)
    write_dataset(ws, "ds", {"train": 6, "test": 2})
    assert load_scores(ws, "ds", "enc") is None  # never indexed
    keys = [f"train-{i:07d}" for i in range(6)]
    write_scores(ws, "ds", "enc", keys)  # a table from before the label verdict: no status column
    df = load_scores(ws, "ds", "enc", ["key", "region", "status"])
    assert list(df.columns) == ["key", "region"] and df["key"].tolist() == keys
    folder = ws.index_dir("ds", "enc")
    for n in (4, 2):  # two `dds index` generations, the second committed over the first
        gen = generations.new_generation(folder, generations.INDEX_LINKED)
        pq.write_table(pa.table({"key": keys[:n]}), gen / "scores.parquet")
        generations.commit(folder, gen, generations.INDEX_LINKED)
        assert load_scores(ws, "ds", "enc")["key"].tolist() == keys[:n]
