"""Parquet output (the row schema is pipeline/rows.py's): atomic chunk commits and the per-shard merge.

Layout under OUT (docs/CONTRACTS.md, Output layout):
    OUT/_job.json                     manifest + fingerprint + versions
    OUT/data/{shard}.parquet          one file per finished shard (the dataset)
    OUT/_progress/{shard}/chunk-*.parquet   committed chunks of an unfinished shard
    OUT/_progress/{shard}.json        state per shard (a summary; chunks and data files are the truth)

OUT may be a local directory or an object-store URI: s3:// (AWS or an S3-compatible endpoint, see
`shards.s3_filesystem`) or another scheme pyarrow.fs understands. On a local filesystem a commit is
write-to-temp then rename; on an object store it is a single PUT, which is atomic by itself (no rename,
no directories).

Every operation on the output goes through `OutputStore`, which turns a fault of the storage itself (full, over
quota, read-only, no permission, no bucket: `storage_fault`) into `OutputStorageError` naming the path. No retry
of a shard fixes those, so they are not a shard's failure: the driver stops the job once (exit 4) and a rerun
after the fix resumes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import threading
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
from pipeline.shards import s3_endpoint, s3_filesystem

log = logging.getLogger(__name__)

FLAGS_COLUMN = "caption_flags"
OLD_FLAGS_COLUMN = "flags"  # its former name: chunks and data files written with it are read renamed

META_CONFIG = b"pllava_recaption.config"
META_FINGERPRINT = b"pllava_recaption.fingerprint"

# What the output's storage answers when it cannot take writes at all, whatever shard is writing: full, over
# quota, read-only, no permission, file too large for the file system.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
# The same on S3 and S3-compatible stores (AWS, MinIO, Ceph): error codes and HTTP statuses (403 refused,
# 507 insufficient storage). Throttling and 5xx answers are not here: they pass, and a retry may succeed.
S3_STORAGE_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "NoSuchBucket", "InsufficientStorage", "QuotaExceeded",
    "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded",
})
S3_STORAGE_STATUSES = frozenset({403, 507})
# pyarrow's S3 client raises OSError without an errno; the AWS error is in its message, e.g.
# "AWS Error ACCESS_DENIED during PutObject operation: Access Denied (Request ID: …)"
_PYARROW_S3_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))? during (\w+) operation: ?(.*)", re.S)
_PYARROW_S3_NAMES = frozenset({"ACCESS_DENIED", "NO_SUCH_BUCKET", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                               "EXPIRED_TOKEN"})


class OutputStorageError(RuntimeError):
    """The output's storage refused an operation for a reason no retry of a shard fixes (`storage_fault`).

    Not a shard's failure: a shard attempt that meets it stops with its committed chunks kept and is not
    charged; the driver stops the job once with this one line and exit 4, and a rerun after the fix resumes."""

    def __init__(self, action: str, path: str, cause: str):
        super().__init__(action, path, cause)  # the args rebuild it when it is unpickled (Ray task errors)
        self.action, self.path, self.cause = action, path, cause

    def __str__(self) -> str:
        return f"cannot {self.action} {self.path}: {self.cause}"


def storage_fault(error: BaseException) -> str | None:
    """Why `error` is the output's storage refusing (a short cause: "No space left on device (ENOSPC)",
    "AccessDenied: Access Denied"), or None when it is some other error."""
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return f"{os.strerror(error.errno)} ({errno.errorcode[error.errno]})"
    response = getattr(error, "response", None)  # botocore's ClientError (conditional creates, one-GET reads)
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in S3_STORAGE_CODES or status in S3_STORAGE_STATUSES:
            message = (response.get("Error") or {}).get("Message") or ""
            return f"{code or f'HTTP {status}'}: {message}".rstrip(": ")
        return None
    match = _PYARROW_S3_ERROR.search(str(error)) if isinstance(error, OSError) else None
    if match is None:
        return None
    name, status, _, message = match.groups()
    message = re.sub(r"\s*\(Request ID:.*$", "", message.strip(), flags=re.S)
    message = re.sub(r"^Unable to parse ExceptionName: \S+ Message: ", "", message)  # a code the SDK does not know
    code = next((c for c in sorted(S3_STORAGE_CODES) if c in str(error)), None)
    if name in _PYARROW_S3_NAMES or code or (status and int(status) in S3_STORAGE_STATUSES):
        return f"{code or name}{f' (HTTP {status})' if status else ''}: {message}".rstrip(": ")
    return None


def s3_client(storage: StorageSpec | None = None) -> Any:
    """A boto3 S3 client with the same endpoint and region rules as `shards.s3_filesystem`, for what pyarrow
    lacks: conditional creates (the lease, data files) and a read in one GET. Credentials: boto3's own chain."""
    import boto3

    endpoint, region = s3_endpoint(storage)
    # A session of its own: boto3's default session resolves credentials once per process and keeps them, so a
    # process whose environment changes (a long-lived actor, a test run) would sign with the first ones forever.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    for row in rows:
        missing = set(COLUMNS) - set(row)
        if missing:
            raise ValueError(f"row {row.get('key')!r} lacks columns {sorted(missing)}")
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=SCHEMA)


class OutputStore:
    """The job's output root, local or on an object store, with atomic writes."""

    def __init__(self, root: str, storage: StorageSpec | None = None):
        if root.startswith("s3://"):
            # not FileSystem.from_uri: it ignores AWS_ENDPOINT_URL and asks AWS for the bucket's region
            self.fs, self.root = s3_filesystem(storage), root[len("s3://"):].rstrip("/")
            if not self.root:
                raise ValueError(f"output {root!r} names no bucket")
        elif "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))  # ~/out too
        self.uri = root
        self.storage = storage
        self.is_local = self.fs.type_name == "local"
        self._client: Any = None
        self._client_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_client_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _client_lock=threading.Lock())

    def s3(self) -> Any:
        """This store's boto3 client, made once (boto3's default session is not thread-safe to make it from)."""
        with self._client_lock:
            if self._client is None:
                self._client = s3_client(self.storage)
            return self._client

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
            if cause is None:
                raise
            raise OutputStorageError(action, self.where(path), cause) from e

    # primitive operations ----------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        with self._storage("read", path):
            return self.fs.get_file_info(path).type != pafs.FileType.NotFound

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
            # (past 10 MiB, its multipart upload) completes. pyarrow completes an upload on close even when
            # an exception interrupted the writing, so the bytes go in whole, in one write.
            with self.fs.open_output_stream(path) as f:
                f.write(data)

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

        Local: a hard link of a complete temp file (atomic, fails on an existing name). S3: a PUT with
        `If-None-Match: *` (boto3: pyarrow has no conditional writes). Other stores: check, then write.
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
        if self.fs.type_name == "s3":
            from botocore.exceptions import ClientError

            bucket, _, key = path.partition("/")
            try:
                self.s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        if self.exists(path):
            return False
        self.write_atomic(path, data)
        return True

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
        if self.fs.type_name == "s3":
            # One GET. pyarrow's input stream first HEADs the object for its size: two round trips for every
            # small read, which `recaption status` pays once per shard.
            from botocore.exceptions import ClientError

            bucket, _, key = path.partition("/")
            try:
                return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        selector = pafs.FileSelector(directory, allow_not_found=True)
        with self._storage("list", directory):
            infos = self.fs.get_file_info(selector)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def list_tree(self, directory: str, suffix: str = "") -> list[str]:
        """Every file under `directory`, at any depth: one listing (paged on S3), not one per folder."""
        selector = pafs.FileSelector(directory, allow_not_found=True, recursive=True)
        with self._storage("list", directory):
            infos = self.fs.get_file_info(selector)
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def delete(self, path: str) -> None:
        with self._storage("delete", path):
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass

    def delete_dir(self, path: str) -> None:
        with self._storage("delete", path):
            try:
                self.fs.delete_dir(path)
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
        with self._storage("read", path), self.fs.open_input_file(path) as f:
            names = pq.read_schema(f).names
            if OLD_FLAGS_COLUMN in names and FLAGS_COLUMN not in names:
                # a file written before the rename (resuming an old unfinished output): read `flags`,
                # hand it back as `caption_flags`
                return _read_renamed(f, columns)
            return pq.read_table(f, columns=columns, schema=None if columns else SCHEMA)


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
