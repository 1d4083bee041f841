"""What an output holds, learned from two listings and the progress records, read concurrently.

Planning, `recaption status`, the end-of-run summary and the dataset card used to ask the store about every
shard one request after another (a HEAD for the data file, the record twice, every data file opened for its
counts): 2-10 round trips a shard, over an hour for 100,000 shards on S3. Here a run costs

  * one listing of `data/` (which shards are finished: the data file is the completion marker),
  * one recursive listing of `_progress/` (which shards have a record, and any chunk files),
  * at most one GET per shard whose record is needed, issued `READ_WORKERS` at a time.

Counts come from the records (`mark_done` writes the data file's rows by status, the quality flags and the
repaired rows; see `pipeline/stats.py`); a data file is opened only when its record does not say (an output
written before these fields, or a shard whose record was left behind by a killed worker).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.writing import OutputStore

READ_WORKERS = 32  # concurrent record reads: S3 answers each in ~20-50 ms; locally this costs nothing


def _name(path: str, suffix: str) -> str:
    return path.rsplit("/", 1)[1][: -len(suffix)]


@dataclass
class OutputView:
    finished: set[str] = field(default_factory=set)  # shards with a data file
    recorded: set[str] = field(default_factory=set)  # shards with a progress record
    chunks: dict[str, list[str]] = field(default_factory=dict)  # shard -> its committed chunk files

    @classmethod
    def scan(cls, store: OutputStore) -> OutputView:
        view = cls(finished={_name(p, ".parquet") for p in store.list_files(store.path("data"), ".parquet")})
        progress = store.path("_progress")
        for path in store.list_tree(progress):
            rest = path[len(progress) + 1:]
            if "/" not in rest:
                if rest.endswith(".json"):
                    view.recorded.add(rest[: -len(".json")])
            elif rest.endswith(".parquet") and rest.count("/") == 1:
                shard, name = rest.split("/")
                if not name.startswith("."):  # a writer's temp file
                    view.chunks.setdefault(shard, []).append(path)
        return view

    def known(self) -> set[str]:
        return self.finished | self.recorded | set(self.chunks)

    def read_records(self, store: OutputStore, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The progress records of those of `names` that have one, read concurrently."""
        wanted = sorted(set(names) & self.recorded)
        if not wanted:
            return {}
        with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(wanted))) as pool:
            records = list(pool.map(lambda n: _read_record(store, n), wanted))
        return {n: r for n, r in zip(wanted, records) if isinstance(r, dict)}


def _read_record(store: OutputStore, shard: str) -> Any:
    try:
        return store.read_json(store.state_path(shard))
    except json.JSONDecodeError:  # a torn record of a store without atomic writes: as if it had none
        return None


def record_state(record: dict[str, Any] | None) -> str:
    """The state a progress record gives a shard that has no data file."""
    state = (record or {}).get("state")
    return state if state in ("failed", "running") else "pending"


def counts_of(value: Any) -> dict[str, int] | None:
    """A {name: count} mapping from a record, or None when the record does not hold a usable one."""
    if not isinstance(value, dict):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        return None
    return {str(k): v for k, v in value.items() if v}


def data_file_summary(store: OutputStore, shard: str) -> dict[str, Any]:
    """Rows by status, flag counts and repaired rows of a finished shard, read from its data file (the
    fallback when its record does not say)."""
    path = store.data_path(shard)
    try:
        rows = store.read_table(path, columns=["status", "caption_flags", "attempts"]).to_pylist()
    except (KeyError, pa.ArrowInvalid):  # a file from before the `attempts` column
        rows = store.read_table(path, columns=["status", "caption_flags"]).to_pylist()
    flags: Counter = Counter()
    for row in rows:
        flags.update(row["caption_flags"] or ())
    return {
        "rows": dict(Counter(row["status"] for row in rows)),
        "flags": dict(flags),
        "repaired": sum(1 for row in rows if (row.get("attempts") or 0) > 1),
    }
