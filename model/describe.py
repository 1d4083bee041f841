"""What a checkpoint is, decided once from its directory: frames, crop, normalisation, prompts.

`describe_checkpoint(model_dir)` reads `config.json` (through `PllavaConfig`, validated as the loader
validates it), `preprocessor_config.json` and the tokenizer files, and returns a `ModelDescription`:

  * `num_frames` (config `num_frames`; the pooling shape's T' pools them), the square crop `image_size`
    (preprocessor `crop_size`, which must equal CLIP's `vision_config.image_size`) and `image_mean` /
    `image_std` (preprocessor; CLIP's values when absent) - how clips are sampled, sized and normalised;
  * the prompt `template` of the model family (ChatML when the tokenizer files hold `<|im_start|>` or the
    config has Yi's vocabulary, else Vicuna), and through `prompts(custom)` the wording in effect for a
    manifest's prompts (its own, or the template's defaults) and the prompt version that goes into rows and
    the output's fingerprint;
  * `identity`: whatever the caller's `identity` function makes of the directory (the pipeline passes
    `pipeline.model_identity.model_identity`; model/ does not import pipeline/), None when not asked for.

The job driver (fingerprint, dataset card) and the actor (decode settings, prompts, normalisation; the
loader takes the same description) both call it, so they cannot disagree. No torch or transformers here:
the driver imports this and must start in about a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from model.config import Family, PllavaConfig, detect_family
from model.prompts import PromptTemplate, template_for

# The released checkpoints' values, and the defaults of everything that decodes or normalises frames.
NUM_FRAMES = 16
IMAGE_SIZE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR = "preprocessor_config.json"
# Files whose text holds `<|im_start|>` in a ChatML tokenizer (tokenizer.json last: it is the largest).
TOKENIZER_FILES = ("tokenizer_config.json", "added_tokens.json", "special_tokens_map.json", "tokenizer.json")
CHATML_MARKER = "<|im_start|>"


class CheckpointError(ValueError):
    """The checkpoint directory does not hold what a PLLaVA checkpoint must hold."""


class CustomPrompts(Protocol):
    """A manifest's `prompts` section: None (or empty) means the template's default wording."""

    en: str | None
    zh_direct: str | None
    zh_translate: str | None


@dataclass(frozen=True)
class PromptSet:
    """The wording in effect for one job, and its version (in every row and in the fingerprint)."""

    en: str  # English question of the visual pass
    zh_direct: str  # Chinese question of the `direct` pass
    zh_translate: str  # instruction of the `translate` pass, with `{caption}` where the English caption goes
    version: str  # template version + default wording version, or "+custom-<hash>" of the manifest's wording


@dataclass(frozen=True)
class ModelDescription:
    path: str  # the checkpoint directory as given
    name: str  # config `_name_or_path`, else the folder name (what the `model` column shows)
    config: PllavaConfig = field(repr=False, compare=False)
    family: Family
    template: PromptTemplate
    num_frames: int  # frames sampled per clip
    image_size: int  # side of the square crop fed to CLIP
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    identity: Any = field(default=None, compare=False)  # the pipeline's ModelIdentity when asked for

    @property
    def pooling_shape(self) -> tuple[int, int, int]:
        return self.config.pooling_shape

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens

    def prompts(self, custom: CustomPrompts | None = None) -> PromptSet:
        """The wording in effect (the manifest's, else this template's defaults) and its version.

        Any custom wording adds a short hash of all three manifest values to the version, so edited prompts
        show up in the fingerprint; with none it is the template's `prompt_version`.
        """
        en, zh_direct, zh_translate = (
            (custom.en, custom.zh_direct, custom.zh_translate) if custom is not None else (None, None, None)
        )
        t = self.template
        version = t.prompt_version
        if any((en, zh_direct, zh_translate)):
            digest = hashlib.sha256(repr([en, zh_direct, zh_translate]).encode()).hexdigest()[:8]
            version = f"{t.prompt_version}+custom-{digest}"
        return PromptSet(
            en=en or t.default_question_en,
            zh_direct=zh_direct or t.default_question_zh,
            zh_translate=zh_translate or t.default_translate_zh,
            version=version,
        )


def describe_checkpoint(
    model_dir: str | Path, *, identity: Callable[[Path], Any] | None = None
) -> ModelDescription:
    """The description of the checkpoint in `model_dir`. Raises FileNotFoundError (no config.json),
    ConfigError (config.json) or CheckpointError (preprocessor_config.json); `identity` errors pass through."""
    model_dir = Path(model_dir)
    config = PllavaConfig.from_dir(model_dir)
    family = detect_family(config, _tokenizer_markers(model_dir))
    mean, std, size = read_preprocessor(model_dir, config.vision["image_size"])
    return ModelDescription(
        path=str(model_dir),
        name=config.name_or_path or model_dir.resolve().name,
        config=config,
        family=family,
        template=template_for(family),
        num_frames=config.num_frames,
        image_size=size,
        image_mean=mean,
        image_std=std,
        identity=identity(model_dir) if identity is not None else None,
    )


def _tokenizer_markers(model_dir: Path) -> dict[str, int]:
    """The ChatML marker when a tokenizer file holds it, as a stand-in for the tokenizer's vocabulary."""
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file() and CHATML_MARKER in path.read_text(encoding="utf-8", errors="replace"):
            return {CHATML_MARKER: -1}
    return {}


def read_preprocessor(
    model_dir: str | Path, clip_size: int
) -> tuple[tuple[float, float, float], tuple[float, float, float], int]:
    """(image_mean, image_std, crop size) from `preprocessor_config.json`: CLIP's mean/std when absent, the crop
    defaulting to (and required to equal) CLIP's `vision_config.image_size` (`clip_size`)."""
    path = Path(model_dir) / PREPROCESSOR
    raw: Any = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: must be a JSON object")
    mean = _three_numbers(raw.get("image_mean", CLIP_MEAN), "image_mean", path)
    std = _three_numbers(raw.get("image_std", CLIP_STD), "image_std", path)
    if not all(s > 0 for s in std):
        raise CheckpointError(f"{path}: image_std must be positive, got {list(std)}")
    crop = raw.get("crop_size", clip_size)
    if isinstance(crop, dict):
        height, width = crop.get("height"), crop.get("width", crop.get("height"))
        if height != width:
            raise CheckpointError(f"{path}: crop_size {crop} is not square")
        crop = height
    if crop != clip_size:
        raise CheckpointError(f"{path}: crop size {crop} differs from the CLIP image size {clip_size}")
    return mean, std, clip_size


def _three_numbers(value: Any, name: str, path: Path) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        raise CheckpointError(f"{path}: {name} must have 3 finite numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


# ---- the optional score model (score.model; model/clip_score.py loads it)


@dataclass(frozen=True)
class ScoreModelInfo:
    """What the driver learns of a CLIP score checkpoint without torch: enough to fail fast and to name it."""

    path: str
    name: str  # the folder name, e.g. "clip-vit-large-patch14-336"
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_text_tokens: int  # CLIP's text positions: 77


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` evenly spaced positions among ``n`` (first and last included): 16, 4 -> 0, 5, 10, 15; the frames
    a clip is scored on, and the thumbnails of `recaption inspect`."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def describe_score_model(path: str | Path, allow_pickle: bool = False) -> ScoreModelInfo:
    """Check that `path` holds a CLIP checkpoint in the Hugging Face layout that we can load (config, weights,
    tokenizer, preprocessing); CheckpointError with one line saying what is wrong otherwise. JSON only."""
    d = Path(path)
    where = f"score.model: {path}"
    if not d.is_dir():
        raise CheckpointError(f"{where} is not a directory (a local CLIP checkpoint in the Hugging Face layout, "
                              "e.g. a download of openai/clip-vit-large-patch14-336)")
    try:
        config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no config.json") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}/config.json is unreadable: {e}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "clip":
        raise CheckpointError(f"{where} is not a CLIP checkpoint (config.json model_type {kind!r}, expected 'clip')")
    if not any(d.glob("*.safetensors")):
        pickles = sorted(p.name for p in d.glob("*.bin"))
        if not pickles:
            raise CheckpointError(f"{where} has no weights (*.safetensors)")
        if not allow_pickle:
            raise CheckpointError(f"{where} has only pickle weights ({', '.join(pickles)}); convert them to "
                                  "safetensors, or set score.allow_pickle: true to read their tensors with "
                                  "torch.load(weights_only=True)")
    if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
        raise CheckpointError(f"{where} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    vision = config.get("vision_config") or {}
    text = config.get("text_config") or {}
    image_size = int(vision.get("image_size", 224))
    try:
        mean, std, size = read_preprocessor(d, image_size)
    except CheckpointError as e:
        raise CheckpointError(f"score.model: {e}") from None
    return ScoreModelInfo(path=str(d), name=d.resolve().name, image_size=size, image_mean=mean, image_std=std,
                          max_text_tokens=int(text.get("max_position_embeddings", 77)))
