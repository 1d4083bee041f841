"""Chaos: kill -9 a ShardCaptioner worker or the driver at a random moment, rerun, check exactly once.

Each round starts the real driver (`python -m jobs.recaption`, joined to the session's `ray start`
cluster) on a fresh output over four small shards with a randomly drawn job shape (chunk size, batch
size, decode mode, actor count), waits for a random moment (a random delay, the n-th committed chunk,
or the k-th finished shard), and then kills, with SIGKILL, one of:

- ``worker``: a ShardCaptioner actor process in the middle of a shard (its pid is read from
  ``OUT/_progress/{shard}.json`` of this round's output); the driver must retry the shard and finish;
- ``driver``: the driver process (Ray then ends the job's actors);
- ``driver+worker``: the driver and the actor of every running shard, as when a node dies.

After a driver kill it reruns the job, either once the old job's actors are gone or at once, while they
may still be writing (the design's "late writer" case). After every kill the output as a reader sees it
(``OUT/data``) must hold no duplicate key and no key that was not planted; once the run completes, every
planted key is in ``OUT/data`` exactly once with its planted kind of status.

The same rounds run against an output on the S3 (moto) server (``test_chaos_on_an_s3_output``).

Knobs: ``CHAOS_SEED`` (default: random, printed), ``CHAOS_ROUNDS`` (default 3), ``CHAOS_S3_ROUNDS``
(default 2), ``RELIABILITY_REPORT`` (a path for the JSON summary, used for docs/RELIABILITY.md). Only processes this test started are
killed: its own driver Popen, and actor pids read from this test's output whose command line is a
ShardCaptioner.

A second, deterministic test crashes the writer (an exception standing in for kill -9) at every
filesystem operation of committing and finalizing a shard, and checks the same guarantee.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.jobs.conftest import REPO, wait_for, write_manifest

pytestmark = pytest.mark.slow

NAMES = ["00000", "00001", "00002", "00003"]
RUN_TIMEOUT_S = 300
ACTOR_PID_RE = re.compile(r"ShardCaptioner pid=(\d+)|ShardCaptioner ready on pid (\d+)")


# --- helpers -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChaosStore:
    """An object store the rounds write their output to: `fs` is a pyarrow filesystem on it (the readers' view),
    `storage` the manifest's storage section (may be empty: the environment says where the store is)."""

    name: str
    scheme: str
    bucket: str
    fs: pafs.FileSystem
    storage: dict


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _is_our_actor(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "ShardCaptioner" in cmd


class Out:
    """A round's output as its readers see it, on the local disk or on the S3 (moto) server: the same checks
    run on both."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str, poll_s: float = 0.02):
        self.uri, self.fs, self.root, self.poll_s = uri, fs, root.rstrip("/"), poll_s

    @classmethod
    def local(cls, path: Path) -> Out:
        return cls(str(path), pafs.LocalFileSystem(), str(path))

    def __str__(self) -> str:
        return self.uri

    def _files(self, sub: str) -> list[str]:
        selector = pafs.FileSelector(f"{self.root}/{sub}", allow_not_found=True, recursive=True)
        return [i.path for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def reader_view(self) -> tuple[list[str], list[str]]:
        """(files, keys) of OUT/data exactly as pyarrow/pandas/Ray Data readers discover them."""
        try:
            dataset = ds.dataset(f"{self.root}/data", filesystem=self.fs, format="parquet")
        except FileNotFoundError:
            return [], []
        files = sorted(f.rsplit("/", 1)[1] for f in dataset.files)
        if not files:
            return [], []
        return files, dataset.to_table(columns=["key"]).column("key").to_pylist()

    def chunks(self) -> dict[str, list[str]]:
        """{shard: chunk file paths} under OUT/_progress."""
        found: dict[str, list[str]] = {}
        for path in self._files("_progress"):
            rest = path[len(self.root) + len("/_progress/"):]
            if "/" in rest and rest.rsplit("/", 1)[1].startswith("chunk-") and path.endswith(".parquet"):
                found.setdefault(rest.split("/", 1)[0], []).append(path)
        return found

    def chunk_keys(self) -> dict[str, list[str]]:
        keys: dict[str, list[str]] = {}
        for shard, paths in self.chunks().items():
            for path in paths:
                try:
                    with self.fs.open_input_file(path) as f:
                        keys.setdefault(shard, []).extend(pq.read_table(f, columns=["key"])["key"].to_pylist())
                except (OSError, FileNotFoundError):  # removed by a finalize while we read
                    pass
        return keys

    def state(self, shard: str) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/_progress/{shard}.json") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def has_data(self, shard: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/data/{shard}.parquet").type == pafs.FileType.File

    def data_count(self) -> int:
        return sum(1 for p in self._files("data") if p.endswith(".parquet") and "/." not in p)


def _reader_view(out: Path) -> tuple[list[str], list[str]]:
    """(files, keys) of a local OUT/data exactly as pyarrow/pandas/Ray Data readers discover them."""
    return Out.local(out).reader_view()


def check_partial(out: Out, planted: dict[str, dict[str, str]]) -> dict[str, int]:
    """The invariant at any moment after a kill: readers see no duplicate and nothing unplanted."""
    files, keys = out.reader_view()
    assert all(re.fullmatch(r"\d{5}\.parquet", f) for f in files), f"readers of OUT/data see stray files {files}"
    dupes = [k for k, c in collections.Counter(keys).items() if c > 1]
    assert not dupes, f"duplicated keys in OUT/data: {dupes}"
    every = {k for name in NAMES for k in planted[name]}
    chunks = out.chunk_keys()
    stray = (set(keys) | {k for ks in chunks.values() for k in ks}) - every
    assert not stray, f"keys that were never planted: {stray}"
    for name, ks in chunks.items():
        assert set(ks) <= set(planted[name]), f"chunk of {name} holds keys of another shard"
    return {"rows_in_data": len(keys), "rows_in_chunks": sum(len(v) for v in chunks.values())}


def check_complete(out: Out, planted: dict[str, dict[str, str]]) -> int:
    files, keys = out.reader_view()
    assert files == [f"{n}.parquet" for n in NAMES], files
    counts = collections.Counter(keys)
    dupes = [k for k, c in counts.items() if c > 1]
    expected = {k: s for name in NAMES for k, s in planted[name].items()}
    lost = set(expected) - set(counts)
    assert not dupes and not lost and set(counts) == set(expected), \
        f"duplicates {dupes}, lost {sorted(lost)}, extra {set(counts) - set(expected)}"
    table = ds.dataset(f"{out.root}/data", filesystem=out.fs, format="parquet").to_table(columns=["key", "status"])
    for key, status in zip(table["key"].to_pylist(), table["status"].to_pylist()):
        allowed = {"ok", "flagged"} if expected[key] == "ok" else {expected[key]}
        assert status in allowed, f"{key}: planted {expected[key]}, got {status}"
    for name in NAMES:
        state = out.state(name)
        assert state and state["state"] == "done", f"{name}: {state}"
    leftovers = sorted(out.chunks())
    assert not leftovers, f"chunks left after finishing: {leftovers}"
    return len(keys)


class Driver:
    """One `python -m jobs.recaption` process, its log in a file, the actor pids it reported."""

    def __init__(self, manifest: Path, env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "jobs.recaption", str(manifest), "--log-every", "5"],
                                     cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def actor_pids(self) -> set[int]:
        pids = set()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "ShardCaptioner" in line:
                for m in ACTOR_PID_RE.finditer(line):
                    pids.add(int(m.group(1) or m.group(2)))
        return pids

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._log.close()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def running_workers(out: Out) -> dict[str, int]:
    """{shard: actor pid} for the shards of this output that an actor of ours is working on now."""
    found = {}
    for name in NAMES:
        state = out.state(name)
        pid = state and state.get("state") == "running" and state.get("pid")
        if pid and not out.has_data(name) and _alive(pid) and _is_our_actor(pid):
            found[name] = pid
    return found


def _pick_worker(out: Out, driver: Driver, rng: random.Random) -> dict[str, int]:
    """A random running shard's actor; the drawn moment may fall between shards, so wait a little."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and driver.proc.poll() is None:
        workers = running_workers(out)
        if workers:
            shard = rng.choice(sorted(workers))
            return {shard: workers[shard]}
        time.sleep(out.poll_s)
    return {}


def committed_progress(out: Out, seen: set[str]) -> tuple[int, int]:
    """(chunks committed so far, shards finished); `seen` accumulates chunk names across polls."""
    seen.update(p for paths in out.chunks().values() for p in paths)
    return len(seen), out.data_count()


# --- the chaos test ----------------------------------------------------------------------------------
KILL_KINDS = ("worker", "driver", "driver+worker")


def _draw_round(rng: random.Random, i: int, seed: int) -> dict:
    """Random job shape and moment; the kill kind cycles (and the rerun mode alternates) so that a few
    rounds cover every kind and both rerun modes."""
    chunk = rng.choice([1, 2])
    return {
        "chunk_size": chunk,
        "batch_size": rng.choice([1, 2]),
        "decode_mode": rng.choice(["thread", "process"]),
        "actors": rng.choice([1, 2]),
        "target": KILL_KINDS[(i + seed) % 3],
        "trigger": rng.choice(["delay", "chunk", "shard"]),
        "delay_s": round(rng.uniform(0.0, 6.0), 2),
        "nth_chunk": rng.randint(1, 10 if chunk == 2 else 20),
        "kth_shard": rng.randint(1, 3),
        "rerun": ("after_actors_gone", "immediately")[(i + seed) % 2],
    }


def _wait_trigger(plan: dict, out: Out, driver: Driver) -> str:
    """Block until the drawn moment (or the run's end); return what happened."""
    seen: set[str] = set()
    first_shard = None  # a delay counts from the first shard in progress: startup takes ~10 s here
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if driver.proc.poll() is not None:
            return "run ended first"
        chunks, done = committed_progress(out, seen)
        if plan["trigger"] == "delay" and first_shard is None and (running_workers(out) or chunks or done):
            first_shard = time.monotonic()
        if plan["trigger"] == "delay" and first_shard and time.monotonic() - first_shard >= plan["delay_s"]:
            return f"{plan['delay_s']}s after the first shard started ({chunks} chunks, {done} shards)"
        if plan["trigger"] == "chunk" and chunks >= plan["nth_chunk"]:
            return f"chunk {chunks} committed ({done} shards done)"
        if plan["trigger"] == "shard" and done >= plan["kth_shard"]:
            return f"shard {done} finished ({chunks} chunks)"
        time.sleep(out.poll_s)
    raise AssertionError(f"no trigger within {RUN_TIMEOUT_S}s\n{driver.tail()}")


def _chaos_round(i: int, seed: int, ctx: dict) -> dict:
    rng = random.Random(f"{seed}-{i}")  # per round, so a timing-dependent draw cannot shift later rounds
    plan = _draw_round(rng, i, seed)
    plan.update(ctx.get("plan", {}))  # a store's test fixes what its embedded Ray can take (tests/jobs/test_stores.py)
    store: ChaosStore | None = ctx.get("store")
    if store is None:
        out = Out.local(ctx["tmp"] / f"round{i}" / "out")
        storage = {}
    else:  # an object store (moto, the GCS emulator, Azurite): keys from the processes' environment
        prefix = f"chaos-{seed}-{i}"
        out = Out(f"{store.scheme}://{store.bucket}/{prefix}", store.fs, f"{store.bucket}/{prefix}", poll_s=0.1)
        storage = {"storage": store.storage} if store.storage else {}
    manifest = write_manifest(
        ctx["tmp"] / f"round{i}.yaml", shards=ctx.get("shards") or f"{ctx['shard_dir']}/{{00000..00003}}.tar",
        output=out.uri,
        model=ctx["model"], chunk_size=plan["chunk_size"], generation={"batch_size": plan["batch_size"]},
        decode={"mode": plan["decode_mode"], "workers": 1},
        resources={"actors": plan["actors"], "num_cpus_per_actor": 1}, **storage)
    record = {"round": i, "output": store.name if store is not None else "local", **plan, "kills": [], "checks": []}
    t0 = time.monotonic()
    driver = Driver(manifest, ctx["env"], ctx["tmp"] / f"round{i}-run1.log")
    try:
        moment = _wait_trigger(plan, out, driver)
        victims: dict[str, int] = {}
        if plan["target"] == "worker":
            victims = _pick_worker(out, driver, rng)
        elif plan["target"] == "driver+worker":
            victims = running_workers(out)
        killed_at = round(time.monotonic() - t0, 2)
        if plan["target"] == "worker":
            if victims and driver.proc.poll() is None:
                shard, pid = next(iter(victims.items()))
                os.kill(pid, signal.SIGKILL)
                record["kills"].append({"what": "worker", "shard": shard, "pid": pid, "at_s": killed_at,
                                        "moment": moment})
            else:
                record["kills"].append({"what": "none (run ended first)", "at_s": killed_at, "moment": moment})
            rc = driver.wait(RUN_TIMEOUT_S)
            assert rc == 0, f"driver exited {rc} after a worker kill\n{driver.tail()}"
            runs = 1
        else:
            old_actors = driver.actor_pids()
            if driver.proc.poll() is None:
                driver.kill()
                for pid in victims.values():
                    if _alive(pid) and _is_our_actor(pid):
                        os.kill(pid, signal.SIGKILL)
                record["kills"].append({"what": plan["target"], "workers": victims, "at_s": killed_at,
                                        "moment": moment})
            else:
                driver.wait(10)
                record["kills"].append({"what": "none (run ended first)", "at_s": killed_at, "moment": moment})
            record["checks"].append(check_partial(out, ctx["planted"]))
            old_actors |= driver.actor_pids()
            record["old_actors"] = sorted(old_actors)
            if plan["rerun"] == "after_actors_gone":
                t = time.monotonic()
                wait_for(lambda: not any(_alive(p) for p in old_actors), 120, f"old actors {old_actors} to exit")
                record["actors_gone_after_s"] = round(time.monotonic() - t, 2)
            else:
                record["old_actors_alive_at_rerun"] = sorted(p for p in old_actors if _alive(p))
            rerun = Driver(manifest, ctx["env"], ctx["tmp"] / f"round{i}-run2.log")
            rc = rerun.wait(RUN_TIMEOUT_S)
            assert rc == 0, f"rerun exited {rc}\n{rerun.tail()}"
            runs = 2
            # this round's actors must be gone before the next round (2 CPUs for the whole cluster)
            wait_for(lambda: not any(_alive(p) for p in old_actors | rerun.actor_pids()), 120, "actors to exit")
        rows = check_complete(out, ctx["planted"])
    except BaseException:
        if driver.proc.poll() is None:
            driver.kill()
        raise
    record.update(runs=runs, rows=rows, lost=0, duplicates=0, seconds=round(time.monotonic() - t0, 1))
    if plan["target"] == "worker" and record["kills"][0]["what"] == "worker":
        state = out.state(record["kills"][0]["shard"])
        assert state["attempts"] >= 2 and any("actor died" in e["reason"] for e in state["errors"]), state
    return record


def _run_rounds(ctx: dict, rounds: int, seed: int, what: str) -> dict:
    print(f"chaos ({what}): seed {seed} (rerun with CHAOS_SEED={seed}), {rounds} rounds")
    t0 = time.monotonic()
    records = []
    for i in range(rounds):
        try:
            records.append(_chaos_round(i, seed, ctx))
        except AssertionError as e:
            raise AssertionError(f"chaos round {i} ({what}, CHAOS_SEED={seed}) failed: {e}\nrounds so far: "
                                 f"{json.dumps(records, indent=1)}") from e
        print(f"chaos round {i}: {json.dumps(records[-1])}")
    planted = ctx["planted"]
    kinds = collections.Counter(k["what"] for r in records for k in r["kills"])
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "output": what,
        "seed": seed,
        "rounds": len(records),
        "kills": dict(kinds),
        "reruns": dict(collections.Counter(r["rerun"] for r in records if r["runs"] == 2)),
        "keys_per_round": sum(len(planted[n]) for n in NAMES),
        "rows_checked": sum(r["rows"] for r in records),
        "lost": 0,
        "duplicates": 0,
        "wall_s": round(time.monotonic() - t0, 1),
        "command": f"CHAOS_SEED={seed} CHAOS_ROUNDS={rounds} .venv/bin/python -m pytest -q -s "
                   "tests/jobs/test_chaos.py",
        "per_round": records,
    }
    print("chaos summary: " + json.dumps(summary, indent=1))
    report = os.environ.get("RELIABILITY_REPORT")
    if report:
        Path(f"{report}.{what}.json" if what != "local" else report).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))


def test_chaos_kill_worker_or_driver_then_rerun(ray_cluster, tiny_checkpoint, shards, tmp_path):
    shard_dir, planted = shards
    ctx = {"tmp": tmp_path, "shard_dir": shard_dir, "planted": planted, "model": tiny_checkpoint,
           "env": {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}}
    _run_rounds(ctx, int(os.environ.get("CHAOS_ROUNDS") or 3), _seed(), "local")


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    from tests.jobs.test_s3 import S3
    from tests.moto_server import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as port:
        store = S3(port)
        store.client.create_bucket(Bucket="out")
        yield store


def test_chaos_on_an_s3_output(ray_cluster, moto_s3, tiny_checkpoint, shards, tmp_path):
    """The same rounds with the output on the S3 (moto) server: chunks are single PUTs, the data file a
    conditional PUT, chunk folders prefixes; 0 lost, 0 duplicates there too. The cluster's workers have the
    test keys in their environment (tests/jobs/conftest.py), the endpoint comes from the manifest."""
    shard_dir, planted = shards
    store = ChaosStore("s3", "s3", "out", moto_s3.fs, {"endpoint_url": moto_s3.endpoint, "region": "us-east-1"})
    ctx = {"tmp": tmp_path, "shard_dir": shard_dir, "planted": planted, "model": tiny_checkpoint,
           "env": {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}, "store": store}
    _run_rounds(ctx, int(os.environ.get("CHAOS_S3_ROUNDS") or 2), _seed(), "s3")


# --- deterministic crash points in the storage layer -----------------------------------------------
class Crash(BaseException):
    """Stands in for kill -9: nothing after it runs (BaseException, so no `except Exception` cleans up)."""


class _TornStream:
    def __init__(self, stream):
        self._stream = stream

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()
        return False

    def write(self, data):
        self._stream.write(bytes(data)[: max(1, len(data) // 2)])  # half the bytes reach the disk
        raise Crash("torn write")


class CrashingFS:
    """A pyarrow filesystem that 'dies' at its n-th mutating operation: before it, or (open_output_stream)
    half way through writing the file."""

    def __init__(self, fs, crash_at: int, torn: bool):
        self._fs, self.crash_at, self.torn, self.ops = fs, crash_at, torn, []

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def _op(self, name: str, path: str) -> bool:
        self.ops.append(f"{name} {path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1][:24]}")
        return len(self.ops) == self.crash_at

    def open_output_stream(self, path, *args, **kwargs):
        if self._op("write", path):
            if self.torn:
                return _TornStream(self._fs.open_output_stream(path, *args, **kwargs))
            raise Crash(self.ops[-1])
        return self._fs.open_output_stream(path, *args, **kwargs)

    def move(self, src, dest):
        if self._op("rename", dest):
            raise Crash(self.ops[-1])
        return self._fs.move(src, dest)

    def delete_dir(self, path):
        if self._op("delete_dir", path):
            raise Crash(self.ops[-1])
        return self._fs.delete_dir(path)

    def delete_file(self, path):
        if self._op("delete", path):
            raise Crash(self.ops[-1])
        return self._fs.delete_file(path)


def _rows(shard: str, n: int) -> list[dict]:
    from pipeline.writing import COLUMNS

    return [{**dict.fromkeys(COLUMNS), "key": f"{shard}{i:04d}", "shard": shard, "status": "ok", "caption_flags": [],
             "frame_indices": []} for i in range(n)]


def _writer_run(store, shard: str, rows: list[dict], chunk_size: int, attempt: int) -> None:
    """What run_shard does with the store: skip a finished shard, skip committed keys, commit, finalize."""
    if store.is_finished(shard):
        store.discard_leftover_chunks(shard)
        return
    done = store.committed_keys(shard)
    todo = [r for r in rows if r["key"] not in done]
    for i in range(0, len(todo), chunk_size):
        store.commit_chunk(shard, todo[i:i + chunk_size], attempt)
    store.finalize_shard(shard, {})


def test_crash_at_every_storage_operation_then_rerun(tmp_path):
    from pipeline.writing import OutputStore

    shard, rows = "00000", _rows("00000", 5)
    probe = OutputStore(str(tmp_path / "probe"))
    probe.fs = CrashingFS(probe.fs, crash_at=0, torn=False)
    _writer_run(probe, shard, rows, 2, 1)
    n_ops = len(probe.fs.ops)
    assert n_ops >= 8, probe.fs.ops  # 3 chunks and the data file (write + rename each), then delete_dir
    tried = 0
    for crash_at in range(1, n_ops + 1):
        for torn in (False, True):
            if torn and not probe.fs.ops[crash_at - 1].startswith("write"):
                continue
            out = tmp_path / f"crash{crash_at}{'t' if torn else ''}"
            store = OutputStore(str(out))
            store.fs = CrashingFS(store.fs, crash_at, torn)
            with pytest.raises(Crash):
                _writer_run(store, shard, rows, 2, 1)
            what = f"crash at {store.fs.ops[-1]!r}{' (torn)' if torn else ''}"
            files, keys = _reader_view(out)  # what a reader of OUT/data sees right after the crash
            assert files in ([], [f"{shard}.parquet"]), f"{what}: readers see {files}"
            assert len(keys) == len(set(keys)), f"{what}: duplicates {keys}"
            _writer_run(OutputStore(str(out)), shard, rows, 2, 2)  # the rerun
            files, keys = _reader_view(out)
            assert files == [f"{shard}.parquet"], f"{what}: after the rerun readers see {files}"
            assert sorted(keys) == [r["key"] for r in rows], f"{what}: after the rerun {sorted(keys)}"
            tried += 1
    assert tried > n_ops
    print(f"storage crash points: {tried} crashes over {n_ops} operations, each rerun exactly once")


class Turnstile:
    """Runs writer threads one at a time, switching (by a seeded coin) at every filesystem call."""

    def __init__(self, rng: random.Random, writers: int):
        self.cv = threading.Condition()
        self.rng, self.active, self.waiting, self.turn = rng, set(range(writers)), set(), None
        self.switches = 0

    def _pick(self) -> None:
        if self.active and self.waiting == self.active:
            self.turn = self.rng.choice(sorted(self.waiting))
            self.switches += 1
            self.cv.notify_all()

    def step(self, w: int) -> None:
        with self.cv:
            self.waiting.add(w)
            self.turn = None
            self._pick()
            if not self.cv.wait_for(lambda: self.turn == w, timeout=30):
                raise AssertionError("turnstile stuck")
            self.waiting.discard(w)

    def finish(self, w: int) -> None:
        with self.cv:
            self.active.discard(w)
            self.waiting.discard(w)
            self.turn = None
            self._pick()


class SteppingFS:
    def __init__(self, fs, turnstile: Turnstile, w: int):
        self._fs, self._t, self._w = fs, turnstile, w

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def stepped(*args, **kwargs):
            self._t.step(self._w)
            return attr(*args, **kwargs)
        return stepped


def test_two_concurrent_writers_of_a_shard_interleaved_at_random(tmp_path):
    """A zombie actor of a killed job and the rerun's actor on the same shard, their filesystem calls
    interleaved at random: whatever the interleaving, nothing is lost or duplicated (a writer may fail,
    e.g. reading a chunk the other just merged; its retry then finds the shard finished)."""
    from pipeline.writing import OutputStore

    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    schedules = int(os.environ.get("CHAOS_SCHEDULES") or 150)
    shard, rows = "00000", _rows("00000", 5)
    outcomes: collections.Counter = collections.Counter()
    for n in range(schedules):
        rng = random.Random(f"{seed}-writers-{n}")
        out = tmp_path / f"s{n}"
        if rng.random() < 0.5:  # an earlier attempt committed a chunk before dying
            OutputStore(str(out)).commit_chunk(shard, rows[:2], 1)
        turnstile = Turnstile(rng, 2)
        errors: list[BaseException | None] = [None, None]

        def writer(w: int, turnstile=turnstile, errors=errors, out=out, rng=rng) -> None:
            store = OutputStore(str(out))
            store.fs = SteppingFS(store.fs, turnstile, w)
            try:
                _writer_run(store, shard, rows, rng.choice([1, 2]), 2 + w)
            except Exception as exc:  # an attempt that fails is retried by the driver
                errors[w] = exc
            finally:
                turnstile.finish(w)

        threads = [threading.Thread(target=writer, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        what = f"schedule {n} (CHAOS_SEED={seed}), errors {errors}"
        files, keys = _reader_view(out)
        assert len(keys) == len(set(keys)), f"{what}: duplicates {keys}"
        if errors == [None, None]:
            assert sorted(keys) == [r["key"] for r in rows], f"{what}: both writers finished, data has {keys}"
            outcomes["both finished"] += 1
        else:
            outcomes[f"one failed: {type(next(e for e in errors if e)).__name__}"] += 1
        _writer_run(OutputStore(str(out)), shard, rows, 2, 9)  # the retry / rerun
        files, keys = _reader_view(out)
        assert sorted(keys) == [r["key"] for r in rows], f"{what}: after the retry data has {keys}"
        assert files == [f"{shard}.parquet"], f"{what}: {files}"
    print(f"concurrent writers: seed {seed}, {schedules} schedules: {dict(outcomes)}")
