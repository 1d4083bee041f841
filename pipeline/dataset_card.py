"""OUT/README.md: a Hugging Face dataset card, so `load_dataset(OUT)` and a hub upload work and a reader
knows how the captions were made (model, α, prompts, frame sampling, counts, software versions)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from model.describe import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, NUM_FRAMES, ScoreModelInfo
from pipeline.rows import SCHEMA
from pipeline.writing import OutputStore

if TYPE_CHECKING:
    from model.describe import ModelDescription

CARD_FILE = "README.md"


def _hf_feature(name: str, dtype: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(dtype):
        return {"name": name, "sequence": str(dtype.value_type).replace("double", "float64")}
    return {"name": name, "dtype": str(dtype).replace("double", "float64")}


def collect_counts(store: OutputStore) -> tuple[Counter, Counter, int, int]:
    """Rows by status and by flag over the finished shards, the number of finished shards, and the rows the
    repair pass captioned again (attempts > 1)."""
    statuses: Counter = Counter()
    flags: Counter = Counter()
    repaired = 0
    files = store.list_files(store.path("data"), ".parquet")
    for path in files:
        table = store.read_table(path, columns=["status", "caption_flags", "attempts"])
        statuses.update(table.column("status").to_pylist())
        for row_flags in table.column("caption_flags").to_pylist():
            flags.update(row_flags or [])
        repaired += sum(1 for a in table.column("attempts").to_pylist() if a is not None and a > 1)
    return statuses, flags, len(files), repaired


def duplicates_line(statuses: Counter) -> str:
    n = statuses.get("duplicate", 0)
    if not n:
        return ""
    return (f" Of these, {n} have status `duplicate`: their key is already in another shard's row (not captioned "
            f"again; its `error` names that shard). Rows with distinct keys: {sum(statuses.values()) - n} "
            "(filter `status != 'duplicate'`).")


def frames_lines(description: ModelDescription | None) -> list[str]:
    """How clips became the model's input: the checkpoint's frame count, crop, mean/std and pooling (the
    released checkpoints' when `description` is None)."""
    n, size = (description.num_frames, description.image_size) if description else (NUM_FRAMES, IMAGE_SIZE)
    mean, std = (description.image_mean, description.image_std) if description else (CLIP_MEAN, CLIP_STD)
    pooling = description.pooling_shape if description else (NUM_FRAMES, 12, 12)
    lines = [
        f"- Frames: {n} per clip, the middle frame of {n} equal segments (PLLaVA's sampling), resized to {size}",
        f"  on the short side and center-cropped; visual tokens pooled to {'×'.join(map(str, pooling))}.",
    ]
    if (tuple(mean), tuple(std)) != (CLIP_MEAN, CLIP_STD):
        lines.append(f"- Pixel normalisation: mean {list(mean)}, std {list(std)} (the checkpoint's)")
    return lines


def render_card(job: dict[str, Any], statuses: Counter, flags: Counter, n_shards: int,
                prompts: dict[str, str], description: ModelDescription | None = None, repaired: int = 0,
                score: ScoreModelInfo | None = None, score_frames: int = 4) -> str:
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
        *frames_lines(description),
        f"- Generation: greedy, max_new_tokens {gen.get('max_new_tokens')},"
        f" repetition_penalty {gen.get('repetition_penalty')}",
        f"- Languages: {', '.join(languages)}",
    ]
    if "zh" in languages:
        lines.append(f"- Chinese: mode `{zh.get('mode')}`, normalised with OpenCC to `{zh.get('variant')}`")
    lines.append("- Repair pass: a flagged caption is generated again with settings meant to fix its flag; each "
                 "row's `attempts` and `first_flags` say what it took, `caption_flags` are the kept attempt's")
    if score is not None:
        lines.append(f"- Caption/clip score: `clip_score` is the cosine of the CLIP `{score.name}` embeddings of "
                     f"caption_en (its first {score.max_text_tokens} tokens) and the mean of {score_frames} of the "
                     "clip's frames; null in rows captioned while no score model was set")
    lines += ["", "### Prompts", ""]
    for name, text in prompts.items():
        lines.append(f"- {name}: {text!r}")
    lines += [
        "",
        "## Counts",
        "",
        f"Finished shards: {n_shards}. Rows: {sum(statuses.values())}." + duplicates_line(statuses),
        "",
        "| status | rows |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in sorted(statuses.items())],
        "",
        "| flag | rows |",
        "| --- | --- |",
        *([f"| {k} | {v} |" for k, v in sorted(flags.items())] or ["| (none) | 0 |"]),
        "",
        f"Rows captioned again by the repair pass: {repaired}.",
        "",
        "## Software",
        "",
        *[f"- {k} {v}" for k, v in sorted(job.get("versions", {}).items())],
        "",
        f"Job fingerprint: `{job.get('fingerprint')}`.",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(store: OutputStore, job: dict[str, Any], prompts: dict[str, str],
                       description: ModelDescription | None = None, score: ScoreModelInfo | None = None,
                       score_frames: int = 4, report: dict[str, Any] | None = None) -> str:
    """`prompts`: the wording in effect; `description`: the checkpoint's, for the frame facts (the
    released checkpoints' 16 frames, 336 px, CLIP mean/std and 16×12×12 pooling when None); `score`: the
    score model in effect (score.model), if any. `report`: `jobs.status.collect_status(..., card=True)`, whose
    counts come from the progress records; without it every data file is read (`collect_counts`)."""
    if report is not None:
        others = report.get("others_done") or {}
        statuses = Counter(report["done_rows_by_status"]) + Counter(others.get("rows") or {})
        flags = Counter(report["flags"]) + Counter(others.get("flags") or {})
        n_shards = report["shards_by_state"].get("done", 0) + int(others.get("shards") or 0)
        repaired = int(report["rows_repaired"]) + int(others.get("repaired") or 0)
    else:
        statuses, flags, n_shards, repaired = collect_counts(store)
    text = render_card(job, statuses, flags, n_shards, prompts, description, repaired, score, score_frames)
    store.write_atomic(store.path(CARD_FILE), text.encode())
    return text
