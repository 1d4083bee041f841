"""Planning, `recaption status`, the end-of-run summary and the dataset card from two listings and the
progress records (pipeline/output_view.py): a constant number of listings, at most one record read per shard,
and a data file opened only for a shard whose record does not say. The calls are counted on the real
filesystem under an output built with the project's own store calls."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from jobs.status import collect_status
from pipeline.dataset_card import collect_counts, render_card
from pipeline.progress import (
    mark_done,
    mark_running,
    plan_shards,
    read_state,
    record_failure,
    touch_running,
    write_shard_list,
    write_state,
)
from pipeline.stats import Stats
from pipeline.writing import COLUMNS, OutputStore

STATUSES = ["ok", "flagged", "error", "decode_error"]


def _rows(shard: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        status = STATUSES[(i + len(shard)) % len(STATUSES)]
        rows.append({**dict.fromkeys(COLUMNS), "key": f"{shard}-{i:03d}", "shard": shard, "status": status,
                     "caption_flags": ["repetition"] if status == "flagged" else [], "frame_indices": [],
                     "attempts": 2 if i % 3 == 0 and status in ("ok", "flagged") else 1})
    return rows


def write_finished_shards(store: OutputStore, names: list[str], rows_per_shard: int = 3) -> None:
    """Each shard run as the job runs it (a running record, a chunk, the finalize, the done record), then the
    shard list: an output to measure status and planning on (here, tests/jobs/test_s3.py, test_stores.py,
    benchmarks/stores.py)."""
    from pipeline.progress import mark_done, mark_running, write_shard_list
    from pipeline.stats import Stats

    for name in names:
        rows = _rows(name, rows_per_shard)
        mark_running(store, name, f"/shards/{name}.tar", 1, 123)
        store.commit_chunk(name, rows, 1)
        stats = Stats()
        stats.add_rows(rows)
        mark_done(store, name, store.finalize_shard(name, {}), None, 1.0, stats)
    write_shard_list(store, [(n, f"/shards/{n}.tar") for n in names])


class Counting:
    """The real filesystem, its calls counted: listings (a FileSelector), single-path infos, opened files."""

    def __init__(self, fs):
        self._fs, self.calls = fs, collections.Counter()
        self.opened: list[str] = []

    def __getattr__(self, name):
        attr = getattr(self._fs, name)

        def counted(*args, **kwargs):
            what = args[0] if args else None
            if name == "get_file_info":
                self.calls["listing" if isinstance(what, pafs.FileSelector) else "info"] += 1
            elif name.startswith("open_input"):
                self.calls["open"] += 1
                self.opened.append(what)
            else:
                self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted if callable(attr) else attr


@pytest.fixture
def output(tmp_path):
    """30 finished shards, one finished before records had counts, one running with 2 chunks committed, one
    failed, one never started; the shard list names all but an extra finished shard."""
    store = OutputStore(str(tmp_path / "out"))
    rows_by_shard = {}
    names = [f"{i:05d}" for i in range(34)]
    for name in names[:31] + ["extra"]:
        rows = rows_by_shard[name] = _rows(name, 7)
        mark_running(store, name, f"/shards/{name}.tar", 1, 123)
        for i in range(0, 7, 3):
            store.commit_chunk(name, rows[i:i + 3], 1)
        stats = Stats()
        stats.add_rows(rows)
        counts = store.finalize_shard(name, {})
        if name == "00030":  # an older record: state done, no counts
            store.write_json(store.state_path(name), {"shard": name, "state": "done", "attempts": 1})
        else:
            mark_done(store, name, counts, None, 1.0, stats)
    running = names[31]
    mark_running(store, running, f"/shards/{running}.tar", 1, 123)
    stats = Stats()
    for i in (0, 3):
        chunk = _rows(running, 6)[i:i + 3]
        store.commit_chunk(running, chunk, 1)
        stats.add_rows(chunk)
        touch_running(store, running, stats)
    record_failure(store, names[32], f"/shards/{names[32]}.tar", 3, "ShardReadError: gone", final=True)
    write_shard_list(store, [(n, f"/shards/{n}.tar") for n in names])
    store.write_json(store.path("_job.json"), {"fingerprint": "f", "manifest": {"shards": ["/x"]}})
    return store, names, rows_by_shard


def _counting(store: OutputStore) -> Counting:
    store.fs = Counting(store.fs)
    return store.fs


def test_status_reads_records_not_data_files(output):
    store, names, rows_by_shard = output
    fs = _counting(store)
    report = collect_status(store)
    data_opened = [p for p in fs.opened if "/data/" in p]
    assert data_opened == [store.data_path("00030")]  # only the shard whose record does not say
    assert fs.calls["listing"] <= 3, fs.calls
    records_read = [p for p in fs.opened if re.search(r"/_progress/[^/]+\.json$", p)]
    assert len(records_read) == len(set(records_read)) == 33  # one read per shard with a record, none twice
    assert fs.calls["open"] <= 33 + 1 + 4, fs.calls  # + the data file, _shards.json, _job.json, the lease
    assert fs.calls["info"] <= 3, fs.calls  # no HEAD per shard
    expected = collections.Counter(r["status"] for n in names[:31] for r in rows_by_shard[n])
    expected.update(r["status"] for r in _rows(names[31], 6))  # the running shard's committed rows
    assert report["rows_by_status"] == dict(expected)
    assert report["shards_by_state"] == {"done": 31, "interrupted": 1, "failed": 1, "pending": 1}
    assert report["shards"][names[31]]["rows"] == dict(collections.Counter(r["status"] for r in _rows(names[31], 6)))
    assert report["failed"] == {names[32]: "ShardReadError: gone"}
    assert report["not_in_latest_list"] == ["extra"]


def test_the_card_from_records_equals_the_card_from_every_data_file(output):
    store, names, _ = output
    fs = _counting(store)
    report = collect_status(store, names, card=True)
    assert [p for p in fs.opened if "/data/" in p] == [store.data_path("00030")]
    statuses, flags, n_shards, repaired = collect_counts(store)  # the old way: every data file
    assert n_shards == 32 and repaired > 0 and flags["repetition"] > 0
    job = {"manifest": {"model": {"path": "m"}, "languages": ["en"]}}
    from pipeline.dataset_card import write_dataset_card

    card = write_dataset_card(store, job, {}, report=report)
    assert card == render_card(job, statuses, flags, n_shards, {}, None, repaired)


def test_planning_lists_twice_and_reads_only_unfinished_records(output):
    store, names, _ = output
    leftover = store.commit_chunk("00005", _rows("00005", 1), 2)  # a finished shard's interrupted cleanup
    fs = _counting(store)
    plan = plan_shards(store, [(n, f"/shards/{n}.tar") for n in names], retry_failed=False)
    assert plan.done == names[:31] and plan.failed_skipped == [names[32]]
    assert [n for n, _ in plan.to_run] == [names[31], names[33]]
    assert fs.calls["listing"] == 2 and fs.calls["info"] <= 1, fs.calls
    assert sorted(fs.opened) == [store.state_path(names[31]), store.state_path(names[32])]
    assert not OutputStore(store.uri).exists(leftover)
    retry = plan_shards(OutputStore(store.uri), [(n, "u") for n in names], retry_failed=True)
    assert [n for n, _ in retry.to_run] == [names[32]]


def test_a_torn_record_reads_as_none(output):
    store, names, _ = output
    Path(store.state_path(names[32])).write_text("{not json")  # a store without atomic writes, cut mid-write
    report = collect_status(store)
    assert report["shards"][names[32]]["state"] == "pending"
    assert json.loads(Path(store.state_path(names[31])).read_text())["state"] == "running"


def test_a_rerun_with_everything_done_starts_no_ray_and_imports_no_torch(tiny_checkpoint, tmp_path):
    """The driver's whole path on a finished output: preflight, fingerprint, lease, plan, summary — without
    torch, transformers or a Ray cluster (the output's shards are all finished). One shard's worker was killed
    between creating its data file and writing its record (found by the S3 chaos test): the rerun leaves the
    shard alone (it is finished) and its record says done again, with the data file's counts."""
    import subprocess
    import sys

    from tests.jobs.conftest import REPO, base_env, write_manifest

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    store = OutputStore(str(tmp_path / "out"))
    for i in range(5):
        name = f"{i:05d}"
        (shard_dir / f"{name}.tar").write_bytes(b"\0" * 1024)  # only their names are needed: all finished
        store.commit_chunk(name, _rows(name, 2), 1)
        stats = Stats()
        stats.add_rows(_rows(name, 2))
        mark_done(store, name, store.finalize_shard(name, {}), None, 1.0, stats)
    write_state(store, "00003", state="running", pid=999_999, rows=None, committed={"ok": 1}, finished_at=None)
    manifest = write_manifest(tmp_path / "job.yaml", shards=f"{shard_dir}/{{00000..00004}}.tar",
                              output=tmp_path / "out", model=tiny_checkpoint)
    code = ("import sys\n"
            "from jobs import recaption\n"
            "rc = recaption.main(sys.argv[1:])\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules), rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(manifest)], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED [] 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "5 done, 0 to run" in proc.stderr and "summary: shards done=5" in proc.stderr, proc.stderr[-2000:]
    assert "shard 00003: its data file was written but its progress record did not say so" in proc.stderr
    settled = read_state(store, "00003")
    assert settled["state"] == "done" and settled["pid"] is None and settled["finished_at"], settled
    fields = ("rows", "committed", "flags", "repaired", "tokens")  # its rows are like 00002's
    assert {k: settled[k] for k in fields} == {k: read_state(store, "00002")[k] for k in fields}, settled
    assert settled["rows"] == {"flagged": 1, "error": 1} and settled["repaired"] == 1, settled
    assert collect_status(store)["stale_records"] == []
