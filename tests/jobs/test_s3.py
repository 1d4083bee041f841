"""Shards and outputs on an S3-compatible store: a real moto server on 127.0.0.1, real pyarrow S3 client.

The job runs on an embedded local Ray (its actors inherit the driver's environment, credentials included).
The credentials are fake and distinctive, so a test can prove they are written and logged nowhere.
"""

from __future__ import annotations

import collections
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tarfile
import threading

import boto3
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import StorageSpec
from pipeline.shards import ShardReader, ShardReadError, open_shard_stream
from pipeline.writing import COLUMNS, OutputStore
from tests.jobs.conftest import REPO, base_env, run_job, write_manifest
from tests.moto_server import moto_server, settled_requests

ACCESS_KEY = "AKIARECAPTIONTEST7Q"
SECRET = f"recaption-fake-secret-{secrets.token_hex(12)}"
REGION = "us-east-1"
SHARDS = ("00000", "00001", "00002", "00003")


class S3:
    """The moto server and clients on it: boto3 for test set-up, pyarrow for reading back like a user."""

    def __init__(self, port: int):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                                   aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)
        self.fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET, region=REGION, scheme="http",
                                    endpoint_override=f"127.0.0.1:{port}")

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o for page in pages for o in page.get("Contents", [])}

    def copy_prefix(self, bucket: str, src: str, dst: str) -> None:
        for key in self.objects(bucket, src):
            self.client.copy_object(Bucket=bucket, Key=dst + key[len(src):],
                                    CopySource={"Bucket": bucket, "Key": key})


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("moto")
    with moto_server(log_dir) as port:
        store = S3(port)
        store.log = log_dir / "moto.log"  # one line per request: what the request-counting tests read
        for bucket in ("shards", "out", "unit"):
            store.client.create_bucket(Bucket=bucket)
        yield store


@pytest.fixture(scope="module")
def s3_shards(s3, shard_source):
    """The synthetic shards uploaded to s3://shards/panda/."""
    src, planted = shard_source
    for name in SHARDS:
        s3.client.upload_file(str(src / f"{name}.tar"), "shards", f"panda/{name}.tar")
    return src, planted


def job_env(s3: S3, endpoint_from_env: bool = True) -> dict[str, str]:
    """The standard AWS variables, and nothing from this machine's own AWS set-up."""
    env = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION=REGION,
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    if endpoint_from_env:
        env["AWS_ENDPOINT_URL"] = s3.endpoint
    return env


@pytest.fixture()
def s3_process_env(s3, monkeypatch):
    """This process's environment for the in-process tests (pyarrow's AWS SDK reads it)."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    for var, value in job_env(s3).items():
        if var.startswith("AWS_"):
            monkeypatch.setenv(var, value)


def read_rows(s3: S3, out: str) -> list[dict]:
    """OUT/data read back as a user would: pyarrow.dataset over an S3 filesystem."""
    return ds.dataset(f"{out}/data", filesystem=s3.fs, format="parquet").to_table().to_pylist()


def assert_exactly_once_s3(s3: S3, out: str, planted: dict[str, dict[str, str]], names: list[str]) -> list[dict]:
    rows = read_rows(s3, out)
    keys = [r["key"] for r in rows]
    dupes = [k for k, c in collections.Counter(keys).items() if c > 1]
    assert not dupes, f"duplicated keys: {dupes}"
    expected = {k: s for name in names for k, s in planted[name].items()}
    assert set(keys) == set(expected), f"missing {set(expected) - set(keys)}, extra {set(keys) - set(expected)}"
    for row in rows:
        allowed = {"ok", "flagged"} if expected[row["key"]] == "ok" else {expected[row["key"]]}
        assert row["status"] in allowed, f"{row['key']}: planted {expected[row['key']]}, got {row['status']}"
    return rows


def assert_no_chunks_left(s3: S3, bucket: str, prefix: str) -> None:
    left = [k for k in s3.objects(bucket, f"{prefix}/_progress/") if k.count("/") > prefix.count("/") + 2]
    assert not left, f"chunk objects left after finishing: {left}"


def assert_no_credentials(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert SECRET.encode() not in data, f"the secret key appears in {where}"
    assert ACCESS_KEY.encode() not in data, f"the access key id appears in {where}"


def data_versions(s3: S3, bucket: str, prefix: str) -> dict[str, tuple[str, object]]:
    return {k: (o["ETag"], o["LastModified"]) for k, o in s3.objects(bucket, f"{prefix}/data/").items()}


def row(key: str, shard: str, status: str, caption: str | None = None) -> dict:
    return {**dict.fromkeys(COLUMNS), "key": key, "shard": shard, "status": status, "caption_en": caption,
            "caption_flags": [], "frame_indices": []}


# ------------------------------------------------------------------------------------- without Ray


def test_output_store_commits_single_objects_on_s3(s3, s3_process_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the storage spec alone says where the store is
    store = OutputStore("s3://unit/out", StorageSpec(endpoint_url=s3.endpoint, region=REGION))
    assert not store.is_finished("00000") and store.chunk_paths("00000") == []
    assert store.read_bytes(store.path("_job.json")) is None

    first = store.commit_chunk("00000", [row("a", "00000", "ok", "first"), row("b", "00000", "ok")], attempt=1)
    store.commit_chunk("00000", [row("b", "00000", "ok", "again"), row("c", "00000", "error")], attempt=2)
    store.write_json(store.state_path("00000"), {"state": "running"})
    objects = s3.objects("unit", "out/")
    # exactly the committed objects: no temp objects, no renames, no directory markers
    chunk_keys = {k for k in objects if k.startswith("out/_progress/00000/chunk-")}
    assert set(objects) == chunk_keys | {"out/_progress/00000.json"} and len(chunk_keys) == 2
    assert all("-" not in objects[k]["ETag"] for k in chunk_keys), "a chunk was not written by one PutObject"
    assert first in store.chunk_paths("00000") and len(store.chunk_paths("00000")) == 2
    assert store.committed_keys("00000") == {"a", "b", "c"}

    counts = store.finalize_shard("00000", {b"test": b"meta"})
    assert dict(counts) == {"ok": 2, "error": 1}
    assert store.is_finished("00000") and store.chunk_paths("00000") == []
    assert not [k for k in s3.objects("unit", "out/_progress/00000/")], "chunks left after finalize"
    assert store.read_json(store.state_path("00000")) == {"state": "running"}, "finalize removed the state"
    table = pq.read_table("unit/out/data/00000.parquet", filesystem=s3.fs)
    assert dict(zip(table.column("key").to_pylist(), table.column("caption_en").to_pylist())) == {
        "a": "first", "b": None, "c": None}  # first commit wins
    assert table.schema.metadata[b"test"] == b"meta"

    store.commit_chunk("00000", [row("d", "00000", "ok")], attempt=3)  # e.g. from a zombie actor
    store.discard_leftover_chunks("00000")
    assert store.chunk_paths("00000") == [] and store.is_finished("00000")

    big = os.urandom(12 << 20)  # a large data file: one PutObject still (s3fs goes multipart past 100 MiB)
    store.write_atomic(store.path("big.bin"), big)
    assert store.read_bytes(store.path("big.bin")) == big
    assert "-" not in s3.objects("unit", "out/big.bin")["out/big.bin"]["ETag"]


def test_shard_reader_streams_from_s3(s3, s3_shards, s3_process_env, monkeypatch):
    src, _ = s3_shards
    local = list(ShardReader(str(src / "00000.tar")))
    assert list(ShardReader("s3://shards/panda/00000.tar")) == local

    # A shard whose first sample is followed by 48 MiB: reading that sample must not fetch the whole object.
    buf = io.BytesIO()
    with tarfile.open(src / "00000.tar") as tin, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tout:
        for member in tin.getmembers():
            tout.addfile(member, tin.extractfile(member))
        padding = tarfile.TarInfo("zzzzzzzzzzzzz.mp4")
        padding.size = 48 << 20
        tout.addfile(padding, io.BytesIO(bytes(padding.size)))
    s3.client.put_object(Bucket="shards", Key="big/00000.tar", Body=buf.getvalue())
    with CountingProxy(int(s3.endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        samples = iter(ShardReader("s3://shards/big/00000.tar"))
        assert next(samples) == local[0]
        samples.close()
        assert buf.tell() > 48 << 20 and proxy.bytes_from_server < 16 << 20, proxy.bytes_from_server

    with pytest.raises(ShardReadError) as missing:
        open_shard_stream("s3://shards/panda/99999.tar")
    assert "shards/panda/99999.tar" in str(missing.value)
    assert_no_credentials(str(missing.value), "the error for a missing shard")


class CountingProxy:
    """A TCP relay in front of the S3 server that counts the bytes the server sends."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.bytes_from_server = 0
        self._lock = threading.Lock()

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._relay, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, True), daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.bytes_from_server += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ------------------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def finished_run(s3, s3_shards, tiny_checkpoint, tmp_path_factory):
    """One job over s3://shards/panda/{00000..00002}.tar into s3://out/run; the endpoint and region come
    from the manifest's storage section, the credentials from the environment."""
    _, planted = s3_shards
    tmp = tmp_path_factory.mktemp("s3job")
    manifest = write_manifest(tmp / "job.yaml", shards="s3://shards/panda/{00000..00002}.tar",
                              output="s3://out/run", model=tiny_checkpoint,
                              storage={"endpoint_url": s3.endpoint, "region": REGION})
    proc = run_job([str(manifest)], job_env(s3, endpoint_from_env=False))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return planted, proc


@pytest.mark.slow
def test_job_reads_shards_from_and_writes_output_to_s3(s3, finished_run):
    planted, proc = finished_run
    rows = assert_exactly_once_s3(s3, "out/run", planted, ["00000", "00001", "00002"])
    assert any(r["status"] in ("ok", "flagged") and r["caption_en"] for r in rows)
    assert_no_chunks_left(s3, "out", "run")
    objects = s3.objects("out", "run/")
    assert {f"run/data/{n}.parquet" for n in ("00000", "00001", "00002")} <= set(objects)
    assert not [k for k in objects if ".tmp" in k], "temp objects on an object store"
    assert all("-" not in objects[f"run/data/{n}.parquet"]["ETag"] for n in ("00000", "00001", "00002"))
    job = json.loads(s3.client.get_object(Bucket="out", Key="run/_job.json")["Body"].read())
    recorded = job["manifest"]["storage"]
    assert {k: recorded[k] for k in ("endpoint_url", "region")} == {"endpoint_url": s3.endpoint, "region": REGION}
    meta = pq.read_schema("out/run/data/00000.parquet", filesystem=s3.fs).metadata
    assert meta[b"pllava_recaption.fingerprint"].decode() == job["fingerprint"]

    status = subprocess.run([sys.executable, "-m", "jobs.status", "s3://out/run", "--json"], cwd=REPO,
                            env=job_env(s3), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    report = json.loads(status.stdout)
    assert report["shards_by_state"] == {"done": 3} and report["output"] == "s3://out/run"
    assert sum(report["rows_by_status"].values()) == len(rows)


@pytest.mark.slow
def test_resume_from_s3_uses_committed_chunks_and_skips_finished_shards(s3, finished_run, tiny_checkpoint,
                                                                       s3_process_env, tmp_path):
    planted, _ = finished_run
    s3.copy_prefix("out", "run/", "resume/")
    before = data_versions(s3, "out", "resume")
    # an earlier attempt at 00003 committed a chunk before it died
    store = OutputStore("s3://out/resume")
    early = sorted(planted["00003"])[:2]
    store.commit_chunk("00003", [row(k, "00003", planted["00003"][k], "PRECOMMITTED") for k in early], attempt=1)
    manifest = write_manifest(tmp_path / "job.yaml", shards="s3://shards/panda/{00000..00003}.tar",
                              output="s3://out/resume", model=tiny_checkpoint)
    proc = run_job([str(manifest)], job_env(s3))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    after = data_versions(s3, "out", "resume")
    assert {k: v for k, v in after.items() if k in before} == before, "a finished shard was rewritten"
    rows = assert_exactly_once_s3(s3, "out/resume", planted, list(SHARDS))
    assert {r["key"] for r in rows if r["caption_en"] == "PRECOMMITTED"} == set(early)
    assert_no_chunks_left(s3, "out", "resume")
    assert_no_credentials(proc.stdout + proc.stderr, "the job's output")


@pytest.mark.slow
def test_retry_failed_from_s3_output(s3, finished_run, tiny_checkpoint, tmp_path):
    planted, _ = finished_run
    s3.copy_prefix("out", "run/", "retry/")
    for name in ("00000", "00001", "00002"):  # 00003 is not there yet
        s3.client.copy_object(Bucket="shards", Key=f"partial/{name}.tar",
                              CopySource={"Bucket": "shards", "Key": f"panda/{name}.tar"})
    manifest = write_manifest(tmp_path / "job.yaml", shards="s3://shards/partial/{00000..00003}.tar",
                              output="s3://out/retry", model=tiny_checkpoint, max_attempts=1)
    first = run_job([str(manifest)], job_env(s3))
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-5000:]
    assert "failed shard 00003" in log and "partial/00003.tar" in log
    state = json.loads(s3.client.get_object(Bucket="out", Key="retry/_progress/00003.json")["Body"].read())
    assert state["state"] == "failed" and state["attempts"] == 1
    assert_no_credentials(log, "the failing job's output")

    s3.client.copy_object(Bucket="shards", Key="partial/00003.tar",
                          CopySource={"Bucket": "shards", "Key": "panda/00003.tar"})
    before = data_versions(s3, "out", "retry")
    retry = run_job([str(manifest), "--retry-failed"], job_env(s3))
    assert retry.returncode == 0, (retry.stdout + retry.stderr)[-5000:]
    after = data_versions(s3, "out", "retry")
    assert {k: v for k, v in after.items() if k in before} == before
    assert_exactly_once_s3(s3, "out/retry", planted, list(SHARDS))
    assert_no_chunks_left(s3, "out", "retry")


@pytest.mark.slow
def test_credentials_are_written_and_logged_nowhere(s3, finished_run):
    _, proc = finished_run
    assert_no_credentials(proc.stdout + proc.stderr, "the job's output")
    objects = s3.objects("out")
    assert any(k.endswith(".parquet") for k in objects)
    for key in objects:
        data = s3.client.get_object(Bucket="out", Key=key)["Body"].read()
        assert_no_credentials(data, key)
        if key.endswith(".parquet"):  # values and metadata inside compressed pages, too
            table = pq.read_table(io.BytesIO(data))
            assert_no_credentials(repr(table.schema.metadata) + repr(table.to_pylist()), key)


def test_one_driver_per_s3_output_by_conditional_create(s3, s3_process_env):
    """The lease on an s3:// output is created with If-None-Match: a second driver is refused, and a
    conditional create of an existing object fails on the store itself (not by a check-then-write)."""
    from pipeline.lease import LEASE_FILE, LeaseHeld, acquire, read_lease

    store = OutputStore("s3://unit/leased")
    assert store.create_exclusive(store.path("_probe.json"), b"1")
    assert not store.create_exclusive(store.path("_probe.json"), b"2")
    assert s3.client.get_object(Bucket="unit", Key="leased/_probe.json")["Body"].read() == b"1"
    lease = acquire(store)
    try:
        with pytest.raises(LeaseHeld, match=r"in use by another driver: host .*, pid \d+"):
            acquire(OutputStore("s3://unit/leased"))
        assert read_lease(store)["token"] == lease.token
    finally:
        lease.release()
    assert "leased/" + LEASE_FILE not in s3.objects("unit", "leased/")
    acquire(store).release()


@pytest.mark.parametrize("late_reads_first", [True, False])
def test_two_racing_finalizers_first_complete_file_wins_on_s3(s3, s3_process_env, late_reads_first):
    """As the local test (tests/pipeline/test_writing.py): the data file is created with If-None-Match: *,
    so the first complete file wins and the late finalizer only adds a key it lacked."""
    from tests.pipeline.test_writing import check_race, race_finalizers

    prefix = f"s3://unit/race-{late_reads_first}"
    check_race(race_finalizers(lambda: OutputStore(prefix), late_reads_first), late_reads_first)


def test_status_reads_one_get_per_shard_and_planning_only_lists_on_s3(s3, s3_process_env):
    """Issue 16 on a real S3 server, requests counted in its log: `recaption status` reads each shard's record
    in one GET (pyarrow's input stream would HEAD first) and opens no data file; planning a finished output
    only lists."""
    from jobs.status import collect_status
    from pipeline.progress import plan_shards
    from tests.jobs.test_output_view import write_finished_shards

    store = OutputStore("s3://unit/many")
    names = [f"{i:05d}" for i in range(12)]
    write_finished_shards(store, names)

    before = len(settled_requests(s3.log))
    report = collect_status(OutputStore("s3://unit/many"))
    status = collections.Counter(settled_requests(s3.log)[before:])
    assert report["shards_by_state"] == {"done": 12}
    assert sum(report["rows_by_status"].values()) == 36
    assert status["HEAD"] == 0 and status["LIST"] <= 3, status
    assert status["GET"] <= len(names) + 3, status  # the records; _shards.json, _job.json, the lease

    before = len(settled_requests(s3.log))
    plan = plan_shards(OutputStore("s3://unit/many"), [(n, f"/shards/{n}.tar") for n in names], retry_failed=False)
    requests = collections.Counter(settled_requests(s3.log)[before:])
    assert plan.done == names and not plan.to_run
    assert set(requests) == {"LIST"} and requests["LIST"] <= 3, requests
