"""Row status and flag names and the failure contract (`Failure(stage, reason)`): plain Python, no pyarrow,
so the decoder processes (pipeline/frames.py) can use them. `pipeline.rows` re-exports all of it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_REASON_CHARS = 120


class Status(StrEnum):
    """A row's `status` column. The values are what Parquet holds."""

    OK = "ok"
    FLAGGED = "flagged"
    SOURCE_FAILED = "source_failed"
    DECODE_ERROR = "decode_error"
    ERROR = "error"
    # the key is already in another shard of the output (pipeline/key_claims.py): not captioned again
    DUPLICATE = "duplicate"


class Flag(StrEnum):
    """A name in a row's `caption_flags` (pipeline/quality.py decides them)."""

    EMPTY = "empty"
    ECHO = "echo"
    REPETITION = "repetition"
    WRONG_LANGUAGE = "wrong_language"
    TRUNCATED = "truncated"


STATUSES = tuple(s.value for s in Status)  # ("ok", "flagged", "source_failed", "decode_error", "error", "duplicate")
FLAG_NAMES = tuple(sorted(f.value for f in Flag))


STAGES = ("source", "read", "decode", "caption")
_STAGE_STATUS = {
    "source": Status.SOURCE_FAILED,
    "read": Status.DECODE_ERROR,
    "decode": Status.DECODE_ERROR,
    "caption": Status.ERROR,
}
FAILED_STATUSES = frozenset(s.value for s in _STAGE_STATUS.values())


@dataclass(frozen=True)
class Failure:
    """Why a key has no caption: the stage that failed and a readable reason (the row's `error` text)."""

    stage: str
    reason: str

    def __post_init__(self) -> None:
        if self.stage not in _STAGE_STATUS:
            raise ValueError(f"unknown failure stage {self.stage!r}; stages are {', '.join(STAGES)}")

    @property
    def status(self) -> Status:
        return _STAGE_STATUS[self.stage]

    @property
    def kind(self) -> str:
        """The reason's class for histograms: ``"stage: head"``, the head being the reason up to its first
        ": " (``"decode: could not read the mp4 container"``), so per-clip details do not split it."""
        return reason_kind(self.stage, self.reason)


def reason_kind(stage: str, reason: str | None) -> str:
    head = (reason or "").split(": ", 1)[0].strip() or "unknown"
    return f"{stage}: {head[:MAX_REASON_CHARS]}"


