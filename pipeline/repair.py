"""The repair pass: a caption the quality guards flag is generated again, with settings meant to fix its flag.

Up to `quality.repair_attempts` more generations per language (manifest; default 1, 0 turns repairs off).
Each repair starts from the previous attempt's settings and its flags:

| flag           | what the next attempt changes                                                   |
|----------------|---------------------------------------------------------------------------------|
| repetition     | CTRL repetition penalty raised by REPAIR_PENALTY_STEP (over the prompt's text   |
| echo           | tokens and the generated ones: it discourages loops and copying the prompt)      |
| empty          | the stop tokens cannot be picked for the first MIN_NEW_TOKENS_EMPTY tokens       |
| truncated      | the token budget × TRUNCATED_BUDGET_FACTOR (once; the engine's cache holds it)   |
| wrong_language | the language instruction restated after the question (LANGUAGE_HINT)            |

Decoding stays greedy, so a row is a function of its inputs: same clip, same settings → same row. The row
keeps the attempt with the fewest flags (the earliest among equals), and records how many attempts were
made and the first attempt's flags. Repairs go through the same engine (or the same static batch path) as
first attempts; nothing here runs a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.quality import ECHO, EMPTY, REPETITION, TRUNCATED, WRONG_LANGUAGE

REPAIRABLE = frozenset({EMPTY, ECHO, REPETITION, TRUNCATED, WRONG_LANGUAGE})
REPAIR_PENALTY_STEP = 0.3  # 1.0 (none) -> 1.3 -> 1.6 ...; a configured penalty p -> p + 0.3
MIN_NEW_TOKENS_EMPTY = 8
TRUNCATED_BUDGET_FACTOR = 2
# Appended to the question of the pass whose caption came out in the wrong language.
LANGUAGE_HINT = {"en": "Answer in English.", "zh": "请用中文回答。"}


@dataclass(frozen=True)
class GenSettings:
    """How one caption attempt is generated."""

    max_new_tokens: int
    repetition_penalty: float | None = None
    min_new_tokens: int = 0
    language_hint: bool = False


@dataclass(frozen=True)
class Attempt:
    """One generated caption and what the guards said about it."""

    text: str
    num_tokens: int
    hit_max_new_tokens: bool
    flags: tuple[str, ...]
    settings: GenSettings


def repair_settings(flags: Sequence[str], previous: GenSettings, base_max_new_tokens: int) -> GenSettings:
    """The settings of the attempt after one flagged with `flags`."""
    flags = set(flags)
    s = previous
    if flags & {REPETITION, ECHO}:
        s = dataclasses.replace(s, repetition_penalty=round((s.repetition_penalty or 1.0) + REPAIR_PENALTY_STEP, 6))
    if EMPTY in flags:
        s = dataclasses.replace(s, min_new_tokens=max(s.min_new_tokens, MIN_NEW_TOKENS_EMPTY))
    if TRUNCATED in flags:
        s = dataclasses.replace(s, max_new_tokens=max_budget(base_max_new_tokens))
    if WRONG_LANGUAGE in flags:
        s = dataclasses.replace(s, language_hint=True)
    return s


def max_budget(base_max_new_tokens: int) -> int:
    """The largest token budget a repair can ask for (what the engine's cache must hold)."""
    return base_max_new_tokens * TRUNCATED_BUDGET_FACTOR


def needs_repair(attempts: Sequence[Attempt], repair_attempts: int) -> bool:
    """Whether another attempt is due: the last one has a repairable flag and repairs are left."""
    return bool(attempts) and len(attempts) <= repair_attempts and bool(set(attempts[-1].flags) & REPAIRABLE)


def next_settings(attempts: Sequence[Attempt], base_max_new_tokens: int) -> GenSettings:
    last = attempts[-1]
    return repair_settings(last.flags, last.settings, base_max_new_tokens)


def best(attempts: Sequence[Attempt]) -> Attempt:
    """The attempt with the fewest flags; the earliest among equals."""
    return min(attempts, key=lambda a: len(a.flags))
