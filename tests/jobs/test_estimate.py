"""`recaption estimate`: one actor measures a sample through the real path, nothing is written, and the
projection follows from the measured rate and the counted clips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.jobs.conftest import REPO, write_manifest


def test_estimate_measures_a_sample_and_writes_nothing(ray_cluster, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00003}}.tar", output=out,
                              model=tiny_checkpoint, resources={"actors": 2, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "estimate", str(manifest), "--sample", "6", "--json",
                           "--gpu-hour-price", "2.5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    e = json.loads(proc.stdout)
    assert not out.exists()  # nothing written into the output
    assert e["job"] == {"clips": sum(len(v) for v in planted.values()), "how": "counted", "shards": 4, "actors": 2,
                        "cluster_gpus": 0.0}
    me = e["measured"]
    assert me["clips"] == 6 and e["sample"] == {"clips": 6, "shards": 4, "of_shards": 4}
    assert me["clips_per_s"] > 0 and sum(me["status_share"].values()) == pytest.approx(1.0)
    pr = e["projection"]
    assert pr["actor_hours"] == pytest.approx(e["job"]["clips"] / me["clips_per_s"] / 3600)
    assert pr["wall_hours"] == pytest.approx(pr["actor_hours"] / 2) and pr["cost"] is None  # no GPU: no GPU cost
    text = subprocess.run([sys.executable, "-m", "jobs.estimate", str(manifest), "--sample", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert text.returncode == 0 and "clips/s per actor" in text.stdout and "(counted)" in text.stdout, text.stderr
    bad = subprocess.run([sys.executable, "-m", "jobs.estimate", str(manifest), "--model", str(tmp_path / "nope")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "model.path" in bad.stderr
