"""One driver per output: the lease on a local output (S3's conditional create is tested in tests/jobs/test_s3.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.lease import LEASE_FILE, LeaseHeld, acquire, lease_alive, read_lease
from pipeline.writing import OutputStore


def test_second_driver_is_refused_with_the_holder_named(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    lease = acquire(store)
    try:
        with pytest.raises(LeaseHeld) as err:
            acquire(store)
        message = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message and "--force" in message
        assert read_lease(store)["token"] == lease.token
    finally:
        lease.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    acquire(store).release()  # free again


def test_a_dead_drivers_lease_is_taken_over_at_once_on_the_same_host(tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from pipeline.lease import acquire; from pipeline.writing import OutputStore; "
            f"acquire(OutputStore({str(out)!r}), ttl_s=3600); sys.exit(0)")  # exits without releasing
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    store = OutputStore(str(out))
    stale = read_lease(store)
    assert stale["pid"] != os.getpid() and stale["expires_at"] > time.time() + 3000
    assert not lease_alive(stale)
    lease = acquire(store)
    assert read_lease(store)["token"] == lease.token != stale["token"]
    lease.release()


def test_an_expired_lease_of_another_host_is_taken_over(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    now = time.time()
    other = {"token": "x" * 32, "host": "some-other-host", "pid": 1, "since": now - 600,
             "heartbeat_at": now - 300, "expires_at": now - 180}
    store.write_json(store.path(LEASE_FILE), other)
    assert not lease_alive(other)
    lease = acquire(store)
    lease.release()
    fresh = {**other, "heartbeat_at": now, "expires_at": now + 120}
    store.write_json(store.path(LEASE_FILE), fresh)
    with pytest.raises(LeaseHeld, match="host some-other-host, pid 1"):
        acquire(store)
    forced = acquire(store, force=True)  # --force
    assert read_lease(store)["token"] == forced.token
    forced.release()


def test_a_lease_taken_by_another_driver_is_noticed_at_the_next_heartbeat(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    lease = acquire(store, heartbeat_s=0.05)
    assert lease.heartbeat() and not lease.lost.is_set()
    record = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    assert record["heartbeat_at"] > record["since"] or record["heartbeat_at"] == pytest.approx(record["since"], abs=1)
    intruder = acquire(store, force=True)
    lease.start_heartbeat()
    assert lease.lost.wait(5), "the heartbeat did not notice the other driver"
    assert f"pid {os.getpid()}" in lease.lost_to
    lease.release()  # must not delete the intruder's lease
    assert read_lease(store)["token"] == intruder.token
    intruder.release()


def test_exclusive_create_is_exclusive(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    path = store.path("_x.json")
    assert store.create_exclusive(path, b"1")
    assert not store.create_exclusive(path, b"2")
    assert (tmp_path / "out" / "_x.json").read_bytes() == b"1"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_x.json"], "temp files left behind"
