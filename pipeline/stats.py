"""One set of counters for everything the job reports: a shard attempt, an actor's engine, a captioner.

The same `Stats` feeds the three readers of these numbers:
  * the logs: the driver's "shard finished" line (`ShardOutcome.stats`), benchmarks (`Captioner.stats`,
    `CaptionService.stats`);
  * the Ray metrics: `jobs/metrics.record_stats(now.since(before))` after each commit;
  * the shard's progress record: `record_fields()` of the earlier attempts' counters plus this attempt's, at
    every commit and at `done` (committed rows by status, quality flags, generated tokens, the capped
    histogram of failure reasons, rows by input problem; at `done` also the tar members that belong to no
    sample), read back by `from_record` when a later attempt resumes the shard, so
    nothing is counted twice or lost across attempts.

Row-derived counters (`add_rows`) count committed rows; the others are what the code around them adds
(clips encoded, seconds in the model, engine restarts). The engine's own slot-level counters
(`model.engine.EngineStats`) stay in model/, which imports nothing of pipeline/.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.rows import merge_reasons, row_failure

# The progress record's fields written from a Stats (see `record_fields`).
ERROR_REASONS = "error_reasons"  # {"decode: could not read the mp4 container": 3, ...}, capped (rows.MAX_REASONS)
COMMITTED = "committed"  # {"ok": 240, "flagged": 12, ...}: committed rows by status
FLAGS = "flags"  # {"repetition": 4, ...}: quality flags of committed rows
TOKENS = "tokens"  # {"en": 31000, "zh": 29000}: generated tokens of committed rows
REPAIRED = "repaired"  # committed rows the repair pass captioned again (attempts > 1)
INPUT_FLAGS = "input_flags"  # {"key_normalised": 2, "json_invalid": 1}: input problems of committed rows
# {"not a regular file": 1, ...}: tar members that belong to no sample, by reason; the whole tar's, written
# when the shard is done (each attempt reads the tar again, so this is never added across attempts)
MEMBERS_SKIPPED = "members_skipped"


@dataclass
class Stats:
    # counted from committed rows (add_rows)
    rows: dict[str, int] = field(default_factory=dict)  # by status
    flags: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)  # failure kinds, capped; see rows.merge_reasons
    input_flags: dict[str, int] = field(default_factory=dict)  # rows by input problem (pipeline.shards.InputFlag)
    tokens_en: int = 0
    tokens_zh: int = 0
    rows_repaired: int = 0  # rows whose caption took more than one attempt
    # counted by the code that does the work
    clips: int = 0  # clips through the visual encoder
    batches: int = 0  # static-path caption batches
    chunks: int = 0  # chunk files committed
    keys_skipped: int = 0  # keys already committed by an earlier attempt (or repeated in the tar)
    members_skipped: dict[str, int] = field(default_factory=dict)  # the tar's non-sample members, by reason
    fallbacks: int = 0  # clips captioned by the static path after an engine failure
    engine_restarts: int = 0
    repairs: int = 0  # repair attempts generated (pipeline/repair.py)
    tokens_repair: int = 0  # tokens those attempts generated beyond the kept captions'
    seconds_vision: float = 0.0
    seconds_en: float = 0.0
    seconds_zh: float = 0.0
    seconds_score: float = 0.0  # CLIP scoring (score.model): frame and caption embeddings
    model_s: float = 0.0  # the engine thread working
    idle_s: float = 0.0  # the engine thread waiting for clips
    wait_decode_s: float = 0.0  # the model side waiting for this shard's decoded clips

    @property
    def rows_new(self) -> int:
        return sum(self.rows.values())

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Count committed rows: status, flags, tokens and the failure reason of each."""
        status: Counter = Counter(self.rows)
        flags: Counter = Counter(self.flags)
        inputs: Counter = Counter(self.input_flags)
        kinds = []
        for row in rows:
            status[row["status"]] += 1
            flags.update(row.get("caption_flags") or ())
            inputs.update(row.get("input_flags") or ())
            self.tokens_en += row.get("tokens_en") or 0
            self.tokens_zh += row.get("tokens_zh") or 0
            self.rows_repaired += (row.get("attempts") or 0) > 1
            failure = row_failure(row)
            if failure is not None:
                kinds.append(failure.kind)
        self.rows, self.flags, self.input_flags = dict(status), dict(flags), dict(inputs)
        self.error_reasons = merge_reasons(self.error_reasons, kinds)

    def since(self, earlier: Stats) -> Stats:
        """What was added after `earlier` (a copy taken with `snapshot()`): the increments for metrics."""
        out = Stats()
        for f in dataclasses.fields(self):
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            if isinstance(now, dict):
                setattr(out, f.name, {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)})
            else:
                setattr(out, f.name, now - then)
        return out

    def __add__(self, other: Stats) -> Stats:
        """Both sets of counters together (e.g. earlier attempts' committed rows + this attempt's)."""
        out = Stats()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "error_reasons":
                setattr(out, f.name, merge_reasons(a, b))
            elif isinstance(a, dict):
                setattr(out, f.name, dict(Counter(a) + Counter(b)))
            else:
                setattr(out, f.name, a + b)
        return out

    def snapshot(self) -> Stats:
        return dataclasses.replace(self, rows=dict(self.rows), flags=dict(self.flags),
                                   error_reasons=dict(self.error_reasons), input_flags=dict(self.input_flags),
                                   members_skipped=dict(self.members_skipped))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- the progress record

    def record_fields(self) -> dict[str, Any]:
        """The fields of a shard's progress record that describe its committed rows."""
        return {
            COMMITTED: dict(self.rows),
            FLAGS: dict(self.flags),
            TOKENS: {"en": self.tokens_en, "zh": self.tokens_zh},
            ERROR_REASONS: merge_reasons(None, self.error_reasons),
            REPAIRED: self.rows_repaired,
            INPUT_FLAGS: dict(self.input_flags),
            MEMBERS_SKIPPED: dict(self.members_skipped),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> Stats:
        """The committed rows' counters kept in a progress record (written by `record_fields`); fields that
        are missing or malformed (an older record, a hand edit) start from zero. `members_skipped` is not
        read back: an attempt counts the whole tar again."""
        record = record or {}
        tokens = record.get(TOKENS) if isinstance(record.get(TOKENS), dict) else {}
        return cls(rows=counts(record.get(COMMITTED)), flags=counts(record.get(FLAGS)),
                   error_reasons=merge_reasons(counts(record.get(ERROR_REASONS)), {}),
                   tokens_en=_int(tokens.get("en")), tokens_zh=_int(tokens.get("zh")),
                   rows_repaired=_int(record.get(REPAIRED)), input_flags=counts(record.get(INPUT_FLAGS)))


def counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool) and v > 0}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
