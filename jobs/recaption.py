"""The Ray job: `python -m jobs.recaption MANIFEST [--shards SPEC] [--output DIR] [--model DIR] [--retry-failed]`.

Inside `ray job submit` it joins that cluster; run directly with no RAY_ADDRESS it starts an
embedded local Ray on loopback. The driver expands the shard list, checks the output's fingerprint,
skips finished work, dispatches one shard at a time to ShardCaptioner actors (one per GPU), requeues
a shard whose actor died, and exits non-zero listing the shards that failed `max_attempts` times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jobs.progress_report import ProgressReporter, format_snapshot
from jobs.status import collect_status
from model.describe import ScoreModelInfo, describe_score_model
from pipeline.dataset_card import write_dataset_card
from pipeline.lease import LeaseHeld, acquire
from pipeline.manifest import Manifest, ManifestError, load_manifest, resolve_paths, split_shard_list
from pipeline.model_identity import checkpoint_files
from pipeline.preflight import SetupError, check_engine, check_shards, check_stores, check_unique_keys
from pipeline.progress import (
    JOB_FILE,
    FingerprintMismatch,
    Plan,
    describe_job_model,
    ensure_job,
    job_identity,
    plan_redo,
    plan_shards,
    record_failure,
    settle_record,
    write_shard_list,
)
from pipeline.retry import RetryPolicy
from pipeline.rows import STATUSES
from pipeline.settings import ActorSettings
from pipeline.shards import ShardReadError, expand_shard_spec, redact_urls, safe_url
from pipeline.stats import Stats
from pipeline.writing import META_CONFIG, META_FINGERPRINT, OutputStorageError, OutputStore

log = logging.getLogger("recaption")

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_USAGE = 0, 1, 2  # Ctrl-C: 130, SIGTERM: 143
EXIT_NO_ACTORS = 3  # no actor could run for retry.no_actor_timeout_s (every node lost): rerun to resume
EXIT_STORAGE = 4  # the output's storage refused (full, quota, read-only, no permission): fix it, rerun to resume
POLL_S = 2.0  # how often the driver asks running actors for their progress
STOP_GRACE_S = 30.0  # after Ctrl-C / SIGTERM, how long running shards get to commit before their actors are killed


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _statuses(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in STATUSES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)}: not a row status; use a comma-separated "
                                         f"list of {', '.join(STATUSES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="YAML job spec (see manifests/)")
    p.add_argument("--shards", help="override the manifest's shards: path, URL, brace range; comma-separated list")
    p.add_argument("--output", help="override the manifest's output: a directory, or an s3://, gs://, az:// URL")
    p.add_argument("--model", help="override model.path: local directory of a PLLaVA checkpoint")
    p.add_argument("--retry-failed", action="store_true", help="rerun only the shards marked failed")
    p.add_argument("--redo", type=_statuses, metavar="STATUSES",
                   help="in an existing output, caption again only the rows with these statuses (comma-separated: "
                        "flagged, error, decode_error, source_failed, ok); every other row stays as it is")
    p.add_argument("--actors", type=positive_int, help="override resources.actors (>= 1)")
    p.add_argument("--force", action="store_true",
                   help="take over the output even if another driver's lease on it looks alive (only when you "
                        "know that driver is gone: two drivers on one output caption everything twice)")
    p.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between summary log lines (default 60)")
    return p


def apply_overrides(m: Manifest, args: argparse.Namespace) -> Manifest:
    changes: dict[str, Any] = {}
    if args.shards is not None:
        changes["shards"] = split_shard_list(args.shards)
        if not changes["shards"]:
            raise ManifestError(f"--shards {args.shards!r} names no shard")
    if args.output:
        changes["output"] = args.output
    if args.model:
        changes["model"] = dataclasses.replace(m.model, path=args.model)
    if args.actors is not None:
        changes["resources"] = dataclasses.replace(m.resources, actors=args.actors)
    return m.replace(**changes) if changes else m


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _AnsiStripper:
    """A text stream that drops ANSI escape codes: Ray colours some of what it prints (the dashboard URL,
    "[repeated Nx across cluster]") whatever the output is, and a log file should not get escape codes."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_ANSI.sub("", text) if "\x1b" in text else text)
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def connect_ray(stop: StopRequest | None = None) -> Any:
    """Start or join Ray. With `stop`, a Ctrl-C / SIGTERM while Ray starts is held until ray.init returns,
    then stops the driver like one before it (exit 130 / 143). A Ray that does not start (a start-up timeout
    on a loaded machine, a GCS that does not answer) is a setup failure: one line, exit 2."""
    local = not os.environ.get("RAY_ADDRESS")
    failed = ("the embedded local Ray (127.0.0.1) did not start" if local
              else "could not join the Ray cluster named by RAY_ADDRESS")
    with stop.held_while_ray_starts() if stop else contextlib.nullcontext():
        import ray

        try:
            if not local:
                ray.init(log_to_driver=True)  # inside `ray job submit`, or pointed at a cluster
                return ray
            # Embedded local mode: loopback only, no usage stats (never set these when joining a cluster).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
            return ray
        except Exception as e:
            ray.shutdown()  # the processes it had started
            raise SetupError(f"{failed}: {_first_line(e)}") from None


def actor_count(m: Manifest, resources: dict[str, float], n_shards: int) -> tuple[int, float, float]:
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 1.0)
    num_gpus = m.resources.num_gpus_per_actor if gpus > 0 else 0.0
    num_cpus = min(m.resources.num_cpus_per_actor, cpus)
    if m.resources.actors:
        n = m.resources.actors
    elif num_gpus > 0:
        n = int(gpus // num_gpus)
    else:
        n = max(1, int(cpus // max(num_cpus, 1.0)))
    return max(1, min(n, n_shards)), num_gpus, num_cpus


@dataclass
class Task:
    shard: str
    url: str
    attempt: int
    redo: tuple[str, ...] | None = None  # --redo: the statuses whose rows this shard captions again


def prompt_texts(m: Manifest, model: Any) -> dict[str, str]:
    """The prompt wordings in effect (manifest's or the template's defaults), for the dataset card."""
    p = model.prompts(m.prompts)
    texts = {"en": p.en}
    if "zh" in m.languages:
        if m.zh.mode == "direct":
            texts["zh_direct"] = p.zh_direct
        elif m.zh.mode == "translate":
            texts["zh_translate"] = p.zh_translate
    return texts


class SetupFailure(RuntimeError):
    """Raised inside the dispatch loop when actors cannot start: the job ends with exit 2."""


class StopRequest:
    """Ctrl-C / SIGTERM: the first asks the dispatch loop to stop gracefully, a second one stops at once.

    Before the loop starts (hashing weights, planning) there is nothing to wait for: the first signal
    raises `Interrupted` right away.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.holding = False  # ray.init is running: the first signal waits for it to return
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def install(self) -> None:
        """(Re)install the handlers: ray.init() replaces SIGTERM's with its own (a bare sys.exit)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def held_while_ray_starts(self) -> Iterator[None]:
        """Hold the first signal until ray.init returns, then raise `Interrupted` for it. ray.init installs
        SIGTERM handlers that exit from inside its start-up (exit 15, or an abort with a C++ stack, exit 134,
        when it lands while the core worker starts; Ray's agents and the lease left behind); they are kept out
        until it returns, and ours stay (`install` re-installs them after ray.init anyway)."""
        self.holding = True
        try:
            import ray._private.utils as ray_utils  # where ray.init sets its SIGTERM handlers (Ray 2.60)

            set_handler = getattr(ray_utils, "set_sigterm_handler", None)  # a Ray without it: nothing to keep out
            if set_handler:
                ray_utils.set_sigterm_handler = lambda handler: None
            try:
                yield
            finally:
                if set_handler:
                    ray_utils.set_sigterm_handler = set_handler
        finally:
            self.holding = False
            self.install()
        if self.requested:
            raise Interrupted(self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self.graceful:
            print(f"\n{signal.Signals(signum).name}: stopping; running shards commit what they have "
                  f"(up to {STOP_GRACE_S:.0f}s; send it again to stop now)", file=sys.stderr, flush=True)
            return
        if first and self.holding:
            print(f"\n{signal.Signals(signum).name}: stopping once Ray has started (send it again to stop now)",
                  file=sys.stderr, flush=True)
            return
        raise Interrupted(self.signum)


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run(m: Manifest, retry_failed: bool = False, log_every_s: float = 60.0, force: bool = False,
        stop: StopRequest | None = None, redo: tuple[str, ...] | None = None) -> int:
    stop = stop or StopRequest()
    check_stores(m.shards, m.output)
    store = OutputStore(m.output, m.storage)
    checkpoint_files(m.model.path)  # a bad model.path ends here, named, before anything reads the folder
    score_model(m)  # so does a bad score.model
    model = describe_job_model(m)  # frames, prompts, content identity: the driver's one look at the checkpoint
    ident = job_identity(m, model)
    shards = check_shards(expand_shard_spec(m.shards), m.storage)
    if m.duplicate_keys == "refuse":
        check_unique_keys(shards, m.storage)
    check_device_setting(m)
    check_engine(m.generation)
    if redo and store.read_json(store.path(JOB_FILE)) is None:
        raise SetupError(f"--redo needs an existing output; {m.output} has no {JOB_FILE}")
    lease = acquire(store, force=force)
    try:
        lease.start_heartbeat()
        ensure_job(store, m, ident)
        write_shard_list(store, shards)
        if redo:
            return _redo(m, model, store, ident, shards, redo, lease, stop, log_every_s)
        plan = plan_shards(store, shards, retry_failed)
        log.info("code from %s", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        log.info("job %s: %d shards, %d done, %d to run, %d failed left alone (fingerprint %s, output %s)",
                 m.name, len(shards), len(plan.done), len(plan.to_run), len(plan.failed_skipped),
                 ident.fingerprint, m.output)
        names = [name for name, _ in shards]
        if not plan.to_run:
            return _finish(store, names, plan.failed_skipped)
        return _dispatch(m, model, store, ident, plan, names, lease, stop, log_every_s)
    finally:
        lease.release()


def _redo(m: Manifest, model: Any, store: OutputStore, ident: Any, shards: list[tuple[str, str]],
          redo: tuple[str, ...], lease: Any, stop: StopRequest, log_every_s: float) -> int:
    """`--redo STATUSES`: the finished shards holding rows with those statuses run again, captioning only
    those rows (pipeline/shard_runner.py `redo`); shards not finished yet are left to a plain rerun."""
    rp = plan_redo(store, shards, redo)
    log.info("job %s: redo of %s rows: %d rows in %d of %d shards (fingerprint %s, output %s)", m.name,
             ",".join(redo), rp.rows, len(rp.to_run), len(shards), ident.fingerprint, m.output)
    if rp.unfinished:
        log.warning("%d shard(s) are not finished and are left alone by --redo; rerun without --redo to finish "
                    "them: %s", len(rp.unfinished), " ".join(rp.unfinished[:10]))
    names = [name for name, _ in shards]
    if not rp.to_run:
        return _finish(store, names, [])
    plan = Plan(rp.to_run, [], [])
    return _dispatch(m, model, store, ident, plan, names, lease, stop, log_every_s, redo=redo)


def score_model(m: Manifest) -> ScoreModelInfo | None:
    """The score.model checkpoint, checked without torch (CheckpointError naming what is wrong), or None."""
    return describe_score_model(m.score.model, m.score.allow_pickle) if m.score.model else None


def check_device_setting(m: Manifest) -> None:
    device = m.model.device
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise SetupError(f"model.device is {device!r}; use auto, cpu, cuda or cuda:N")


def check_cluster(m: Manifest, resources: dict[str, float]) -> None:
    """A `cuda` job on a cluster without GPU resources fails here, before any actor loads the model."""
    gpus = resources.get("GPU", 0.0)
    if m.model.device.startswith("cuda") and gpus <= 0:
        cpus = resources.get("CPU", 0.0)
        raise SetupError(f"model.device is {m.model.device!r} but the Ray cluster has no GPUs "
                         f"(CPU={cpus:g}, GPU=0); use model.device: auto (CPU when there is no GPU) or add GPU nodes")
    if m.model.device.startswith("cuda") and m.resources.num_gpus_per_actor <= 0:
        raise SetupError("model.device is cuda but resources.num_gpus_per_actor is 0: Ray would give the actors "
                         "no GPU")


def _dispatch(m: Manifest, model: Any, store: OutputStore, ident: Any, plan: Any, names: list[str], lease: Any,
              stop: StopRequest, log_every_s: float, redo: tuple[str, ...] | None = None) -> int:
    """Start the actors, keep every actor's shard places busy until the queue is empty (or a stop), then
    write the dataset card and the summary."""
    ray = connect_ray(stop)
    d = _Dispatcher(ray, m, store, ident, plan, lease, stop, log_every_s, redo)
    stop.graceful = True
    try:
        while True:
            d.maybe_stop()
            d.dispatch()
            if not d.running and (d.stopping_since is not None or not d.queue):
                break
            ready, _ = ray.wait([*d.running, *d.starting], num_returns=1, timeout=POLL_S)
            try:
                if not ready:
                    d.on_tick()
                elif ready[0] in d.starting:
                    d.on_actor_ready(ready[0])
                else:
                    d.on_shard_result(ready[0])
            except OutputStorageError as e:  # the driver's own write (a failure record): stop as for a shard's
                d.storage_fault = d.storage_fault or e
    finally:
        stop.graceful = False
        d.close()
    log.info("this run: %s", format_snapshot(d.progress.snapshot()))
    if d.storage_fault is not None:
        snap = d.progress.snapshot()
        print(_storage_error_line(d.storage_fault, snap["shards_total"] - snap["shards_done"] - snap["shards_failed"]),
              file=sys.stderr, flush=True)
        return EXIT_STORAGE
    unfinished = len(d.queue) + len(d.interrupted)
    if d.stopping_since is not None and unfinished:
        print(f"interrupted: {unfinished} shards unfinished; rerun the same command to resume", file=sys.stderr,
              flush=True)
        if d.stranded:
            return EXIT_NO_ACTORS
        if lease.lost.is_set() and not stop.requested:
            return EXIT_USAGE
        return stop.exit_code
    report = collect_status(store, names, card=True)  # listings and progress records, once for both
    write_dataset_card(store, store.read_json(store.path(JOB_FILE)), prompt_texts(m, model), description=model,
                       score=score_model(m), score_frames=m.score.frames, report=report)
    return _finish(store, names, d.failed, report)


class _Dispatcher:
    """The driver's state while shards run: actors starting, free shard places (an actor holds
    SHARDS_IN_FLIGHT), shards running, the queue; one method per event the loop in `_dispatch` waits for."""

    def __init__(self, ray: Any, m: Manifest, store: OutputStore, ident: Any, plan: Any, lease: Any,
                 stop: StopRequest, log_every_s: float, redo: tuple[str, ...] | None = None):
        from jobs.actor import SHARDS_IN_FLIGHT, ShardCaptioner

        self.ray, self.m, self.store, self.lease, self.stop = ray, m, store, lease, stop
        self.shards_in_flight = SHARDS_IN_FLIGHT
        resources = ray.cluster_resources()
        check_cluster(m, resources)
        n_actors, num_gpus, num_cpus = actor_count(m, resources, len(plan.to_run))
        log.info("starting %d ShardCaptioner actors (num_gpus=%s, num_cpus=%s each)", n_actors, num_gpus,
                 num_cpus)
        self.file_metadata = {
            META_CONFIG: json.dumps({"manifest": m.to_dict(), "fingerprint_parts": ident.parts}).encode(),
            META_FINGERPRINT: ident.fingerprint.encode(),
        }
        # Actors open the output and the shards with the manifest's `storage` settings, passed explicitly
        # (credentials never travel: each node's own environment, config or role provides them).
        self.actor_cls = ShardCaptioner.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)
        # the content identity the driver computed: the actors' vLLM export cache is keyed by it (no re-hashing)
        self.actor_settings = ActorSettings.from_manifest(m, model_identity=ident.model_digest)
        self.policy = RetryPolicy.from_manifest(m)
        # The actor enforces shard_timeout_s between samples; a shard stuck inside a read or a decode that
        # never returns is stopped here by killing its actor (then retried like any actor death).
        self.watchdog_s = self.policy.watchdog_s
        self.queue = deque(Task(name, url, 1, redo) for name, url in plan.to_run)
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor still loading the model
        self.idle: list[Any] = []  # one entry per free shard place
        self.dead: list[Any] = []  # actors already replaced (their other shard must not replace them twice)
        self.running: dict[Any, tuple[Any, Task]] = {}
        self.started: dict[Any, float] = {}
        self.stalled: set[Any] = set()
        self.failed: list[str] = list(plan.failed_skipped)
        self.interrupted: list[str] = []
        self.progress = ProgressReporter(len(plan.to_run), log_every_s=log_every_s)
        self.stopping_since: float | None = None
        self.no_actor_since: float | None = None  # since when no actor has been loaded and alive
        self.ever_ready = False  # an actor has loaded the model: a later death while starting is a lost actor
        self.stranded = False  # stopped because no actor could run for retry.no_actor_timeout_s
        self.storage_fault: OutputStorageError | None = None  # the output's storage refused: stop, exit 4
        self.actor_needs = f"num_gpus={num_gpus}, num_cpus={num_cpus}"
        for _ in range(n_actors):
            self.new_actor()

    def new_actor(self) -> None:
        actor = self.actor_cls.remote(self.actor_settings, self.file_metadata)
        self.starting[actor.ready.remote()] = actor

    def maybe_stop(self) -> None:
        """Ctrl-C / SIGTERM, another driver took the output, or the output's storage refused: ask the running
        shards to commit and stop."""
        self.storage_fault = self.storage_fault or self.lease.storage_fault
        if self.stopping_since is not None or not (self.stop.requested or self.lease.lost.is_set()
                                                   or self.storage_fault):
            return
        self.stopping_since = time.monotonic()
        if self.lease.lost.is_set() and not self.stop.requested:
            log.error("another driver took over %s (%s); stopping", self.m.output, self.lease.lost_to)
        elif self.storage_fault is not None:
            log.error("the output's storage refused: %s; stopping", self.storage_fault)
        for actor, _ in self.running.values():
            actor.stop.remote()

    def dispatch(self) -> None:
        while self.stopping_since is None and self.queue and self.idle:
            task = self.queue.popleft()
            actor = self.idle.pop()
            ref = actor.process_shard.remote(task.url, task.shard, task.attempt, task.redo)
            self.running[ref] = (actor, task)
            self.started[ref] = time.monotonic()
            # the actor gets the full URL; logs and records get it without credentials (safe_url)
            self.progress.log("shard %s start (attempt %d): %s", task.shard, task.attempt, safe_url(task.url))

    def on_tick(self) -> None:
        """Nothing finished for POLL_S: progress, the watchdog, the end of a stop's grace period."""
        actors = list({id(a): a for a, _ in self.running.values()}.values())
        self.progress.in_flight(_rows_in_flight(self.ray, actors))
        now = time.monotonic()
        for ref, (actor, task) in self.running.items():
            if ref not in self.stalled and now - self.started[ref] > self.watchdog_s:
                log.error("shard %s stalled past %.0fs; killing its actor", task.shard, self.watchdog_s)
                self.stalled.add(ref)
                self.ray.kill(actor, no_restart=True)
        self.check_stranded(now)
        if self.stopping_since is not None and now - self.stopping_since > STOP_GRACE_S:
            for ref, (actor, task) in list(self.running.items()):
                self.ray.kill(actor, no_restart=True)
                self.interrupted.append(task.shard)
                self.running.pop(ref)

    def check_stranded(self, now: float) -> None:
        """Stop when no actor has run for retry.no_actor_timeout_s: the nodes that held them are gone and Ray
        keeps the replacements pending (no node with the free resources; an autoscaler may still add one)."""
        if self.idle or self.running or not self.starting or self.stopping_since is not None:
            self.no_actor_since = None
            return
        self.no_actor_since = self.no_actor_since or now
        if now - self.no_actor_since > self.policy.no_actor_timeout_s:
            log.error("no actor has been ready for %.0fs (retry.no_actor_timeout_s): Ray could place none (each "
                      "needs %s: were nodes lost?) or the model loads slower than that; stopping with %d shards "
                      "left", now - self.no_actor_since, self.actor_needs, len(self.queue))
            self.stranded = True
            self.stopping_since = now

    def on_actor_ready(self, ref: Any) -> None:
        from ray.exceptions import ActorDiedError, RayActorError

        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except (RayActorError, ActorDiedError) as e:
            # The process died (a model that fails to load answers with an error instead): its node may be gone.
            # Once an actor has loaded this model that is no setup problem: ask for a replacement, which Ray
            # places when a node has room (retry.no_actor_timeout_s bounds the wait). Before any has, go on
            # with the others; the job ends with a setup failure only when none is left.
            if self.ever_ready or self.starting:
                log.warning("an actor died while starting (%s); %s", _first_line(e),
                            "asking for another" if self.ever_ready else "going on with the others")
                self.ray.kill(actor, no_restart=True)
                if self.ever_ready and self.stopping_since is None:
                    self.new_actor()
                return
            info = {"error": f"the actor died while starting: {_first_line(e)}"}
        if info.get("error"):
            raise SetupFailure(f"an actor could not load the model ({self.m.model.path}): {info['error']}")
        self.ever_ready = True
        self.idle.extend([actor] * self.shards_in_flight)

    def on_shard_result(self, ref: Any) -> None:
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        actor, task = self.running.pop(ref)
        self.started.pop(ref)
        try:
            outcome = self.ray.get(ref)
        except (RayActorError, ActorDiedError) as e:
            self.on_actor_death(actor, task, ref, e)
            return
        except RayTaskError as e:
            self.idle.append(actor)
            cause = e.cause if getattr(e, "cause", None) else e
            if isinstance(cause, OutputStorageError):  # not the shard's fault: no attempt charged, the job stops
                self.interrupted.append(task.shard)
                self.storage_fault = self.storage_fault or cause
                self.progress.log("shard %s stopped: %s", task.shard, cause, level=logging.WARNING)
            elif type(cause).__name__ == "ShardInterrupted":
                self.interrupted.append(task.shard)
                self.progress.log("shard %s stopped: %s", task.shard, _first_line(cause))
            elif _retry_or_fail(self.store, task, _first_line(cause), self.policy, self.queue, self.failed,
                                self.progress):
                self.progress.shard_failed()
            return
        self.idle.append(actor)
        stats = Stats.from_dict(outcome["stats"])
        self.progress.shard_finished(stats.rows_new)
        rate = stats.rows_new / outcome["seconds"] if outcome["seconds"] else 0.0
        self.progress.log("shard %s done (attempt %d): %s; %d new rows in %.1fs (%.2f clips/s), decode wait "
                          "%.1fs, model %.1fs", task.shard, task.attempt, _fmt(outcome["counts"]),
                          stats.rows_new, outcome["seconds"], rate, stats.wait_decode_s, stats.model_s)

    def on_actor_death(self, actor: Any, task: Task, ref: Any, error: BaseException) -> None:
        from jobs.metrics import record_shard_failure

        self.ray.kill(actor, no_restart=True)
        self.idle[:] = [a for a in self.idle if a is not actor]
        if self.stopping_since is not None:
            self.interrupted.append(task.shard)
            return
        reason = (f"stalled past the {self.watchdog_s:.0f}s watchdog; actor killed" if ref in self.stalled
                  else f"actor died: {_first_line(error)}")
        if not any(actor is d for d in self.dead):
            self.dead.append(actor)
            self.new_actor()
        record_shard_failure()
        if _retry_or_fail(self.store, task, reason, self.policy, self.queue, self.failed, self.progress):
            self.progress.shard_failed()

    def close(self) -> None:
        self.progress.close()
        everyone = [*self.idle, *(a for a, _ in self.running.values()), *self.starting.values()]
        for actor in {id(a): a for a in everyone}.values():
            self.ray.kill(actor, no_restart=True)


def _rows_in_flight(ray: Any, actors: list[Any]) -> int:
    """Rows committed so far by the shards in progress (0 for an actor that does not answer in time)."""
    refs = [a.progress.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
    total = 0
    for ref in ready:
        try:
            total += ray.get(ref).get("rows", 0)
        except Exception:  # a dying actor: its shard will be retried, nothing to count
            pass
    return total


def _retry_or_fail(store: OutputStore, task: Task, reason: str, policy: RetryPolicy, queue: deque,
                   failed: list[str], progress: ProgressReporter) -> bool:
    """Requeue the shard, or mark it failed after max_attempts; True when it is final."""
    final = policy.is_final(task.attempt)
    record_failure(store, task.shard, task.url, task.attempt, reason, final=final)
    if final:
        progress.log("shard %s FAILED after %d attempts: %s", task.shard, task.attempt, reason, level=logging.ERROR)
        failed.append(task.shard)
    else:
        progress.log("shard %s attempt %d failed (%s); requeued", task.shard, task.attempt, reason,
                     level=logging.WARNING)
        queue.append(Task(task.shard, task.url, task.attempt + 1, task.redo))
    return final


def _finish(store: OutputStore, names: list[str], failed: list[str], report: dict[str, Any] | None = None) -> int:
    report = report or collect_status(store, names)
    for name in report["stale_records"]:  # killed between its data file and its record: the record catches up
        if settle_record(store, name):
            log.info("shard %s: its data file was written but its progress record did not say so (a worker "
                     "killed in between); the record says done now", name)
    log.info("summary: shards %s; rows %s; output %s", _fmt(report["shards_by_state"]),
             _fmt(report["rows_by_status"]), store.uri)
    if failed:
        for name in failed:
            log.error("failed shard %s: %s", name, report["shards"].get(name, {}).get("last_error"))
        log.error("%d shard(s) failed; rerun with --retry-failed once fixed: %s", len(failed), " ".join(failed))
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _storage_error_line(e: OutputStorageError, unfinished: int | None = None) -> str:
    """The one line the driver ends with when the output's storage refused (exit 4)."""
    left = f"; {unfinished} shards unfinished, their committed rows kept" if unfinished else ""
    return (f"error: output storage: {e}{left}; free space or fix access to the output, then rerun the same "
            f"command to resume")


def _first_line(e: BaseException) -> str:
    """The exception's last line, as a failure reason for logs and records: a URL in it without credentials."""
    text = redact_urls(str(e)).strip() or type(e).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else text}"[:500]


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    stop = StopRequest()
    stop.install()
    try:
        m = resolve_paths(apply_overrides(load_manifest(args.manifest), args), os.getcwd())
        if args.redo and args.retry_failed:
            raise ManifestError("--redo and --retry-failed do not go together: finish the failed shards first")
        return run(m, retry_failed=args.retry_failed, log_every_s=args.log_every, force=args.force, stop=stop,
                   redo=args.redo)
    except Interrupted as e:
        print(f"interrupted ({e}) while starting, before any shard ran; nothing lost: rerun the same command to "
              f"resume", file=sys.stderr)
        return 128 + e.signum
    except OutputStorageError as e:  # the driver's own writes: _job.json, _shards.json, the lease, the card
        print(_storage_error_line(e), file=sys.stderr)
        return EXIT_STORAGE
    except (ManifestError, FingerprintMismatch, ShardReadError, SetupError, SetupFailure, LeaseHeld,
            OSError, ValueError) as e:
        # bad manifest or model path, different job in OUT, output held by another driver, missing device,
        # unreachable store: one line, no traceback (ValueError covers ModelPathError and CheckpointError)
        print(f"error: {redact_urls(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        stop.restore()


def configure_logging() -> None:
    if not sys.stdout.isatty() and not isinstance(sys.stdout, _AnsiStripper):
        sys.stdout = _AnsiStripper(sys.stdout)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours its worker-log prefixes otherwise
    if not sys.stderr.isatty() and not isinstance(sys.stderr, _AnsiStripper):
        sys.stderr = _AnsiStripper(sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray 2.60 warns on every start that token authentication is on; the README says it is.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
