"""Node loss: a Ray node dies in the middle of a shard; the job finishes on the nodes left, every key once.

Each test starts its own two-node cluster on 127.0.0.1: `ray start --head` (1 CPU) and a second node,
`ray start --address` (1 CPU), each with its own --temp-dir and free ports, token authentication on as in
conftest.py's `ray_cluster`. The job asks for two actors of 1 CPU each, so one ShardCaptioner runs on each
node (checked in each node's process tree). The GCS is told to give up a killed node within about five
seconds, and one that is alive but slow to answer (a loaded machine) only after about a minute
(HEALTH_CHECK; Ray's defaults: a ping every 3 s, 5 failures, a 10 s timeout).

- Once a shard on the second node has committed a chunk, the second node's raylet and every process it
  started are killed with SIGKILL, by pid, as when a machine drops off the network. The driver must retry
  the lost shards on the head's actor and exit 0 within AFTER_KILL_S, with every key in OUT/data exactly once.
- The second node dies while its actor is still loading the model: a lost actor, not a model that cannot
  load; the job goes on with the head's actor.
- The node comes back mid-job (a fresh `ray start --address`, new temp dir): the replacement actor the driver
  asked for, pending while no node had a free CPU, starts there and runs a shard; every key exactly once.

Only processes this test started are signalled: those whose command line names one of its temp dirs, and
their children (conftest.stop_cluster's rule; `ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs.conftest import (
    RAY_START_TIMEOUT_S,
    VENV_BIN,
    assert_exactly_once,
    base_env,
    free_port,
    shard_state,
    wait_for,
    write_manifest,
)
from tests.jobs.test_chaos import Driver

pytestmark = pytest.mark.slow

# Bounds, met in well under a minute on a quiet machine; a 2-core box at load 8-12 needs minutes.
START_TIMEOUT_S = 300  # driver start to the kill: two actors load the model on a loaded 2-core machine
AFTER_KILL_S = 300  # the kill to the driver's exit: node death noticed (~5 s), two shards captioned again
# The GCS pings each raylet every second and gives a node up after 5 failed pings in a row (default: every 3 s,
# 5 failures, a 10 s timeout). A killed node refuses the ping at once, so its actors are reported dead within
# about 5 s; a node that is alive but starved of CPU has 10 s to answer each ping (it had 2 s, and a 2-core box
# at load 8-12 missed 5 in a row: "marked dead because the detector has missed too many heartbeats"), so it would
# have to stay silent for about a minute.
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "10000",
                "RAY_health_check_failure_threshold": "5", "RAY_health_check_initial_delay_ms": "1000"}
READY_RE = re.compile(r"ShardCaptioner ready on pid (\d+)")
# `ray start --address ...`, the CLI's own code, kept on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what
# keeps Ray on 127.0.0.1) the CLI refuses to start a second node; with it on, it turns 127.0.0.1 (in --address and
# --node-ip-address) into the machine's outward IP, where the head's GCS (bound to 127.0.0.1) does not answer.
# So the second node runs the same `ray start` with the check on and the local IP pinned to 127.0.0.1; its raylet,
# agents and workers then run with the environment above, as the head's do.
RAY_START_ON_LOOPBACK = "; ".join([
    "import sys",
    "import ray._private.ray_constants as constants",
    "import ray._private.services as services",
    "constants.ENABLE_RAY_CLUSTER = True",
    "services.get_node_ip_address = lambda address=None: '127.0.0.1'",
    "from ray.scripts.scripts import main",
    "sys.argv[0] = 'ray'",
    "sys.exit(main())",
])


def _names_dir(args: list[str], temp_dir: str) -> bool:
    return any(a == temp_dir or a.endswith("=" + temp_dir) or temp_dir + "/" in a for a in args)


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class RayNode:
    """One `ray start` of this test; its --temp-dir names its processes (raylet, agents, GCS on the head)."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir

    def processes(self) -> dict[int, psutil.Process]:
        """The processes that name this node's temp dir, and their children (the raylet's workers)."""
        procs: dict[int, psutil.Process] = {}
        for root in psutil.process_iter(["cmdline"]):
            if root.pid == os.getpid() or not _names_dir(root.info["cmdline"] or [], self.temp_dir):
                continue
            try:
                for p in [root, *root.children(recursive=True)]:
                    procs[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        return procs

    def actor_pids(self) -> set[int]:
        """Pids of this node's ShardCaptioner workers (Ray renames an actor's process `ray::ShardCaptioner`)."""
        found = set()
        for pid, p in self.processes().items():
            try:
                if "ShardCaptioner" in " ".join(p.cmdline()):
                    found.add(pid)
            except psutil.Error:
                pass
        return found

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM this node's processes, SIGKILL what is left after grace_s."""
        procs = self.processes()
        for p in procs.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        wait_for(lambda: all(_gone(p) for p in procs.values()), 60, "the node's processes to exit", 0.1)

    def kill(self) -> set[int]:
        """SIGKILL every process of this node at once (raylet, agents, workers); return their pids."""
        procs = self.processes()
        for p in procs.values():
            try:
                p.send_signal(signal.SIGKILL)  # psutil checks the pid was not reused
            except psutil.NoSuchProcess:
                pass
        wait_for(lambda: all(_gone(p) for p in procs.values()), 60, "the killed node's processes to exit", 0.1)
        return set(procs)


class TwoNodes:
    """A head and worker nodes on 127.0.0.1, each `ray start` with its own temp dir and ports."""

    def __init__(self, tmp: Path):
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = base_env()
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **HEALTH_CHECK)
        self.gcs = f"127.0.0.1:{free_port()}"
        self.nodes: list[RayNode] = []

    def _start(self, head: bool, cpus: int = 1) -> RayNode:
        node = RayNode(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths live under it
        self.nodes.append(node)
        cmd = [str(VENV_BIN / "ray"), "start", "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", node.temp_dir,
               "--node-ip-address", "127.0.0.1", "--node-manager-port", str(free_port()),
               "--object-manager-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"]
        if head:
            cmd += ["--head", "--port", self.gcs.rsplit(":", 1)[1], "--ray-client-server-port", str(free_port()),
                    "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(free_port())]
        else:
            cmd = [sys.executable, "-c", RAY_START_ON_LOOPBACK, *cmd[1:], "--address", self.gcs]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=RAY_START_TIMEOUT_S)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return node

    def start_head(self, cpus: int = 1) -> RayNode:
        return self._start(head=True, cpus=cpus)

    def start_node(self) -> RayNode:
        return self._start(head=False)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture()
def two_nodes(tmp_path):
    cluster = TwoNodes(tmp_path)
    try:
        cluster.start_head()
        cluster.start_node()
        yield cluster
    finally:
        cluster.stop()


def _start_job(two_nodes: TwoNodes, model: Path, shard_dir: Path, names: list[str], tmp_path: Path,
               actors: int = 2, log_name: str = "driver.log", **retry: float) -> Driver:
    manifest = write_manifest(tmp_path / "job.yaml", shards=[f"{shard_dir}/{n}.tar" for n in names],
                              output=tmp_path / "out", model=model, chunk_size=1,
                              generation={"batch_size": 1, "max_new_tokens": 24},
                              resources={"actors": actors, "num_cpus_per_actor": 1},
                              # the driver's own bound on one attempt: watchdog 1.0 x 120 + 30 = 150 s
                              shard_timeout_s=120,
                              retry={"watchdog_factor": 1.0, "watchdog_margin_s": 30, **retry})
    env = {**two_nodes.env, "RAY_ADDRESS": two_nodes.gcs}
    return Driver(manifest, env, tmp_path / log_name)


def _kill_node_mid_shard(driver: Driver, out: Path, names: list[str], head: RayNode, node: RayNode) -> dict:
    """Wait until a shard on `node`'s actor has committed a chunk (and is not finished) while an actor runs on
    the head too, then SIGKILL the whole node. Returns what was killed and which shards were lost."""

    def victim():
        assert driver.proc.poll() is None, f"driver exited {driver.proc.returncode}\n{driver.tail()}"
        for shard in names:
            state = shard_state(out, shard)
            pid = state and state.get("state") == "running" and state.get("pid")
            if (pid and list((out / "_progress" / shard).glob("chunk-*.parquet"))
                    and not (out / "data" / f"{shard}.parquet").exists() and pid in node.actor_pids()):
                return shard, pid
        return None

    shard, pid = wait_for(victim, START_TIMEOUT_S, "a chunk committed by a shard on the second node", 0.2)
    head_actors = wait_for(head.actor_pids, 60, "a ShardCaptioner on the head")
    node_actors = node.actor_pids()
    lost = [s for s in names if (st := shard_state(out, s)) and st.get("state") == "running"
            and st.get("pid") in node_actors and not (out / "data" / f"{s}.parquet").exists()]
    killed = node.kill()
    assert pid in killed and node_actors <= killed and not killed & head_actors, (pid, node_actors, killed)
    assert shard in lost, (shard, lost)
    return {"shard": shard, "pid": pid, "lost": lost, "head_actors": head_actors, "killed": killed,
            "at": time.monotonic()}


def _check_run(driver: Driver, out: Path, planted: dict, names: list[str], kill: dict) -> str:
    """The driver exits 0 within AFTER_KILL_S of the kill; every key once; the lost shards ran again."""
    try:
        rc = driver.wait(max(1.0, kill["at"] + AFTER_KILL_S - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the driver was still running {AFTER_KILL_S}s after the node was killed\n{driver.tail()}")
    log = driver.log_path.read_text(errors="replace")
    assert rc == 0, log[-5000:]
    assert_exactly_once(out, planted, names)
    for name in names:
        state = shard_state(out, name)
        assert state and state["state"] == "done", (name, state)
    assert not [p.name for p in (out / "_progress").iterdir() if p.is_dir()], "chunk dirs left after finishing"
    for name in kill["lost"]:  # every shard that was on the dead node ran again
        state = shard_state(out, name)
        assert state["attempts"] >= 2 and "actor died" in state["errors"][0]["reason"], (name, state)
        assert re.search(rf"shard {name} attempt 1 failed \(actor died.*requeued", log), log[-5000:]
    # the head's actor worked to the end (the second node's actor was found in that node's process tree)
    assert {int(p) for p in READY_RE.findall(log)} & kill["head_actors"], log[-5000:]
    return log


def test_node_killed_mid_shard_job_finishes_on_the_head(two_nodes, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    names = ["00000", "00001", "00002", "00003"]
    head, node = two_nodes.nodes
    driver = _start_job(two_nodes, tiny_checkpoint, shard_dir, names, tmp_path)
    try:
        kill = _kill_node_mid_shard(driver, tmp_path / "out", names, head, node)
        _check_run(driver, tmp_path / "out", planted, names, kill)
        took = time.monotonic() - kill["at"]
    finally:
        driver.kill()
    print(f"\nnode loss: killed the second node's {len(kill['killed'])} processes in shard {kill['shard']} "
          f"(lost {kill['lost']}); the job finished on the head {took:.1f}s later")


def test_node_killed_while_its_actor_loads_the_model(two_nodes, tiny_checkpoint, shards, tmp_path):
    """The second node dies before its actor has loaded the model: that is a lost actor, not a model that
    cannot load (which ends the job with exit 2); the job goes on with the head's actor, nothing is charged.

    The head's actor is paused (SIGSTOP) from the kill until the driver has seen the death: otherwise, on a
    quiet machine, it could finish every shard before the GCS gives the killed node up (about 5 s)."""
    shard_dir, planted = shards
    names = ["00000", "00001", "00002", "00003"]
    head, node = two_nodes.nodes
    out = tmp_path / "out"
    driver = _start_job(two_nodes, tiny_checkpoint, shard_dir, names, tmp_path)
    paused: set[int] = set()
    try:
        starting = wait_for(node.actor_pids, START_TIMEOUT_S, "the actor on the second node to be created", 0.05)
        killed = node.kill()  # the model takes seconds to load: the actor is still in its __init__
        at = time.monotonic()
        assert starting <= killed
        running = {(st or {}).get("pid") for st in (shard_state(out, n) for n in names)}
        assert not running & starting, "the second node's actor had already started a shard"
        head_actors = paused = wait_for(head.actor_pids, 60, "a ShardCaptioner on the head")
        _signal_all(head, paused, signal.SIGSTOP)
        wait_for(lambda: "an actor died while starting" in driver.log_path.read_text(errors="replace")
                 or driver.proc.poll() is not None, AFTER_KILL_S, "the driver to see the actor die", 0.2)
        _signal_all(head, paused, signal.SIGCONT)
        paused = set()
        _check_run(driver, out, planted, names, {"at": at, "lost": [], "head_actors": head_actors})
        took = time.monotonic() - at
    finally:
        _signal_all(head, paused, signal.SIGCONT)
        driver.kill()
    log = driver.log_path.read_text(errors="replace")
    assert "an actor died while starting" in log and "could not load the model" not in log, log[-3000:]
    for name in names:
        assert shard_state(out, name)["attempts"] == 1, shard_state(out, name)
    print(f"\nnode lost while loading: the job finished on the head {took:.1f}s after the kill")


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]]]:
    from pipeline.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("six-shards")
    return out, write_synthetic_shards(out, shards=6, clips_per_shard=5, failed=1, corrupt=1, seed=16)


def _signal_all(node: RayNode, pids: set[int], sig: int) -> None:
    """Send sig to those of `pids` that are still processes of `node` (never to a reused pid)."""
    for pid, p in node.processes().items():
        if pid in pids:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


def test_node_comes_back_mid_job(two_nodes, tiny_checkpoint, six_shards, tmp_path):
    """The node comes back (a fresh `ray start --address`): the replacement actor the driver asked for when the
    second node died, pending while no node had a free CPU, starts there and is given shards.

    So that the node that came back gets work whatever the machine's speed, the head's actor is paused
    (SIGSTOP) from the kill until a shard runs on the new node: otherwise the head could finish every shard
    before the new node has loaded the model. Six shards keep the queue from running dry."""
    shard_dir, planted = six_shards
    names = sorted(planted)
    head, node = two_nodes.nodes
    out = tmp_path / "out"
    driver = _start_job(two_nodes, tiny_checkpoint, shard_dir, names, tmp_path)
    paused: set[int] = set()
    try:
        kill = _kill_node_mid_shard(driver, out, names, head, node)
        paused = kill["head_actors"]
        _signal_all(head, paused, signal.SIGSTOP)
        wait_for(lambda: all(f"shard {n} attempt 1 failed" in driver.log_path.read_text(errors="replace")
                             for n in kill["lost"]) or driver.proc.poll() is not None,
                 120, "the driver to requeue the lost shards", 0.2)
        back = two_nodes.start_node()  # a fresh node: new temp dir, new ports

        def moved():
            assert driver.proc.poll() is None, f"driver exited {driver.proc.returncode}\n{driver.tail()}"
            actors = back.actor_pids()
            for name in names:
                state = shard_state(out, name)
                if state and state.get("state") == "running" and state.get("pid") in actors:
                    return name, state["attempts"], state["pid"]
            return None

        shard, attempt, pid = wait_for(moved, 150, "a shard running on the node that came back", 0.2)
        _signal_all(head, paused, signal.SIGCONT)
        paused = set()
        _check_run(driver, out, planted, names, kill)
        took = time.monotonic() - kill["at"]
    finally:
        _signal_all(head, paused, signal.SIGCONT)
        driver.kill()
    print(f"\nnode back: killed the second node's {len(kill['killed'])} processes in shard {kill['shard']} "
          f"(lost {kill['lost']}); shard {shard} attempt {attempt} ran on the new node (actor pid {pid}); "
          f"the job finished {took:.1f}s after the kill")


def test_every_actor_node_lost_the_driver_stops_then_a_rerun_resumes(tmp_path, tiny_checkpoint, shards):
    """The only node with room for an actor dies (the head has no CPU for one): the replacement actor stays
    pending, so after retry.no_actor_timeout_s the driver stops with exit 3 and says to rerun; nothing is lost,
    and the same command, once a node is back, finishes the job with every key once."""
    shard_dir, planted = shards
    names = ["00000", "00001", "00002", "00003"]
    cluster = TwoNodes(tmp_path)
    try:
        cluster.start_head(cpus=0)
        node = cluster.start_node()
        out = tmp_path / "out"
        driver = _start_job(cluster, tiny_checkpoint, shard_dir, names, tmp_path, actors=1, no_actor_timeout_s=10)
        try:
            def committed_on_node():
                assert driver.proc.poll() is None, f"driver exited {driver.proc.returncode}\n{driver.tail()}"
                return any(list((out / "_progress" / n).glob("chunk-*.parquet")) for n in names)

            wait_for(committed_on_node, START_TIMEOUT_S, "a chunk committed on the second node", 0.2)
            node.kill()
            at = time.monotonic()
            rc = driver.wait(AFTER_KILL_S)
            took = time.monotonic() - at
        finally:
            driver.kill()
        log = driver.log_path.read_text(errors="replace")
        assert rc == 3, log[-5000:]
        assert "no actor has been ready for" in log and "rerun the same command to resume" in log, log[-3000:]
        assert not (out / "data").exists() or len(list((out / "data").glob("*.parquet"))) < len(names)

        cluster.start_node()  # a node is back: the same command resumes
        rerun = _start_job(cluster, tiny_checkpoint, shard_dir, names, tmp_path, actors=1,
                           log_name="rerun.log")
        try:
            assert rerun.wait(START_TIMEOUT_S) == 0, rerun.tail()
        finally:
            rerun.kill()
        assert_exactly_once(out, planted, names)
    finally:
        cluster.stop()
    print(f"\nevery actor node lost: the driver stopped {took:.1f}s after the kill (no_actor_timeout_s 10); "
          f"the rerun finished every key once")
