"""Faults of the output's storage (full, read-only, no permission, quota, refused on S3) are told apart from a
shard's own failures, name the path, keep what was committed and leave no temp file behind.

On a real tmpfs (tests/tmpfs.py) that fills up or goes read-only under the store; the S3 side against moto is in
tests/jobs/test_storage_faults.py, the whole job in a real Ray cluster there too."""

from __future__ import annotations

import errno
import pickle
import time

import pytest
from botocore.exceptions import ClientError

from pipeline.lease import LEASE_FILE, acquire, read_lease
from pipeline.progress import read_state, write_state
from pipeline.writing import COLUMNS, OutputStorageError, OutputStore, storage_fault
from tests.tmpfs import fill, remount, small_tmpfs


def _rows(keys: list[str]) -> list[dict]:
    return [{**dict.fromkeys(COLUMNS), "key": k, "shard": "00000", "status": "ok", "caption_flags": [],
             "frame_indices": []} for k in keys]


def _client_error(code: str, status: int, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _s3fs_error(code: str, status: int, message: str = "") -> OSError:
    """The error s3fs raises: its translation of botocore's (PermissionError, OSError(EIO, ...)), chained to it."""
    from s3fs.errors import translate_boto_error

    cause = _client_error(code, status, message)
    error = translate_boto_error(cause)
    error.__cause__ = cause
    return error


def _gcs_error(code: int, message: str) -> Exception:
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": message})


def _azure_error(status: int, code: str, message: str) -> Exception:
    from azure.core.exceptions import HttpResponseError

    error = HttpResponseError(message=f"{message}\nRequestId:00000000-0000\nTime:2026-12-05T00:00:00Z")
    error.status_code, error.error_code = status, code
    return error


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
     "No space left on device (ENOSPC)"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded (EDQUOT)"),
    (OSError(errno.EROFS, "Failed to open local file. Detail: [errno 30] Read-only file system"),
     "Read-only file system (EROFS)"),
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied (EACCES)"),
    (_client_error("AccessDenied", 403, "Access Denied"), "AccessDenied: Access Denied"),
    (_client_error("QuotaExceeded", 400, "Bucket quota exceeded"), "QuotaExceeded: Bucket quota exceeded"),
    (_client_error("XMinioStorageFull", 507, "Storage backend is full"), "XMinioStorageFull: Storage backend is full"),
    (_client_error("Whatever", 507), "Whatever"),
    (_client_error("NoSuchBucket", 404, "The specified bucket does not exist"),
     "NoSuchBucket: The specified bucket does not exist"),
    (_s3fs_error("AccessDenied", 403, "Access Denied"), "AccessDenied: Access Denied"),
    (_s3fs_error("XMinioStorageFull", 507, "Storage backend is full"), "XMinioStorageFull: Storage backend is full"),
    (_gcs_error(403, "caller does not have storage.objects.create access"),
     "HTTP 403: caller does not have storage.objects.create access, 403"),
    (_azure_error(403, "AuthorizationFailure", "This request is not authorized to perform this operation."),
     "AuthorizationFailure: This request is not authorized to perform this operation."),
    (_azure_error(404, "ContainerNotFound", "The specified container does not exist."),
     "ContainerNotFound: The specified container does not exist."),
])
def test_storage_faults_are_recognised_with_a_short_cause(error, cause):
    assert storage_fault(error) == cause


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "No such file or directory"),  # a chunk a concurrent finalizer removed
    OSError(errno.EIO, "Input/output error"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    _client_error("NoSuchKey", 404),
    _client_error("SlowDown", 503, "Please reduce your request rate."),  # throttling: a retry may succeed
    _client_error("PreconditionFailed", 412),
    _s3fs_error("SlowDown", 503, "Please reduce your request rate."),
    _gcs_error(429, "rate limit exceeded"),
    _azure_error(404, "BlobNotFound", "The specified blob does not exist."),
    ValueError("bad parquet"),
])
def test_other_errors_are_not_storage_faults(error):
    assert storage_fault(error) is None


def test_a_storage_error_crosses_process_boundaries_whole():
    """Ray hands an actor's exception to the driver pickled."""
    e = pickle.loads(pickle.dumps(OutputStorageError("write", "/out/_progress/00000.json", "No space left on device")))
    assert isinstance(e, OutputStorageError)
    assert (e.action, e.path, e.cause) == ("write", "/out/_progress/00000.json", "No space left on device")
    assert str(e) == "cannot write /out/_progress/00000.json: No space left on device"


def _temp_files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*.tmp-*"))


def test_a_full_disk_names_the_path_keeps_what_was_committed_and_leaves_no_temp_file(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = OutputStore(str(disk / "out"))
        committed = store.commit_chunk("00000", _rows(["a", "b"]), attempt=1)
        write_state(store, "00000", state="running", attempts=1)
        ballast = fill(disk)

        with pytest.raises(OutputStorageError) as chunk:
            store.commit_chunk("00000", _rows(["c", "d"]), attempt=1)
        assert chunk.value.path.startswith(f"{disk}/out/_progress/00000/chunk-001-")
        assert chunk.value.cause == "No space left on device (ENOSPC)"
        with pytest.raises(OutputStorageError, match=r"cannot write .*/_progress/00000\.json: No space left"):
            write_state(store, "00000", state="running", attempts=1, committed=4)
        with pytest.raises(OutputStorageError, match=r"cannot write .*/data/00000\.parquet: No space left"):
            store.finalize_shard("00000", {})
        with pytest.raises(OutputStorageError, match=r"cannot write .*/_lease\.json: No space left"):
            acquire(store)
        assert _temp_files(disk) == []
        assert store.chunk_paths("00000") == [committed] and store.committed_keys("00000") == {"a", "b"}
        assert read_state(store, "00000")["attempts"] == 1 and not store.is_finished("00000")

        ballast.unlink()  # space freed: the same calls go through
        store.commit_chunk("00000", _rows(["c", "d"]), attempt=1)
        assert dict(store.finalize_shard("00000", {})) == {"ok": 4}
        assert _temp_files(disk) == []


def test_a_read_only_disk_is_a_storage_fault(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = OutputStore(str(disk / "out"))
        store.commit_chunk("00000", _rows(["a"]), attempt=1)
        remount(disk, "ro")
        try:
            with pytest.raises(OutputStorageError) as e:
                store.commit_chunk("00000", _rows(["b"]), attempt=1)
            assert e.value.cause == "Read-only file system (EROFS)" and e.value.path.startswith(str(disk / "out"))
            with pytest.raises(OutputStorageError, match="cannot delete .*Read-only file system"):
                store.delete_dir(store.chunk_dir("00000"))
            assert store.committed_keys("00000") == {"a"}  # reading still works
        finally:
            remount(disk, "rw")


def test_a_lease_heartbeat_the_disk_refuses_is_reported_to_the_driver(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = OutputStore(str(disk / "out"))
        lease = acquire(store, heartbeat_s=0.05)
        before = read_lease(store)
        lease.start_heartbeat()
        ballast = fill(disk)
        deadline = time.monotonic() + 10
        while lease.storage_fault is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.storage_fault is not None and f"{LEASE_FILE}: No space left" in str(lease.storage_fault)
        assert not lease.lost.is_set()
        assert read_lease(store)["token"] == before["token"]  # the lease file is the last one written, whole
        lease.release()  # removing a file needs no space
        assert read_lease(store) is None and _temp_files(disk) == []
        ballast.unlink()
