import json
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import manifest_from_dict
from pipeline.progress import FingerprintMismatch, JobIdentity, ensure_job, plan_shards, record_failure
from pipeline.writing import COLUMNS, SCHEMA, OutputStore, rows_to_table


def row(key: str, status: str = "ok", caption: str = "a cat") -> dict:
    r = {c: None for c in COLUMNS}
    r.update(key=key, shard="00000", status=status, caption_en=caption, caption_flags=[], frame_indices=[0, 1],
             num_frames=2, model="tiny", lora_alpha=4.0, prompt_version="v1")
    return r


def test_rows_to_table_requires_every_column():
    bad = row("k")
    del bad["caption_zh"]
    with pytest.raises(ValueError, match="caption_zh"):
        rows_to_table([bad])
    assert rows_to_table([row("k")]).schema.equals(SCHEMA)


def test_chunks_merge_dedupe_and_metadata(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.commit_chunk("00000", [row("a"), row("b")], attempt=1)
    store.commit_chunk("00000", [row("b", caption="again"), row("c", "decode_error")], attempt=2)
    assert store.committed_keys("00000") == {"a", "b", "c"}
    assert not store.is_finished("00000")
    counts = store.finalize_shard("00000", {b"pllava_recaption.fingerprint": b"fp1"})
    assert store.is_finished("00000")
    assert counts == {"ok": 2, "decode_error": 1}
    table = pq.read_table(tmp_path / "out/data/00000.parquet")
    assert sorted(table.column("key").to_pylist()) == ["a", "b", "c"]
    assert table.schema.metadata[b"pllava_recaption.fingerprint"] == b"fp1"
    assert not (tmp_path / "out/_progress/00000").exists()  # chunks removed after the data file exists
    # no temp files left behind by the atomic writes
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_finalize_keeps_first_committed_row_of_a_key(tmp_path):
    store = OutputStore(str(tmp_path))
    store.commit_chunk("s", [row("k", caption="first")], attempt=1)
    store.finalize_shard("s", {})
    table = pq.read_table(tmp_path / "data/s.parquet")
    assert table.num_rows == 1


def test_a_chunk_with_the_old_flags_column_is_merged_as_caption_flags(tmp_path):
    """Resuming an output begun before the `flags` -> `caption_flags` rename: its chunks still merge."""
    store = OutputStore(str(tmp_path))
    old = rows_to_table([{**row("a"), "caption_flags": ["echo", "truncated"]}, row("b")])
    old = old.rename_columns(["flags" if c == "caption_flags" else c for c in old.column_names])
    (tmp_path / "_progress/s").mkdir(parents=True)
    pq.write_table(old, tmp_path / "_progress/s/chunk-001-old.parquet")
    store.commit_chunk("s", [{**row("c"), "caption_flags": ["empty"]}], attempt=2)
    assert store.committed_keys("s") == {"a", "b", "c"}
    assert store.read_table(store.chunk_paths("s")[0], columns=["key", "caption_flags"]).column_names == [
        "key", "caption_flags"]
    assert store.finalize_shard("s", {}) == {"ok": 3}
    table = pq.read_table(tmp_path / "data/s.parquet")
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert "flags" not in table.column_names
    flags = dict(zip(table.column("key").to_pylist(), table.column("caption_flags").to_pylist()))
    assert flags == {"a": ["echo", "truncated"], "b": [], "c": ["empty"]}
    assert table.column("caption_en").to_pylist() == ["a cat"] * 3  # the other columns come through too


def test_chunks_and_data_files_from_before_source_key_and_input_flags_still_read(tmp_path):
    """Resuming an output begun before issue 22's columns: old chunks merge (the new columns null), an old data
    file's counters are still read (status, settle_record)."""
    from pipeline.progress import file_stats

    store = OutputStore(str(tmp_path))
    old = rows_to_table([row("a"), row("b", "decode_error")]).drop_columns(["source_key", "input_flags"])
    (tmp_path / "_progress/s").mkdir(parents=True)
    pq.write_table(old, tmp_path / "_progress/s/chunk-001-old.parquet")
    store.commit_chunk("s", [{**row("c"), "source_key": "c\u200b", "input_flags": ["key_normalised"]}], attempt=2)
    assert store.committed_keys("s") == {"a", "b", "c"}
    assert store.finalize_shard("s", {}) == {"ok": 2, "decode_error": 1}
    table = pq.read_table(tmp_path / "data/s.parquet")
    assert table.schema.remove_metadata().equals(SCHEMA)
    got = {r["key"]: (r["source_key"], r["input_flags"]) for r in table.to_pylist()}
    assert got == {"a": (None, None), "b": (None, None), "c": ("c\u200b", ["key_normalised"])}
    assert file_stats(store, "s").input_flags == {"key_normalised": 1}

    pq.write_table(old, tmp_path / "data/old.parquet")  # a data file written before the columns
    stats = file_stats(store, "old")
    assert stats.rows == {"ok": 1, "decode_error": 1} and stats.input_flags == {}


def test_fingerprint_mismatch_is_refused_with_what_differs(tmp_path):
    store = OutputStore(str(tmp_path))
    m = manifest_from_dict({"shards": "x.tar", "output": str(tmp_path), "model": {"path": "m"}})
    ensure_job(store, m, JobIdentity("fp-a", {"lora_alpha": 4.0, "model": "tiny"}, "tiny", "v1"))
    ensure_job(store, m, JobIdentity("fp-a", {"lora_alpha": 4.0, "model": "tiny"}, "tiny", "v1"))  # same: fine
    with pytest.raises(FingerprintMismatch) as e:
        ensure_job(store, m, JobIdentity("fp-b", {"lora_alpha": 8.0, "model": "tiny"}, "tiny", "v1"))
    assert "lora_alpha: output has 4.0, manifest has 8.0" in str(e.value)
    assert "  model:" not in str(e.value)  # only what differs is listed
    assert json.loads((tmp_path / "_job.json").read_text())["fingerprint"] == "fp-a"


def test_plan_skips_done_and_failed_unless_retry_failed(tmp_path):
    store = OutputStore(str(tmp_path))
    store.commit_chunk("done", [row("a")], attempt=1)
    store.finalize_shard("done", {})
    store.commit_chunk("done", [row("a")], attempt=9)  # leftover from an interrupted clean-up
    record_failure(store, "bad", "bad.tar", 3, "unreadable", final=True)
    record_failure(store, "flaky", "flaky.tar", 1, "actor died", final=False)
    shards = [("done", "done.tar"), ("bad", "bad.tar"), ("flaky", "flaky.tar"), ("new", "new.tar")]
    plan = plan_shards(store, shards, retry_failed=False)
    assert [n for n, _ in plan.to_run] == ["flaky", "new"]
    assert plan.done == ["done"] and plan.failed_skipped == ["bad"]
    assert store.chunk_paths("done") == []
    retry = plan_shards(store, shards, retry_failed=True)
    assert [n for n, _ in retry.to_run] == ["bad"]


def test_finalize_twice_never_drops_keys(tmp_path):
    store = OutputStore(str(tmp_path))
    store.commit_chunk("s", [row("a"), row("b")], attempt=1)
    store.finalize_shard("s", {})
    store.commit_chunk("s", [row("c")], attempt=2)  # a late writer after the shard was finished
    counts = store.finalize_shard("s", {})
    assert counts == {"ok": 3}
    assert sorted(pq.read_table(tmp_path / "data/s.parquet").column("key").to_pylist()) == ["a", "b", "c"]


def test_shard_resume_is_asked_once_and_knows_everything(tmp_path):
    from pipeline.progress import ShardResume, touch_running, write_state
    from pipeline.stats import Stats

    store = OutputStore(str(tmp_path))
    fresh = ShardResume.load(store, "s")
    assert not fresh.finished and fresh.committed_keys == frozenset() and fresh.error_reasons == {}
    # an earlier attempt's histogram without committed rows is not continued (it would double count)
    write_state(store, "s", state="running", error_reasons={"decode: x": 2})
    assert ShardResume.load(store, "s").error_reasons == {}
    store.commit_chunk("s", [row("k1"), row("k2", status="decode_error")], attempt=1)
    touch_running(store, "s", Stats(error_reasons={"decode: x": 1}))
    resumed = ShardResume.load(store, "s")
    assert resumed.committed_keys == {"k1", "k2"} and resumed.error_reasons == {"decode: x": 1}
    store.finalize_shard("s", {})
    store.commit_chunk("s", [row("k3")], attempt=2)  # a chunk left by an interrupted cleanup
    done = ShardResume.load(store, "s")
    assert done.finished and not store.chunk_paths("s")


class PausingFS:
    """The real filesystem; when armed, a call asking whether the shard's data file exists (the finalizer's
    check, after it read the chunks) answers, then waits until the test lets it go on."""

    def __init__(self, fs, data_path: str):
        self._fs, self._data_path = fs, data_path
        self.armed, self.paused, self.go = False, threading.Event(), threading.Event()

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in ("get_file_info", "info"):  # pyarrow's local filesystem, fsspec's (object stores)
            return attr

        def info(what, *args, **kwargs):
            try:
                return attr(what, *args, **kwargs)  # fsspec's raises FileNotFoundError: paused all the same
            finally:
                if self.armed and what == self._data_path:
                    self.armed = False
                    self.paused.set()
                    assert self.go.wait(30), "the test never let the finalizer go on"
        return info


def race_finalizers(make_store, late_reads_first: bool, shard: str = "00000") -> dict:
    """Two finalizers W and L of one shard, each paused after reading the chunks; W writes first, then L.
    Chunks 1-2 hold keys a, b, c; a zombie attempt commits chunk 3 (d, and a again) between the two reads.
    `late_reads_first`: L read before chunk 3 (W's file is the complete one), else after (L holds key d
    that W's file lacks). Returns each finalizer's counts and the data file (with metadata) after each."""
    w, late = make_store(), make_store()
    w.fs, late.fs = PausingFS(w.fs, w.data_path(shard)), PausingFS(late.fs, late.data_path(shard))
    w.commit_chunk(shard, [row("a", "ok", "w1"), row("b", "ok", "w1")], attempt=1)
    w.commit_chunk(shard, [row("c", "error", None)], attempt=1)
    out: dict = {}
    threads = {}

    def start(store, name):
        store.fs.armed = True
        threads[name] = threading.Thread(target=lambda: out.__setitem__(
            name, store.finalize_shard(shard, {b"writer": name.encode()})))
        threads[name].start()
        assert store.fs.paused.wait(30)

    first, second = ((late, "L"), (w, "W")) if late_reads_first else ((w, "W"), (late, "L"))
    start(*first)
    make_store().commit_chunk(shard, [row("d", "ok", "zombie"), row("a", "ok", "z")], attempt=2)
    start(*second)
    reader = make_store()

    def data_file():  # read whole, with its metadata (OutputStore.read_table gives today's schema)
        return pq.read_table(pa.BufferReader(reader.read_bytes(reader.data_path(shard))))

    w.fs.go.set()
    threads["W"].join(30)
    out["after W"] = data_file()
    late.fs.go.set()
    threads["L"].join(30)
    out["after L"] = data_file()
    out["chunks"] = reader.chunk_paths(shard)
    return out


def check_race(out: dict, late_reads_first: bool) -> None:
    first, final = out["after W"], out["after L"]
    assert first.schema.metadata[b"writer"] == b"W"
    rows = {r["key"]: r["caption_en"] for r in final.to_pylist()}
    assert rows == {"a": "w1", "b": "w1", "c": None, "d": "zombie"}, rows  # nothing lost, a key once
    if late_reads_first:
        # W's file is complete: it wins and stays byte for byte (before, L overwrote it and lost d)
        assert sorted(first.column("key").to_pylist()) == ["a", "b", "c", "d"]
        assert final.equals(first) and final.schema.metadata[b"writer"] == b"W"
        assert dict(out["L"]) == dict(out["W"]) == {"ok": 3, "error": 1}
    else:
        # W read before chunk 3 and removed it with the folder: L adds only the key W's file lacks
        assert sorted(first.column("key").to_pylist()) == ["a", "b", "c"]
        assert final.schema.metadata[b"writer"] == b"L"
        assert dict(out["W"]) == {"ok": 2, "error": 1} and dict(out["L"]) == {"ok": 3, "error": 1}
    assert out["chunks"] == []


@pytest.mark.parametrize("late_reads_first", [True, False])
def test_two_racing_finalizers_first_complete_file_wins_locally(tmp_path, late_reads_first):
    check_race(race_finalizers(lambda: OutputStore(str(tmp_path / "out")), late_reads_first), late_reads_first)


def test_a_late_finalizer_does_not_rewrite_a_complete_file(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.commit_chunk("00000", [row("a", "ok", "first")], attempt=1)
    store.finalize_shard("00000", {b"writer": b"first"})
    before = os.stat(store.data_path("00000"))
    store.commit_chunk("00000", [row("a", "ok", "zombie")], attempt=2)  # same key, another attempt
    assert dict(store.finalize_shard("00000", {b"writer": b"second"})) == {"ok": 1}
    after = os.stat(store.data_path("00000"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert store.chunk_paths("00000") == []
    with open(store.data_path("00000"), "rb") as f:
        assert pq.read_schema(f).metadata[b"writer"] == b"first"


def test_settling_a_record_keeps_the_tars_skipped_members(tmp_path):
    """A worker killed between the data file and its record: the rewritten record counts the data file's rows
    and keeps what only the record knew (the tar members that belong to no sample)."""
    from pipeline.progress import read_state, settle_record, write_state

    store = OutputStore(str(tmp_path / "out"))
    store.commit_chunk("00000", [row("a"), row("b", status="decode_error")], attempt=1)
    store.finalize_shard("00000", {})
    write_state(store, "00000", state="running", members_skipped={"not a regular file": 2})
    assert settle_record(store, "00000")
    state = read_state(store, "00000")
    assert state["state"] == "done" and state["rows"] == {"ok": 1, "decode_error": 1}
    assert state["members_skipped"] == {"not a regular file": 2}
