"""One driver per output: a lease file `OUT/_lease.json` with a heartbeat.

A driver takes the lease before it does any work on an output and refreshes it every `HEARTBEAT_S`; a
second driver on the same output (same host or another) is refused with who holds it. A lease is
stale, and may be taken over, once its heartbeat is older than `TTL_S`, or at once when its holder ran on
this host and that process is gone (a killed driver's rerun does not wait). `--force` takes it regardless.

Creation is conditional where the store allows it: `O_EXCL`-style (a hard link) on a local filesystem,
`If-None-Match: *` on S3. Taking over a stale lease is delete-then-create; two drivers racing for the same
stale lease can both believe they won for at most one heartbeat: each heartbeat re-reads the lease, and a
driver that finds another's token there stops dispatching (`Lease.lost`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pipeline.writing import OutputStorageError, OutputStore

LEASE_FILE = "_lease.json"
TTL_S = 120.0
HEARTBEAT_S = 20.0

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live driver holds the output."""


def read_lease(store: OutputStore) -> dict[str, Any] | None:
    try:
        record = store.read_json(store.path(LEASE_FILE))
    except ValueError:  # torn or hand-edited: treat as absent (it can only be a stale one)
        return None
    return record if isinstance(record, dict) else None


def _process_start_time(pid: int) -> float | None:
    """When process `pid` on this host started, or None when it is gone (zombies count as gone)."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def lease_alive(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether the lease's holder is to be presumed running."""
    if not record:
        return False
    now = time.time() if now is None else now
    if now > float(record.get("expires_at", 0)):
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        started = _process_start_time(record["pid"])
        # gone, or the pid was reused by a process that started after the lease was taken
        if started is None or (record.get("pid_started_at") and abs(started - record["pid_started_at"]) > 1.0):
            return False
    return True


def describe(record: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("since", 0)))
    beat = now - float(record.get("heartbeat_at", 0))
    return (f"host {record.get('host')}, pid {record.get('pid')}, since {since} "
            f"(last heartbeat {beat:.0f}s ago)")


class Lease:
    """A held lease; `start_heartbeat()` keeps it fresh from a daemon thread until `release()`."""

    def __init__(self, store: OutputStore, record: dict[str, Any], ttl_s: float, heartbeat_s: float):
        self.store = store
        self.record = record
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.lost = threading.Event()  # set when another driver's token is found in the lease
        self.lost_to: str | None = None
        # the output's storage refused the heartbeat (full, read-only, no permission): the driver stops the job
        self.storage_fault: OutputStorageError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.record["token"]

    def heartbeat(self) -> bool:
        """Refresh the lease; False (and `lost` set) when it is no longer ours."""
        current = read_lease(self.store)
        if current is not None and current.get("token") != self.token:
            self.lost_to = describe(current)
            self.lost.set()
            return False
        now = time.time()
        self.record.update(heartbeat_at=now, expires_at=now + self.ttl_s)
        self.store.write_json(self.store.path(LEASE_FILE), self.record)
        return True

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.heartbeat():
                        log.error("lost the lease on %s to %s", self.store.uri, self.lost_to)
                        return
                except OutputStorageError as e:
                    log.error("lease heartbeat on %s: %s", self.store.uri, e)
                    self.storage_fault = self.storage_fault or e
                except Exception as e:  # a flaky store: keep trying until the lease expires
                    log.warning("lease heartbeat on %s failed: %s", self.store.uri, e)

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = read_lease(self.store)
            if current is not None and current.get("token") == self.token:
                self.store.delete(self.store.path(LEASE_FILE))
        except Exception as e:  # it expires on its own
            log.warning("could not release the lease on %s: %s", self.store.uri, e)


def acquire(store: OutputStore, *, force: bool = False, ttl_s: float = TTL_S,
            heartbeat_s: float = HEARTBEAT_S) -> Lease:
    """Take the output's lease, or raise LeaseHeld naming the holder."""
    path = store.path(LEASE_FILE)
    now = time.time()
    pid = os.getpid()
    record = {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started_at": _process_start_time(pid),
        "since": now,
        "heartbeat_at": now,
        "expires_at": now + ttl_s,
    }
    payload = _encode(record)
    for _ in range(3):
        current = read_lease(store)
        if current is not None:
            if lease_alive(current) and not force:
                raise LeaseHeld(
                    f"output {store.uri} is in use by another driver: {describe(current)}. Wait for it to "
                    f"finish or stop it; if it is gone, its lease expires {TTL_S:.0f}s after its last heartbeat "
                    f"(or pass --force to take over now)")
            how = "forcing" if lease_alive(current) else "taking over the stale lease of"
            log.warning("%s %s on %s", how, describe(current), store.uri)
            if read_lease(store) == current:  # narrow the window in which we could delete a fresh lease
                store.delete(path)
        if store.create_exclusive(path, payload):
            held = read_lease(store)
            if held is not None and held.get("token") == record["token"]:
                return Lease(store, record, ttl_s, heartbeat_s)
        # someone else created it between our read and our create: look again
    current = read_lease(store) or {}
    raise LeaseHeld(f"output {store.uri} is in use by another driver: {describe(current)}")


def _encode(record: dict[str, Any]) -> bytes:
    import json

    return json.dumps(record, indent=2, sort_keys=True).encode()
