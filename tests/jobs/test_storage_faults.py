"""A storage fault of the output is not a shard's fault: the job stops once, cleanly, with one line and exit 4,
and a plain rerun after the fix resumes exactly once.

A real job on a real Ray cluster writing to a small tmpfs that fills up mid-job; an S3 output (moto, with its IAM
checks on) whose bucket refuses the writes under a prefix."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
import pytest
import requests

from jobs.recaption import EXIT_STORAGE
from jobs.status import collect_status
from pipeline.progress import write_state
from pipeline.writing import COLUMNS, OutputStorageError, OutputStore
from tests.jobs.conftest import (
    REPO,
    assert_exactly_once,
    base_env,
    run_job,
    shard_state,
    wait_for,
    write_manifest,
)
from tests.moto_server import moto_server
from tests.tmpfs import fill, small_tmpfs

NAMES = ["00000", "00001", "00002", "00003"]


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-5000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _temp_files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_a_full_disk_stops_the_job_once_and_a_plain_rerun_resumes_exactly_once(ray_cluster, tiny_checkpoint, shards,
                                                                               tmp_path):
    shard_dir, planted = shards
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        out = disk / "out"
        manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00003}}.tar", output=out,
                                  model=tiny_checkpoint, resources={"actors": 1, "num_cpus_per_actor": 1})
        env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
        stdout, stderr = (tmp_path / "driver.out").open("w+"), (tmp_path / "driver.err").open("w+")
        driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                                  stdout=stdout, stderr=stderr, text=True)
        try:
            wait_for(lambda: list(out.glob("_progress/*/chunk-*.parquet")), 300, "a first committed chunk")
            ballast = fill(disk)  # the disk is full from here on
            committed = sorted(out.glob("_progress/*/chunk-*.parquet"))
            driver.wait(timeout=300)
        finally:
            driver.kill()
        stderr.seek(0)
        log = stderr.read()
        assert driver.returncode == EXIT_STORAGE, log[-5000:]
        [line] = _error_lines(log)
        assert line.startswith(f"error: output storage: cannot write {out}/"), line
        assert "No space left on device (ENOSPC)" in line and "rerun the same command" in line, line

        # committed chunks intact, nothing marked failed or charged, no temp file, the lease released
        for chunk in committed:
            assert chunk.exists() or (out / "data" / f"{chunk.parent.name}.parquet").exists(), chunk
        report = collect_status(OutputStore(str(out)), NAMES)
        states = {name: info["state"] for name, info in report["shards"].items()}
        assert "failed" not in states.values() and "interrupted" in states.values(), states
        for name in NAMES:
            record = shard_state(out, name) or {}
            assert not record.get("errors") and record.get("attempts", 1) == 1, record
        assert _temp_files(disk) == [] and not (out / "_lease.json").exists()

        ballast.unlink()
        rerun = run_job([str(manifest)], env)  # a plain rerun: no --retry-failed
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
        assert_exactly_once(out, planted, NAMES)
        for name in NAMES:
            record = shard_state(out, name)
            assert record["state"] == "done" and record["attempts"] == 1 and not record["errors"], record
        assert _temp_files(disk) == []
        assert not [p for p in (out / "_progress").iterdir() if p.is_dir()], "chunk dirs left after finishing"


# ---- S3: a bucket that refuses writes


@pytest.fixture(scope="module")
def guarded_s3(tmp_path_factory):
    """A moto server with a bucket `out` and an IAM user whose policy refuses writes under `out/refused/data/`,
    `out/refused/_progress/00001/` and all of `out/readonly/`; its IAM checks are turned on after the set-up."""
    log_dir = tmp_path_factory.mktemp("moto")
    with moto_server(log_dir) as port:
        endpoint = f"http://127.0.0.1:{port}"
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIAADMINTEST00000",
                     aws_secret_access_key="admin")
        boto3.client("s3", **admin).create_bucket(Bucket="out")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="job")
        key = iam.create_access_key(UserName="job")["AccessKey"]
        # moto names the steps of a multipart upload by their API name, AWS folds them into s3:PutObject
        writes = ["s3:PutObject", "s3:CreateMultipartUpload", "s3:UploadPart", "s3:CompleteMultipartUpload"]
        refused = ["arn:aws:s3:::out/refused/data/*", "arn:aws:s3:::out/refused/_progress/00001/*",
                   "arn:aws:s3:::out/readonly/*"]
        iam.put_user_policy(UserName="job", PolicyName="refuse-writes", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                          {"Effect": "Deny", "Action": writes, "Resource": refused}]}))
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()  # checks on
        env = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
                   AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        yield {"endpoint": endpoint, "env": env}


def _rows(shard: str, keys: list[str]) -> list[dict]:
    return [{**dict.fromkeys(COLUMNS), "key": k, "shard": shard, "status": "ok", "caption_flags": [],
             "frame_indices": []} for k in keys]


def test_a_bucket_refusing_writes_is_a_storage_fault_naming_the_object(guarded_s3, monkeypatch):
    for var, value in guarded_s3["env"].items():
        if var.startswith("AWS_"):
            monkeypatch.setenv(var, value)
    store = OutputStore("s3://out/refused")
    store.commit_chunk("00000", _rows("00000", ["a", "b"]), attempt=1)  # allowed: chunks and records
    write_state(store, "00000", state="running", attempts=1)

    # the data file: the conditional create
    with pytest.raises(OutputStorageError) as data:
        store.finalize_shard("00000", {})
    assert (data.value.path, data.value.cause) == ("s3://out/refused/data/00000.parquet", "AccessDenied: Access Denied")
    assert store.committed_keys("00000") == {"a", "b"} and not store.is_finished("00000")
    # a chunk: a plain PUT
    with pytest.raises(OutputStorageError, match=r"cannot write s3://out/refused/_progress/00001/chunk-001-\w+\.parquet: "
                                                 r"AccessDenied: Access Denied"):
        store.commit_chunk("00001", _rows("00001", ["c"]), attempt=1)
    assert store.chunk_paths("00001") == []

    reset_auth = f"{guarded_s3['endpoint']}/moto-api/reset-auth"
    requests.post(reset_auth, data=b"inf", timeout=30).raise_for_status()  # the refusal lifted
    try:
        assert dict(store.finalize_shard("00000", {})) == {"ok": 2}
        assert store.read_table(store.data_path("00000"), columns=["key"]).column("key").to_pylist() == ["a", "b"]
    finally:
        requests.post(reset_auth, data=b"0", timeout=30).raise_for_status()


def test_a_driver_whose_output_bucket_refuses_writes_ends_with_one_line_and_exit_4(guarded_s3, tiny_checkpoint,
                                                                                 shards, tmp_path):
    shard_dir, _ = shards
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/00000.tar", output="s3://out/readonly",
                              model=tiny_checkpoint)
    proc = run_job([str(manifest)], guarded_s3["env"], timeout=300)
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-5000:]
    [line] = _error_lines(proc.stderr)
    assert line.startswith("error: output storage: cannot write s3://out/readonly/"), line
    assert "AccessDenied: Access Denied" in line, line


def test_status_on_an_output_it_cannot_read_is_one_line(guarded_s3):
    """`recaption status` with credentials the store refuses: one line naming the object, exit 4, no traceback."""
    env = {**guarded_s3["env"], "AWS_ACCESS_KEY_ID": "AKIANOSUCHUSER000000"}
    proc = subprocess.run([sys.executable, "-m", "jobs.status", "s3://out/refused"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
    [line] = _error_lines(proc.stderr)
    assert line.startswith("error: output storage: cannot read s3://out/refused/"), line
