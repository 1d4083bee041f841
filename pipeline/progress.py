"""Job and shard progress: `_job.json`, the fingerprint check, shard states and the run plan.

The truth of what is finished is the data files and the committed chunks (see writing.py);
`_progress/{shard}.json` is a summary for operators and the record of attempts and failures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import socket
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from model.describe import ModelDescription, describe_checkpoint
from pipeline.manifest import Manifest, fingerprint
from pipeline.model_identity import ModelIdentity, ModelPathError  # noqa: F401  (ModelPathError: re-exported)
from pipeline.model_identity import model_identity as _content_identity
from pipeline.output_view import OutputView, record_state
from pipeline.shards import redact_urls, safe_url
from pipeline.stats import ERROR_REASONS, MEMBERS_SKIPPED, Stats, counts  # noqa: F401  (ERROR_REASONS: re-exported)
from pipeline.writing import OutputStore

SHARD_STATES = ("done", "running", "failed", "pending")  # + "interrupted" in status: running, driver gone
JOB_FILE = "_job.json"

log = logging.getLogger(__name__)


class FingerprintMismatch(RuntimeError):
    pass


def model_identity(model_path: str) -> ModelIdentity:
    """The content identity of the checkpoint in `model_path` (see pipeline/model_identity.py): the sha256 of
    every file the loader reads, so other weights under the same folder name are told apart and a
    byte-identical copy in another folder is not. Raises ModelPathError naming model.path."""
    return _content_identity(model_path)


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
    model_digest: str | None = None  # the weights' full content digest: the actors' vLLM export cache key


def describe_job_model(m: Manifest) -> ModelDescription:
    """The job's checkpoint, described once (model/describe.py) with its content identity: the driver's one
    look at the model folder, for the fingerprint, the prompt texts and the dataset card. No torch."""
    return describe_checkpoint(m.model.path, identity=_content_identity)


def job_identity(m: Manifest, model: ModelDescription) -> JobIdentity:
    """The fingerprint's "model" part is the weights' content digest ("sha256:<16 hex>"), never the folder
    name; `JobIdentity.model` is the readable label ("pllava-7b@<12 hex>") for logs. The prompt version is the
    one the actors' captioners compute from the same description."""
    identity = model.identity if model.identity is not None else _content_identity(model.path)
    prompt_version = model.prompts(m.prompts).version
    fp, parts = fingerprint(m, identity.fingerprint_part, prompt_version)
    return JobIdentity(fp, parts, identity.label, prompt_version, identity.digest)


def ensure_job(store: OutputStore, m: Manifest, ident: JobIdentity) -> dict[str, Any]:
    """Write `_job.json` on first start; on later starts refuse a different fingerprint."""
    path = store.path(JOB_FILE)
    existing = store.read_json(path)
    if existing is not None:
        if existing.get("fingerprint") != ident.fingerprint:
            old_parts = existing.get("fingerprint_parts", {})
            if _legacy_model_matches(old_parts, m, ident):
                return _upgrade_identity(store, existing, ident)
            raise FingerprintMismatch(_describe_mismatch(store.uri, old_parts, ident))
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


def legacy_model_identity(model_path: str) -> str | None:
    """The model identity of outputs written before it was the weights' content: folder name + a hash of
    config.json and the safetensors index. None when the folder has no config.json."""
    root = Path(model_path)
    h = hashlib.sha256()
    found = False
    for name in ("config.json", "model.safetensors.index.json"):
        p = root / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
            found = True
    return f"{root.resolve().name}@{h.hexdigest()[:12]}" if found else None


def _legacy_model_matches(old_parts: dict[str, Any], m: Manifest, ident: JobIdentity) -> bool:
    """An output of the older identity scheme, same settings, and model.path still matching that identity:
    it resumes (once) under the content identity instead of being refused after an upgrade."""
    old_model = old_parts.get("model")
    if not isinstance(old_model, str) or old_model.startswith("sha256:"):
        return False
    if {k: v for k, v in old_parts.items() if k != "model"} != {k: v for k, v in ident.parts.items() if k != "model"}:
        return False
    return legacy_model_identity(m.model.path) == old_model


def _upgrade_identity(store: OutputStore, existing: dict[str, Any], ident: JobIdentity) -> dict[str, Any]:
    record = dict(existing)
    record["previous_fingerprints"] = [*existing.get("previous_fingerprints", []), existing.get("fingerprint")]
    record["fingerprint"] = ident.fingerprint
    record["fingerprint_parts"] = ident.parts
    store.write_json(store.path(JOB_FILE), record)
    log.warning("output %s: model identity upgraded from %s (folder name + config) to the content of the "
                "weights (%s); data files written before keep fingerprint %s", store.uri,
                existing.get("fingerprint_parts", {}).get("model"), ident.parts.get("model"),
                existing.get("fingerprint"))
    return record


def _describe_mismatch(uri: str, old: dict[str, Any], ident: JobIdentity) -> str:
    diffs = []
    for key in sorted(set(old) | set(ident.parts)):
        a, b = old.get(key), ident.parts.get(key)
        if a != b:
            diffs.append(f"  {key}: output has {json.dumps(a, sort_keys=True)}, manifest has {json.dumps(b, sort_keys=True)}")
    detail = "\n".join(diffs) or "  (fingerprint differs)"
    old_model, new_model = old.get("model"), ident.parts.get("model")
    if old_model != new_model:
        if isinstance(old_model, str) and not old_model.startswith("sha256:"):
            # Written before the identity was the weights' content (folder name + config hash then).
            headline = (
                f"output {uri} was written by an older version that identified the model by folder name and "
                f"config ({old_model}), not by the content of the weights; it cannot tell whether the weights "
                f"in model.path ({ident.model}) are the ones that wrote this output. Refusing to mix captions."
            )
        else:
            headline = (
                f"output {uri}: the weights in model.path differ from the weights that wrote this output "
                f"(model.path now holds {ident.model}); refusing to mix captions."
            )
        return f"{headline}\n{detail}\nUse a new output directory, or point model.path at the original weights."
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


MAX_INTERVALS = 50  # earlier attempts' [start, end] kept per shard, for the active-time rate in status


def mark_running(store: OutputStore, shard: str, url: str, attempt: int, pid: int,
                 redo: tuple[str, ...] | None = None, engine: dict[str, Any] | None = None) -> None:
    """`engine` (`EngineChoice.record()`: engine, version, reason) is appended to the record's `engines`, one
    entry per attempt, so the rows of a shard resumed under another engine can be told apart by attempt."""
    state = read_state(store, shard) or {}
    intervals = list(state.get("intervals") or [])
    if state.get("started_at") and state.get("updated_at"):  # the previous attempt's active span
        intervals = (intervals + [[state["started_at"], state["updated_at"]]])[-MAX_INTERVALS:]
    engines = list(state.get("engines") or [])
    if engine is not None:
        engines = (engines + [{"attempt": attempt, **engine, "host": socket.gethostname(),
                               "at": time.time()}])[-MAX_INTERVALS:]
    write_state(store, shard, url=safe_url(url), state="running", attempts=attempt, pid=pid, host=socket.gethostname(),
                started_at=time.time(), intervals=intervals, finished_at=None, redo=list(redo) if redo else None,
                engines=engines)


def touch_running(store: OutputStore, shard: str, stats: Stats | None = None) -> None:
    """A chunk was committed: the shard's active span reaches now (rate and ETA use active time only).
    `stats`, when given, are the committed rows' counters (`Stats.record_fields`: rows by status, flags,
    tokens, the capped histogram of failure reasons), replacing the record's."""
    write_state(store, shard, **(stats.record_fields() if stats is not None else {}))


def mark_done(store: OutputStore, shard: str, counts: dict[str, int], truncated: str | None,
              seconds: float, stats: Stats | None = None) -> None:
    write_state(store, shard, state="done", rows=dict(counts), truncated=truncated, seconds=round(seconds, 3),
                pid=None, finished_at=time.time(), redo=None, **(stats.record_fields() if stats is not None else {}))


def file_stats(store: OutputStore, shard: str) -> Stats:
    """The counters of a finished shard's data file rows (after a redo, or when its record does not say)."""
    columns = ["status", "caption_flags", "tokens_en", "tokens_zh", "error", "attempts", "input_flags"]
    stats = Stats()
    try:
        rows = store.read_table(store.data_path(shard), columns=columns).to_pylist()
    except (KeyError, pa.ArrowInvalid):  # a data file from before the `input_flags` column
        rows = store.read_table(store.data_path(shard), columns=columns[:-1]).to_pylist()
    stats.add_rows(rows)
    return stats


def settle_record(store: OutputStore, shard: str, record: dict[str, Any] | None = None) -> bool:
    """A finished shard (its data file exists) whose record does not say done: a worker was killed between
    creating the data file and writing its record, or its actor died before the driver heard of it. The
    record says done again, with the data file's counts. `record`: the record already read, if it was.
    Returns whether it wrote."""
    state = record if record is not None else (read_state(store, shard) or {})
    if state.get("state") == "done":
        return False
    stats = file_stats(store, shard)
    stats.members_skipped = counts(state.get(MEMBERS_SKIPPED))  # the tar's: only the record knows them
    mark_done(store, shard, dict(stats.rows), state.get("truncated"), float(state.get("seconds") or 0.0), stats)
    return True


def record_failure(store: OutputStore, shard: str, url: str, attempt: int, reason: str, final: bool) -> None:
    """`reason` is an exception's text: a URL in it is recorded as `safe_url` gives it, like `url`."""
    state = read_state(store, shard) or {"shard": shard, "errors": []}
    errors = list(state.get("errors", [])) + [{"attempt": attempt, "reason": redact_urls(reason), "at": time.time()}]
    write_state(store, shard, url=safe_url(url), attempts=attempt, errors=errors, pid=None,
                state="failed" if final else "running")


SHARD_LIST_FILE = "_shards.json"


def write_shard_list(store: OutputStore, shards: list[tuple[str, str]]) -> None:
    """The latest run's shard list (name -> URL without credentials, `safe_url`): `recaption status` and
    `inspect` report against it."""
    store.write_json(store.path(SHARD_LIST_FILE),
                     {"written_at": time.time(), "shards": {name: safe_url(url) for name, url in shards}})


def read_shard_list(store: OutputStore) -> dict[str, str] | None:
    record = store.read_json(store.path(SHARD_LIST_FILE))
    if isinstance(record, dict) and isinstance(record.get("shards"), dict):
        return record["shards"]
    return None


@dataclass(frozen=True)
class ShardResume:
    """What the output already holds of one shard, asked once by the runner: whether it is finished (its data
    file exists; leftover chunks of an interrupted cleanup are dropped then), the keys committed by earlier
    attempts, and the counters of those committed rows (`Stats.from_record`: continued, never double counted).

    For a redo (`--redo STATUSES`) of a finished shard: not finished, `redo_keys` the data file's keys with those
    statuses, `committed_keys` the replacement rows an interrupted redo already committed."""

    shard: str
    finished: bool
    committed_keys: frozenset[str]
    stats: Stats
    redo_keys: frozenset[str] | None = None

    @property
    def error_reasons(self) -> dict[str, int]:
        return self.stats.error_reasons

    @classmethod
    def load(cls, store: OutputStore, shard: str, redo: tuple[str, ...] | None = None) -> ShardResume:
        if redo:
            return cls._load_redo(store, shard, redo)
        if store.is_finished(shard):
            store.discard_leftover_chunks(shard)
            return cls(shard, True, frozenset(), Stats())
        keys = frozenset(store.committed_keys(shard))
        # the record counts committed rows: without committed chunks an attempt starts afresh
        stats = Stats.from_record(read_state(store, shard)) if keys else Stats()
        return cls(shard, False, keys, stats)

    @classmethod
    def _load_redo(cls, store: OutputStore, shard: str, redo: tuple[str, ...]) -> ShardResume:
        if not store.is_finished(shard):
            raise RuntimeError(f"shard {shard} has no data file to redo rows of")
        table = store.read_table(store.data_path(shard), columns=["key", "status"])
        wanted = set(redo)
        keys = frozenset(k for k, st in zip(table.column("key").to_pylist(), table.column("status").to_pylist())
                         if st in wanted)
        return cls(shard, False, frozenset(store.committed_keys(shard)), Stats(), redo_keys=keys)


@dataclass(frozen=True)
class Plan:
    to_run: list[tuple[str, str]]  # (shard name, url)
    done: list[str]
    failed_skipped: list[str]


def plan_shards(store: OutputStore, shards: list[tuple[str, str]], retry_failed: bool) -> Plan:
    """Which shards this run works on. A plain rerun finishes the unfinished ones and leaves shards
    marked failed alone; `--retry-failed` runs only those. Two listings, then one record read per
    unfinished shard that has a record (pipeline/output_view.py)."""
    view = OutputView.scan(store)
    records = view.read_records(store, [name for name, _ in shards if name not in view.finished])
    to_run, done, failed = [], [], []
    for name, url in shards:
        if name in view.finished:
            if view.chunks.get(name):  # an interrupted cleanup: the chunks are in the data file already
                store.delete_dir(store.chunk_dir(name))
            done.append(name)
        elif record_state(records.get(name)) == "failed":
            (to_run.append((name, url)) if retry_failed else failed.append(name))
        elif not retry_failed:
            to_run.append((name, url))
    return Plan(to_run, done, failed)


@dataclass(frozen=True)
class RedoPlan:
    to_run: list[tuple[str, str]]  # finished shards holding rows with the statuses to redo
    rows: int  # how many rows that is
    unfinished: list[str]  # shards without a data file: a plain rerun finishes them; --redo leaves them alone


def redo_counts(record: dict[str, Any] | None, statuses: tuple[str, ...]) -> int | None:
    """Rows of a finished shard with these statuses, from its progress record (`mark_done` writes the data
    file's counts); None when the record does not say."""
    rows = (record or {}).get("rows")
    if (record or {}).get("state") != "done" or not isinstance(rows, dict):
        return None
    return sum(n for k, n in rows.items() if k in statuses and isinstance(n, int))


def plan_redo(store: OutputStore, shards: list[tuple[str, str]], statuses: tuple[str, ...]) -> RedoPlan:
    """Which finished shards a `--redo STATUSES` run works on: those whose rows include the statuses. Counts
    come from the progress records; a shard whose record does not say (an older output) is counted from its
    data file's status column."""
    view = OutputView.scan(store)
    records = view.read_records(store, [name for name, _ in shards if name in view.finished])
    to_run, unfinished, total = [], [], 0
    for name, url in shards:
        if name not in view.finished:
            unfinished.append(name)
            continue
        n = redo_counts(records.get(name), statuses)
        if n is None:
            column = store.read_table(store.data_path(name), columns=["status"]).column("status").to_pylist()
            n = sum(st in statuses for st in column)
        if n or view.chunks.get(name):  # (chunks: an interrupted redo's replacement rows, finished now)
            to_run.append((name, url))
            total += n
    return RedoPlan(to_run, total, unfinished)
