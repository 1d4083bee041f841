"""`python -m jobs.status OUT [--json]`: per-shard state, rows by status, failed shards with reasons.

Reads only files under OUT (progress files and the data files' row counts), so it works while a job
runs, after it died, or from another machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from pipeline.progress import JOB_FILE, read_state, shard_status
from pipeline.shards import expand_shard_spec, shard_name
from pipeline.writing import OutputStore


def known_shards(store: OutputStore) -> list[str]:
    """Shards named by the job record, plus any with a data or state file."""
    names: set[str] = set()
    job = store.read_json(store.path(JOB_FILE))
    if job:
        try:
            names.update(shard_name(u) for u in expand_shard_spec(job["manifest"]["shards"]))
        except Exception:  # the job record is a summary; fall back to what is on disk
            pass
    for path in store.list_files(store.path("data"), ".parquet"):
        names.add(path.rsplit("/", 1)[1][: -len(".parquet")])
    for path in store.list_files(store.path("_progress"), ".json"):
        names.add(path.rsplit("/", 1)[1][: -len(".json")])
    return sorted(names)


def collect_status(store: OutputStore, names: list[str] | None = None) -> dict[str, Any]:
    names = known_shards(store) if names is None else names
    shards: dict[str, dict[str, Any]] = {}
    rows: Counter = Counter()
    by_state: Counter = Counter()
    for name in names:
        state = shard_status(store, name)
        record = read_state(store, name) or {}
        info: dict[str, Any] = {"state": state, "attempts": record.get("attempts", 0)}
        if state == "done":
            counts = _data_counts(store, name)
            rows.update(counts)
            info["rows"] = counts
            if record.get("truncated"):
                info["truncated"] = record["truncated"]
        errors = record.get("errors") or []
        if errors:
            info["last_error"] = errors[-1]["reason"]
            info["errors"] = errors
        shards[name] = info
        by_state[state] += 1
    job = store.read_json(store.path(JOB_FILE)) or {}
    return {
        "throughput": _throughput(store, names, by_state),
        "output": store.uri,
        "fingerprint": job.get("fingerprint"),
        "shards_by_state": dict(by_state),
        "rows_by_status": dict(rows),
        "shards": shards,
        "failed": {n: i.get("last_error") for n, i in shards.items() if i["state"] == "failed"},
    }


def _throughput(store: OutputStore, names: list[str], by_state: Counter) -> dict[str, Any] | None:
    """Clips/s and ETA from the progress files: rows of finished shards over the window they ran in."""
    starts, ends, rows, finished = [], [], 0, 0
    for name in names:
        record = read_state(store, name) or {}
        if record.get("started_at"):
            starts.append(record["started_at"])
        if record.get("state") == "done" and record.get("updated_at"):
            ends.append(record["updated_at"])
            rows += sum((record.get("rows") or {}).values())
            finished += 1
    if not finished or not starts:
        return None
    window = max(max(ends) - min(starts), 1e-9)
    remaining = by_state.get("running", 0) + by_state.get("pending", 0)
    return {
        "clips_per_s": rows / window,
        "shards_per_hour": finished / window * 3600,
        "eta_s": window / finished * remaining if remaining else 0.0,
    }


def _data_counts(store: OutputStore, name: str) -> dict[str, int]:
    with store.fs.open_input_file(store.data_path(name)) as f:
        table = pq.read_table(f, columns=["status"])
    return dict(Counter(table.column("status").to_pylist()))


def format_report(report: dict[str, Any]) -> str:
    lines = [f"output: {report['output']}  fingerprint: {report['fingerprint']}"]
    lines.append("shards: " + ", ".join(f"{s}={report['shards_by_state'].get(s, 0)}"
                                        for s in ("done", "running", "failed", "pending")))
    lines.append("rows:   " + (", ".join(f"{k}={v}" for k, v in sorted(report["rows_by_status"].items())) or "none"))
    tp = report.get("throughput")
    if tp:
        lines.append(f"rate:   {tp['clips_per_s']:.2f} clips/s, {tp['shards_per_hour']:.1f} shards/hour; "
                     f"ETA {tp['eta_s']:.0f}s for the shards not done")
    for name, info in report["shards"].items():
        extra = ""
        if info.get("rows"):
            extra = " " + " ".join(f"{k}={v}" for k, v in sorted(info["rows"].items()))
        if info.get("truncated"):
            extra += f" TRUNCATED ({info['truncated']})"
        if info["state"] == "failed":
            extra += f" attempts={info['attempts']} reason: {info.get('last_error')}"
        lines.append(f"  {name:<20} {info['state']:<8}{extra}")
    return "\n".join(lines)


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
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
