"""A clip's metadata in its prompts: `{source_caption}`, `{duration_s}` and `{title}`.

A manifest's prompt text may name these fields; each clip's prompt gets its own values. A field the clip
does not have fills with an empty string, never an error. Only these three names are replaced, by plain
substitution (other braces in a prompt stay as written: no str.format). Values are cut to MAX_FIELD_CHARS so a
long source caption cannot crowd out the model's token budget; the prompt version is a hash of the prompt
texts as written (model/describe.py), so editing a template changes the fingerprint.
"""

from __future__ import annotations

from typing import Any

FIELDS = ("source_caption", "duration_s", "title")
MAX_FIELD_CHARS = 500


def has_fields(text: str | None) -> bool:
    return bool(text) and any("{" + name + "}" in text for name in FIELDS)


def clip_fields(sample: Any, clip: Any = None) -> dict[str, str]:
    """The field values of one clip: Panda-70M's caption, the clip's duration in seconds (its span in the
    source video, else the decoded clip's), and the source video's title when the metadata has one."""
    duration = None
    if sample.clip_start_s is not None and sample.clip_end_s is not None:
        duration = sample.clip_end_s - sample.clip_start_s
    elif clip is not None and getattr(clip, "duration_s", None) is not None:
        duration = clip.duration_s
    return {
        "source_caption": (sample.source_caption or "").strip(),
        "duration_s": f"{duration:.1f}" if duration is not None and duration >= 0 else "",
        "title": (getattr(sample, "title", None) or "").strip(),
    }


def fill_fields(text: str, values: dict[str, str]) -> str:
    for name in FIELDS:
        text = text.replace("{" + name + "}", values.get(name, "")[:MAX_FIELD_CHARS])
    return text
