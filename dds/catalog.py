"""The catalog: DuckDB views over the workspace's parquet files (the public table contract).

``catalog.duckdb`` holds only views, so it can be rebuilt at any time and a reader never blocks a
writer. ``dds sql`` builds the same views in an in-memory connection, which needs no lock at all.
"""
from __future__ import annotations

import logging

from dds.errors import DdsError
from dds.workspace import Workspace

log = logging.getLogger(__name__)

# view name -> (glob relative to the workspace, columns of the empty view when no file exists yet)
TABLES: dict[str, tuple[str, str]] = {
    "datasets": ("datasets/*/dataset.parquet",
                 "name VARCHAR, num_samples BIGINT, num_classes INTEGER, classes VARCHAR[], source VARCHAR"),
    "samples": ("datasets/*/samples.parquet",
                "dataset VARCHAR, key VARCHAR, split VARCHAR, label INTEGER, label_orig INTEGER, shard VARCHAR"),
    "shards": ("datasets/*/shards.parquet",
               "dataset VARCHAR, split VARCHAR, shard VARCHAR, path VARCHAR, count BIGINT, sha256 VARCHAR"),
    "rejects": ("datasets/*/rejects.parquet", "dataset VARCHAR, source VARCHAR, reason VARCHAR"),
    "embeddings": ("datasets/*/embed/*/shards/*.parquet",
                   "dataset VARCHAR, encoder VARCHAR, key VARCHAR, label INTEGER, vector FLOAT[]"),
    "text_embeddings": ("datasets/*/embed/*/text.parquet",
                        "dataset VARCHAR, encoder VARCHAR, label INTEGER, class_name VARCHAR, vector FLOAT[]"),
    "knn": ("datasets/*/index/*/knn.parquet",
            "dataset VARCHAR, encoder VARCHAR, key VARCHAR, neighbor VARCHAR, rank INTEGER, similarity FLOAT, scope VARCHAR"),
    "scores": ("datasets/*/index/*/scores.parquet",
               "dataset VARCHAR, encoder VARCHAR, key VARCHAR, label INTEGER, density FLOAT, consistency FLOAT, margin FLOAT, "
               "knn_agreement FLOAT, joint FLOAT, region VARCHAR, pred_label INTEGER, prob_label FLOAT, probs FLOAT[]"),
    "runs": ("runs/*/run.parquet",
             "run_id VARCHAR, dataset VARCHAR, policy VARCHAR, budget DOUBLE, epochs INTEGER, seed INTEGER, "
             "status VARCHAR, config VARCHAR"),
    "epochs": ("runs/*/epochs/*.parquet",
               "run_id VARCHAR, epoch INTEGER, selected BIGINT, sample_steps BIGINT, train_loss DOUBLE, test_acc DOUBLE, "
               "wall_s DOUBLE, data_s DOUBLE, compute_s DOUBLE, select_s DOUBLE, eval_s DOUBLE"),
    "history": ("runs/*/history/*.parquet",
                "run_id VARCHAR, epoch INTEGER, key VARCHAR, selected BOOLEAN, weight FLOAT, aug VARCHAR, loss FLOAT"),
    "bench": ("bench/*.parquet",
              "bench_id VARCHAR, dataset VARCHAR, policy VARCHAR, budget DOUBLE, seeds INTEGER, acc_mean DOUBLE, "
              "acc_std DOUBLE, budget_spent DOUBLE, wall_ratio DOUBLE, select_s DOUBLE, eval_split VARCHAR"),
}


def view_sql(ws: Workspace, name: str) -> str:
    """``CREATE OR REPLACE VIEW`` for table ``name``: over its parquet files, or empty with its columns."""
    pattern, columns = TABLES[name]
    if any(ws.root.glob(pattern)):
        glob = (ws.root / pattern).as_posix().replace("'", "''")
        body = f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
    else:
        casts = ", ".join(f"NULL::{c.split(' ', 1)[1]} AS {c.split(' ', 1)[0]}" for c in columns.split(", "))
        body = f"SELECT {casts} WHERE false"
    return f"CREATE OR REPLACE VIEW {name} AS {body}"


def connect(ws: Workspace):
    """An in-memory DuckDB connection with every catalog view defined (no file lock taken)."""
    import duckdb

    con = duckdb.connect(":memory:")
    for name in TABLES:
        con.execute(view_sql(ws, name))
    return con


def refresh(ws: Workspace) -> None:
    """Rebuild the views in ``catalog.duckdb`` (for users who open it with the duckdb CLI).

    A catalog locked by another process is left as it is: ``dds sql`` does not depend on it.
    """
    import duckdb

    ws.root.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(ws.catalog_path))
    except duckdb.IOException as e:  # held by another writer; views are rebuilt on its next refresh
        log.warning("catalog %s is locked, views not refreshed: %s", ws.catalog_path, e)
        return
    try:
        for name in TABLES:
            con.execute(view_sql(ws, name))
    finally:
        con.close()


_READ_ONLY = {"SELECT", "EXPLAIN"}


def query(ws: Workspace, sql: str):
    """Run read-only ``sql`` over the catalog; returns a ``pyarrow.Table``.

    Raises:
        DdsError: if the text holds a statement that would write, or it does not parse.
    """
    import duckdb

    con = connect(ws)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise DdsError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
    if not statements:
        raise DdsError("no SQL statement given; try: dds sql \"SELECT * FROM datasets\"")
    for st in statements:
        kind = st.type.name if hasattr(st.type, "name") else str(st.type)
        if kind.upper() not in _READ_ONLY:
            raise DdsError(f"dds sql is read-only: refused a {kind} statement; only SELECT queries are run")
    try:
        result = None
        for st in statements:
            result = con.sql(st.query).to_arrow_table()
        return result
    except duckdb.Error as e:
        raise DdsError(f"query failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
