"""`recaption run MANIFEST --redo flagged`: only the rows with those statuses are captioned again, every other
row stays as it was, and a kill -9 in the middle of a redo followed by a rerun loses and duplicates nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pyarrow.parquet as pq

from tests.jobs.conftest import REPO, assert_exactly_once, run_job, shard_state, wait_for, write_manifest

NAMES = ["00000", "00001"]


def _rows(out):
    return {r["key"]: r for name in NAMES for r in pq.read_table(out / "data" / f"{name}.parquet").to_pylist()}


def test_redo_flagged_rows_only_survives_kill_9_and_leaves_other_rows_alone(ray_cluster, tiny_checkpoint, shards,
                                                                             tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    spec = {"shards": f"{shard_dir}/{{00000..00001}}.tar", "output": out, "model": tiny_checkpoint,
            "resources": {"actors": 1, "num_cpus_per_actor": 1}, "chunk_size": 1}
    first = write_manifest(tmp_path / "first.yaml", quality={"repair_attempts": 0}, **spec)
    proc = run_job([str(first)], env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    before = _rows(out)
    flagged = {k for k, r in before.items() if r["status"] == "flagged"}
    assert flagged and len(flagged) < len(before), {k: r["status"] for k, r in before.items()}

    status = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert json.loads(status.stdout)["redo_rows"]["flagged"] == len(flagged)

    # The same job with repairs on (not part of the fingerprint): redo the flagged rows, killed mid-way.
    redo = write_manifest(tmp_path / "redo.yaml", quality={"repair_attempts": 1}, **spec)
    driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(redo), "--redo", "flagged"], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list((out / "_progress").glob("*/chunk-*.parquet")), 300, "a committed redo chunk",
                 interval=0.01)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    mid = [n for n in NAMES if list((out / "_progress" / n).glob("chunk-*.parquet"))]
    assert mid and all((shard_state(out, n) or {}).get("redo") == ["flagged"] for n in mid), "not killed mid-redo"
    assert_exactly_once(out, planted, NAMES)  # the data files are whole while a redo runs

    rerun = run_job([str(redo), "--redo", "flagged"], env)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    after = _rows(out)
    assert_exactly_once(out, planted, NAMES)
    assert not [p for p in (out / "_progress").iterdir() if p.is_dir()], "chunk dirs left after the redo"
    for key, row in after.items():
        if key in flagged:  # captioned again: the same (greedy) first attempt, then its repair
            assert row["attempts"] == 2 and row["first_flags"] == before[key]["caption_flags"], (key, row)
        else:
            assert row == before[key], key  # untouched, value for value
    for name in NAMES:
        state = shard_state(out, name)
        assert state["state"] == "done" and state["redo"] is None
        file_counts = {}
        for r in after.values():
            if r["shard"] == name:
                file_counts[r["status"]] = file_counts.get(r["status"], 0) + 1
        assert state["rows"] == file_counts == state["committed"]
