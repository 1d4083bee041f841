"""The Ray job end to end: real `ray start`, `ray job submit`, real shards, Parquet read back."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.jobs.conftest import (
    REPO,
    VENV_BIN,
    assert_exactly_once,
    base_env,
    read_output,
    run_job,
    running_with_a_chunk,
    shard_state,
    submit_job,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.slow


def test_ray_job_submit_demo_manifest(ray_cluster, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    proc = submit_job(["--address", ray_cluster["dashboard"], "--working-dir", ".",
                       "--", "python", "-m", "jobs.recaption", "manifests/demo.yaml",
                       "--shards", f"{shard_dir}/{{00000..00001}}.tar", "--output", str(out),
                       "--model", str(tiny_checkpoint)], ray_cluster["env"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log)
    assert job_id, log[-3000:]
    status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", ray_cluster["dashboard"],
                             job_id.group(1)], env=ray_cluster["env"], capture_output=True, text=True, timeout=120)
    assert f"Job '{job_id.group(1)}' succeeded" in status.stdout + status.stderr  # ray's wording of SUCCEEDED
    # the job ran the code uploaded with --working-dir, not a copy installed elsewhere
    assert "working_dir_files" in log and "code from" in log, log[-3000:]
    assert_exactly_once(out, planted, ["00000", "00001"])
    rows = read_output(out).to_pylist()
    captioned = [r for r in rows if r["status"] in ("ok", "flagged")]
    assert captioned and all(r["caption_en"] is not None and r["caption_zh"] is not None for r in captioned)
    assert all(r["error"] for r in rows if r["status"] in ("source_failed", "decode_error"))
    meta = pq.read_schema(out / "data/00000.parquet").metadata
    assert json.loads(meta[b"pllava_recaption.config"])["manifest"]["model"]["lora_alpha"] == 4.0
    job = json.loads((out / "_job.json").read_text())
    assert meta[b"pllava_recaption.fingerprint"].decode() == job["fingerprint"]


def test_ray_job_submit_needs_the_token(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", ray_cluster["dashboard"]],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()


def test_kill_worker_mid_shard_loses_and_duplicates_nothing(ray_cluster, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00001}}.tar", output=out,
                              model=tiny_checkpoint, chunk_size=1, generation={"batch_size": 1,
                                                                               "max_new_tokens": 24},
                              resources={"actors": 1, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        shard, pid = wait_for(lambda: running_with_a_chunk(out, ["00000", "00001"]), 300,
                              "a running shard with a committed chunk")
        os.kill(pid, signal.SIGKILL)
        log, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, log[-5000:]
    state = shard_state(out, shard)
    assert state["state"] == "done" and state["attempts"] == 2, state
    assert "actor died" in state["errors"][0]["reason"]
    assert_exactly_once(out, planted, ["00000", "00001"])


def test_kill_driver_then_rerun_skips_finished_shards(ray_cluster, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    names = ["00000", "00001", "00002", "00003"]
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00003}}.tar", output=out,
                              model=tiny_checkpoint, resources={"actors": 1, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list((out / "data").glob("*.parquet")), 300, "a first finished shard")
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    assert 0 < len(finished) < len(names)
    rerun = run_job([str(manifest)], env)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    for name, mtime in finished.items():
        assert (out / "data" / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert_exactly_once(out, planted, names)
    assert not [p for p in (out / "_progress").iterdir() if p.is_dir()], "chunk dirs left after finishing"


def test_unreadable_shard_fails_then_retry_failed_after_repair(tiny_checkpoint, shards, tmp_path):
    """Embedded local Ray (no RAY_ADDRESS): a 0-byte shard (a cut download) is never `done`: it fails, the rest
    finish, and --retry-failed runs it once the file is replaced. (A missing file is refused before any work:
    tests/jobs/test_driver.py.)"""
    shard_dir, planted = shards
    out = tmp_path / "out"
    hidden = tmp_path / "00002.tar.away"
    shutil.move(shard_dir / "00002.tar", hidden)
    (shard_dir / "00002.tar").write_bytes(b"")
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00002}}.tar", output=out,
                              model=tiny_checkpoint, max_attempts=2)
    first = run_job([str(manifest)], base_env())
    log = first.stdout + first.stderr
    assert first.returncode == 1, log[-5000:]
    assert "failed shard 00002" in log and "--retry-failed" in log
    state = shard_state(out, "00002")
    assert state["state"] == "failed" and state["attempts"] == 2 and len(state["errors"]) == 2
    assert "incomplete: shard is empty (0 bytes)" in state["errors"][-1]["reason"], state
    assert_exactly_once(out, planted, ["00000", "00001"])
    status = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    report = json.loads(status.stdout)
    assert report["shards_by_state"] == {"done": 2, "failed": 1}
    assert "00002" in report["failed"]

    plain = run_job([str(manifest)], base_env())  # a plain rerun leaves the failed shard alone
    assert plain.returncode == 1 and not (out / "data/00002.parquet").exists()

    shutil.move(hidden, shard_dir / "00002.tar")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    retry = run_job([str(manifest), "--retry-failed"], base_env())
    assert retry.returncode == 0, (retry.stdout + retry.stderr)[-5000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet") if p.name in before} == before
    assert_exactly_once(out, planted, ["00000", "00001", "00002"])


def test_fingerprint_mismatch_and_bad_manifest_are_refused(tiny_checkpoint, shards, tmp_path):
    shard_dir, _ = shards
    out = tmp_path / "out"
    out.mkdir()
    first = write_manifest(tmp_path / "a.yaml", shards=f"{shard_dir}/00000.tar", output=out, model=tiny_checkpoint)
    from pipeline.manifest import load_manifest
    from pipeline.progress import describe_job_model, ensure_job, job_identity
    from pipeline.writing import OutputStore

    m = load_manifest(first)
    ensure_job(OutputStore(str(out)), m, job_identity(m, describe_job_model(m)))
    changed = tmp_path / "b.yaml"
    changed.write_text(first.read_text().replace("lora_alpha: 4", "lora_alpha: 8"))
    proc = run_job([str(changed)], base_env())
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr and "lora_alpha: output has 4.0, manifest has 8.0" in proc.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text(first.read_text().replace("chunk_size: 2", "chunk_size: many"))
    proc = run_job([str(bad)], base_env())
    assert proc.returncode == 2
    assert f"{bad}: field 'chunk_size' must be an integer" in proc.stderr


def test_a_stalled_shard_is_stopped_by_the_watchdog(tiny_checkpoint, shards, tmp_path):
    """A server that trickles one byte a second never trips a socket timeout; the driver's watchdog
    (1.5 × shard_timeout_s + 60 s) kills the stuck actor and the shard fails with the reason."""
    import http.server
    import threading

    shard_dir, _ = shards
    data = (shard_dir / "00000.tar").read_bytes()
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:1024])
            for byte in data[1024:]:
                if stop.wait(1.0):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "out"
        manifest = write_manifest(tmp_path / "job.yaml", shards=f"http://127.0.0.1:{server.server_port}/00000.tar",
                                  output=out, model=tiny_checkpoint, max_attempts=1, shard_timeout_s=0.5)
        proc = run_job([str(manifest)], base_env(), timeout=300)
    finally:
        stop.set()
        server.shutdown()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    state = shard_state(out, "00000")
    assert state["state"] == "failed" and "watchdog" in state["errors"][-1]["reason"], state
