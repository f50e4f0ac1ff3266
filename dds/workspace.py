"""The workspace folder: where every stage reads and writes, and how files are written atomically.

Every table is a parquet file written by atomic rename under ``datasets/NAME/`` (generations of
tars and tables, embeddings per encoder, index generations per encoder) and ``runs/RUN_ID/``
(run, epochs and history rows, the last checkpoint); ``catalog.duckdb`` holds only views over
them. No output option (``--out``, ``--shards``, ``--results``) may point into ``datasets/``,
``runs/``, ``bench/`` or ``catalog.duckdb`` (:meth:`Workspace.check_output`). The full layout:
docs/integrity.md, "Design notes: dds/workspace.py".
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from dds._validate import check_dataset_name
from dds.errors import DdsError

# pyarrow is imported inside the functions that read or write parquet: dds.cli imports this module at
# startup, where pyarrow.parquet would add ~0.4 s to every command, `dds --help` included.

DEFAULT_WORKSPACE = "./dds-work"

#: run ids as the trainer issues them: {dataset}-{policy}-{YYYYmmdd-HHMMSS}-{4 hex}
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-[A-Za-z0-9_]+-\d{8}-\d{6}-[0-9a-f]{4}")


def slug(name: str) -> str:
    """A file-system safe form of a name (``openclip:ViT-B-32/x`` -> ``openclip_ViT-B-32_x``); not one-to-one."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def encoder_slug(encoder: str) -> str:
    """The folder name of an encoder: the name itself when it is file-system safe, else its slug plus a
    short hash of the name, so two encoders never share a folder (``a/b`` and ``a_b`` differ)."""
    s = slug(encoder)
    if s == encoder and ".." not in s:
        return s
    return f"{s}-{hashlib.sha256(encoder.encode()).hexdigest()[:8]}"


def safe_default_name(text: str) -> str:
    """A dataset name derived from a folder or glob stem (``my pets`` -> ``my_pets``)."""
    name = slug(text).replace("..", "_").lstrip("._-")[:100]
    return name or "dataset"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace folder. Creating it does not touch the disk."""

    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        """``path``, else ``$DDS_WORKSPACE``, else ``./dds-work``."""
        return cls(Path(path or os.environ.get("DDS_WORKSPACE") or DEFAULT_WORKSPACE).resolve())

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def check_exists(self) -> "Workspace":
        """For readers: the workspace must be an existing folder.

        Raises:
            DdsError: it does not exist, or is a file.
        """
        if self.root.is_file():
            raise DdsError(f"workspace {self.root} is a file, not a folder; give another --workspace")
        if not self.root.is_dir():
            raise DdsError(f"workspace {self.root} does not exist; check --workspace (or $DDS_WORKSPACE), "
                           "or create it with `dds shard SOURCE -w PATH`")
        return self

    def check_writable(self) -> "Workspace":
        """For writers, before any work: the workspace folder exists (created if need be) and can be written.

        Raises:
            DdsError: the path is a file, lies under a file, or cannot be created or written.
        """
        if self.root.exists() and not self.root.is_dir():
            raise DdsError(f"workspace {self.root} is a file, not a folder; give another --workspace")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            raise DdsError(f"workspace {self.root} lies under a file, not a folder; give another --workspace") from None
        except OSError as e:
            raise DdsError(f"cannot create workspace {self.root}: {e.strerror}; give a writable --workspace") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise DdsError(f"workspace {self.root} is not writable; give a writable --workspace or fix its permissions")
        return self

    def dataset_dir(self, name: str) -> Path:
        """``datasets/NAME``; the name is checked (:func:`check_dataset_name`)."""
        return self.root / "datasets" / check_dataset_name(name)

    def shards_dir(self, name: str) -> Path:
        return self.dataset_dir(name) / "shards"

    def embed_dir(self, name: str, encoder: str) -> Path:
        return self.dataset_dir(name) / "embed" / self._encoder_folder(name, encoder)

    def index_dir(self, name: str, encoder: str) -> Path:
        return self.dataset_dir(name) / "index" / self._encoder_folder(name, encoder)

    def _encoder_folder(self, name: str, encoder: str) -> str:
        """:func:`encoder_slug`, or the plain slug of an older workspace whose folder holds this encoder."""
        new, old = encoder_slug(encoder), slug(encoder)
        base = self.dataset_dir(name) / "embed"
        if new != old and not (base / new).exists() and (base / old / "encoder.json").exists():
            with contextlib.suppress(OSError, ValueError):
                if json.loads((base / old / "encoder.json").read_text()).get("encoder") == encoder:
                    return old
        return new

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def check_run_id(self, run_id: str) -> str:
        """``run_id`` if this workspace issued it: an existing ``runs/`` folder named like a run id.

        Raises:
            DdsError: a malformed id (path separators, ``..``) or no such run (close ids are named).
        """
        if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
            raise DdsError(f"{run_id!r} is not a run id (DATASET-POLICY-YYYYmmdd-HHMMSS-XXXX); list runs with: "
                           "dds sql \"SELECT run_id, status FROM runs\"")
        if not self.run_dir(run_id).is_dir():
            known = sorted(p.name for p in (self.root / "runs").glob("*") if p.is_dir())
            close = difflib.get_close_matches(run_id, known, n=3)
            hint = f"; did you mean {', '.join(close)}" if close else ""
            raise DdsError(f"no run '{run_id}' in workspace {self.root}{hint}")
        return run_id

    def check_output(self, path: str | os.PathLike, option: str) -> Path:
        """``path`` resolved, for an output option (``--out``, ``--shards``): never one of the workspace's own files.

        Raises:
            DdsError: the path is, or lies inside, the workspace's ``datasets/`` (shards, tables,
                embeddings, index), ``runs/``, ``bench/`` or ``catalog.duckdb``.
        """
        out = Path(path).resolve()
        for own in ("datasets", "runs", "bench", "catalog.duckdb"):
            base = (self.root / own).resolve()
            if out == base or base in out.parents:
                raise DdsError(f"{option} {path} lies inside the workspace's own {own} (which dds reads and would "
                               f"overwrite); give a path outside {base}")
        return out

    @contextlib.contextmanager
    def lock(self, target: str | os.PathLike, what: str | None = None, *, shared: bool = False,
             holder: str | None = None) -> Iterator[Path]:
        """Hold a lock on a dataset (by name) or a folder (a path, e.g. ``ws.run_dir(id)``).

        ``fcntl.flock`` on ``FOLDER/.lock`` is released when the block ends or the process dies (kill -9
        included), so a crashed holder never leaves a stale lock. Writers take it exclusively; readers that
        must not see the data replaced under them take it ``shared``. Each holder leaves a note
        ``FOLDER/.lock.PID.X`` so a refusal names the holders.

        Args:
            target: a dataset name, or the folder to lock (created if missing).
            what: how the error names the locked thing (default: ``dataset NAME`` / the folder).
            shared: take the lock shared instead of exclusive.
            holder: who holds it, for other processes' errors (e.g. ``run ID``); the pid is added.

        Raises:
            DdsError: another process holds the lock (exclusively, or at all when asking for it exclusively).
        """
        folder = self.dataset_dir(target) if isinstance(target, str) else Path(target)
        what = what or (f"dataset '{target}'" if isinstance(target, str) else str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ".lock"
        note = folder / f".lock.{os.getpid()}.{secrets.token_hex(3)}"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = "; ".join(lock_holders(folder))
                raise DdsError(f"{what} is in use by another dds process{f' ({holders})' if holders else ''}; "
                               "wait for it to finish, then try again") from None
            if not shared:  # no one else holds it: notes left by killed holders go
                for old in folder.glob(".lock.*"):
                    old.unlink(missing_ok=True)
            note.write_text(f"{holder + ', ' if holder else ''}pid {os.getpid()}")
            try:
                yield path
            finally:
                note.unlink(missing_ok=True)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def dataset_info(self, name: str) -> dict[str, Any]:
        """The ``dataset.json`` written by ``dds shard``; a clear error if the dataset was never sharded."""
        path = self.dataset_dir(name) / "dataset.json"
        if not path.exists():
            known = sorted(p.name for p in (self.root / "datasets").glob("*") if (p / "dataset.json").exists())
            listing = f"; sharded datasets here: {', '.join(known)}" if known else ""
            raise DdsError(
                f"dataset '{name}' is not in workspace {self.root}{listing}; run `dds shard SOURCE --name {name}` first"
            )
        return json.loads(path.read_text())

    def split_samples(self, name: str, split: str, columns: list[str]):
        """Rows of ``samples.parquet`` for one split, in ``idx`` order, as a pandas DataFrame.

        Args:
            columns: columns to read besides ``split`` and ``idx`` (always read).
        """
        import pyarrow.parquet as pq

        cols = list(dict.fromkeys([*columns, "split", "idx"]))
        df = pq.read_table(self.dataset_dir(name) / "samples.parquet", columns=cols).to_pandas()
        return df[df["split"] == split].sort_values("idx").reset_index(drop=True)


def temp_path(path: Path) -> Path:
    """A temporary name next to ``path``, unique to this call (two writers of one file never share it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a unique temporary name + ``os.replace``; the temporary is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, so readers never see half a file."""
    _atomic_write(path, lambda f: f.write(data))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holders(folder: Path) -> list[str]:
    """The notes of the live processes holding ``folder``'s lock (see :meth:`Workspace.lock`)."""
    out = []
    for note in sorted(folder.glob(".lock.*")):
        pid = note.name.split(".")[2]
        with contextlib.suppress(OSError):
            if pid.isdigit() and pid_alive(int(pid)):
                out.append(note.read_text().strip())
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_parquet(path: Path, table) -> None:
    """Write a ``pyarrow.Table`` (or a dict of columns) to ``path`` atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table, dict):
        table = pa.table(table)
    _atomic_write(path, lambda f: pq.write_table(table, f))
