"""OpenCC normalisation of Chinese captions to the manifest's script variant.

Whatever the Chinese pass produced (an LLM that drifts between scripts, or a translation model trained on
mixed data), the dataset ships one variant per job:

- `zh-Hans`: Simplified Chinese (`t2s`), the default.
- `zh-Hant`: Traditional Chinese, OpenCC's standard character set (`s2t`).
- `zh-TW`: Traditional Chinese as written in Taiwan, with Taiwanese phrasing (`s2twp`: 视频→影片,
  软件→軟體). Characters alone (`s2tw`) would leave mainland vocabulary in Taiwanese script, which
  reads as a mainland text to a Taiwanese reader; a caption dataset for zh-TW wants the local words.
- `zh-HK`: Traditional Chinese with Hong Kong character forms (`s2hk`).
"""

from __future__ import annotations

import threading

import opencc

OPENCC_CONFIGS: dict[str, str] = {
    "zh-Hans": "t2s.json",
    "zh-Hant": "s2t.json",
    "zh-TW": "s2twp.json",
    "zh-HK": "s2hk.json",
}
DEFAULT_VARIANT = "zh-Hans"

# OpenCC's conversion tables are not closed under themselves for a handful of characters (t2s: 薴→苧,
# then 苧→苎), so one pass over its own output can still change it. Re-running until nothing changes
# makes normalisation idempotent; two passes are enough for every CJK character, the cap only guards
# against a future table with a cycle.
MAX_PASSES = 4


class _Converter:
    """One OpenCC converter, shared by all threads of the process behind a lock.

    Building one reads its dictionaries (10–100 ms), so each is built once. Whether the C++ `Convert`
    may run concurrently depends on the binding (releasing the GIL or not) and is not documented; a
    caption converts in microseconds, so serialising calls costs nothing measurable and is certainly safe.
    """

    def __init__(self, config: str):
        self._opencc = opencc.OpenCC(config)
        self._lock = threading.Lock()

    def convert(self, text: str) -> str:
        with self._lock:
            return self._opencc.convert(text)


_converters: dict[str, _Converter] = {}
_converters_lock = threading.Lock()


def _converter(variant: str) -> _Converter:
    if variant not in OPENCC_CONFIGS:
        allowed = ", ".join(OPENCC_CONFIGS)
        raise ValueError(f"unknown Chinese variant {variant!r}; allowed: {allowed}")
    with _converters_lock:
        if variant not in _converters:
            _converters[variant] = _Converter(OPENCC_CONFIGS[variant])
        return _converters[variant]


def normalize_zh(text: str, variant: str = DEFAULT_VARIANT) -> str:
    """`text` in the script of `variant` (one of `OPENCC_CONFIGS`); non-Chinese text passes through."""
    converter = _converter(variant)
    if not text:
        return text
    out = converter.convert(text)
    for _ in range(MAX_PASSES - 1):
        again = converter.convert(out)
        if again == out:
            break
        out = again
    return out
