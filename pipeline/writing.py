"""Parquet output (the row schema is pipeline/rows.py's): atomic chunk commits and the per-shard merge.

Layout under OUT (docs/CONTRACTS.md, Output layout):
    OUT/_job.json                     manifest + fingerprint + versions
    OUT/data/{shard}.parquet          one file per finished shard (the dataset)
    OUT/_progress/{shard}/chunk-*.parquet   committed chunks of an unfinished shard
    OUT/_progress/{shard}.json        state per shard (a summary; chunks and data files are the truth)

OUT may be a local directory or an object-store URL: s3:// (AWS or an S3-compatible endpoint), gs://, az:// or
abfs(s):// (pipeline/storage.py: one fsspec filesystem each). On a local filesystem a commit is write-to-temp
then rename, and an exclusive create a hard link (our own: no library does this commit protocol; pyarrow's
local filesystem is the thin layer over the OS calls); on an object store a commit is a single PUT (or a
multipart upload, visible only once complete), which is atomic by itself, and an exclusive create is the
store's conditional PUT (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`, Azure `If-None-Match: *`).

Every operation on the output goes through `OutputStore`, which turns a fault of the storage itself (full, over
quota, read-only, no permission, no bucket: `storage_fault`) into `OutputStorageError` naming the path. No retry
of a shard fixes those, so they are not a shard's failure: the driver stops the job once (exit 4) and a rerun
after the fix resumes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.manifest import StorageSpec
from pipeline.retry import STORAGE_RETRIES
from pipeline.rows import COLUMNS, SCHEMA, STATUSES  # noqa: F401  (the row's schema lives in pipeline/rows.py)
from pipeline.storage import backend, filesystem, storage_fault  # noqa: F401  (storage_fault: its home is there)
from pipeline.storage.streams import redact_urls

log = logging.getLogger(__name__)

FLAGS_COLUMN = "caption_flags"
OLD_FLAGS_COLUMN = "flags"  # its former name: chunks and data files written with it are read renamed

META_CONFIG = b"pllava_recaption.config"
META_FINGERPRINT = b"pllava_recaption.fingerprint"

class OutputStorageError(RuntimeError):
    """The output's storage refused an operation for a reason no retry of a shard fixes (`storage_fault`).

    Not a shard's failure: a shard attempt that meets it stops with its committed chunks kept and is not
    charged; the driver stops the job once with this one line and exit 4, and a rerun after the fix resumes."""

    def __init__(self, action: str, path: str, cause: str):
        super().__init__(action, path, cause)  # the args rebuild it when it is unpickled (Ray task errors)
        self.action, self.path, self.cause = action, path, cause

    def __str__(self) -> str:
        return f"cannot {self.action} {self.path}: {self.cause}"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"row {row.get('key')!r} lacks columns {sorted(missing)}")
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=SCHEMA)


class OutputStore:
    """The job's output root, local or on an object store, with atomic writes.

    `fs` is pyarrow's local filesystem for a local root, else the store's fsspec filesystem
    (pipeline/storage.py); `root` is the path inside it (`bucket/prefix` on an object store)."""

    def __init__(self, root: str, storage: StorageSpec | None = None):
        store = backend(root)
        if store is not None and not store.writable:
            raise ValueError(f"output {root!r}: {store.title} is read-only here (shards only)")
        if store is None and "://" in root and not root.startswith("file://"):
            raise ValueError(f"output {root!r}: unsupported scheme")
        self.uri = root
        self.storage = storage
        self.is_local = store is None
        self.fs, self.root = self._filesystem()
        if not self.is_local and not self.root:
            raise ValueError(f"output {root!r} names no bucket")

    def _filesystem(self) -> tuple[Any, str]:
        if self.is_local:
            _, path = filesystem(self.uri)  # ~/out and file:// resolved to an absolute path
            return pafs.LocalFileSystem(), path
        return filesystem(self.uri, self.storage)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "fs"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fs, _ = self._filesystem()  # an actor makes its own client (its node's credentials)

    # paths -------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def data_path(self, shard: str) -> str:
        return self.path("data", f"{shard}.parquet")

    def chunk_dir(self, shard: str) -> str:
        return self.path("_progress", shard)

    def state_path(self, shard: str) -> str:
        return self.path("_progress", f"{shard}.json")

    def where(self, path: str) -> str:
        """`path` as the user names it: `s3://bucket/key` on S3, the absolute path locally."""
        return f"{self.uri.split('://', 1)[0]}://{path}" if "://" in self.uri else path

    @contextlib.contextmanager
    def _storage(self, action: str, path: str) -> Iterator[None]:
        """A storage fault (`storage_fault`) inside becomes OutputStorageError naming `path`; others pass."""
        try:
            yield
        except OutputStorageError:
            raise
        except Exception as e:
            cause = storage_fault(e)
            if cause is None and not self.is_local and action == "write" and isinstance(e, FileNotFoundError):
                cause = f"no such bucket or container ({e})"  # object stores have no parent folders to miss
            if cause is None:
                raise
            # a store's message may quote a request URL (a SAS token, a signed query): never into logs or records
            raise OutputStorageError(action, self.where(path), redact_urls(cause)) from e

    # primitive operations ----------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        with self._storage("read", path):
            if self.is_local:
                return self.fs.get_file_info(path).type != pafs.FileType.NotFound
            try:
                self.fs.info(path)
                return True
            except FileNotFoundError:
                return False

    def write_atomic(self, path: str, data: bytes) -> None:
        """`path` holds `data` or what it held before, never a part of it, whenever the writer dies."""
        with self._storage("write", path):
            self._write_atomic(path, data)

    def _write_atomic(self, path: str, data: bytes) -> None:
        parent, name = path.rsplit("/", 1)
        if self.is_local:
            for attempt in range(STORAGE_RETRIES):
                try:
                    self._write_then_rename(parent, name, data)
                    return
                except FileNotFoundError:  # a concurrent finalizer removed the chunk folder under us
                    if attempt == STORAGE_RETRIES - 1:
                        raise
        else:
            # No parent directories on an object store, no rename: the object is visible only once its PUT
            # (for a large one, its multipart or resumable upload) completes; the bytes go in whole, in one call.
            self.fs.pipe_file(path, data)

    def _write_then_rename(self, parent: str, name: str, data: bytes) -> None:
        self.fs.create_dir(parent, recursive=True)
        # Dot-prefixed: a temp file left by a kill -9 (torn, or complete but not yet renamed) sits
        # next to the data files, and readers of OUT/data (pyarrow, pandas, Ray Data) skip "."/"_" names.
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            with open(tmp, "rb+") as f:  # durable before it becomes visible
                os.fsync(f.fileno())
            self.fs.move(tmp, f"{parent}/{name}")
        except BaseException:
            self._discard(tmp)  # a full disk or a refused write leaves no temp file behind (a kill -9 still can)
            raise

    def _discard(self, tmp: str) -> None:
        """Remove a temp file of ours if it is there; a store that refuses even that keeps it (hidden, harmless)
        and the error that brought us here is the one raised."""
        try:
            self.fs.delete_file(tmp)
        except OSError:
            pass

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` only if it does not exist; False when it already does.

        Local: a hard link of a complete temp file (atomic, fails on an existing name). Object stores: the
        store's conditional create through fsspec (`pipe_file(mode="create")`: S3 `If-None-Match: *`, GCS
        `ifGenerationMatch=0`, Azure `If-None-Match: *`), which the store itself decides atomically.
        """
        with self._storage("write", path):
            return self._create_exclusive(path, data)

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        parent, name = path.rsplit("/", 1)
        if self.is_local:
            self.fs.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                with open(tmp, "rb+") as f:  # durable before it becomes visible
                    os.fsync(f.fileno())
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                self._discard(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise

    def link_exclusive(self, target: str, path: str) -> bool:
        """Local stores: make `path` a hard link to the existing file `target`, atomically; False when `path`
        already exists (the key claims of pipeline/key_claims.py: a directory entry each, no data block)."""
        with self._storage("write", path):
            try:
                os.link(target, path)
            except FileNotFoundError:  # the first claim in its folder
                os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                try:
                    os.link(target, path)
                except FileExistsError:
                    return False
            except FileExistsError:
                return False
            return True

    def read_bytes(self, path: str) -> bytes | None:
        with self._storage("read", path):
            return self._read_bytes(path)

    def _read_bytes(self, path: str) -> bytes | None:
        try:
            if self.is_local:
                with self.fs.open_input_stream(path) as f:
                    return f.read()
            return self.fs.cat_file(path)  # one GET (`recaption status` pays this once per shard)
        except FileNotFoundError:
            return None

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        with self._storage("list", directory):
            if self.is_local:
                infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
                return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
            try:
                entries = self.fs.ls(directory, detail=True)
            except FileNotFoundError:
                return []
        return sorted(e["name"] for e in entries if e.get("type") == "file" and e["name"].endswith(suffix))

    def list_tree(self, directory: str, suffix: str = "") -> list[str]:
        """Every file under `directory`, at any depth: one listing (paged on object stores), not one per folder."""
        with self._storage("list", directory):
            if self.is_local:
                infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True, recursive=True))
                return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
            try:
                paths = self.fs.find(directory)
            except FileNotFoundError:
                return []
        return sorted(p for p in paths if p.endswith(suffix))

    def delete(self, path: str) -> None:
        with self._storage("delete", path):
            try:
                if self.is_local:
                    self.fs.delete_file(path)
                else:
                    self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def delete_dir(self, path: str) -> None:
        with self._storage("delete", path):
            try:
                if self.is_local:
                    self.fs.delete_dir(path)
                else:
                    self.fs.rm(self.list_tree(path))  # what is there now; an empty list deletes nothing
            except FileNotFoundError:
                pass

    def read_json(self, path: str) -> Any | None:
        data = self.read_bytes(path)
        return None if data is None else json.loads(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())

    # chunks and shards -------------------------------------------------------------------------
    def commit_chunk(self, shard: str, rows: list[dict[str, Any]], attempt: int) -> str:
        """Write rows as one chunk, atomically. Once this returns, these keys are done."""
        path = f"{self.chunk_dir(shard)}/chunk-{attempt:03d}-{uuid.uuid4().hex}.parquet"
        self.write_atomic(path, _parquet_bytes(rows_to_table(rows)))
        return path

    def chunk_paths(self, shard: str) -> list[str]:
        return self.list_files(self.chunk_dir(shard), ".parquet")

    def committed_keys(self, shard: str) -> set[str]:
        keys: set[str] = set()
        for path in self.chunk_paths(shard):
            try:
                keys.update(self._read_table(path, columns=["key"]).column("key").to_pylist())
            except FileNotFoundError:  # merged and removed by a concurrent finalizer: its rows are in data/
                continue
        return keys

    def is_finished(self, shard: str) -> bool:
        return self.exists(self.data_path(shard))

    def finalize_shard(self, shard: str, metadata: dict[bytes, bytes], replace: bool = False) -> Counter:
        """Merge the committed chunks, dedupe by key (first commit wins), write data/{shard}.parquet.

        The data file is the completion marker; chunks are removed only after it exists, so a
        crash anywhere in here leaves either the chunks or the finished file, never neither. Two finalizers
        racing (a zombie actor and a retry): the data file is created exclusively (a hard link locally,
        `If-None-Match: *` on S3), so the first complete file wins and is never rewritten by the other; the
        other adds rows only for keys the winner's file lacks (none, when both committed the whole shard).
        `replace` (a redo of some rows): the chunks' rows go first instead, replacing the data file's rows of
        the same keys; every other row is kept as it was.
        """
        for attempt in range(STORAGE_RETRIES):
            try:
                tables = [self._read_table(p) for p in self.chunk_paths(shard)]
                existing = self._read_table(self.data_path(shard)) if self.is_finished(shard) else None
                break
            except FileNotFoundError:  # a concurrent finalizer merged and removed a chunk: read again
                if attempt == STORAGE_RETRIES - 1:
                    raise
        if replace and existing is not None:
            table = self._with_metadata(dedupe_by_key(pa.concat_tables([*tables, existing])), metadata)
            self.write_atomic(self.data_path(shard), _parquet_bytes(table))
        else:
            if existing is None:
                table = self._with_metadata(
                    dedupe_by_key(pa.concat_tables(tables)) if tables else SCHEMA.empty_table(), metadata)
                if not self.create_exclusive(self.data_path(shard), _parquet_bytes(table)):
                    existing = self._read_table(self.data_path(shard))  # another finalizer won: keep its file
            if existing is not None:
                table = self._merge_late(shard, existing, tables, metadata)
        self.delete_dir(self.chunk_dir(shard))
        return Counter(table.column("status").to_pylist())

    def _merge_late(self, shard: str, existing: pa.Table, tables: list[pa.Table],
                    metadata: dict[bytes, bytes]) -> pa.Table:
        """A data file exists: it stays as it is unless these chunks hold keys it lacks (a late finalizer
        that committed rows the first one never saw), which are added; never shrinks, never duplicates."""
        have = set(existing.column("key").to_pylist())
        extra = [t.filter(pa.array([k not in have for k in t.column("key").to_pylist()])) for t in tables]
        extra = [t for t in extra if t.num_rows]
        if not extra:
            return existing
        log.warning("shard %s: adding %d rows to the data file another finalizer wrote", shard,
                    sum(t.num_rows for t in extra))
        table = self._with_metadata(dedupe_by_key(pa.concat_tables([existing, *extra])), metadata)
        self.write_atomic(self.data_path(shard), _parquet_bytes(table))
        return table

    @staticmethod
    def _with_metadata(table: pa.Table, metadata: dict[bytes, bytes]) -> pa.Table:
        return table.replace_schema_metadata({**(SCHEMA.metadata or {}), **metadata})

    def discard_leftover_chunks(self, shard: str) -> None:
        """A finished shard whose chunk removal was interrupted: drop the now redundant chunks."""
        if self.chunk_paths(shard):
            self.delete_dir(self.chunk_dir(shard))

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """A data or chunk file in today's column names (a file from before the `flags` rename too)."""
        return self._read_table(path, columns)

    def _read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self._storage("read", path), self._open_file(path) as f:
            names = pq.read_schema(f).names
            if OLD_FLAGS_COLUMN in names and FLAGS_COLUMN not in names:
                # a file written before the rename (resuming an old unfinished output): read `flags`,
                # hand it back as `caption_flags`
                return _read_renamed(f, columns)
            return pq.read_table(f, columns=columns, schema=None if columns else SCHEMA)


    def _open_file(self, path: str) -> Any:
        """A random-access file for pyarrow: on an object store the whole object in one GET (a chunk or a data
        file: parquet's footer-then-columns reads would each be a ranged GET)."""
        if self.is_local:
            return self.fs.open_input_file(path)
        return pa.BufferReader(self.fs.cat_file(path))


def _precondition_failed(error: BaseException) -> bool:
    """A conditional create refused because the object exists, as a library raises it when it does not turn it
    into FileExistsError (412 Precondition Failed; S3's 409 ConditionalRequestConflict for a racing create)."""
    for e in (error, error.__cause__, error.__context__):
        if e is None:
            continue
        response = getattr(e, "response", None)
        code = (response.get("Error") or {}).get("Code") if isinstance(response, dict) else None
        status = getattr(e, "status_code", None) or getattr(e, "code", None)
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return True
        if "PreconditionFailed" in str(e) or "Precondition Failed" in str(e):
            return True
    return False


def _read_renamed(f: Any, columns: list[str] | None) -> pa.Table:
    wanted = list(columns or COLUMNS)
    read = [OLD_FLAGS_COLUMN if c == FLAGS_COLUMN else c for c in wanted]
    present = set(pq.read_schema(f).names)
    table = pq.read_table(f, columns=[c for c in read if c in present])
    table = table.rename_columns([FLAGS_COLUMN if c == OLD_FLAGS_COLUMN else c for c in table.column_names])
    for name in wanted:  # columns added after the file was written (e.g. attempts) read as nulls
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(table.num_rows, SCHEMA.field(name).type))
    return table.select(wanted) if columns else table.select(list(COLUMNS)).cast(SCHEMA)


def dedupe_by_key(table: pa.Table) -> pa.Table:
    seen: set[str] = set()
    keep = []
    for i, key in enumerate(table.column("key").to_pylist()):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == table.num_rows:
        return table
    return table.take(pa.array(keep, type=pa.int64()))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
