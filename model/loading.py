"""Load a released PLLaVA checkpoint (or our tiny one) from a local directory, strictly.

Weights come from safetensors (sharded via `model.safetensors.index.json`, or one `model.safetensors`);
pickle `.bin` files are refused unless the caller passes `allow_pickle=True`, and even then they are read
with `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and nothing else. The
model is built on the `meta` device and the loaded tensors are assigned to it, so nothing is randomly
initialised. The released LoRA (PEFT names, unmerged) is scaled by the
inference alpha and merged into q_proj/v_proj once: W = W0 + (alpha/r)*B@A, so inference runs at base speed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model.config import Family, PllavaConfig, detect_family
from model.describe import (
    CLIP_MEAN,  # noqa: F401  (re-exported)
    CLIP_STD,  # noqa: F401  (re-exported)
    CheckpointError,
    ModelDescription,
    describe_checkpoint,
)
from model.pllava import PllavaModel
from model.prompts import PromptTemplate

log = logging.getLogger(__name__)

DEFAULT_LORA_ALPHA = 4.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PEFT_PREFIX = "language_model.base_model.model."
# LoRA lives on the language model's q_proj/v_proj only (CLIP has q_proj/v_proj too: never touched).
_LORA_NAME = re.compile(
    r"(language_model\.model\.layers\.\d+\.self_attn\.(?:q_proj|v_proj))\.(base_layer|lora_A\.default|lora_B\.default)\.weight"
)
# Layer -2 features never reach CLIP's post_layernorm, and some exports drop it.
_OPTIONAL = (
    "vision_tower.vision_model.post_layernorm.weight",
    "vision_tower.vision_model.post_layernorm.bias",
)


@dataclass
class LoadedPllava:
    model: PllavaModel  # eval mode, no grad, LoRA merged
    tokenizer: PreTrainedTokenizerBase  # left padding
    config: PllavaConfig
    family: Family
    name: str  # model identity for outputs and fingerprints
    lora_alpha: float | None  # inference alpha merged in; None for a checkpoint saved already merged
    lora_rank: int | None
    template: PromptTemplate
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: int  # square crop fed to CLIP

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def _list(names: set[str], limit: int = 20) -> str:
    shown = sorted(names)[:limit]
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def read_safetensors(
    model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by name, checked against the index when there is one.

    Floating tensors are cast to `dtype` one at a time, so a 7B never exists twice in memory.
    """
    index_path = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        shards: dict[str, set[str]] = {}
        for name, filename in weight_map.items():
            if (
                not isinstance(filename, str)
                or Path(filename).name != filename
                or not filename.endswith(".safetensors")
            ):
                raise CheckpointError(f"{index_path}: bad shard file name {filename!r} for {name}")
            shards.setdefault(filename, set()).add(name)
    elif single.is_file():
        shards = {single.name: set()}
    else:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        if pickles:
            raise CheckpointError(
                f"{model_dir}: only pickle weights ({', '.join(pickles)}); refusing to unpickle them "
                "(they can run arbitrary code). Convert them to safetensors, or pass allow_pickle=True "
                "(manifest: model.allow_pickle: true) to read their tensors with torch.load(weights_only=True)."
            )
        raise CheckpointError(f"{model_dir}: no model.safetensors.index.json or model.safetensors")

    state: dict[str, torch.Tensor] = {}
    for filename, listed in sorted(shards.items()):
        path = model_dir / filename
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: shard {filename} listed in the index is missing")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            if listed and keys != listed:
                raise CheckpointError(
                    f"{path}: tensors differ from the index; missing: {_list(listed - keys) or '-'}; "
                    f"not in the index: {_list(keys - listed) or '-'}"
                )
            for key in keys:
                if key in state:
                    raise CheckpointError(f"{path}: tensor {key} also appears in another shard")
                tensor = f.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state


def read_pickle_weights(
    model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of `pytorch_model.bin` (or the shards of `pytorch_model.bin.index.json`), tensors only.

    `torch.load(weights_only=True)` refuses any pickle that names something other than tensors and plain
    containers, so a malicious `__reduce__` is never called; `mmap=True` maps the file instead of reading it.
    """
    index_path = model_dir / "pytorch_model.bin.index.json"
    if index_path.is_file():
        try:
            filenames = set(json.loads(index_path.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        bad = [f for f in filenames if not isinstance(f, str) or Path(f).name != f or not f.endswith(".bin")]
        if bad:
            raise CheckpointError(f"{index_path}: bad shard file name {bad[0]!r}")
    elif (model_dir / "pytorch_model.bin").is_file():
        filenames = {"pytorch_model.bin"}
    else:
        raise CheckpointError(f"{model_dir}: no model.safetensors*, pytorch_model.bin or its index")
    state: dict[str, torch.Tensor] = {}
    for filename in sorted(filenames):
        path = model_dir / filename
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
            # torch's message starts with advice to retry with weights_only=False: show only the cause.
            lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
            cause = next((line for line in lines if "GLOBAL" in line), lines[0])[:300]
            raise CheckpointError(
                f"{path}: not a plain tensor file; torch.load(weights_only=True) refused it: {cause.strip()}"
            ) from exc
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
        ):
            raise CheckpointError(f"{path}: does not hold a {{name: tensor}} state dict")
        for key, tensor in loaded.items():
            if key in state:
                raise CheckpointError(f"{path}: tensor {key} also appears in another shard")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor.to(device)
    return state


def split_lora(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """PEFT names -> plain names. Returns (base weights by model name, {module: (lora_A, lora_B)}).

    Names that match nothing stay as they are, so the strict key check reports them.
    """
    base: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        plain = "language_model." + name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
        match = _LORA_NAME.fullmatch(plain)
        if match and match.group(2) != "base_layer":
            parts.setdefault(match.group(1), {})[match.group(2)[:6]] = tensor
            continue
        if match:
            plain = f"{match.group(1)}.weight"
        if plain in base:
            raise CheckpointError(f"tensor {plain} appears twice (as {name} and another name)")
        base[plain] = tensor
    lora = {}
    for module, pair in parts.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"LoRA of {module} is incomplete: has only {sorted(pair)}")
        lora[module] = (pair["lora_A"], pair["lora_B"])
    return base, lora


def lora_rank_of(lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"LoRA ranks differ between modules: {sorted(ranks)}")
    return ranks.pop()


def merge_lora(
    base: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]], lora_alpha: float
) -> None:
    """In place: W = W0 + (alpha/r) * B @ A, computed in float32 then cast back to W0's dtype."""
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in base:
            raise CheckpointError(f"LoRA for {module} but no base weight {key}")
        w0 = base[key]
        rank = a.shape[0]
        if a.shape != (rank, w0.shape[1]) or b.shape != (w0.shape[0], rank):
            raise CheckpointError(
                f"LoRA shapes of {module} do not fit W0 {tuple(w0.shape)}: A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        merged = w0.float() + (lora_alpha / rank) * (b.float() @ a.float())  # (out, in)
        base[key] = merged.to(w0.dtype)


def _read_adapter_config(model_dir: Path) -> tuple[int | None, float | None]:
    path = model_dir / "adapter_config.json"
    if not path.is_file():
        return None, None
    raw = json.loads(path.read_text())
    if raw.get("use_rslora") or raw.get("use_dora"):
        raise CheckpointError(f"{path}: rsLoRA/DoRA adapters are not supported (plain alpha/r scaling only)")
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(rank, int) or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{path}: fields 'r' (int) and 'lora_alpha' (number) are required")
    return rank, float(alpha)


def materialize_buffers(model: PllavaModel, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints; on `meta` they must be recomputed from the configs."""
    for module in model.modules():
        if isinstance(module, CLIPVisionEmbeddings):
            module.position_ids = torch.arange(module.num_positions, device=device).expand((1, -1))
        elif isinstance(module, LlamaRotaryEmbedding):
            fresh = LlamaRotaryEmbedding(config=module.config).to(device)  # no parameters: cheap
            module.inv_freq, module.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    left = [name for name, buf in model.named_buffers() if buf.is_meta]
    if left:
        raise RuntimeError(f"buffers left on the meta device (transformers changed?): {left}")


def load_tokenizer(model_dir: Path, config: PllavaConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    tokenizer.padding_side = "left"  # batched generation needs the prompts to end together
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_id != config.image_token_index:
        raise CheckpointError(
            f"{model_dir}: tokenizer maps <image> to {image_id}, config image_token_index is {config.image_token_index}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def build_model(
    config: PllavaConfig,
    state: dict[str, torch.Tensor],
    device: torch.device,
    attn_implementation: str = "sdpa",
) -> PllavaModel:
    """Builds the skeleton on `meta` and assigns `state` (plain names, LoRA merged) to it, strictly."""
    with torch.device("meta"):
        model = PllavaModel(config, attn_implementation=attn_implementation)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = set(expected) - set(state) - set(_OPTIONAL)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{config.source}: checkpoint does not match the model; "
            f"missing tensors ({len(missing)}): {_list(missing) or '-'}; "
            f"unexpected tensors ({len(unexpected)}): {_list(unexpected) or '-'}"
        )
    wrong = {
        f"{n} {tuple(t.shape)} != {expected[n]}" for n, t in state.items() if tuple(t.shape) != expected[n]
    }
    if wrong:
        raise CheckpointError(f"{config.source}: tensor shapes do not match the config: {_list(wrong)}")
    for name in _OPTIONAL:
        if name not in state:
            fill = torch.ones if name.endswith("weight") else torch.zeros
            state[name] = fill(expected[name], dtype=state["multi_modal_projector.linear_1.weight"].dtype)
    model.load_state_dict({n: t.to(device) for n, t in state.items()}, strict=True, assign=True)
    materialize_buffers(model, device)
    model.eval().requires_grad_(False)
    return model


def load_pllava(
    model_dir: str | Path,
    *,
    lora_alpha: float | None = DEFAULT_LORA_ALPHA,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
    description: ModelDescription | None = None,
) -> LoadedPllava:
    """Loads a PLLaVA checkpoint directory for inference.

    allow_pickle: read pickle `.bin` weights when the directory has no safetensors, tensors only
    (`torch.load(weights_only=True)`); without it such a checkpoint is refused. Safetensors win when both exist.

    lora_alpha: inference alpha for the unmerged LoRA (scale alpha/r; r read off the lora_A shapes).
    None means the alpha recorded in adapter_config.json (an error without one). Ignored, with a warning
    when not the default, for checkpoints saved already merged.

    description: `describe_checkpoint(model_dir)` when the caller has it already (it is read otherwise). The
    template, image mean/std and crop size come from it; the tokenizer must agree with its model family.
    """
    model_dir = Path(model_dir)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if torch_dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    device = torch.device(device)
    description = description or describe_checkpoint(model_dir)
    config = description.config
    tokenizer = load_tokenizer(model_dir, config)
    family = detect_family(config, tokenizer.get_vocab())
    if family != description.family:
        raise CheckpointError(
            f"{model_dir}: the tokenizer is a {family} tokenizer, but its files and config.json describe a "
            f"{description.family} checkpoint"
        )

    has_safetensors = (model_dir / "model.safetensors.index.json").is_file() or (
        model_dir / "model.safetensors"
    ).is_file()
    if allow_pickle and not has_safetensors:
        log.warning("%s: reading pickle weights (allow_pickle=True), tensors only", model_dir)
        state = read_pickle_weights(model_dir, device, torch_dtype)
    else:
        state = read_safetensors(model_dir, device, torch_dtype)
    base, lora = split_lora(state)
    del state
    adapter_rank, adapter_alpha = _read_adapter_config(model_dir)
    if lora:
        rank = lora_rank_of(lora)
        if adapter_rank is not None and adapter_rank != rank:
            raise CheckpointError(
                f"{model_dir}: adapter_config.json says r={adapter_rank}, lora_A shapes say {rank}"
            )
        if lora_alpha is None:
            if adapter_alpha is None:
                raise ValueError(f"{model_dir}: lora_alpha=None needs an adapter_config.json with lora_alpha")
            lora_alpha = adapter_alpha
        merge_lora(base, lora, float(lora_alpha))
        used_alpha: float | None = float(lora_alpha)
    else:
        rank, used_alpha = None, None
        if lora_alpha is not None and lora_alpha != DEFAULT_LORA_ALPHA:
            log.warning(
                "%s: checkpoint has its LoRA merged already; lora_alpha=%s is not applied",
                model_dir,
                lora_alpha,
            )
    model = build_model(config, base, device, attn_implementation)

    return LoadedPllava(
        model=model,
        tokenizer=tokenizer,
        config=config,
        family=family,
        name=description.name,
        lora_alpha=used_alpha,
        lora_rank=rank,
        template=description.template,
        image_mean=description.image_mean,
        image_std=description.image_std,
        image_size=description.image_size,
    )
