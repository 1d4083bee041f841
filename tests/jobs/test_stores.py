"""Shards and outputs on Google Cloud Storage and Azure Blob: real servers on 127.0.0.1 (gcp-storage-emulator and
Azurite, tests/emulators.py) reached by the job's own clients (gcsfs and adlfs through pipeline/storage), with the
standard variables users set for them (STORAGE_EMULATOR_HOST, an Azurite connection string).

For each store: the output store's commits and its conditional create refusing a second finalizer, a shard
stream cut mid-body resumed at the byte reached, a real job (shards on the store, output there) killed with
kill -9 (driver and worker) and rerun with every key exactly once, and the request counts of status and
planning. The S3 equivalents are tests/jobs/test_s3.py and tests/pipeline/test_transport.py (moto).

gcp-storage-emulator ignores generation preconditions (it overwrites on `ifGenerationMatch=0`, which real GCS
answers with 412): the GCS runs go through `GcsPreconditions`, a proxy that answers 412 as GCS does, so the code
path the real store uses (gcsfs's `mode="create"` upload and its FileExistsError) is the one tested.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import json
import logging
import os
import re
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from pipeline.shards import ShardReader
from pipeline.storage import streams
from pipeline.writing import OutputStore
from tests.emulators import azure_request_kinds, azurite_server, gcs_request_kinds, gcs_server, settled
from tests.jobs.conftest import base_env

NAMES = ("00000", "00001", "00002", "00003")
STORES = ("gcs", "azure")


@dataclass
class Store:
    name: str
    scheme: str
    env: dict[str, str]  # what a process needs to reach it (read by gcsfs / adlfs themselves)
    fs: Any  # an fsspec filesystem on it, for set-up and checks
    log: Path
    kinds: Any  # the server log's request kinds: callable(log) -> list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.scheme}://{path}"

    def requests(self) -> list[str]:
        return settled(self.kinds, self.log)

    @property
    def pyarrow_fs(self) -> pafs.FileSystem:
        """The readers' view: pyarrow over the same fsspec filesystem, as a user loading the dataset would."""
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


class GcsPreconditions:
    """A proxy in front of the GCS emulator that does what it lacks: an upload with `ifGenerationMatch=0` for an
    object that exists is answered 412 Precondition Failed, as real GCS answers it. Everything else is relayed."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.refused = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.relay(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _call(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()

    def _exists(self, bucket: str, name: str) -> bool:
        status, _, _ = self._call("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
        return status == 200

    def relay(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        target = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(target.query)
        upload = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", target.path)
        if upload and query.get("ifGenerationMatch") == ["0"]:
            name = query.get("name", [None])[0] or _multipart_name(body or b"")
            if name and self._exists(upload.group(1), name):
                self.refused += 1
                answer = json.dumps({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                               "specified did not hold."}}).encode()
                return self._answer(h, 412, [("Content-Type", "application/json")], answer)
        status, headers, answer = self._call(h.command, h.path, body, dict(h.headers.items()))
        self._answer(h, status, headers, answer)

    @staticmethod
    def _answer(h: http.server.BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]],
                body: bytes) -> None:
        h.send_response(status)
        for name, value in headers:
            if name.lower() not in ("connection", "transfer-encoding", "keep-alive", "date", "server",
                                    "content-length"):
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


def _multipart_name(body: bytes) -> str | None:
    """The object name in a multipart upload's JSON metadata part."""
    m = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    return json.loads(b'"' + m.group(1) + b'"') if m else None


@pytest.fixture(scope="module")
def stores(tmp_path_factory, shard_source) -> Iterator[dict[str, Store]]:
    """Both servers, buckets `shards` (the synthetic shards at panda/NNNNN.tar), `out` and `unit`."""
    import adlfs
    import gcsfs.core

    src, _ = shard_source
    logs = tmp_path_factory.mktemp("stores")
    with gcs_server(_dir(logs / "gcs")) as g, azurite_server(_dir(logs / "azure")) as a:
        proxy = GcsPreconditions(g.endpoint)
        try:
            gcs_env = {**g.env, "STORAGE_EMULATOR_HOST": proxy.endpoint}
            gfs = gcsfs.core.GCSFileSystem(token="anon", endpoint_url=proxy.endpoint, use_listings_cache=False)
            afs = adlfs.AzureBlobFileSystem(connection_string=a.connection_string, use_listings_cache=False)
            found = {"gcs": Store("gcs", "gs", gcs_env, gfs, g.log, gcs_request_kinds, {"proxy": proxy}),
                     "azure": Store("azure", "az", dict(a.env), afs, a.log, azure_request_kinds)}
            for store in found.values():
                for bucket in ("shards", "out", "unit"):
                    store.fs.mkdir(bucket)
                for name in NAMES:
                    store.fs.put_file(str(src / f"{name}.tar"), f"shards/panda/{name}.tar")
            yield found
        finally:
            proxy.close()


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def store_env(stores, monkeypatch):
    """This process's environment for in-process tests: each store reached through its standard variables."""
    for var in ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING", "FSSPEC_GCS_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for store in stores.values():
        for var, value in store.env.items():
            monkeypatch.setenv(var, value)
    return stores


def _row(key: str, status: str = "ok", caption: str | None = None) -> dict:
    from pipeline.writing import COLUMNS

    return {**dict.fromkeys(COLUMNS), "key": key, "shard": "00000", "status": status, "caption_en": caption,
            "caption_flags": [], "frame_indices": []}


@pytest.mark.parametrize("name", STORES)
def test_output_store_commits_objects_and_creates_exclusively(store_env, name):
    store = store_env[name]
    out = OutputStore(store.url(f"unit/commits-{name}"))
    assert not out.is_finished("00000") and out.chunk_paths("00000") == []
    assert out.read_bytes(out.path("_job.json")) is None
    out.commit_chunk("00000", [_row("a", "ok", "first"), _row("b")], attempt=1)
    out.commit_chunk("00000", [_row("b", "ok", "again"), _row("c", "error")], attempt=2)
    # exactly the committed objects: no temp objects, no renames, no folder markers
    objects = store.fs.find(f"unit/commits-{name}")
    assert len(objects) == 2 and all("/_progress/00000/chunk-00" in o for o in objects), objects
    assert out.committed_keys("00000") == {"a", "b", "c"}

    assert dict(out.finalize_shard("00000", {b"test": b"meta"})) == {"ok": 2, "error": 1}
    assert out.is_finished("00000") and out.chunk_paths("00000") == []
    table = out.read_table(out.data_path("00000"))
    assert dict(zip(table["key"].to_pylist(), table["caption_en"].to_pylist())) == {"a": "first", "b": None,
                                                                                    "c": None}
    # a second finalizer's file is refused by the store itself: the first complete file stays
    before = store.fs.cat_file(out.data_path("00000"))
    assert not out.create_exclusive(out.data_path("00000"), b"another finalizer's file")
    assert store.fs.cat_file(out.data_path("00000")) == before
    assert out.create_exclusive(out.path("_lease.json"), b"{}") and not out.create_exclusive(out.path("_lease.json"), b"")


@pytest.mark.parametrize("late_reads_first", [True, False])
@pytest.mark.parametrize("name", STORES)
def test_two_racing_finalizers_first_complete_file_wins(store_env, name, late_reads_first):
    from tests.pipeline.test_writing import check_race, race_finalizers

    prefix = store_env[name].url(f"unit/race-{name}-{late_reads_first}")
    check_race(race_finalizers(lambda: OutputStore(prefix), late_reads_first), late_reads_first)


@pytest.mark.parametrize("name", STORES)
def test_shard_stream_cut_mid_body_resumes_at_the_byte_reached(store_env, name, monkeypatch, caplog,
                                                              shard_source):
    from tests.pipeline.test_transport import FaultyS3Proxy

    store = store_env[name]
    src, _ = shard_source
    local = list(ShardReader(str(src / "00000.tar")))
    url = store.url("shards/panda/00000.tar")
    assert list(ShardReader(url)) == local

    monkeypatch.setattr(streams, "STORE_READ_BUFFER_BYTES", 64 << 10)  # several ranged reads per shard
    resume_at = 2 * (64 << 10)
    failures = [("cut", 1000)] * 12  # more than the client library retries by itself

    def plan(method: str, range_: str | None) -> tuple[str, int] | None:
        if method == "GET" and range_ and range_.startswith(f"bytes={resume_at}-") and failures:
            return failures.pop(0)
        return None

    if name == "gcs":
        upstream = int(urllib.parse.urlsplit(store.extra["proxy"].endpoint).port)
        match = lambda path: path.endswith("/o/panda%2F00000.tar") or path.endswith("/o/panda/00000.tar")  # noqa: E731
    else:
        upstream = int(re.search(r"BlobEndpoint=http://127\.0\.0\.1:(\d+)", store.env["AZURE_STORAGE_CONNECTION_STRING"])
                       .group(1))
        match = lambda path: path.endswith("/shards/panda/00000.tar")  # noqa: E731
    caplog.set_level(logging.WARNING, logger="pipeline.storage.streams")
    with FaultyS3Proxy(upstream, plan, match) as proxy:
        if name == "gcs":
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        else:
            monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", store.env["AZURE_STORAGE_CONNECTION_STRING"].replace(
                f"127.0.0.1:{upstream}", urllib.parse.urlsplit(proxy.endpoint).netloc))
        reader = ShardReader(url, read_retries=5, retry_backoff_s=0.01)
        samples = list(reader)
    assert samples == local and reader.incomplete is None
    assert not failures, "every planned cut was served"
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.storage.streams"]
    assert warnings and all(f"byte {resume_at} of " in w and url in w for w in warnings), warnings
    gets = [r for m, r in proxy.requests if m == "GET" and r]
    assert gets[0].startswith("bytes=0-") and not any(g.startswith("bytes=0-") for g in gets[1:]), \
        "the shard was read again from its start"


@pytest.mark.parametrize("name", STORES)
def test_status_reads_one_get_per_shard_and_planning_only_lists(store_env, name):
    from jobs.status import collect_status
    from pipeline.progress import plan_shards
    from tests.jobs.test_output_view import write_finished_shards

    store = store_env[name]
    root = store.url(f"unit/many-{name}")
    out = OutputStore(root)
    names = [f"{i:05d}" for i in range(12)]
    write_finished_shards(out, names)

    before = len(store.requests())
    report = collect_status(OutputStore(root))
    status = collections.Counter(store.requests()[before:])
    assert report["shards_by_state"] == {"done": 12} and sum(report["rows_by_status"].values()) == 36
    # the records in one GET each (+ _shards.json, _job.json, the lease); a few listings, no data file opened
    assert status["GET"] <= len(names) + 3 and status["LIST"] + status["HEAD"] <= 6, status
    assert sum(status.values()) <= 1.1 * len(names) + 8, status

    before = len(store.requests())
    plan = plan_shards(OutputStore(root), [(n, f"/shards/{n}.tar") for n in names], retry_failed=False)
    planning = collections.Counter(store.requests()[before:])
    assert plan.done == names and not plan.to_run
    assert planning["GET"] == 0 and planning["LIST"] <= 3 and sum(planning.values()) <= 5, planning


@pytest.mark.slow
@pytest.mark.parametrize("name", STORES)
def test_job_on_the_store_killed_and_rerun_writes_every_key_once(stores, name, tiny_checkpoint, shard_source,
                                                                tmp_path):
    """Shards read from the store, output written there, by a real job on an embedded Ray (its actors inherit the
    driver's environment: the store's standard variables). kill -9 of the driver and a worker mid-shard, a rerun:
    every planted key exactly once, every shard done, no chunk left (tests/jobs/test_chaos.py's round)."""
    from tests.jobs.test_chaos import ChaosStore, _run_rounds

    store = stores[name]
    _, planted = shard_source
    env = {k: v for k, v in base_env().items() if k not in ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_CONNECTION_STRING")}
    ctx = {"tmp": tmp_path, "planted": planted, "model": tiny_checkpoint, "env": {**env, **store.env},
           "store": ChaosStore(name, store.scheme, "out", store.pyarrow_fs, {}),
           "shards": store.url("shards/panda/{00000..00003}.tar"),
           # one actor: an embedded Ray on this 2-core machine; the kill takes the driver and its worker
           "plan": {"target": "driver+worker", "actors": 1, "trigger": "chunk", "nth_chunk": 2}}
    summary = _run_rounds(ctx, 1, int(os.environ.get("CHAOS_SEED") or 0) or _seed(), name)
    (record,) = summary["per_round"]
    assert record["runs"] == 2 and record["kills"][0]["what"] == "driver+worker", record
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    # the store's secret (Azurite's account key, in the connection string) is in no object and no log line
    secret = re.search(r"AccountKey=([^;]+)", store.env.get("AZURE_STORAGE_CONNECTION_STRING", ""))
    if secret:
        objects = store.fs.find("out")
        assert any(p.endswith("/_job.json") for p in objects), objects
        for path in objects:
            assert secret.group(1).encode() not in store.fs.cat_file(path), path
        logs = list(tmp_path.glob("*.log"))
        assert logs and not any(secret.group(1) in log.read_text(errors="replace") for log in logs)


def _seed() -> int:
    import random

    return random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize("name", STORES)
def test_an_empty_or_cut_shard_on_the_store_is_incomplete(store_env, name, shard_source):
    """A 0-byte object and one cut at a member boundary (an upload that stopped): what was read is kept, the
    shard is never complete (its attempt fails with the reason), as for a local file."""
    store = store_env[name]
    src, _ = shard_source
    data = (src / "00000.tar").read_bytes()
    with tarfile.open(src / "00000.tar") as tar:
        boundary = tar.getmembers()[3].offset
    store.fs.pipe_file("shards/cut/empty.tar", b"")
    store.fs.pipe_file("shards/cut/boundary.tar", data[:boundary])
    empty = ShardReader(store.url("shards/cut/empty.tar"))
    assert list(empty) == [] and empty.incomplete == "shard is empty (0 bytes)"
    cut = ShardReader(store.url("shards/cut/boundary.tar"))
    samples = list(cut)
    assert samples and cut.incomplete == f"shard ends at byte {boundary} without an end-of-archive block"
