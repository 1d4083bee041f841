"""The driver's guard rails: setup mistakes fail fast (exit 2), one driver per output, Ctrl-C / SIGTERM stop
cleanly and resume, cut streams are resumed or never `done`, and `recaption status` tells the truth mid-job."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs.conftest import (
    REPO,
    assert_exactly_once,
    base_env,
    run_job,
    shard_state,
    wait_for,
    write_manifest,
)

pytestmark = pytest.mark.slow


def _manifest(path, shards, output, checkpoint, **changes):
    """write_manifest, then nested changes: {"model": {"device": "cuda"}} changes only model.device."""
    import yaml

    write_manifest(path, shards=shards, output=output, model=checkpoint)
    spec = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_setup_mistakes_fail_fast_with_one_line(tiny_checkpoint, shards, tmp_path):
    shard_dir, _ = shards
    out = tmp_path / "out"
    cases = {
        "missing shard": ({"shards": f"{shard_dir}/{{00000..00009}}.tar"}, "6 of 10 local shards do not exist"),
        "directory": ({"shards": str(shard_dir)}, "is a directory"),
        "glob matching nothing": ({"shards": f"{shard_dir}/*.tgz"}, "brace range"),
        "missing model": ({"model": {"path": str(tmp_path / "nope")}}, "model.path"),
        "model is a file": ({"model": {"path": str(shard_dir / "00000.tar")}}, "model.path"),
        "bad device": ({"model": {"device": "tpu"}}, "model.device"),
        "missing score model": ({"score": {"model": str(tmp_path / "no-clip")}}, "score.model"),
        "score model not CLIP": ({"score": {"model": str(tiny_checkpoint)}}, "not a CLIP checkpoint"),
    }
    for what, (overrides, expected) in cases.items():
        overrides = dict(overrides)
        manifest = _manifest(tmp_path / "job.yaml", overrides.pop("shards", f"{shard_dir}/00000.tar"), out,
                             tiny_checkpoint, **overrides)
        proc = run_job([str(manifest)], base_env(), timeout=120)
        assert proc.returncode == 2, (what, proc.stderr[-3000:])
        assert expected in _one_error_line(proc), (what, proc.stderr[-2000:])
        assert not out.exists(), f"{what}: the output was created before the mistake was found"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/00000.tar", output=out, model=tiny_checkpoint)
    for flags, expected in ((["--actors", "0"], "--actors: must be >= 1"), (["--shards", ","], "names no shard")):
        proc = run_job([str(manifest), *flags], base_env(), timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr, (flags, proc.stderr[-2000:])
    # a quoted glob that matches is expanded (here: just shard 00000 and 00001)
    globbed = write_manifest(tmp_path / "glob.yaml", shards=f"{shard_dir}/0000[01].tar", output=out,
                             model=tiny_checkpoint)
    from pipeline.manifest import load_manifest
    from pipeline.preflight import check_shards

    assert [n for n, _ in check_shards(load_manifest(globbed).shards)] == ["00000", "00001"]


def test_cuda_on_a_cluster_without_gpus_and_a_model_that_cannot_load_end_the_job(ray_cluster, tiny_checkpoint,
                                                                                 shards, tmp_path):
    shard_dir, _ = shards
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00003}}.tar", output=out,
                              model=tiny_checkpoint)
    manifest.write_text(manifest.read_text().replace("device: cpu", "device: cuda"))
    assert "device: cuda" in manifest.read_text()
    proc = run_job([str(manifest)], env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the Ray cluster has no GPUs" in _one_error_line(proc)
    assert not list((out / "_progress").glob("*.json")), "shards were charged for a setup mistake"

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_checkpoint, broken)
    weights = sorted(broken.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:100])  # the loader cannot read it; its hash is still a hash
    out2 = tmp_path / "out2"
    manifest = write_manifest(tmp_path / "job2.yaml", shards=f"{shard_dir}/{{00000..00003}}.tar", output=out2,
                              model=broken)
    t0 = time.time()
    proc = run_job([str(manifest)], env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "could not load the model" in _one_error_line(proc)
    assert not [p for p in (out2 / "_progress").glob("*.json") if json.loads(p.read_text())["state"] == "failed"]
    assert time.time() - t0 < 200


def _cutting_server(data: bytes, cut_first: int | None):
    """Serves `data` at any path; the first `cut_first` answers stop halfway (None: every answer does)."""
    answered = {"n": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's name
            answered["n"] += 1
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Connection", "close")
            self.end_headers()
            body = data[start:]
            if cut_first is None:  # always ends at the same byte, wherever the request starts
                body = data[start: max(start, len(data) // 2)]
            elif answered["n"] <= cut_first:
                body = body[: len(body) // 2]
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, answered


def test_cut_http_streams_are_resumed_or_the_shard_is_never_done(tiny_checkpoint, shards, tmp_path):
    """Embedded local Ray. A body cut twice is resumed within the attempt; a body that is always cut leaves
    the shard failed with the reason (never `done`), and --retry-failed finishes it once the server is fixed."""
    shard_dir, planted = shards
    data = (shard_dir / "00000.tar").read_bytes()
    flaky, flaky_hits = _cutting_server(data, cut_first=2)
    broken, _ = _cutting_server(data, cut_first=None)
    try:
        out = tmp_path / "out"
        shard_list = [f"http://127.0.0.1:{flaky.server_port}/00000.tar",
                      f"http://127.0.0.1:{broken.server_port}/00001.tar"]
        manifest = write_manifest(tmp_path / "job.yaml", shards=shard_list, output=out, model=tiny_checkpoint,
                                  max_attempts=2)
        first = run_job([str(manifest)], base_env())
        assert first.returncode == 1, (first.stdout + first.stderr)[-5000:]
        assert (out / "data/00000.parquet").exists() and flaky_hits["n"] >= 3
        state = shard_state(out, "00001")
        assert state["state"] == "failed" and "incomplete" in state["errors"][-1]["reason"], state
        assert not (out / "data/00001.parquet").exists()
        status = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        report = json.loads(status.stdout)
        assert report["shards_by_state"] == {"done": 1, "failed": 1}
        assert "incomplete" in report["failed"]["00001"]
        # what was read of the cut shard is committed, and counted
        assert sum(report["shards"]["00001"].get("rows", {}).values()) > 0

        plain = run_job([str(manifest)], base_env())  # a plain rerun leaves it failed, and says so
        assert plain.returncode == 1 and not (out / "data/00001.parquet").exists()
        fixed = [shard_list[0], f"http://127.0.0.1:{flaky.server_port}/00001.tar"]
        flaky_hits["n"] = 10  # no more cuts
        manifest = write_manifest(tmp_path / "job.yaml", shards=fixed, output=out, model=tiny_checkpoint,
                                  max_attempts=2)
        retry = run_job([str(manifest), "--retry-failed"], base_env())
        assert retry.returncode == 0, (retry.stdout + retry.stderr)[-5000:]
    finally:
        flaky.shutdown()
        broken.shutdown()
    # shard 00001 was served from 00000's bytes: both hold 00000's keys, each exactly once per shard
    import pyarrow.parquet as pq

    for name in ("00000", "00001"):
        keys = pq.read_table(out / f"data/{name}.parquet").column("key").to_pylist()
        assert sorted(keys) == sorted(planted["00000"]) and len(set(keys)) == len(keys)


def test_one_driver_per_output_and_signals_stop_cleanly(ray_cluster, tiny_checkpoint, tmp_path):
    from jobs.status import collect_status
    from pipeline.synthetic import write_synthetic_shards
    from pipeline.writing import OutputStore

    # enough work (8 shards, one actor, one clip per chunk) that both signals land with shards unfinished
    shard_dir = tmp_path / "shards"
    planted = write_synthetic_shards(shard_dir, shards=8, clips_per_shard=4, failed=1, corrupt=0, seed=11)
    names = sorted(planted)
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00007}}.tar", output=out,
                              model=tiny_checkpoint, chunk_size=1,
                              generation={"batch_size": 1, "max_new_tokens": 64}, zh={"max_new_tokens": 64},
                              resources={"actors": 1, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}

    def committed_since(t0: float) -> bool:
        return any(p.stat().st_mtime > t0 for p in (out / "_progress").glob("*/chunk-*.parquet"))

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        t0 = time.time()
        driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda t0=t0: committed_since(t0), 300, "a chunk committed by this run")
            status = collect_status(OutputStore(str(out)))
            assert status["driver"]["pid"] == driver.pid
            running = [n for n, i in status["shards"].items() if i["state"] == "running"]
            assert running and sum(sum(status["shards"][n].get("rows", {}).values()) for n in running) > 0
            if sig == signal.SIGINT:  # a second driver on the same output is refused, naming the first
                second = run_job([str(manifest)], env, timeout=120)
                assert second.returncode == 2, second.stderr[-3000:]
                line = _one_error_line(second)
                assert "in use by another driver: host " in line and f"pid {driver.pid}" in line, line
            driver.send_signal(sig)
            stdout, stderr = driver.communicate(timeout=120)
        finally:
            driver.kill()
        assert driver.returncode == code, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        status = json.loads(subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO,
                                           capture_output=True, text=True, timeout=120).stdout)
        assert status["driver"] is None and "running" not in status["shards_by_state"], status["shards_by_state"]
        unfinished = status["shards_by_state"].get("interrupted", 0) + status["shards_by_state"].get("pending", 0)
        assert f"interrupted: {unfinished} shards unfinished; rerun the same command to resume" in stderr, (
            status, stderr[-2000:])
        assert unfinished > 0
    rerun = run_job([str(manifest)], env)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    assert_exactly_once(out, planted, names)
    status = json.loads(subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], cwd=REPO,
                                       capture_output=True, text=True, timeout=120).stdout)
    assert status["shards_by_state"] == {"done": 8}


def test_status_counts_active_time_latest_list_and_interrupted_shards(tmp_path):
    from jobs.status import collect_status
    from pipeline.progress import write_shard_list, write_state
    from pipeline.writing import COLUMNS, OutputStore

    def rows(prefix, n):
        return [{**dict.fromkeys(COLUMNS), "key": f"{prefix}{i}", "status": "ok", "caption_flags": []}
                for i in range(n)]

    store = OutputStore(str(tmp_path))
    now = time.time()
    # shard a: done yesterday in 100 s with 50 rows; shard b: 10 rows committed in the last 10 s, driver gone
    store.commit_chunk("a", rows("a", 50), attempt=1)
    store.finalize_shard("a", {})
    write_state(store, "a", state="done", started_at=now - 86400, rows={"ok": 50})
    state = json.loads((tmp_path / "_progress/a.json").read_text())
    state["updated_at"] = state["finished_at"] = now - 86400 + 100
    (tmp_path / "_progress/a.json").write_text(json.dumps(state))
    store.commit_chunk("b", rows("b", 10), attempt=1)
    write_state(store, "b", state="running", started_at=now - 10)
    write_state(store, "old", state="failed", errors=[{"attempt": 1, "reason": "typo", "at": now}])
    write_shard_list(store, [("a", "/x/a.tar"), ("b", "/x/b.tar"), ("c", "/x/c.tar")])
    report = collect_status(store)
    assert report["shards_by_state"] == {"done": 1, "interrupted": 1, "pending": 1}
    assert report["rows_by_status"] == {"ok": 60}
    assert report["not_in_latest_list"] == ["old"] and "old" not in report["failed"]
    tp = report["throughput"]
    assert tp["active_s"] == pytest.approx(110, abs=2)  # not the day between the two runs
    assert tp["clips_per_s"] == pytest.approx(60 / 110, rel=0.05)
    assert tp["eta_s"] == pytest.approx(2 * 110, rel=0.05)  # 2 shards left, 1 finished in 110 s of activity


class StartingDriver:
    """`python -m jobs.recaption` on an embedded local Ray, its log in files, and every process it started (its
    Ray's GCS, raylet, agents, workers), noted while it runs so that they can be checked gone after it exits."""

    def __init__(self, manifest: Path, env: dict[str, str], logs: Path):
        self.out_log, self.err_log = logs / "stdout.log", logs / "stderr.log"
        with open(self.out_log, "w") as out, open(self.err_log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                                         stdout=out, stderr=err)
        self.started: dict[int, psutil.Process] = {}

    def note_children(self) -> list[str]:
        """Note the driver's descendants; return their command lines."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.started.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        lines = []
        for p in list(self.started.values()):
            try:
                lines.append(" ".join(p.cmdline()))
            except psutil.Error:
                pass
        return lines

    def wait(self, timeout: float) -> int:
        """Wait for the driver to exit, noting the processes it starts on the way (ray.init goes on starting
        them after a held signal)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.note_children()
            time.sleep(0.01)
        return self.proc.wait(timeout=1)

    def left_behind(self, timeout: float) -> list[str]:
        """Its processes still alive `timeout` s after it exited (Ray's shutdown stops them in the meantime)."""
        _, alive = psutil.wait_procs(list(self.started.values()), timeout=timeout)
        left = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        return left

    def stop(self) -> None:
        """Kill the driver and whatever it started that is still there (only those: never another Ray)."""
        if self.proc.poll() is None:
            self.note_children()
            self.proc.kill()
        self.proc.wait(timeout=60)
        for p in self.started.values():
            try:
                p.kill()  # psutil checks that the pid is still the process noted
            except psutil.NoSuchProcess:
                pass

    def stderr(self) -> str:
        return self.err_log.read_text(errors="replace")


def _start_up_job(tmp_path: Path, shard_dir: Path, checkpoint: Path) -> tuple[Path, Path, dict[str, str]]:
    """A tiny job whose output is `~/out`, with HOME a folder of the test: `~` must be the home directory."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00001}}.tar", output="~/out",
                              model=checkpoint, resources={"actors": 1, "num_cpus_per_actor": 1})
    return manifest, home / "out", {**base_env(), "HOME": str(home)}


def test_sigterm_at_any_moment_of_start_up_exits_143_and_releases_the_lease(tiny_checkpoint, shards, tmp_path):
    """SIGTERM while the driver starts (lease taken, before ray.init; while ray.init starts the GCS, then the
    raylet; while the actor loads the model): exit 143 saying to rerun, no lease left, no process of it left.
    Before, ray.init's own SIGTERM handlers exited from inside its start-up: exit 15 or an abort (134) with a C++
    stack, the lease or Ray's agents left behind."""
    shard_dir, _ = shards
    manifest, out, env = _start_up_job(tmp_path, shard_dir, tiny_checkpoint)
    moments = {
        "the lease is taken": lambda driver: (out / "_lease.json").exists(),
        "its GCS has started": lambda driver: any("gcs_server" in c for c in driver.note_children()),
        "its raylet has started": lambda driver: any("raylet/raylet" in c for c in driver.note_children()),
        "its actor loads the model": lambda driver: any("ShardCaptioner" in c for c in driver.note_children()),
    }
    for moment, reached in moments.items():
        logs = tmp_path / moment.replace(" ", "-")
        logs.mkdir()
        driver = StartingDriver(manifest, env, logs)
        try:
            wait_for(lambda driver=driver, reached=reached: reached(driver) or driver.proc.poll() is not None,
                     300, f"the driver to reach: {moment}", 0.01)
            assert driver.proc.poll() is None, (moment, driver.stderr()[-3000:])
            driver.proc.send_signal(signal.SIGTERM)
            rc = driver.wait(180)
            stderr = driver.stderr()
            assert rc == 143, (moment, rc, stderr[-3000:])
            assert "rerun the same command to resume" in stderr and "Traceback" not in stderr, (moment, stderr[-3000:])
            assert not (out / "_lease.json").exists(), moment
            assert not driver.left_behind(60), (moment, driver.left_behind(0))
        finally:
            driver.stop()
    assert not (REPO / "~").exists(), "a literal ~ folder was made"
    status = subprocess.run([sys.executable, "-m", "jobs.status", "~/out", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout)["driver"] is None, status.stderr[-2000:]


def test_ray_that_does_not_start_in_time_is_one_line(tiny_checkpoint, shards, tmp_path):
    """A Ray start-up timeout (here the GCS given 0 s to publish its port, as a loaded machine can take longer
    than Ray's 30 s) ends the driver with one line naming it, exit 2, the lease released, nothing left running."""
    shard_dir, _ = shards
    manifest, out, env = _start_up_job(tmp_path, shard_dir, tiny_checkpoint)
    driver = StartingDriver(manifest, {**env, "RAY_gcs_server_port_wait_time_s": "0"}, tmp_path)
    try:
        proc = subprocess.CompletedProcess(driver.proc.args, driver.wait(300), "", driver.stderr())
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert "the embedded local Ray (127.0.0.1) did not start: RuntimeError: Timed out" in line, line
        assert not (out / "_lease.json").exists() and (out / "_job.json").exists()
        assert not driver.left_behind(60), driver.left_behind(0)
    finally:
        driver.stop()
