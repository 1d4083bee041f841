"""pipeline/stats.py: one set of counters for logs, metrics and progress records."""

from __future__ import annotations

from pipeline.rows import MAX_REASONS, OTHER
from pipeline.stats import Stats


def _row(status, flags=(), en=None, zh=None, error=None):
    return {"status": status, "caption_flags": list(flags), "tokens_en": en, "tokens_zh": zh, "error": error}


def test_rows_are_counted_by_status_flag_token_and_failure_reason():
    s = Stats()
    s.add_rows([_row("ok", en=10, zh=12), _row("flagged", ["repetition", "truncated"], 40, 3),
                _row("decode_error", error="could not read the mp4 container: x"), _row("source_failed", error="403")])
    s.add_rows([_row("flagged", ["repetition"], 5, 5)])
    assert s.rows == {"ok": 1, "flagged": 2, "decode_error": 1, "source_failed": 1} and s.rows_new == 5
    assert s.flags == {"repetition": 2, "truncated": 1}
    assert (s.tokens_en, s.tokens_zh) == (55, 20)
    assert s.error_reasons == {"decode: could not read the mp4 container": 1, "source: 403": 1}


def test_since_gives_the_increments_and_add_merges_with_the_reason_cap():
    s = Stats()
    s.add_rows([_row("ok", en=3)])
    s.model_s = 1.5
    before = s.snapshot()
    s.add_rows([_row("ok", en=4), _row("error", error="model error: boom")])
    s.model_s = 2.0
    delta = s.since(before)
    assert delta.rows == {"ok": 1, "error": 1} and delta.tokens_en == 4 and delta.model_s == 0.5
    assert before.rows == {"ok": 1}  # a snapshot does not move with the original

    a = Stats(error_reasons={f"decode: r{i}": 2 for i in range(MAX_REASONS)}, rows={"ok": 1}, tokens_en=1)
    b = Stats(error_reasons={"source: new": 1, "decode: r0": 1}, rows={"ok": 2, "error": 1}, tokens_en=2)
    both = a + b
    assert both.rows == {"ok": 3, "error": 1} and both.tokens_en == 3
    assert both.error_reasons["decode: r0"] == 3 and both.error_reasons[OTHER] == 1
    assert len(both.error_reasons) == MAX_REASONS + 1


def test_the_progress_record_round_trips_and_tolerates_old_or_edited_records():
    s = Stats()
    s.add_rows([_row("flagged", ["echo"], 7, 8), _row("decode_error", error="no frames")])
    assert Stats.from_record(s.record_fields()).record_fields() == s.record_fields()
    old = {"state": "running", "error_reasons": {"decode: no frames": 2}}  # written before the other fields
    assert Stats.from_record(old).error_reasons == {"decode: no frames": 2} and Stats.from_record(old).rows == {}
    edited = {"committed": {"ok": "7", "flagged": -1, "error": True}, "tokens": ["en", 3], "flags": None}
    assert Stats.from_record(edited) == Stats()
    assert Stats.from_record(None) == Stats()
