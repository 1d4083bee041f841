"""Job and shard progress: `_job.json`, the fingerprint check, shard states and the run plan.

The truth of what is finished is the data files and the committed chunks (see writing.py);
`_progress/{shard}.json` is a summary for operators and the record of attempts and failures.
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from pipeline.manifest import Manifest, fingerprint
from pipeline.writing import OutputStore

SHARD_STATES = ("done", "running", "failed", "pending")
JOB_FILE = "_job.json"


class FingerprintMismatch(RuntimeError):
    pass


def model_identity(model_path: str) -> str:
    """A stable identity of the weights: directory name plus a hash of config and weight index.

    Hashing the small metadata files (not the weights) keeps this cheap for a 34B checkpoint and
    independent of where the directory is mounted.
    """
    root = Path(model_path)
    h = hashlib.sha256()
    found = False
    for name in ("config.json", "model.safetensors.index.json"):
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
            found = True
    if not found:
        raise FileNotFoundError(f"model directory {model_path!r} has no config.json")
    return f"{root.resolve().name}@{h.hexdigest()[:12]}"


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "ray", "pyarrow", "webdataset", "decord", "opencc"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(frozen=True)
class JobIdentity:
    fingerprint: str
    parts: dict[str, Any]
    model: str
    prompt_version: str


def job_identity(m: Manifest, prompt_version: str) -> JobIdentity:
    model = model_identity(m.model.path)
    fp, parts = fingerprint(m, model, prompt_version)
    return JobIdentity(fp, parts, model, prompt_version)


def ensure_job(store: OutputStore, m: Manifest, ident: JobIdentity) -> dict[str, Any]:
    """Write `_job.json` on first start; on later starts refuse a different fingerprint."""
    path = store.path(JOB_FILE)
    existing = store.read_json(path)
    if existing is not None:
        if existing.get("fingerprint") != ident.fingerprint:
            raise FingerprintMismatch(_describe_mismatch(store.uri, existing.get("fingerprint_parts", {}), ident))
        return existing
    record = {
        "fingerprint": ident.fingerprint,
        "fingerprint_parts": ident.parts,
        "manifest": m.to_dict(),
        "manifest_source": m.source,
        "versions": software_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_json(path, record)
    return record


def _describe_mismatch(uri: str, old: dict[str, Any], ident: JobIdentity) -> str:
    diffs = []
    for key in sorted(set(old) | set(ident.parts)):
        a, b = old.get(key), ident.parts.get(key)
        if a != b:
            diffs.append(f"  {key}: output has {json.dumps(a, sort_keys=True)}, manifest has {json.dumps(b, sort_keys=True)}")
    detail = "\n".join(diffs) or "  (fingerprint differs)"
    return (
        f"output {uri} was written by a job with a different configuration; refusing to mix captions.\n"
        f"{detail}\nUse a new output directory, or restore the original settings."
    )


def read_state(store: OutputStore, shard: str) -> dict[str, Any] | None:
    return store.read_json(store.state_path(shard))


def write_state(store: OutputStore, shard: str, **fields: Any) -> dict[str, Any]:
    state = read_state(store, shard) or {"shard": shard, "attempts": 0, "errors": []}
    state.update(fields)
    state["updated_at"] = time.time()
    store.write_json(store.state_path(shard), state)
    return state


def mark_running(store: OutputStore, shard: str, url: str, attempt: int, pid: int) -> None:
    write_state(store, shard, url=url, state="running", attempts=attempt, pid=pid, host=socket.gethostname(),
                started_at=time.time())


def mark_done(store: OutputStore, shard: str, counts: dict[str, int], truncated: str | None,
              seconds: float) -> None:
    write_state(store, shard, state="done", rows=dict(counts), truncated=truncated, seconds=round(seconds, 3),
                pid=None)


def record_failure(store: OutputStore, shard: str, url: str, attempt: int, reason: str, final: bool) -> None:
    state = read_state(store, shard) or {"shard": shard, "errors": []}
    errors = list(state.get("errors", [])) + [{"attempt": attempt, "reason": reason, "at": time.time()}]
    write_state(store, shard, url=url, attempts=attempt, errors=errors, pid=None,
                state="failed" if final else "running")


def shard_status(store: OutputStore, shard: str) -> str:
    if store.is_finished(shard):
        return "done"
    state = read_state(store, shard)
    if state is None:
        return "pending"
    return "failed" if state.get("state") == "failed" else "running" if state.get("state") == "running" else "pending"


@dataclass(frozen=True)
class Plan:
    to_run: list[tuple[str, str]]  # (shard name, url)
    done: list[str]
    failed_skipped: list[str]


def plan_shards(store: OutputStore, shards: list[tuple[str, str]], retry_failed: bool) -> Plan:
    """Which shards this run works on. A plain rerun finishes the unfinished ones and leaves shards
    marked failed alone; `--retry-failed` runs only those."""
    to_run, done, failed = [], [], []
    for name, url in shards:
        status = shard_status(store, name)
        if status == "done":
            store.discard_leftover_chunks(name)
            done.append(name)
        elif status == "failed":
            (to_run.append((name, url)) if retry_failed else failed.append(name))
        elif not retry_failed:
            to_run.append((name, url))
    return Plan(to_run, done, failed)
