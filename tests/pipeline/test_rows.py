"""pipeline/rows.py: one row type, one schema, one failure contract, and the capped failure-reason histogram."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.frames import DecodedClip, DecodeFailure
from pipeline.rows import (
    COLUMNS,
    FLAG_NAMES,
    MAX_REASONS,
    OTHER,
    SCHEMA,
    STATUSES,
    Failure,
    Flag,
    Row,
    Status,
    failure_row,
    merge_reasons,
    row_failure,
    sample_failure,
    top_reasons,
)
from pipeline.shards import Sample

CTX = SimpleNamespace(model_name="pllava-tiny@abc", lora_alpha=4.0, prompt_version="vicuna-v1/recaption-v1")


def _sample(**over) -> Sample:
    base = dict(key="0000001_00002", shard="00000", url="https://www.youtube.com/watch?v=abcdefghijk",
                video_id="abcdefghijk", clip_start_s=1.5, clip_end_s=4.0, source_caption="a cat",
                source_status="success")
    return Sample(**{**base, **over})


def _clip() -> DecodedClip:
    return DecodedClip(np.zeros((2, 4, 4, 3), np.uint8), 30.0, 75, 640, 360, 2.5, [18, 56])


def test_the_module_owns_the_schema_and_the_names():
    import pipeline.quality
    import pipeline.writing

    assert pipeline.writing.SCHEMA is SCHEMA and pipeline.writing.COLUMNS == COLUMNS
    assert pipeline.writing.STATUSES == STATUSES == ("ok", "flagged", "source_failed", "decode_error", "error",
                                                     "duplicate")
    assert [f.name for f in dataclasses.fields(Row)] == list(COLUMNS) == SCHEMA.names
    assert pipeline.quality.FLAG_NAMES == FLAG_NAMES == ("echo", "empty", "repetition", "truncated",
                                                         "wrong_language")
    assert {pipeline.quality.EMPTY, pipeline.quality.TRUNCATED} == {"empty", "truncated"}
    assert Status.DECODE_ERROR == "decode_error" and Flag.WRONG_LANGUAGE == "wrong_language"


@pytest.mark.parametrize("stage, status", [("source", "source_failed"), ("read", "decode_error"),
                                           ("decode", "decode_error"), ("caption", "error")])
def test_every_stage_maps_to_its_status_and_keeps_the_reason(stage, status):
    failure = Failure(stage, f"{stage} went wrong: details 42")
    assert failure.status == status
    row = failure_row(_sample(), failure, ctx=CTX).to_dict()
    assert row["status"] == status and type(row["status"]) is str
    assert row["error"] == f"{stage} went wrong: details 42"
    assert failure.kind == f"{stage}: {stage} went wrong"
    assert row_failure(row).reason == failure.reason


def test_an_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="unknown failure stage"):
        Failure("upload", "no")


def test_the_reader_and_the_decoder_map_to_the_contract():
    failed = _sample(source_status="failed_to_download", source_error="HTTP Error 403: Forbidden")
    assert sample_failure(failed, None) == Failure("source", "HTTP Error 403: Forbidden")
    assert sample_failure(_sample(source_status="failed_to_subsample"), None) == Failure(
        "source", "source video failed_to_subsample")
    assert sample_failure(_sample(), None) == Failure("read", "mp4 member missing from the shard")
    assert sample_failure(_sample(read_error="mp4 member cut short"), None) == Failure("read", "mp4 member cut short")
    decoded = DecodeFailure("empty mp4 (0 bytes)")
    assert isinstance(decoded, Failure) and decoded.stage == "decode" and decoded.reason == "empty mp4 (0 bytes)"
    assert sample_failure(_sample(), decoded) is decoded
    assert sample_failure(_sample(), _clip()) is None


def test_failure_rows_are_the_rows_written_before_the_contract():
    """Byte-for-byte: the same dict (keys, order, values) that `base_row` (now `Row.for_sample`) built before
    pipeline/rows.py."""
    s = _sample(source_status="failed_to_download", source_error="timeout")
    expected = {
        "key": s.key, "shard": s.shard,
        "source_key": None,  # added since (issue 22): null for a key used as it is
        "video_id": s.video_id, "url": s.url, "clip_start_s": 1.5, "clip_end_s": 4.0,
        "source_caption": "a cat", "caption_en": None, "caption_zh": None, "status": "source_failed",
        "error": "timeout",
        "input_flags": [],  # added since (issue 22): empty for a sample without input problems
        "caption_flags": [], "frame_indices": None, "num_frames": None, "fps": None,
        "duration_s": None, "width": None, "height": None, "tokens_en": None, "tokens_zh": None,
        "model": "pllava-tiny@abc", "lora_alpha": 4.0, "prompt_version": "vicuna-v1/recaption-v1",
        # columns added since (issue 15): null for a failure
        "attempts": None, "first_flags": None, "clip_score": None,
    }
    row = failure_row(s, sample_failure(s, None), ctx=CTX).to_dict()
    assert list(row.items()) == list(expected.items())
    assert Row.for_sample(s, None, CTX, status="source_failed", error="timeout").to_dict() == row
    # a caption failure keeps the decoded clip's facts
    clip = _clip()
    row = failure_row(_sample(), Failure("caption", "model error: RuntimeError: boom"), clip, ctx=CTX).to_dict()
    assert (row["status"], row["frame_indices"], row["num_frames"], row["width"], row["height"]) == (
        "error", [18, 56], 75, 640, 360)
    assert row["fps"] == 30.0 and row["duration_s"] == 2.5 and row["caption_en"] is None


def test_to_dict_writes_plain_strings():
    row = Row(key="k", shard="s", status=Status.FLAGGED, caption_flags=[Flag.EMPTY, "truncated"]).to_dict()
    assert row["status"] == "flagged" and type(row["status"]) is str
    assert row["caption_flags"] == ["empty", "truncated"] and all(type(f) is str for f in row["caption_flags"])
    with pytest.raises(ValueError):
        Row(key="k", shard="s", status="bogus").to_dict()


def test_the_histogram_keeps_the_most_frequent_reasons_and_counts_the_rest_as_other():
    kinds = [f"decode: reason {i:02d}" for i in range(MAX_REASONS + 5) for _ in range(i + 1)]
    hist = merge_reasons(None, kinds)
    assert len(hist) == MAX_REASONS + 1 and OTHER in hist
    assert sum(hist.values()) == len(kinds)
    assert hist[OTHER] == sum(range(1, 6))  # the five rarest
    assert "decode: reason 00" not in hist and f"decode: reason {MAX_REASONS + 4:02d}" in hist
    again = merge_reasons(hist, ["caption: model error"] * 100)  # merging keeps the cap and the total
    assert len(again) == MAX_REASONS + 1 and sum(again.values()) == len(kinds) + 100
    assert next(iter(again)) == "caption: model error"
    assert top_reasons(again, 1) == [("caption: model error", 100)]
    assert merge_reasons({"a": 1}, {"a": 2, "b": 1}) == {"a": 3, "b": 1}


def test_progress_records_carry_the_histogram(tmp_path):
    from pipeline.progress import ERROR_REASONS, mark_done, mark_running, read_state, touch_running
    from pipeline.stats import Stats
    from pipeline.writing import OutputStore

    store = OutputStore(str(tmp_path))
    mark_running(store, "a", "a.tar", 1, 1)
    touch_running(store, "a")  # the former call: no histogram, none written
    assert ERROR_REASONS not in read_state(store, "a")
    touch_running(store, "a", Stats(error_reasons={"decode: no frames": 2}))
    assert read_state(store, "a")[ERROR_REASONS] == {"decode: no frames": 2}
    mark_done(store, "a", {"ok": 3, "decode_error": 2}, None, 1.0)  # the former call keeps it
    assert read_state(store, "a")[ERROR_REASONS] == {"decode: no frames": 2}
    many = {f"source: r{i}": 1 for i in range(MAX_REASONS + 3)}
    mark_done(store, "a", {"source_failed": MAX_REASONS + 3}, None, 1.0, Stats(error_reasons=many))
    state = read_state(store, "a")
    assert len(state[ERROR_REASONS]) == MAX_REASONS + 1 and state[ERROR_REASONS][OTHER] == 3


def test_decoder_processes_do_not_import_pyarrow():
    import subprocess
    import sys

    code = "import sys, pipeline.frames; print('pyarrow' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stdout
