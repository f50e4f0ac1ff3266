"""The catalog: the workspace's parquet files as DuckDB views (the public table contract).

``dds sql`` opens an in-memory DuckDB connection in which every table of :data:`dds.tables.TABLES`
is a view over a pyarrow dataset of its files (scanned by pyarrow, so DuckDB itself needs no file
access). The connection is then locked down with DuckDB's own settings: no file system, no
network, no extensions, configuration locked. A query can read the views and nothing else, and
cannot write anywhere; it also takes no lock, so a reader never blocks a running ``dds train``.

``catalog.duckdb`` holds the same views over the parquet globs, for users who open it with the
duckdb CLI; it can be rebuilt at any time.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dds.errors import DdsError
from dds.tables import TABLES, stale_run_ids, table_files
from dds.workspace import Workspace, atomic_write_bytes

log = logging.getLogger(__name__)

#: DuckDB settings of a query connection; lock_configuration last, so a query cannot undo the others
LOCKED_DOWN = {"enable_external_access": False, "autoload_known_extensions": False,
               "autoinstall_known_extensions": False, "allow_community_extensions": False,
               "lock_configuration": True}


#: the command that writes each table's files: what to re-run when one is unreadable
_WRITERS = {"datasets": "dds shard", "samples": "dds shard", "shards": "dds shard", "rejects": "dds shard",
            "embeddings": "dds embed", "text_embeddings": "dds embed", "knn": "dds index", "scores": "dds index",
            "runs": "dds train", "epochs": "dds train", "history": "dds train", "bench": "dds bench"}


def _dataset(ws: Workspace, name: str):
    """A pyarrow dataset of table ``name``: its files under one schema (missing columns null), or empty.

    Raises:
        DdsError: a file of the table is not readable parquet (the message names it).
    """
    declared = TABLES[name].schema
    files = table_files(ws, name)
    if not files:
        return declared.empty_table()
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (pa.ArrowException, OSError) as e:
            raise DdsError(f"table {name} is unreadable: {f} is not a parquet file ({str(e).splitlines()[0]}); "
                           f"move it away and re-run {_WRITERS[name]}") from None
    schema = pa.unify_schemas([declared, *schemas], promote_options="permissive")
    return pads.dataset([str(f) for f in files], schema=schema, format="parquet")


def _runs_table(ws: Workspace):
    """The runs rows with status ``stale`` for runs whose process died without marking the run failed."""
    data = _dataset(ws, "runs")
    table = data if isinstance(data, pa.Table) else data.to_table()
    stale = stale_run_ids(table.select([c for c in ("run_id", "status", "pid", "host")
                                        if c in table.column_names]).to_pylist())
    if stale:
        is_stale = pc.is_in(table["run_id"], pa.array(sorted(stale), pa.string()))
        status = pc.if_else(is_stale, pa.scalar("stale", pa.string()), table["status"])
        table = table.set_column(table.column_names.index("status"), "status", status)
    return table


def connect(ws: Workspace):
    """An in-memory, locked-down DuckDB connection with every catalog view defined (no file lock taken)."""
    return _connect(ws)[0]


def _connect(ws: Workspace):
    """:func:`connect`, and the tables left without a view because a file of theirs is unreadable
    (name -> the DdsError naming the file): queries that need them fail, the others run."""
    con = duckdb.connect(":memory:")
    unreadable: dict[str, DdsError] = {}
    for name in TABLES:
        try:
            data = _runs_table(ws) if name == "runs" else _dataset(ws, name)
        except DdsError as e:
            unreadable[name] = e
            continue
        except (pa.ArrowException, OSError) as e:  # runs are read whole here: a damaged data page surfaces now
            unreadable[name] = DdsError(f"table {name} is unreadable ({str(e).splitlines()[0]}); move the damaged "
                                        f"file under {ws.root / 'runs'} away and re-run {_WRITERS[name]}")
            continue
        con.register(f"_{name}_arrow", data)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}_arrow")
    for key, value in LOCKED_DOWN.items():
        con.execute(f"SET {key} = {str(value).lower()}")
    return con, unreadable


_DUCKDB_TYPES = {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT", "float": "FLOAT", "double": "DOUBLE",
                 "bool": "BOOLEAN"}


def _duckdb_type(t) -> str:
    if pa.types.is_list(t):
        return _duckdb_type(t.value_type) + "[]"
    return _DUCKDB_TYPES[str(t)]


def _glob_escape(path: str) -> str:
    """``path`` matched literally by a DuckDB glob: each of ``[ ] * ? { }`` becomes a one-character class."""
    return re.sub(r"([\[\]*?{}])", r"[\1]", path)


def view_sql(ws: Workspace, name: str) -> str:
    """``CREATE OR REPLACE VIEW`` for ``catalog.duckdb``: over the table's parquet glob, or empty with its columns.

    Only the table's own pattern is a glob; the workspace path in front of it is matched literally.
    """
    table = TABLES[name]
    if table_files(ws, name):
        glob = (_glob_escape(ws.root.as_posix()) + "/" + table.pattern).replace("'", "''")
        body = f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
    else:
        body = "SELECT " + ", ".join(f"NULL::{_duckdb_type(f.type)} AS {f.name}" for f in table.schema) + " WHERE false"
    return f"CREATE OR REPLACE VIEW {name} AS {body}"


def refresh(ws: Workspace) -> None:
    """Rebuild the views in ``catalog.duckdb`` (for users who open it with the duckdb CLI).

    The views are written to a new database in a temporary folder, which then replaces the file in the
    workspace atomically: a reader holding the old file keeps it, and DuckDB never opens a database
    under the workspace path (it reads a ``?`` in a database path as options). A view whose files
    are unreadable is left out with a warning: ``dds sql`` names the file when a query needs it.
    """
    ws.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dds-catalog-") as tmp:
        built = Path(tmp) / ws.catalog_path.name
        con = duckdb.connect(str(built))
        try:
            for name in TABLES:
                try:
                    con.execute(view_sql(ws, name))
                except duckdb.Error as e:
                    log.warning("catalog view %s not refreshed: %s", name, str(e).splitlines()[0])
        finally:
            con.close()
        atomic_write_bytes(ws.catalog_path, built.read_bytes())


_QUERIES = {"SELECT", "EXPLAIN"}


def query_all(ws: Workspace, sql: str) -> list:
    """Run each statement of ``sql`` over the catalog; returns one ``pyarrow.Table`` per statement.

    The connection cannot touch files, the network or extensions (see the module docstring); as a
    courtesy, statements other than queries are refused before anything runs.

    Raises:
        DdsError: the workspace does not exist, the text does not parse, holds no query or a
            statement that is not a query, or a query fails (e.g. touches a file).
    """
    ws.check_exists()
    con, unreadable = _connect(ws)
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise DdsError(f"SQL does not parse: {str(e).splitlines()[0]}") from None
        if not statements:
            raise DdsError("no SQL statement given; try: dds sql \"SELECT * FROM datasets\"")
        for st in statements:
            kind = st.type.name if hasattr(st.type, "name") else str(st.type)
            if kind.upper() not in _QUERIES:
                raise DdsError(f"dds sql is read-only: refused a {kind} statement; only SELECT queries are run")
        try:
            return [con.sql(st.query).to_arrow_table() for st in statements]
        except duckdb.Error as e:
            missing = re.search(r"Table with name (\w+) does not exist", str(e))
            if missing and missing.group(1).lower() in unreadable:
                raise unreadable[missing.group(1).lower()] from None
            raise DdsError(f"query failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def query(ws: Workspace, sql: str):
    """Run read-only ``sql`` over the catalog; returns the last statement's ``pyarrow.Table``.

    Raises:
        DdsError: as :func:`query_all`.
    """
    return query_all(ws, sql)[-1]


