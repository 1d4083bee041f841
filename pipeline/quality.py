"""Per-row quality guards: name what is wrong with a generated caption instead of shipping it silently.

Known failure modes of PLLaVA-style generation (docs/CONTRACTS.md, Output layout: the flags): an empty
answer, an answer that echoes the prompt or the chat template (wrong template or LoRA α), a greedy loop that
repeats a phrase until `max_new_tokens`, and a caption in the wrong language. A row keeps its caption; its
`caption_flags` say why it should not be trusted, and downstream training decides what to drop.

Text is measured in "tokens" that work for both languages: a run of letters/digits is one token
(lower-cased), every CJK ideograph is one token (Chinese has no spaces, and a character is the unit a
looping model repeats), punctuation and spaces are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from pipeline.rows import FLAG_NAMES, Flag  # noqa: F401  (FLAG_NAMES: re-exported, sorted)

# The flag names (pipeline.rows.Flag), as the plain strings a row's `caption_flags` holds.
EMPTY = Flag.EMPTY.value
ECHO = Flag.ECHO.value
REPETITION = Flag.REPETITION.value
WRONG_LANGUAGE = Flag.WRONG_LANGUAGE.value
TRUNCATED = Flag.TRUNCATED.value

# echo: a verbatim run of this many tokens from a prompt text. Captions share short phrases with the
# question ("the video", "in detail") and may quote a few of its words; 8 consecutive words of one
# instruction do not occur by chance in a description of a video.
ECHO_MIN_RUN = 8
# A prompt shorter than ECHO_MIN_RUN is an echo when it appears whole, if it has at least this many tokens
# (a whole 2-token prompt such as "Describe it." is an ordinary phrase).
ECHO_MIN_WHOLE_PROMPT = 4
# Chat-template markup never belongs in a caption: a role tag (the model answering as, or continuing,
# the dialogue) at the start of a line in any case, or anywhere in the template's upper case ("... ASSISTANT:"
# is how the Vicuna template ends a turn), or a template special token decoded as text.
ECHO_ROLE_TAG_LINE_START = re.compile(r"^\s*(?:user|assistant|system)\s*:", re.IGNORECASE | re.MULTILINE)
ECHO_ROLE_TAG_UPPER = re.compile(r"\b(?:USER|ASSISTANT|SYSTEM):")
ECHO_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<image>")

# repetition: a span of REPETITION_MIN_COPIES or more back-to-back copies of one token sequence (of
# any length), spanning at least REPETITION_MIN_SPAN tokens. Three copies of a sentence in a row is
# already a loop under greedy decoding; the span floor keeps emphasis and reduplication ("very very
# very", "慢慢", "哈哈哈") and short lists from counting: one repeated word needs 12 copies, a 2-token
# phrase 6, a 4-token phrase 3.
REPETITION_MIN_COPIES = 3
REPETITION_MIN_SPAN = 12
# ... or a caption that ends by restarting a passage right after it (the copy possibly cut short by
# max_new_tokens) where the copy is at least REPETITION_MIN_SPAN tokens and this fraction of the caption:
# a loop of a long passage that ran out of tokens before its third copy. A caption may reuse a phrase,
# but not end on a verbatim replay of a fifth of itself.
REPETITION_TAIL_FRACTION = 0.2

# wrong_language, measured over letters (str.isalpha: Latin letters, CJK ideographs, kana, ...;
# digits and punctuation do not count). An English word has ~5 letters and a Chinese word ~1.5
# ideographs, so a Chinese caption with brand names or a quoted sign in English keeps a ratio well above
# 0.3, while an English answer to a Chinese request, or one that switches to English halfway, falls
# below it.
ZH_MIN_CJK_RATIO = 0.3
# An English caption is wrong when most of its letters are ideographs; a quoted Chinese word or sign is
# a small fraction of a caption.
EN_MAX_CJK_RATIO = 0.5

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens, one per CJK ideograph; punctuation and spaces dropped."""
    return _TOKEN.findall(text.lower())


def is_empty(text: str) -> bool:
    """No letter or digit at all: whitespace, punctuation or zero-width characters only."""
    return not any(ch.isalnum() for ch in text)


def is_echo(text: str, prompt_texts: Sequence[str]) -> bool:
    """The caption repeats chat markup or a long verbatim run of one of `prompt_texts`.

    `prompt_texts` are the fixed instructions the model saw (system prompt, question, translation
    instruction), not the English caption being translated, which a good translation may overlap.
    """
    if ECHO_ROLE_TAG_LINE_START.search(text) or ECHO_ROLE_TAG_UPPER.search(text):
        return True
    if any(tag in text for tag in ECHO_TEMPLATE_TOKENS):
        return True
    caption = tokens(text)
    for prompt_text in prompt_texts:
        prompt = tokens(prompt_text)
        need = min(ECHO_MIN_RUN, len(prompt))
        if need < ECHO_MIN_WHOLE_PROMPT or len(caption) < need:
            continue
        prompt_runs = {tuple(prompt[i : i + need]) for i in range(len(prompt) - need + 1)}
        if any(tuple(caption[i : i + need]) in prompt_runs for i in range(len(caption) - need + 1)):
            return True
    return False


def _runs_of_true(mask: np.ndarray) -> tuple[int, int]:
    """(longest run of True, run of True that ends at the last element) in a 1-D bool array."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if len(starts) == 0:
        return 0, 0
    lengths = ends - starts
    return int(lengths.max()), int(lengths[-1]) if mask[-1] else 0


def has_repetition(text: str) -> bool:
    """A looping caption: one token sequence repeated back to back (see the REPETITION_* constants)."""
    toks = tokens(text)
    n = len(toks)
    if n < REPETITION_MIN_SPAN:
        return False
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(t, len(vocab)) for t in toks])
    for period in range(1, max(n // REPETITION_MIN_COPIES, n - REPETITION_MIN_SPAN) + 1):
        if period > n // REPETITION_MIN_COPIES and ids[-1] != ids[-1 - period]:
            continue  # too long for three copies, and the caption does not end on a replay of it
        # same[j]: token j+period equals token j; a run of r such positions is r + period tokens
        # made of one period-long sequence repeated.
        same = ids[period:] == ids[:-period]
        longest, tail = _runs_of_true(same)
        span = longest + period
        if span >= REPETITION_MIN_COPIES * period and span >= REPETITION_MIN_SPAN:
            return True
        if tail >= REPETITION_MIN_SPAN and tail >= REPETITION_TAIL_FRACTION * n:
            return True
    return False


def is_wrong_language(text: str, language: str) -> bool:
    """Too little Chinese in a `zh` caption, or mostly Chinese in an `en` one (see *_CJK_RATIO)."""
    if language not in ("en", "zh"):
        raise ValueError(f"unknown caption language {language!r}; allowed: en, zh")
    if is_empty(text):
        return False  # flagged as empty; no language to judge
    letters = sum(ch.isalpha() for ch in text)
    cjk = len(_IS_CJK.findall(text))
    ratio = cjk / letters if letters else 0.0
    if language == "zh":
        return ratio < ZH_MIN_CJK_RATIO
    return ratio > EN_MAX_CJK_RATIO


def detect_flags(
    text: str,
    *,
    language: str,
    prompt_texts: Sequence[str] = (),
    hit_max_new_tokens: bool = False,
) -> list[str]:
    """Sorted names of every guard `text` trips (a subset of FLAG_NAMES); [] for a clean caption.

    `language` is "en" or "zh"; `hit_max_new_tokens` says generation stopped at its token budget
    instead of at end-of-sequence, i.e. the caption is cut off.
    """
    flags = []
    if is_empty(text):
        flags.append(EMPTY)
    if is_echo(text, prompt_texts):
        flags.append(ECHO)
    if has_repetition(text):
        flags.append(REPETITION)
    if is_wrong_language(text, language):
        flags.append(WRONG_LANGUAGE)
    if hit_max_new_tokens:
        flags.append(TRUNCATED)
    return sorted(flags)
