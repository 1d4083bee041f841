"""`recaption status` reports why rows failed from the progress records alone (no Parquet is read)."""

from __future__ import annotations

import json

from jobs.status import collect_status, format_report, main
from pipeline.progress import JOB_FILE, write_shard_list, write_state
from pipeline.writing import OutputStore


def _records(tmp_path) -> OutputStore:
    store = OutputStore(str(tmp_path))
    store.write_json(store.path(JOB_FILE), {"fingerprint": "f"})
    write_shard_list(store, [(n, f"{n}.tar") for n in "abc"])
    write_state(store, "a", state="running", error_reasons={"decode: could not read the mp4 container": 3,
                                                            "source: HTTP Error 403": 1})
    write_state(store, "b", state="failed", errors=[{"attempt": 3, "reason": "boom", "at": 0}],
                error_reasons={"source: HTTP Error 403": 4, "caption: model error": 1, "other": 2})
    write_state(store, "c", state="running")  # no histogram (written before it existed): nothing to report
    return store


def test_status_reports_top_reasons_from_progress_records_alone(tmp_path, monkeypatch):
    store = _records(tmp_path)
    assert not (tmp_path / "data").exists()  # no data file and no chunk: nothing but the records to read

    def no_parquet(*a, **k):
        raise AssertionError("status read Parquet for the error reasons")

    monkeypatch.setattr("pyarrow.parquet.read_table", no_parquet)  # whoever reads it
    report = collect_status(store, ["a", "b", "c"])
    assert report["top_error_reasons"] == [["source: HTTP Error 403", 5], ["decode: could not read the mp4 container", 3],
                                           ["other", 2], ["caption: model error", 1]]
    assert report["error_reasons"]["source: HTTP Error 403"] == 5
    assert report["shards"]["a"]["top_error_reasons"] == [["decode: could not read the mp4 container", 3],
                                                           ["source: HTTP Error 403", 1]]
    assert report["shards"]["b"]["top_error_reasons"][0] == ["source: HTTP Error 403", 4]
    assert "error_reasons" not in report["shards"]["c"]
    text = format_report(report)
    assert "errors: 5× source: HTTP Error 403; 3× decode: could not read the mp4 container; 2× other" in text
    lines = text.splitlines()
    after = {lines[i].split()[0]: lines[i + 1].strip() for i in range(len(lines) - 1) if lines[i].startswith("  ")}
    assert after["a"] == "errors: 3× decode: could not read the mp4 container; 1× source: HTTP Error 403"
    assert after["b"] == "errors: 4× source: HTTP Error 403; 2× other; 1× caption: model error"


def test_status_json_carries_the_reasons(tmp_path, capsys):
    _records(tmp_path)
    assert main([str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top_error_reasons"][0] == ["source: HTTP Error 403", 5]
    assert report["shards"]["b"]["error_reasons"]["other"] == 2


def test_status_reports_input_problems_and_skipped_members_from_records_alone(tmp_path, monkeypatch):
    """Issue 22: rows whose input had a problem (a normalised key, an unusable .json) and the tar members that are
    no sample's (stray files, directories), per shard and for the job, from the progress records alone."""
    store = _records(tmp_path)
    write_state(store, "a", input_flags={"key_normalised": 2, "json_invalid": 1})  # committed rows so far
    write_state(store, "b", input_flags={"json_not_utf8": 1},
                members_skipped={"not a regular file": 1, "not .mp4/.json/.txt": 3})

    def no_parquet(*a, **k):
        raise AssertionError("status read Parquet for the input counts")

    monkeypatch.setattr("pyarrow.parquet.read_table", no_parquet)  # whoever reads it
    report = collect_status(store, ["a", "b", "c"])
    assert report["input_flags"] == {"key_normalised": 2, "json_invalid": 1, "json_not_utf8": 1}
    assert report["members_skipped"] == {"not a regular file": 1, "not .mp4/.json/.txt": 3}
    assert report["shards"]["a"]["input_flags"] == {"key_normalised": 2, "json_invalid": 1}
    assert "members_skipped" not in report["shards"]["a"] and "input_flags" not in report["shards"]["c"]
    lines = format_report(report).splitlines()
    assert ("input:  rows with input problems: json_invalid=1 json_not_utf8=1 key_normalised=2; "
            "tar members skipped: 4 (not .mp4/.json/.txt: 3, not a regular file: 1)") in lines
    b = next(i for i, line in enumerate(lines) if line.split()[:1] == ["b"])
    assert lines[b + 2].strip() == ("input: rows with input problems: json_not_utf8=1; "
                                    "tar members skipped: 4 (not .mp4/.json/.txt: 3, not a regular file: 1)")
