"""The output row, in one place: its columns and Arrow schema, the status and flag names, and the failure
contract every stage maps to.

A row is one key of a shard. Everything that can go wrong with a key is a `Failure(stage, reason)`:

    stage     where it comes from                                            row status
    source    the source video failed in video2dataset (json status/error)   source_failed
    read      the tar has no (complete) mp4 for a key whose source succeeded  decode_error
    decode    the mp4 could not be decoded (`pipeline.frames.DecodeFailure`)  decode_error
    caption   the model raised on this clip, alone                           error

Every key of a shard has a row, whatever its input: a key normalised by the reader keeps the tar's key in
`source_key`, and what was wrong with a sample's members is in `input_flags` (`pipeline.shards.InputFlag`),
described in `error` when the row has no failure reason of its own (a captioned row).

`failure_row` builds the row of any failure; `Row.captioned` (via `Captioner.build_row`) the row of a
captioned clip. A row leaves the pipeline as `Row.to_dict()`: plain Python values (statuses and flags as
plain strings), in the column order of `SCHEMA`.

Plain Python and pyarrow: no torch, no model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import pyarrow as pa

# The names and the failure contract live in pipeline/failures.py (no pyarrow: decoder processes import them).
from pipeline.failures import (  # noqa: F401 - re-exported: pipeline.rows is the row's one module
    FAILED_STATUSES,
    FLAG_NAMES,
    MAX_REASON_CHARS,
    STAGES,
    STATUSES,
    Failure,
    Flag,
    Status,
    reason_kind,
)

if TYPE_CHECKING:
    from pipeline.frames import DecodedClip
    from pipeline.shards import Sample


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source_key", pa.string()),
        ("video_id", pa.string()),
        ("url", pa.string()),
        ("clip_start_s", pa.float64()),
        ("clip_end_s", pa.float64()),
        ("source_caption", pa.string()),
        ("caption_en", pa.string()),
        ("caption_zh", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("input_flags", pa.list_(pa.string())),
        ("caption_flags", pa.list_(pa.string())),
        ("frame_indices", pa.list_(pa.int32())),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("tokens_en", pa.int32()),
        ("tokens_zh", pa.int32()),
        ("model", pa.string()),
        ("lora_alpha", pa.float64()),
        ("prompt_version", pa.string()),
        ("attempts", pa.int32()),
        ("first_flags", pa.list_(pa.string())),
        ("clip_score", pa.float32()),
    ]
)
COLUMNS = tuple(SCHEMA.names)


def sample_failure(sample: Sample, decoded: DecodedClip | Failure | None) -> Failure | None:
    """The failure of a key as the reader and the decoder left it, or None when it has a decoded clip.

    `decoded` is None when the key has no mp4 to decode: a failed source video (stage "source": the json's
    error_message, else its status) or a member missing or cut from the tar (stage "read").
    """
    if isinstance(decoded, Failure):
        return decoded
    if decoded is not None:
        return None
    if sample.source_failed:
        return Failure("source", sample.source_error or f"source video {sample.source_status}")
    # the source says success but the tar has no (complete) mp4 for the key
    return Failure("read", sample.read_error or "mp4 member missing from the shard")


# ------------------------------------------------------------------------------------------ the row


@dataclass
class Row:
    """One output row; the fields are the columns of `SCHEMA`, in order."""

    key: str
    shard: str
    source_key: str | None = None  # the tar's key, when `key` is its normalised form (pipeline.shards.usable_key)
    video_id: str | None = None
    url: str | None = None
    clip_start_s: float | None = None
    clip_end_s: float | None = None
    source_caption: str | None = None
    caption_en: str | None = None
    caption_zh: str | None = None
    status: Status | str = Status.OK
    error: str | None = None
    input_flags: list[str] = field(default_factory=list)  # pipeline.shards.InputFlag names, sorted
    caption_flags: list[Flag | str] = field(default_factory=list)
    frame_indices: list[int] | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    tokens_en: int | None = None
    tokens_zh: int | None = None
    model: str | None = None
    lora_alpha: float | None = None
    prompt_version: str | None = None
    attempts: int | None = None  # caption generations of the language that needed most (1: no repair)
    first_flags: list[Flag | str] | None = None  # the first attempt's flags (what the repair pass fixed)
    clip_score: float | None = None  # CLIP similarity of caption_en and the clip's frames (score.model)

    @classmethod
    def for_sample(cls, sample: Sample, clip: Any, ctx: Any, *, status: Status | str,
                   error: str | None = None) -> Row:
        """The sample's facts and, when `clip` is a decoded clip, the clip's; captions left empty. `ctx` gives
        `model_name`, `lora_alpha` and `prompt_version` (a `Captioner`). `error` is the failure's reason; without
        one, the sample's input notes (a captioned row still says what was wrong with its input)."""
        from pipeline.frames import DecodedClip  # here: frames imports this module

        decoded = clip if isinstance(clip, DecodedClip) else None
        return cls(
            key=sample.key,
            shard=sample.shard,
            source_key=sample.source_key,
            video_id=sample.video_id,
            url=sample.url,
            clip_start_s=sample.clip_start_s,
            clip_end_s=sample.clip_end_s,
            source_caption=sample.source_caption,
            status=status,
            error=error if error is not None else sample.input_note,
            input_flags=sorted(sample.input_flags),
            frame_indices=list(decoded.frame_indices) if decoded else None,
            num_frames=decoded.num_frames if decoded else None,
            fps=decoded.fps if decoded else None,
            duration_s=decoded.duration_s if decoded else None,
            width=decoded.width if decoded else None,
            height=decoded.height if decoded else None,
            model=ctx.model_name,
            lora_alpha=ctx.lora_alpha,
            prompt_version=ctx.prompt_version,
        )

    def to_dict(self) -> dict[str, Any]:
        """The row as `writing.rows_to_table` takes it: every column, plain values, schema order."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS}
        out["status"] = Status(out["status"]).value
        out["caption_flags"] = [Flag(f).value for f in out["caption_flags"]]
        if out["first_flags"] is not None:
            out["first_flags"] = [Flag(f).value for f in out["first_flags"]]
        return out


_FIELDS = fields(Row)
assert tuple(f.name for f in _FIELDS) == COLUMNS, "Row's fields must be SCHEMA's columns, in order"


def failure_row(sample: Sample, failure: Failure, clip: Any = None, *, ctx: Any) -> Row:
    """The row of a key that failed at any stage: status from the stage, `error` the reason, the clip's
    facts when it was decoded (a caption failure)."""
    return Row.for_sample(sample, clip, ctx, status=failure.status, error=failure.reason)


def row_failure(row: Mapping[str, Any]) -> Failure | None:
    """The failure a written row records, or None for a captioned row. A `decode_error` row does not say
    whether the mp4 was missing or undecodable: it reads as stage "decode"."""
    stage = {"source_failed": "source", "decode_error": "decode", "error": "caption"}.get(row.get("status"))
    return Failure(stage, row.get("error") or "") if stage else None


# ------------------------------------------------------------------------------------------ histograms

MAX_REASONS = 20  # distinct reason kinds kept per shard; the rest are counted under OTHER
OTHER = "other"


def merge_reasons(histogram: Mapping[str, int] | None, kinds: Iterable[str] | Mapping[str, int],
                  cap: int = MAX_REASONS) -> dict[str, int]:
    """`histogram` plus `kinds` (reason kinds, or a kind -> count mapping), keeping the `cap` most frequent
    kinds (ties: alphabetical) and counting the others under "other". Ordered by count, descending."""
    counts: Counter = Counter()
    for k, n in (histogram or {}).items():
        if isinstance(n, int) and n > 0:
            counts[str(k)] += n
    counts.update(kinds)
    other = counts.pop(OTHER, 0)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[:cap])
    other += sum(n for _, n in ranked[cap:])
    if other:
        kept[OTHER] = other
    return kept


def top_reasons(histogram: Mapping[str, int] | None, n: int | None = None) -> list[tuple[str, int]]:
    """(kind, count) pairs, most frequent first ("other" last among equals)."""
    items = sorted(((k, v) for k, v in (histogram or {}).items() if isinstance(v, int) and v > 0),
                   key=lambda kv: (-kv[1], kv[0] == OTHER, kv[0]))
    return items if n is None else items[:n]
