"""OUT/README.md: a Hugging Face dataset card, so `load_dataset(OUT)` and a hub upload work and a reader
knows how the captions were made (model, α, prompts, frame sampling, counts, software versions)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import yaml

from pipeline.writing import SCHEMA, OutputStore

CARD_FILE = "README.md"


def _hf_feature(name: str, dtype: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(dtype):
        return {"name": name, "sequence": str(dtype.value_type).replace("double", "float64")}
    return {"name": name, "dtype": str(dtype).replace("double", "float64")}


def collect_counts(store: OutputStore) -> tuple[Counter, Counter, int]:
    """Rows by status and by flag over the finished shards, and the number of finished shards."""
    statuses: Counter = Counter()
    flags: Counter = Counter()
    files = store.list_files(store.path("data"), ".parquet")
    for path in files:
        table = store.read_table(path, columns=["status", "caption_flags"])
        statuses.update(table.column("status").to_pylist())
        for row_flags in table.column("caption_flags").to_pylist():
            flags.update(row_flags or [])
    return statuses, flags, len(files)


def render_card(job: dict[str, Any], statuses: Counter, flags: Counter, n_shards: int,
                prompts: dict[str, str]) -> str:
    manifest = job["manifest"]
    parts = job.get("fingerprint_parts", {})
    languages = manifest.get("languages", ["en"])
    front = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "dataset_info": {"features": [_hf_feature(f.name, f.type) for f in SCHEMA]},
        "language": languages,
        "task_categories": ["video-text-to-text"],
        "tags": ["video-captioning", "pllava", "recaption"],
    }
    model = manifest["model"]
    zh = manifest.get("zh", {})
    gen = manifest.get("generation", {})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {manifest.get('name', 'recaption')}: PLLaVA re-captions",
        "",
        "Dense video captions written by the `pllava-recaption` Ray job, one Parquet file per source",
        "webdataset shard under `data/`, one row per input sample (successes and failures).",
        "",
        "## How the captions were made",
        "",
        f"- Model: `{parts.get('model', model.get('path'))}` (PLLaVA), dtype {model.get('dtype')}",
        f"- LoRA inference alpha: {model.get('lora_alpha')} (post-training optimization; merged at load)",
        f"- Prompt version: `{parts.get('prompt_version')}`",
        "- Frames: 16 per clip, the middle frame of 16 equal segments (PLLaVA's sampling), resized to 336",
        "  on the short side and center-cropped; visual tokens pooled to 16×12×12.",
        f"- Generation: greedy, max_new_tokens {gen.get('max_new_tokens')},"
        f" repetition_penalty {gen.get('repetition_penalty')}",
        f"- Languages: {', '.join(languages)}",
    ]
    if "zh" in languages:
        lines.append(f"- Chinese: mode `{zh.get('mode')}`, normalised with OpenCC to `{zh.get('variant')}`")
    lines += ["", "### Prompts", ""]
    for name, text in prompts.items():
        lines.append(f"- {name}: {text!r}")
    lines += [
        "",
        "## Counts",
        "",
        f"Finished shards: {n_shards}. Rows: {sum(statuses.values())}.",
        "",
        "| status | rows |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in sorted(statuses.items())],
        "",
        "| flag | rows |",
        "| --- | --- |",
        *([f"| {k} | {v} |" for k, v in sorted(flags.items())] or ["| (none) | 0 |"]),
        "",
        "## Software",
        "",
        *[f"- {k} {v}" for k, v in sorted(job.get("versions", {}).items())],
        "",
        f"Job fingerprint: `{job.get('fingerprint')}`.",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(store: OutputStore, job: dict[str, Any], prompts: dict[str, str]) -> str:
    statuses, flags, n_shards = collect_counts(store)
    text = render_card(job, statuses, flags, n_shards, prompts)
    store.write_atomic(store.path(CARD_FILE), text.encode())
    return text
