"""`python -m jobs.status OUT [--json]`: per-shard state, rows by status, failed shards with reasons.

Reads only files under OUT, so it works while a job runs, after it died, or from another machine: two
listings and the progress records (pipeline/output_view.py); a data file only when its record does not say. The top reasons rows failed for, per job and per shard, come
from the progress records alone (each shard's capped histogram, `pipeline.progress.ERROR_REASONS`), as do
the rows whose input had a problem (`input_flags`: a normalised key, an unusable .json) and the tar members
that are no sample's (`members_skipped`, written when the shard is done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any

from pipeline.lease import lease_alive, read_lease
from pipeline.output_view import OutputView, counts_of, data_file_summary, record_state
from pipeline.progress import ERROR_REASONS, JOB_FILE, read_shard_list
from pipeline.rows import top_reasons
from pipeline.shards import expand_shard_spec, shard_name
from pipeline.stats import COMMITTED, FLAGS, INPUT_FLAGS, MEMBERS_SKIPPED, REPAIRED
from pipeline.storage import StoreUnavailable
from pipeline.writing import OutputStorageError, OutputStore

SHOWN_STATES = ("done", "running", "interrupted", "failed", "pending")
TOP_REASONS_JOB = 10  # failure reasons listed for the whole job, most frequent first
TOP_REASONS_SHARD = 3  # ... and per shard


def listed_shards(store: OutputStore, view: OutputView | None = None) -> tuple[list[str], list[str]]:
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
    view = view or OutputView.scan(store)
    return sorted(listed), sorted(view.known() - set(listed))


def known_shards(store: OutputStore) -> list[str]:
    """Every shard the output knows of: the latest list and any other with a data or state file."""
    listed, others = listed_shards(store)
    return sorted({*listed, *others})


REDO_STATUSES = ("flagged", "error", "decode_error", "source_failed")


def collect_status(store: OutputStore, names: list[str] | None = None, card: bool = False) -> dict[str, Any]:
    """The report of `recaption status`, from two listings and the progress records (read concurrently):
    done shards' counts are their records' (`mark_done`), an unfinished shard's its record's committed rows.
    A data or chunk file is opened only for a shard whose record does not say. `card`: also the finished
    shards' flag and repaired-row counts, and `others_done` (finished shards not in `names` or the latest
    list), for the dataset card."""
    view = OutputView.scan(store)
    if names is None:
        names, others = listed_shards(store, view)
    else:
        others = sorted(view.finished - set(names))
    records = view.read_records(store, [*names, *others] if card else names)
    lease = read_lease(store)
    driver_alive = lease_alive(lease)
    shards: dict[str, dict[str, Any]] = {}
    rows: Counter = Counter()
    by_state: Counter = Counter()
    reasons: Counter = Counter()
    flags: Counter = Counter()
    inputs: dict[str, Counter] = {INPUT_FLAGS: Counter(), MEMBERS_SKIPPED: Counter()}
    repaired = 0
    stale: list[str] = []  # finished shards whose record does not say done (see settle_record)
    done_rows: Counter = Counter()  # rows of finished shards only (the dataset's rows)
    redo: Counter = Counter()  # rows of finished shards a `--redo STATUS` would caption again
    for name in names:
        record = records.get(name) or {}
        info, summary = _shard_info(store, view, name, record, driver_alive, card)
        state, counts = info["state"], info.get("rows") or {}
        rows.update(counts)
        if state == "done":
            if name in view.recorded and record.get("state") != "done":
                stale.append(name)
            done_rows.update(counts)
            redo.update({k: v for k, v in counts.items() if k in REDO_STATUSES})
            flags.update(summary["flags"])
            repaired += summary["repaired"]
        reasons.update(info.get("error_reasons") or {})
        for field, counter in inputs.items():
            counter.update(info.get(field) or {})
        shards[name] = info
        by_state[state] += 1
    others_done: dict[str, Any] = {"shards": 0, "rows": Counter(), "flags": Counter(), "repaired": 0}
    for name in others if card else ():
        if name in view.finished:
            _, summary = _shard_info(store, view, name, records.get(name) or {}, driver_alive, card)
            others_done["shards"] += 1
            others_done["rows"].update(summary["rows"])
            others_done["flags"].update(summary["flags"])
            others_done["repaired"] += summary["repaired"]
    job = store.read_json(store.path(JOB_FILE)) or {}
    return {
        "throughput": _throughput({n: records.get(n) or {} for n in names}, shards, by_state),
        "output": store.uri,
        "fingerprint": job.get("fingerprint"),
        "driver": ({k: lease.get(k) for k in ("host", "pid", "since", "heartbeat_at")} if driver_alive else None),
        "shards_by_state": dict(by_state),
        "rows_by_status": dict(rows),
        "done_rows_by_status": dict(done_rows),
        "flags": dict(flags),  # quality flags of the finished shards' rows (with card=True)
        "rows_repaired": repaired,
        "redo_rows": {k: redo[k] for k in REDO_STATUSES if redo[k]},
        "error_reasons": dict(top_reasons(reasons)),
        "top_error_reasons": [[k, n] for k, n in top_reasons(reasons, TOP_REASONS_JOB)],
        # rows by input problem (normalised keys, unusable .json) and the tar members that are no sample's
        **{field: dict(counter) for field, counter in inputs.items()},
        "shards": shards,
        "failed": {n: i.get("last_error") for n, i in shards.items() if i["state"] == "failed"},
        "not_in_latest_list": others,
        "stale_records": stale,
        "others_done": {k: dict(v) if isinstance(v, Counter) else v for k, v in others_done.items()},
    }


def _shard_info(store: OutputStore, view: OutputView, name: str, record: dict[str, Any], driver_alive: bool,
                card: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the shard's line of the report, a done shard's rows by status and, with `card`, its flag and
    repaired-row counts)."""
    summary: dict[str, Any] = {"rows": {}, "flags": {}, "repaired": 0}
    if name in view.finished:
        state = "done"
        done = record.get("state") == "done"
        rows, flag_counts = counts_of(record.get("rows")), counts_of(record.get(FLAGS))
        if done and rows is not None and (not card or (flag_counts is not None and REPAIRED in record)):
            summary = {"rows": rows, "flags": flag_counts or {}, "repaired": int(record.get(REPAIRED) or 0)}
        else:  # the record does not say (an older output, a record left behind by a killed worker)
            summary = data_file_summary(store, name)
        counts = summary["rows"]
    else:
        state = record_state(record or None)
        if state == "running" and not driver_alive:
            state = "interrupted"  # its driver is gone: a rerun resumes it after its committed chunks
        counts = {}
        if view.chunks.get(name):  # committed rows of a shard in progress, failed or interrupted
            committed = counts_of(record.get(COMMITTED))
            counts = committed if committed is not None else _chunk_counts(store, view.chunks[name])
    info: dict[str, Any] = {"state": state, "attempts": record.get("attempts", 0)}
    if counts:
        info["rows"] = counts
    if record.get("truncated"):
        info["truncated"] = record["truncated"]
    for field in (INPUT_FLAGS, MEMBERS_SKIPPED):  # from the record only (members_skipped: once done)
        found = counts_of(record.get(field))
        if found:
            info[field] = found
    histogram = record.get(ERROR_REASONS)
    top = top_reasons(histogram if isinstance(histogram, dict) else None)
    if top:
        info["error_reasons"] = dict(top)
        info["top_error_reasons"] = [[k, n] for k, n in top[:TOP_REASONS_SHARD]]
    errors = record.get("errors") or []
    if errors:
        info["last_error"] = errors[-1]["reason"]
        info["errors"] = errors
    return info, summary


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


def _chunk_counts(store: OutputStore, paths: list[str]) -> dict[str, int]:
    counts: Counter = Counter()
    for path in paths:
        try:
            counts.update(store.read_table(path, columns=["status"]).column("status").to_pylist())
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
    duplicates = report["rows_by_status"].get("duplicate", 0)
    if duplicates:
        lines.append(f"dupes:  {duplicates} rows are keys another shard of this output already holds (status "
                     f"duplicate, not captioned again); {sum(report['rows_by_status'].values()) - duplicates} "
                     "rows without them")
    redo = report.get("redo_rows") or {}
    if redo:
        lines.append("redo:   rows a `recaption run MANIFEST --redo STATUS,...` would caption again: "
                     + ", ".join(f"{k}={v}" for k, v in redo.items()))
    top = report.get("top_error_reasons") or []
    if top:
        lines.append("errors: " + _format_reasons(top, sum((report.get("error_reasons") or {}).values())))
    if report.get(INPUT_FLAGS) or report.get(MEMBERS_SKIPPED):
        lines.append("input:  " + _format_input(report))
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
        if info.get(INPUT_FLAGS) or info.get(MEMBERS_SKIPPED):
            lines.append(f"  {'':<20} input: " + _format_input(info))
    others = report.get("not_in_latest_list") or []
    if others:
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        lines.append(f"not in the latest run's shard list (kept, not counted above): {shown}")
    return "\n".join(lines)


def _format_input(counts: dict[str, Any]) -> str:
    """"rows with input problems: key_normalised=2; tar members skipped: 3 (not a regular file: 1, ...)"."""
    parts = []
    flags = counts.get(INPUT_FLAGS) or {}
    if flags:
        parts.append("rows with input problems: " + " ".join(f"{k}={v}" for k, v in sorted(flags.items())))
    skipped = counts.get(MEMBERS_SKIPPED) or {}
    if skipped:
        parts.append(f"tar members skipped: {sum(skipped.values())} ("
                     + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")")
    return "; ".join(parts)


def _format_reasons(top: list[list[Any]], total: int) -> str:
    shown = "; ".join(f"{n}× {reason}" for reason, n in top)
    rest = total - sum(n for _, n in top)
    return shown + (f"; {rest} more" if rest > 0 else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="the job's output: a directory, or an s3://, gs://, az:// URL")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    try:
        store = OutputStore(args.output)
    except (StoreUnavailable, ValueError) as e:  # a store library not installed, an hf:// or unknown scheme
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if not store.exists(store.path(JOB_FILE)) and not store.exists(store.path("data")):
            print(f"error: {args.output} is not a job output (no {JOB_FILE})", file=sys.stderr)
            return 2
        report = collect_status(store)
    except OutputStorageError as e:  # no access to the output (credentials, a policy): one line, as the job's
        print(f"error: output storage: {e}", file=sys.stderr)
        return 4  # jobs.recaption.EXIT_STORAGE (not imported: that module pulls in the job's dependencies)
    try:
        print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report), flush=True)
    except BrokenPipeError:  # `recaption status OUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
