"""`python -m jobs.status OUT [--json]`: per-shard state, rows by status, failed shards with reasons.

Reads only files under OUT (progress files and the data files' row counts), so it works while a job
runs, after it died, or from another machine. The top reasons rows failed for, per job and per shard, come
from the progress records alone (each shard's capped histogram, `pipeline.progress.ERROR_REASONS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from pipeline.lease import lease_alive, read_lease
from pipeline.progress import ERROR_REASONS, JOB_FILE, read_shard_list, read_state, shard_status
from pipeline.rows import top_reasons
from pipeline.shards import expand_shard_spec, shard_name
from pipeline.writing import OutputStore

SHOWN_STATES = ("done", "running", "interrupted", "failed", "pending")
TOP_REASONS_JOB = 10  # failure reasons listed for the whole job, most frequent first
TOP_REASONS_SHARD = 3  # ... and per shard


def listed_shards(store: OutputStore) -> tuple[list[str], list[str]]:
    """(shards of the latest run's list, other shards with files under OUT but not in that list).

    The list is `_shards.json`, written by each run; outputs written before it existed fall back to the
    job record's shard spec.
    """
    listed = read_shard_list(store)
    if listed is None:
        job = store.read_json(store.path(JOB_FILE))
        try:
            listed = {shard_name(u): u for u in expand_shard_spec(job["manifest"]["shards"])} if job else {}
        except Exception:  # the job record is a summary; fall back to what is on disk
            listed = {}
    on_disk: set[str] = set()
    for path in store.list_files(store.path("data"), ".parquet"):
        on_disk.add(path.rsplit("/", 1)[1][: -len(".parquet")])
    for path in store.list_files(store.path("_progress"), ".json"):
        on_disk.add(path.rsplit("/", 1)[1][: -len(".json")])
    return sorted(listed), sorted(on_disk - set(listed))


def known_shards(store: OutputStore) -> list[str]:
    """Every shard the output knows of: the latest list and any other with a data or state file."""
    listed, others = listed_shards(store)
    return sorted({*listed, *others})


REDO_STATUSES = ("flagged", "error", "decode_error", "source_failed")


def collect_status(store: OutputStore, names: list[str] | None = None) -> dict[str, Any]:
    if names is None:
        names, others = listed_shards(store)
    else:
        others = []
    lease = read_lease(store)
    driver_alive = lease_alive(lease)
    shards: dict[str, dict[str, Any]] = {}
    rows: Counter = Counter()
    by_state: Counter = Counter()
    records: dict[str, dict[str, Any]] = {}
    reasons: Counter = Counter()
    redo: Counter = Counter()  # rows of finished shards a `--redo STATUS` would caption again
    for name in names:
        state = shard_status(store, name)
        record = read_state(store, name) or {}
        records[name] = record
        if state == "running" and not driver_alive:
            state = "interrupted"  # its driver is gone: a rerun resumes it after its committed chunks
        info: dict[str, Any] = {"state": state, "attempts": record.get("attempts", 0)}
        if state == "done":
            counts = _data_counts(store, name)
            redo.update({k: v for k, v in counts.items() if k in REDO_STATUSES})
        else:
            counts = _chunk_counts(store, name)  # committed rows of a shard in progress, failed or interrupted
        if counts:
            rows.update(counts)
            info["rows"] = counts
        if record.get("truncated"):
            info["truncated"] = record["truncated"]
        histogram = record.get(ERROR_REASONS)
        top = top_reasons(histogram if isinstance(histogram, dict) else None)
        if top:
            reasons.update(dict(top))
            info["error_reasons"] = dict(top)
            info["top_error_reasons"] = [[k, n] for k, n in top[:TOP_REASONS_SHARD]]
        errors = record.get("errors") or []
        if errors:
            info["last_error"] = errors[-1]["reason"]
            info["errors"] = errors
        shards[name] = info
        by_state[state] += 1
    job = store.read_json(store.path(JOB_FILE)) or {}
    return {
        "throughput": _throughput(records, shards, by_state),
        "output": store.uri,
        "fingerprint": job.get("fingerprint"),
        "driver": ({k: lease.get(k) for k in ("host", "pid", "since", "heartbeat_at")} if driver_alive else None),
        "shards_by_state": dict(by_state),
        "rows_by_status": dict(rows),
        "redo_rows": {k: redo[k] for k in REDO_STATUSES if redo[k]},
        "error_reasons": dict(top_reasons(reasons)),
        "top_error_reasons": [[k, n] for k, n in top_reasons(reasons, TOP_REASONS_JOB)],
        "shards": shards,
        "failed": {n: i.get("last_error") for n, i in shards.items() if i["state"] == "failed"},
        "not_in_latest_list": others,
    }


def _active_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals: time when at least one shard was being worked on."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _throughput(records: dict[str, dict[str, Any]], shards: dict[str, dict[str, Any]],
                by_state: Counter) -> dict[str, Any] | None:
    """Clips/s and ETA over active time only (idle time between runs does not count), from the state records:
    each attempt's span is [started_at, last update]; rows are those of done shards plus committed rows of
    shards in progress."""
    intervals: list[tuple[float, float]] = []
    rows, finished = 0, 0
    for name, record in records.items():
        for span in record.get("intervals") or []:
            if len(span) == 2 and span[1] >= span[0]:
                intervals.append((float(span[0]), float(span[1])))
        if record.get("started_at") and record.get("updated_at"):
            end = record.get("finished_at") or record["updated_at"]
            intervals.append((float(record["started_at"]), max(float(end), float(record["started_at"]))))
        rows += sum((shards[name].get("rows") or {}).values())
        finished += shards[name]["state"] == "done"
    active = _active_seconds(intervals)
    if not finished or active <= 0:
        return None
    remaining = sum(by_state.get(s, 0) for s in ("running", "interrupted", "pending"))
    return {
        "clips_per_s": rows / active,
        "shards_per_hour": finished / active * 3600,
        "active_s": active,
        "eta_s": active / finished * remaining if remaining else 0.0,
    }


def _data_counts(store: OutputStore, name: str) -> dict[str, int]:
    with store.fs.open_input_file(store.data_path(name)) as f:
        table = pq.read_table(f, columns=["status"])
    return dict(Counter(table.column("status").to_pylist()))


def _chunk_counts(store: OutputStore, name: str) -> dict[str, int]:
    counts: Counter = Counter()
    for path in store.chunk_paths(name):
        try:
            with store.fs.open_input_file(path) as f:
                counts.update(pq.read_table(f, columns=["status"]).column("status").to_pylist())
        except (FileNotFoundError, OSError):  # merged away by a finalizer meanwhile, or being written
            continue
    return dict(counts)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"output: {report['output']}  fingerprint: {report['fingerprint']}"]
    driver = report.get("driver")
    if driver:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(driver["since"] or 0))
        lines.append(f"driver: running on host {driver['host']}, pid {driver['pid']}, since {since}")
    else:
        lines.append("driver: none running")
    lines.append("shards: " + ", ".join(f"{s}={report['shards_by_state'].get(s, 0)}" for s in SHOWN_STATES))
    lines.append("rows:   " + (", ".join(f"{k}={v}" for k, v in sorted(report["rows_by_status"].items())) or "none"))
    redo = report.get("redo_rows") or {}
    if redo:
        lines.append("redo:   rows a `recaption run MANIFEST --redo STATUS,...` would caption again: "
                     + ", ".join(f"{k}={v}" for k, v in redo.items()))
    top = report.get("top_error_reasons") or []
    if top:
        lines.append("errors: " + _format_reasons(top, sum((report.get("error_reasons") or {}).values())))
    tp = report.get("throughput")
    if tp:
        lines.append(f"rate:   {tp['clips_per_s']:.2f} clips/s, {tp['shards_per_hour']:.1f} shards/hour over "
                     f"{tp['active_s']:.0f}s of active time; ETA {tp['eta_s']:.0f}s for the shards not done")
    for name, info in report["shards"].items():
        extra = ""
        if info.get("rows"):
            extra = " " + " ".join(f"{k}={v}" for k, v in sorted(info["rows"].items()))
        if info.get("truncated"):
            extra += f" TRUNCATED ({info['truncated']})"
        if info["state"] == "failed":
            extra += f" attempts={info['attempts']} reason: {info.get('last_error')}"
        elif info.get("last_error"):
            extra += f" (last attempt failed: {info['last_error']})"
        lines.append(f"  {name:<20} {info['state']:<11}{extra}")
        if info.get("top_error_reasons"):
            lines.append(f"  {'':<20} errors: " + _format_reasons(info["top_error_reasons"],
                                                               sum(info["error_reasons"].values())))
    others = report.get("not_in_latest_list") or []
    if others:
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        lines.append(f"not in the latest run's shard list (kept, not counted above): {shown}")
    return "\n".join(lines)


def _format_reasons(top: list[list[Any]], total: int) -> str:
    shown = "; ".join(f"{n}× {reason}" for reason, n in top)
    rest = total - sum(n for _, n in top)
    return shown + (f"; {rest} more" if rest > 0 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the job's output directory or s3:// URI")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    store = OutputStore(args.output)
    if not store.exists(store.path(JOB_FILE)) and not store.exists(store.path("data")):
        print(f"error: {args.output} is not a job output (no {JOB_FILE})", file=sys.stderr)
        return 2
    report = collect_status(store)
    try:
        print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report), flush=True)
    except BrokenPipeError:  # `recaption status OUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
