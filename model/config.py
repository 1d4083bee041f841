"""PLLaVA configuration, read from a released `config.json` and validated once.

The released checkpoints were saved by transformers 4.37 through the reference's `PllavaConfig`: the
sub-configs (`text_config`, `vision_config`) hold only the *differences from 4.37's class defaults*, and
top-level fields equal to the reference class defaults may be absent. A missing field therefore means that
old default, which we write down here instead of trusting whatever the installed transformers defaults to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    # transformers is imported only where its configs are built: the job driver reads config.json
    # (model/describe.py) and must not wait for it.
    from transformers import CLIPVisionConfig, LlamaConfig

ACCEPTED_ARCHITECTURES = ("PllavaForConditionalGeneration", "MagicForConditionalGeneration")

Family = Literal["vicuna", "chatml"]

# transformers 4.37.1 LlamaConfig.__init__ defaults (only the fields that shape the model we build).
LLAMA_437_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None means = num_attention_heads (no grouped-query attention)
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
}

# transformers 4.37.1 CLIPVisionConfig.__init__ defaults.
CLIP_VISION_437_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
}

# Top-level defaults of the reference `PllavaConfig.__init__` (used when a field equal to them was not saved).
# num_frames and pooling_shape are deliberately absent: a video checkpoint without them is not one we know.
PLLAVA_TOP_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "pooling_method": "avg",
    "frame_shape": [24, 24],
}


class ConfigError(ValueError):
    """A config.json field is missing, ill-typed or invalid; the message names the field and the file."""


_NULLABLE = {"num_key_value_heads", "pad_token_id", "bos_token_id", "eos_token_id", "rope_scaling"}
_CHATML_VOCAB_SIZES = {64000, 64064}
_CHATML_IMAGE_TOKEN_INDEXES = {64000, 64002}


def _check_type(value: Any, default: Any, field: str, source: str) -> Any:
    """Validates `value` against the type of its default; ints are accepted where floats are expected."""
    if value is None:
        if field.rsplit(".", 1)[-1] in _NULLABLE:
            return None
        raise ConfigError(f"{source}: field '{field}' must not be null")
    if default is None:  # nullable ints (num_key_value_heads, pad_token_id, ...) or rope_scaling (a dict)
        expected: tuple[type, ...] = (dict,) if field.endswith("rope_scaling") else (int,)
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, float):
        expected = (int, float)
    elif isinstance(default, list):
        expected = (list,)
    else:
        expected = (type(default),)
    if isinstance(value, bool) and bool not in expected:
        raise ConfigError(f"{source}: field '{field}' must be {expected[0].__name__}, got bool ({value!r})")
    if not isinstance(value, expected):
        raise ConfigError(
            f"{source}: field '{field}' must be {expected[0].__name__}, got {type(value).__name__} ({value!r})"
        )
    return float(value) if isinstance(default, float) else value


def _fill_sub_config(raw: Any, defaults: dict[str, Any], prefix: str, source: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: field '{prefix}' must be an object, got {type(raw).__name__}")
    return {
        key: _check_type(raw.get(key, default), default, f"{prefix}.{key}", source)
        for key, default in defaults.items()
    }


def _int_list(raw: dict[str, Any], field: str, length: int, source: str) -> tuple[int, ...]:
    value = raw.get(field, PLLAVA_TOP_DEFAULTS.get(field))
    if value is None:
        raise ConfigError(f"{source}: missing field '{field}'")
    if (
        not isinstance(value, list)
        or len(value) != length
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(
            f"{source}: field '{field}' must be a list of {length} positive ints, got {value!r}"
        )
    return tuple(value)


@dataclass(frozen=True)
class PllavaConfig:
    """What we need of a PLLaVA `config.json`, validated; `text`/`vision` are filled with 4.37 defaults."""

    source: str  # the file (or a label) the config came from, for error messages
    architecture: str
    text: dict[str, Any]  # Llama fields, LLAMA_437_DEFAULTS filled in
    vision: dict[str, Any]  # CLIP vision fields, CLIP_VISION_437_DEFAULTS filled in
    num_frames: int
    pooling_shape: tuple[int, int, int]  # (T', h', w') of AdaptiveAvgPool3d
    frame_shape: tuple[int, int]  # CLIP patch grid (24, 24) at 336/14
    image_token_index: int
    vision_feature_layer: int
    vision_feature_select_strategy: str  # "default" drops CLS, "full" keeps it
    projector_hidden_act: str
    pad_token_id: int | None
    torch_dtype: str | None
    name_or_path: str | None

    @property
    def hidden_size(self) -> int:
        return self.text["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.text["vocab_size"]

    @property
    def num_visual_tokens(self) -> int:
        t, h, w = self.pooling_shape
        return t * h * w

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> PllavaConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> PllavaConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the config must be a JSON object")
        architectures = raw.get("architectures")
        if not isinstance(architectures, list) or not architectures:
            raise ConfigError(
                f"{source}: missing field 'architectures' (expected one of {ACCEPTED_ARCHITECTURES})"
            )
        if architectures[0] not in ACCEPTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: field 'architectures' is {architectures!r}, expected one of {ACCEPTED_ARCHITECTURES}"
            )
        for field in ("text_config", "vision_config", "num_frames", "pooling_shape"):
            if field not in raw:
                raise ConfigError(f"{source}: missing field '{field}'")

        text_raw, vision_raw = raw["text_config"], raw["vision_config"]
        text = _fill_sub_config(text_raw, LLAMA_437_DEFAULTS, "text_config", source)
        vision = _fill_sub_config(vision_raw, CLIP_VISION_437_DEFAULTS, "vision_config", source)
        if text_raw.get("model_type", "llama") != "llama":
            raise ConfigError(
                f"{source}: field 'text_config.model_type' must be 'llama', got {text_raw['model_type']!r}"
            )
        if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ConfigError(
                f"{source}: field 'vision_config.model_type' must be 'clip_vision_model', "
                f"got {vision_raw['model_type']!r}"
            )
        if text["tie_word_embeddings"]:
            raise ConfigError(f"{source}: field 'text_config.tie_word_embeddings' must be false for PLLaVA")

        def top(field: str, default: Any) -> Any:
            return _check_type(raw.get(field, default), default, field, source)

        num_frames = _check_type(raw["num_frames"], 0, "num_frames", source)
        pooling_shape = _int_list(raw, "pooling_shape", 3, source)
        frame_shape = _int_list(raw, "frame_shape", 2, source)
        image_token_index = top("image_token_index", PLLAVA_TOP_DEFAULTS["image_token_index"])
        layer = top("vision_feature_layer", PLLAVA_TOP_DEFAULTS["vision_feature_layer"])
        strategy = top(
            "vision_feature_select_strategy", PLLAVA_TOP_DEFAULTS["vision_feature_select_strategy"]
        )
        act = top("projector_hidden_act", PLLAVA_TOP_DEFAULTS["projector_hidden_act"])
        pooling_method = top("pooling_method", PLLAVA_TOP_DEFAULTS["pooling_method"])

        if num_frames < 1:
            raise ConfigError(f"{source}: field 'num_frames' must be >= 1, got {num_frames}")
        if pooling_method != "avg":
            raise ConfigError(f"{source}: field 'pooling_method' must be 'avg', got {pooling_method!r}")
        if strategy not in ("default", "full"):
            raise ConfigError(
                f"{source}: field 'vision_feature_select_strategy' must be 'default' or 'full', got {strategy!r}"
            )
        grid = vision["image_size"] // vision["patch_size"]
        if frame_shape != (grid, grid):
            raise ConfigError(
                f"{source}: field 'frame_shape' {list(frame_shape)} does not match the CLIP patch grid "
                f"{grid}x{grid} (vision_config.image_size / patch_size)"
            )
        if not -vision["num_hidden_layers"] - 1 <= layer <= vision["num_hidden_layers"]:
            raise ConfigError(
                f"{source}: field 'vision_feature_layer' {layer} is out of range for the CLIP depth"
            )
        if not 0 <= image_token_index < text["vocab_size"]:
            raise ConfigError(
                f"{source}: field 'image_token_index' {image_token_index} is outside the vocabulary "
                f"(text_config.vocab_size {text['vocab_size']})"
            )
        pad_token_id = raw.get("pad_token_id")
        pad_token_id = text["pad_token_id"] if pad_token_id is None else top("pad_token_id", None)
        torch_dtype = raw.get("torch_dtype")
        name_or_path = raw.get("_name_or_path")
        return cls(
            source=source,
            architecture=architectures[0],
            text=text,
            vision=vision,
            num_frames=num_frames,
            pooling_shape=pooling_shape,  # type: ignore[arg-type]
            frame_shape=frame_shape,  # type: ignore[arg-type]
            image_token_index=image_token_index,
            vision_feature_layer=layer,
            vision_feature_select_strategy=strategy,
            projector_hidden_act=act,
            pad_token_id=pad_token_id,
            torch_dtype=torch_dtype if isinstance(torch_dtype, str) else None,
            name_or_path=name_or_path if isinstance(name_or_path, str) and name_or_path else None,
        )

    def llama_config(self, attn_implementation: str = "sdpa") -> LlamaConfig:
        """The language model's transformers config (Vicuna = Llama; Yi-34B = Llama with 8 KV heads)."""
        from transformers import LlamaConfig

        fields = dict(self.text)
        if fields["num_key_value_heads"] is None:
            fields["num_key_value_heads"] = fields["num_attention_heads"]
        return LlamaConfig(**fields, use_cache=True, attn_implementation=attn_implementation)

    def clip_vision_config(self, attn_implementation: str = "sdpa") -> CLIPVisionConfig:
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**self.vision, attn_implementation=attn_implementation)


def detect_family(config: PllavaConfig, vocab: dict[str, int] | None = None) -> Family:
    """'chatml' for the Yi-34B based checkpoint, 'vicuna' for the Llama 7B/13B ones.

    `vocab` (the tokenizer's token -> id map), when given, is the strongest signal: a ChatML tokenizer has
    `<|im_start|>`.
    """
    if vocab is not None and "<|im_start|>" in vocab:
        return "chatml"
    if config.vocab_size in _CHATML_VOCAB_SIZES or config.image_token_index in _CHATML_IMAGE_TOKEN_INDEXES:
        return "chatml"
    return "vicuna"
