"""Keys unique across the whole output, through the real job: a shard copied under another name and run with
the others (re-sharded, re-downloaded or merged datasets), a worker killed with kill -9 mid-run, the job
finished by its retries: every key is captioned once over the output and its other row says `duplicate`;
`recaption status` and the dataset card count them; `duplicate_keys: refuse` stops the job at preflight."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.jobs.conftest import (
    REPO,
    read_output,
    run_job,
    running_with_a_chunk,
    shard_state,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.slow


def test_a_copied_shard_is_captioned_once_over_the_output_under_kill_9(ray_cluster, tiny_checkpoint, shards,
                                                                       tmp_path):
    shard_dir, planted = shards
    shutil.copy(shard_dir / "00000.tar", shard_dir / "00000-copy.tar")
    names = ["00000", "00000-copy", "00001"]
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=[str(shard_dir / f"{n}.tar") for n in names],
                              output=out, model=tiny_checkpoint, chunk_size=1,
                              generation={"batch_size": 1, "max_new_tokens": 16},
                              resources={"actors": 2, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def started():
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            return running_with_a_chunk(out, ["00000", "00000-copy"])

        shard, pid = wait_for(started, 300, "a running shard with a committed chunk")
        os.kill(pid, signal.SIGKILL)
        log, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, log[-5000:]
    assert shard_state(out, shard)["attempts"] == 2

    rows = read_output(out).to_pylist()
    expected = {**planted["00000"], **planted["00001"]}
    kept = [r for r in rows if r["status"] != "duplicate"]
    counts = collections.Counter(r["key"] for r in kept)
    assert set(counts) == set(expected) and max(counts.values()) == 1, counts
    for row in kept:
        allowed = {"ok", "flagged"} if expected[row["key"]] == "ok" else {expected[row["key"]]}
        assert row["status"] in allowed, row
    holder = {r["key"]: r["shard"] for r in kept}
    dupes = [r for r in rows if r["status"] == "duplicate"]
    assert sorted(r["key"] for r in dupes) == sorted(planted["00000"])  # the copy's other half, nothing else
    for row in dupes:
        assert row["shard"] in ("00000", "00000-copy") and row["shard"] != holder[row["key"]]
        assert row["error"] == f"duplicate key: already in shard {holder[row['key']]}"

    status = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    report = json.loads(status.stdout)
    assert report["rows_by_status"]["duplicate"] == len(planted["00000"])
    text = subprocess.run([sys.executable, "-m", "jobs.status", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120).stdout
    assert f"dupes:  {len(planted['00000'])} rows are keys another shard" in text, text
    card = (out / "README.md").read_text()
    assert f"Of these, {len(planted['00000'])} have status `duplicate`" in card
    assert f"Rows with distinct keys: {len(expected)}" in card

    # The same command again: nothing to do, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    rerun = run_job([str(manifest)], env)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}


def test_refuse_policy_stops_the_job_before_any_work(tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    shutil.copy(shard_dir / "00001.tar", shard_dir / "renamed.tar")
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=[f"{shard_dir}/{{00000..00001}}.tar", f"{shard_dir}/renamed.tar"],
                              output=out, model=tiny_checkpoint, duplicate_keys="refuse")
    result = run_job([str(manifest)], {**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "keys appear in more than one shard" in lines[0] and "00001, renamed" in lines[0], \
        result.stderr
    assert not out.exists(), "a refused job wrote to its output"
