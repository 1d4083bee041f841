"""Real artefacts for the job tests: a tiny checkpoint, synthetic shards, a local Ray cluster.

The cluster is started with `ray start --head` on 127.0.0.1 with token authentication on (the token
lives in a file of this test session, passed by RAY_AUTH_TOKEN_PATH), and stopped
at the end (only its own processes). Loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on 127.0.0.1.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
# A 2-core CI box running other Ray clusters beside the tests (load 8-12) starts Ray slowly: these are bounds,
# met in seconds on a quiet machine.
RAY_START_TIMEOUT_S = 300
AGENT_WAIT_S = 180
START_TRIES = 3  # `ray start` on fresh ports, when another Ray took one of ours first
NO_AGENT = "No available agent to submit job"  # Ray's answer while the head has no job agent registered


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this test session handed out before: the kernel can offer the port it just
    freed again, and one cluster got the same port for its GCS and its metrics (`ray start` then failed)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # Every worker's log line reaches the driver's output: tests read actor lines (pids, "ready") from it,
        # and Ray's dedup folds lines that differ only in numbers into "[repeated 2x across cluster]".
        RAY_DEDUP_LOGS="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from model.tiny import build_tiny_checkpoint

    return Path(build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-pllava", seed=0))


@pytest.fixture(scope="session")
def shard_source(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    """Four synthetic shards with failed and corrupt samples, and what was planted in each."""
    from pipeline.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    planted = write_synthetic_shards(out, shards=4, clips_per_shard=5, failed=1, corrupt=1, seed=7)
    return out, planted


@pytest.fixture()
def shards(shard_source, tmp_path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A private copy of the shards, so a test may break and repair them."""
    src, planted = shard_source
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return dst, planted


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head` on loopback with token auth; yields the env a client needs."""
    tmp = tmp_path_factory.mktemp("ray")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = base_env()
    # metrics pushed to the node's exporter every second (default 10 s), so a short test job shows up
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_metrics_report_interval_ms="1000")
    # Test keys for outputs on the moto S3 server (test_chaos_on_an_s3_output): workers take credentials from
    # their node's environment, as on a real cluster; moto accepts any key, the endpoint is in the manifest.
    env.update(AWS_ACCESS_KEY_ID="AKIARAYCLUSTERTEST", AWS_SECRET_ACCESS_KEY="ray-cluster-test-secret",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    # Its own short temp dir: the cluster's processes name it, so teardown stops exactly these processes
    # (`ray stop` would stop every Ray on the machine, other test runs' and users' included).
    # A free port can be taken by another Ray starting on the box before ours binds it (other test runs, CI beside
    # a developer): a start that fails is stopped and tried again on fresh ports, up to START_TRIES times.
    for attempt in range(1, START_TRIES + 1):
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        gcs_port, dash_port, metrics_port, agent_port = free_port(), free_port(), free_port(), free_port()
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--temp-dir",
               temp_dir, "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--metrics-export-port",
               str(metrics_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
               *own_ports(agent_port)]
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=RAY_START_TIMEOUT_S)
            if wait_for_job_agent(f"http://127.0.0.1:{dash_port}", agent_port, env):
                break
            failure = "its job agent did not come up"
        except subprocess.CalledProcessError as e:
            failure = f"ray start exited {e.returncode}: {(e.stderr or b'').decode(errors='replace')[-2000:]}"
        except subprocess.TimeoutExpired:
            failure = f"ray start took over {RAY_START_TIMEOUT_S} s"
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == START_TRIES:
            raise RuntimeError(f"the test cluster did not start in {START_TRIES} tries; last: {failure}")
    cluster = {
        "env": env,
        "gcs": f"127.0.0.1:{gcs_port}",
        "dashboard": f"http://127.0.0.1:{dash_port}",
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        "token": token,
        "temp_dir": temp_dir,  # the session's logs are under it
    }
    try:
        yield cluster
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def own_ports(agent_port: int) -> list[str]:
    """`ray start` flags giving a test cluster its own free ports where Ray's defaults are fixed numbers: the job
    agent's 52365 above all. Two Rays on one machine (other test runs, CI beside a developer) otherwise collide
    there; the second agent then serves no HTTP and never registers, and every `ray job submit` to that cluster
    fails with "No available agent to submit job" however long it is retried."""
    return ["--dashboard-agent-listen-port", str(agent_port), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--ray-client-server-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]


def wait_for_job_agent(dashboard: str, agent_port: int, env: dict[str, str]) -> bool:
    """Wait until the job API answers and the head's job agent listens (it registers with the head right after):
    on a loaded machine both can come up well after `ray start` returns, as an operator would wait."""
    deadline = time.time() + RAY_START_TIMEOUT_S
    while time.time() < deadline:
        probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
                               env=env, capture_output=True, text=True, timeout=RAY_START_TIMEOUT_S)
        if probe.returncode == 0:
            break
        time.sleep(1)
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", agent_port)) == 0:
                return True
        time.sleep(0.5)
    return False


def submit_job(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit ARGS`, submitted again while the head answers that its job agent is not there yet (only
    that answer, for at most AGENT_WAIT_S): the agent registers after the head on a loaded machine."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if NO_AGENT not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(3)


def stop_cluster(temp_dir: str) -> None:
    """Stop the processes of the cluster started with --temp-dir temp_dir, and their children; nothing else."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in (p.info["cmdline"] or []))]
    procs = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def write_manifest(path: Path, *, shards: str, output: Path, model: Path, **overrides) -> Path:
    spec = {
        "name": "test",
        "shards": shards,
        "output": str(output),
        "model": {"path": str(model), "lora_alpha": 4, "dtype": "float32", "device": "cpu"},
        "languages": ["en", "zh"],
        "generation": {"max_new_tokens": 8, "batch_size": 2},
        "zh": {"mode": "translate", "max_new_tokens": 8},
        "decode": {"workers": 1, "max_ahead": 4, "mode": "thread", "timeout_s": 60},
        "resources": {"num_cpus_per_actor": 1},
        "chunk_size": 2,
        "max_attempts": 3,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_output(out: Path):
    return ds.dataset(str(out / "data"), format="parquet").to_table()


def assert_exactly_once(out: Path, planted: dict[str, dict[str, str]], shard_names: list[str]) -> None:
    """Every planted key of these shards is in OUT/data exactly once, with the planted kind of status."""
    table = read_output(out)
    keys = table.column("key").to_pylist()
    dupes = [k for k, c in collections.Counter(keys).items() if c > 1]
    assert not dupes, f"duplicated keys: {dupes}"
    expected = {k: s for name in shard_names for k, s in planted[name].items()}
    assert set(keys) == set(expected), f"missing {set(expected) - set(keys)}, extra {set(keys) - set(expected)}"
    got = dict(zip(keys, table.column("status").to_pylist()))
    for key, planted_status in expected.items():
        allowed = {"ok", "flagged"} if planted_status == "ok" else {planted_status}
        assert got[key] in allowed, f"{key}: planted {planted_status}, got {got[key]}"


def run_job(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.recaption", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def shard_state(out: Path, shard: str) -> dict | None:
    p = out / "_progress" / f"{shard}.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def running_with_a_chunk(out: Path, shards: list[str]) -> tuple[str, int] | None:
    """(shard, actor pid) of one of `shards` that is running and has committed a chunk, else None: the moment
    a kill -9 of its worker tests resuming after committed rows."""
    for shard in shards:
        state = shard_state(out, shard)
        if state and state.get("state") == "running" and state.get("pid") and \
                list((out / "_progress" / shard).glob("chunk-*.parquet")):
            return shard, state["pid"]
    return None
