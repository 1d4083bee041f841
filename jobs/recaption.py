"""The Ray job: `python -m jobs.recaption MANIFEST [--shards SPEC] [--output DIR] [--model DIR] [--retry-failed]`.

Inside `ray job submit` it joins that cluster; run directly with no RAY_ADDRESS it starts an
embedded local Ray on loopback. The driver expands the shard list, checks the output's fingerprint,
skips finished work, dispatches one shard at a time to ShardCaptioner actors (one per GPU), requeues
a shard whose actor died, and exits non-zero listing the shards that failed `max_attempts` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from jobs.progress_report import ProgressReporter, format_snapshot
from pipeline.dataset_card import write_dataset_card
from pipeline.manifest import Manifest, ManifestError, load_manifest, resolve_paths
from pipeline.progress import (
    JOB_FILE,
    FingerprintMismatch,
    ensure_job,
    job_identity,
    plan_shards,
    record_failure,
)
from pipeline.shards import ShardReadError, expand_shard_spec, shard_name
from pipeline.writing import META_CONFIG, META_FINGERPRINT, OutputStore

log = logging.getLogger("recaption")

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_USAGE = 0, 1, 2
POLL_S = 2.0  # how often the driver asks running actors for their progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", help="YAML job spec (see manifests/)")
    p.add_argument("--shards", help="override the manifest's shards: path, URL, brace range; comma-separated list")
    p.add_argument("--output", help="override the manifest's output directory or s3:// URI")
    p.add_argument("--model", help="override model.path: local directory of a PLLaVA checkpoint")
    p.add_argument("--retry-failed", action="store_true", help="rerun only the shards marked failed")
    p.add_argument("--actors", type=int, help="override resources.actors")
    p.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between summary log lines (default 60)")
    return p


def apply_overrides(m: Manifest, args: argparse.Namespace) -> Manifest:
    changes: dict[str, Any] = {}
    if args.shards:
        changes["shards"] = [s for s in args.shards.split(",") if s]
    if args.output:
        changes["output"] = args.output
    if args.model:
        changes["model"] = dataclasses.replace(m.model, path=args.model)
    if args.actors:
        changes["resources"] = dataclasses.replace(m.resources, actors=args.actors)
    return m.replace(**changes) if changes else m


def prompt_version_of(m: Manifest) -> str:
    # The driver knows the prompt version without loading weights: the template comes from config.json.
    from model.prompts import template_for_model_dir
    from pipeline.captioning import prompt_version_for

    return prompt_version_for(m, template_for_model_dir(m.model.path))


def connect_ray() -> Any:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # inside `ray job submit`, or pointed at a cluster
        return ray
    # Embedded local mode: loopback only, no usage stats (never set these when joining a cluster).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return ray


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


def prompt_texts(m: Manifest) -> dict[str, str]:
    """The prompt wordings in effect (manifest's or the template's defaults), for the dataset card."""
    from model.prompts import template_for_model_dir

    t = template_for_model_dir(m.model.path)
    texts = {"en": m.prompts.en or t.default_question_en}
    if "zh" in m.languages:
        if m.zh.mode == "direct":
            texts["zh_direct"] = m.prompts.zh_direct or t.default_question_zh
        elif m.zh.mode == "translate":
            texts["zh_translate"] = m.prompts.zh_translate or t.default_translate_zh
    return texts


def run(m: Manifest, retry_failed: bool = False, log_every_s: float = 60.0) -> int:
    store = OutputStore(m.output, m.storage)
    ident = job_identity(m, prompt_version_of(m))
    ensure_job(store, m, ident)
    urls = expand_shard_spec(m.shards)
    names = [shard_name(u) for u in urls]
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise ManifestError(f"{m.source}: shards {dupes[:5]} appear twice (or two shard URLs share a name)")
    plan = plan_shards(store, list(zip(names, urls)), retry_failed)
    log.info("code from %s", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log.info("job %s: %d shards, %d done, %d to run, %d failed left alone (fingerprint %s, output %s)",
             m.name, len(urls), len(plan.done), len(plan.to_run), len(plan.failed_skipped),
             ident.fingerprint, m.output)
    if not plan.to_run:
        return _finish(store, names, plan.failed_skipped)

    ray = connect_ray()
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    from jobs.actor import ShardCaptioner
    from jobs.metrics import record_shard_failure

    n_actors, num_gpus, num_cpus = actor_count(m, ray.cluster_resources(), len(plan.to_run))
    log.info("starting %d ShardCaptioner actors (num_gpus=%s, num_cpus=%s each)", n_actors, num_gpus, num_cpus)
    file_metadata = {
        META_CONFIG: json.dumps({"manifest": m.to_dict(), "fingerprint_parts": ident.parts}).encode(),
        META_FINGERPRINT: ident.fingerprint.encode(),
    }
    # Actors open the output and the shards themselves: the manifest's storage settings reach them as the
    # standard variables (endpoint and region only; credentials come from each node's own environment).
    storage_env = {var: value for var, value in (("AWS_ENDPOINT_URL", m.storage.endpoint_url),
                                                 ("AWS_REGION", m.storage.region)) if value}
    actor_cls = ShardCaptioner.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0,
                                       **({"runtime_env": {"env_vars": storage_env}} if storage_env else {}))

    def new_actor() -> Any:
        return actor_cls.remote(m, file_metadata)

    queue = deque(Task(name, url, 1) for name, url in plan.to_run)
    idle = [new_actor() for _ in range(n_actors)]
    running: dict[Any, tuple[Any, Task]] = {}
    started: dict[Any, float] = {}
    # The actor enforces shard_timeout_s between samples; a shard stuck inside a read or a decode that never
    # returns is stopped here by killing its actor (then retried like any actor death).
    watchdog_s = 1.5 * m.shard_timeout_s + 60
    stalled: set[Any] = set()
    failed: list[str] = list(plan.failed_skipped)
    progress = ProgressReporter(len(plan.to_run), log_every_s=log_every_s)

    while queue or running:
        while queue and idle:
            task = queue.popleft()
            actor = idle.pop()
            ref = actor.process_shard.remote(task.url, task.shard, task.attempt)
            running[ref] = (actor, task)
            started[ref] = time.monotonic()
            log.info("shard %s start (attempt %d): %s", task.shard, task.attempt, task.url)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        if not ready:
            progress.in_flight(_rows_in_flight(ray, [a for a, _ in running.values()]))
            for busy_ref, (busy_actor, busy_task) in running.items():
                if busy_ref not in stalled and time.monotonic() - started[busy_ref] > watchdog_s:
                    log.error("shard %s stalled past %.0fs; killing its actor", busy_task.shard, watchdog_s)
                    stalled.add(busy_ref)
                    ray.kill(busy_actor, no_restart=True)
            continue
        ref = ready[0]
        actor, task = running.pop(ref)
        started.pop(ref)
        try:
            outcome = ray.get(ref)
        except (RayActorError, ActorDiedError) as e:
            reason = (f"stalled past the {watchdog_s:.0f}s watchdog; actor killed" if ref in stalled
                      else f"actor died: {_first_line(e)}")
            ray.kill(actor, no_restart=True)
            idle.append(new_actor())
            record_shard_failure()
            if _retry_or_fail(store, task, reason, m.max_attempts, queue, failed):
                progress.shard_failed()
            continue
        except RayTaskError as e:
            reason = _first_line(e.cause if getattr(e, "cause", None) else e)
            idle.append(actor)
            if _retry_or_fail(store, task, reason, m.max_attempts, queue, failed):
                progress.shard_failed()
            continue
        idle.append(actor)
        progress.shard_finished(outcome["rows_new"])
        rate = outcome["rows_new"] / outcome["seconds"] if outcome["seconds"] else 0.0
        log.info("shard %s done (attempt %d): %s; %d new rows in %.1fs (%.2f clips/s), decode wait %.1fs, "
                 "model %.1fs%s", task.shard, task.attempt, _fmt(outcome["counts"]), outcome["rows_new"],
                 outcome["seconds"], rate, outcome["wait_decode_s"], outcome["model_s"],
                 f", TRUNCATED: {outcome['truncated']}" if outcome["truncated"] else "")
    progress.close()
    log.info("this run: %s", format_snapshot(progress.snapshot()))
    for actor in idle:
        ray.kill(actor, no_restart=True)
    write_dataset_card(store, store.read_json(store.path(JOB_FILE)), prompt_texts(m))
    return _finish(store, names, failed)


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


def _retry_or_fail(store: OutputStore, task: Task, reason: str, max_attempts: int, queue: deque,
                   failed: list[str]) -> bool:
    """Requeue the shard, or mark it failed after max_attempts; True when it is final."""
    final = task.attempt >= max_attempts
    record_failure(store, task.shard, task.url, task.attempt, reason, final=final)
    if final:
        log.error("shard %s FAILED after %d attempts: %s", task.shard, task.attempt, reason)
        failed.append(task.shard)
    else:
        log.warning("shard %s attempt %d failed (%s); requeued", task.shard, task.attempt, reason)
        queue.append(Task(task.shard, task.url, task.attempt + 1))
    return final


def _finish(store: OutputStore, names: list[str], failed: list[str]) -> int:
    from jobs.status import collect_status

    report = collect_status(store, names)
    log.info("summary: shards %s; rows %s; output %s", _fmt(report["shards_by_state"]),
             _fmt(report["rows_by_status"]), store.uri)
    if failed:
        for name in failed:
            log.error("failed shard %s: %s", name, report["shards"].get(name, {}).get("last_error"))
        log.error("%d shard(s) failed; rerun with --retry-failed once fixed: %s", len(failed), " ".join(failed))
        return EXIT_FAILED_SHARDS
    return EXIT_OK


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else text}"[:500]


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        m = resolve_paths(apply_overrides(load_manifest(args.manifest), args), os.getcwd())
        return run(m, retry_failed=args.retry_failed, log_every_s=args.log_every)
    except (ManifestError, FingerprintMismatch, ShardReadError, OSError) as e:
        # bad manifest, different job in OUT, missing model dir, unreachable output store: no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
