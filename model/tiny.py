"""A tiny random PLLaVA written exactly in the released checkpoint layout, built offline in well under a second.

    python -m model.tiny OUTDIR [--seed N] [--family vicuna|chatml] [--merged] [--head-dim 32] [--kv-heads 2]

Same files as `ermu2001/pllava-7b`: config.json (released fields, sub-configs as differences from
transformers 4.37 defaults, extra fields the loader ignores), sharded safetensors + index with PEFT names and
the LoRA *unmerged* (no adapter_config.json), tokenizer files, preprocessor_config.json. CLIP keeps the real
336px / patch 14 geometry (24x24 = 576 patches per frame) so pooling shapes are the real ones; only the widths
and depths are tiny. `--merged` writes the plain merged layout instead (`language_model.model.*`).
Weights are random (random text comes out); the same seed gives byte-identical files.

The language model has 4 heads of `head_dim` 16 (hidden 64) by default; `head_dim=32` (hidden 128) is the
smallest vLLM's CPU attention accepts, and `kv_heads` below 4 gives grouped-query attention (as the 34B's Yi).
The defaults write the same bytes as before these options existed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel

from model.config import CLIP_VISION_437_DEFAULTS, LLAMA_437_DEFAULTS

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
}
TINY_HEAD_DIM = TINY_TEXT["hidden_size"] // TINY_TEXT["num_attention_heads"]
LORA_RANK = 8
NUM_MERGES = 400
PEFT_PREFIX = "language_model.base_model.model."


def text_dims(head_dim: int = TINY_HEAD_DIM, kv_heads: int | None = None) -> dict:
    """TINY_TEXT with heads of `head_dim` (hidden = heads x head_dim, MLP twice as wide) and `kv_heads` key/value
    heads (None: one per head). The defaults give TINY_TEXT."""
    heads = TINY_TEXT["num_attention_heads"]
    kv_heads = heads if kv_heads is None else kv_heads
    if head_dim < 1 or not 1 <= kv_heads <= heads or heads % kv_heads:
        raise ValueError(f"need head_dim >= 1 and kv_heads dividing {heads}; got head_dim {head_dim}, "
                         f"kv_heads {kv_heads}")
    hidden = heads * head_dim
    return {**TINY_TEXT, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_key_value_heads": kv_heads}

# Small embedded corpus for the byte-level BPE merges: captions in English, Simplified and Traditional Chinese.
CORPUS = """\
A man in a red jacket walks along a snowy mountain trail while the camera follows him from behind.
The video shows a woman cooking pasta in a small kitchen; she stirs the pot and adds salt.
Two children play football on a green field at sunset, and a dog runs after the ball.
A close-up of hands typing on a laptop keyboard in a bright office with large windows.
The camera pans across a busy city street with cars, buses and people crossing the road.
A chef slices vegetables on a wooden board, then puts them into a hot pan with oil.
Describe the background, characters and the actions in the provided video in detail.
You are a helpful assistant. Translate the following English text into Chinese.
视频中一个穿红色夹克的男人沿着雪山小路行走，镜头从后面跟随着他。
一位女士在小厨房里煮意大利面，她搅拌锅里的面并加了盐。
两个孩子在日落时分的绿色草地上踢足球，一只狗追着球跑。
镜头扫过繁忙的城市街道，汽车、公共汽车和行人正在过马路。
視頻中一個穿紅色夾克的男人沿著雪山小路行走，鏡頭從後面跟隨著他。
一位女士在小廚房裡煮意大利麵，她攪拌鍋裡的麵並加了鹽。
兩個孩子在日落時分的綠色草地上踢足球，一隻狗追著球跑。
鏡頭掃過繁忙的城市街道，汽車、公共汽車和行人正在過馬路。
"""


def _learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE merges learned in plain Python: deterministic (ties broken by the pair itself)."""
    pre = ByteLevel(add_prefix_space=False)
    words = Counter(piece for line in corpus.splitlines() for piece, _ in pre.pre_tokenize_str(line))
    splits = {word: list(word) for word in words}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        vocab["".join(best)] = len(vocab)
        for word, symbols in splits.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return vocab, merges


def build_tokenizer(family: str) -> Tokenizer:
    """<unk>=0, <s>=1, </s>=2, bytes, merges, then the added specials: `<image>` first (its id is the config's
    image_token_index, as 32000 follows the 32000-token Vicuna vocabulary), `<pad>`, and ChatML turn markers."""
    vocab, merges = _learn_bpe(CORPUS, NUM_MERGES)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    added = ["<image>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if family == "chatml" else [])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>", *added])
    if family == "vicuna":  # Llama tokenizers prepend BOS
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tokenizer


def _tokenizer_files(tokenizer: Tokenizer, family: str) -> dict[str, dict]:
    eos = "<|im_end|>" if family == "chatml" else "</s>"
    specials = {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>", "pad_token": "<pad>"}
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
        + (["<|im_start|>", "<|im_end|>"] if family == "chatml" else [])
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **specials,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _tiny_config(family: str, vocab_size: int, image_token_index: int, name: str, num_frames: int = 16,
                 pooling_shape: tuple[int, int, int] = (16, 12, 12), text_shape: dict | None = None) -> dict:
    text = {
        "_name_or_path": f"tiny-{family}",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "vocab_size": vocab_size,
        **(text_shape or TINY_TEXT),
    }
    vision = {"model_type": "clip_vision_model", "vocab_size": 32000, **TINY_VISION}
    # Saved as differences from the 4.37 defaults, as the reference's save did.
    text = {k: v for k, v in text.items() if LLAMA_437_DEFAULTS.get(k, object()) != v}
    vision = {k: v for k, v in vision.items() if CLIP_VISION_437_DEFAULTS.get(k, object()) != v}
    return {
        "_name_or_path": name,
        "architectures": ["PllavaForConditionalGeneration"],
        "causal_conv_ks": None,
        "dilation": None,
        "frame_shape": [24, 24],
        "gradient_checkpointing": False,
        "highres": None,
        "ignore_index": -100,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_token_index": image_token_index,
        "model_type": "llava",
        "num_frames": num_frames,
        "pad_token_id": 0,
        "pooling_method": "avg",
        "pooling_shape": list(pooling_shape),
        "projector_hidden_act": "gelu",
        "register": False,
        "slide_pooling_shape": None,
        "stride": None,
        "text_config": text,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.1",
        "use_cc": False,
        "use_image_newline_parameter": False,
        "use_pooling": True,
        "vision_config": vision,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": vocab_size,
    }


def _random_weights(vocab_size: int, seed: int, text: dict | None = None) -> dict[str, torch.Tensor]:
    """Released names and shapes (PEFT layout), scaled so activations and logits stay O(1). `text`: the language
    model's dims (`text_dims()`; default TINY_TEXT)."""
    text = text or TINY_TEXT
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_dim: int, in_dim: int) -> torch.Tensor:
        return normal(out_dim, in_dim, std=in_dim**-0.5)

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + normal(dim, std=0.05)

    dv, dv_ff, dt, dt_ff = (
        TINY_VISION["hidden_size"],
        TINY_VISION["intermediate_size"],
        text["hidden_size"],
        text["intermediate_size"],
    )
    kv_dim = text["num_key_value_heads"] * dt // text["num_attention_heads"]  # k/v rows (= dt without GQA)
    patch, grid = TINY_VISION["patch_size"], TINY_VISION["image_size"] // TINY_VISION["patch_size"]
    w: dict[str, torch.Tensor] = {}
    v = "vision_tower.vision_model."
    w[v + "embeddings.class_embedding"] = normal(dv, std=0.5)
    w[v + "embeddings.patch_embedding.weight"] = normal(dv, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    w[v + "embeddings.position_embedding.weight"] = normal(grid * grid + 1, dv, std=0.5)
    w[v + "pre_layrnorm.weight"], w[v + "pre_layrnorm.bias"] = norm(dv), normal(dv, std=0.05)
    for i in range(TINY_VISION["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[f"{p}self_attn.{proj}.weight"], w[f"{p}self_attn.{proj}.bias"] = (
                linear(dv, dv),
                normal(dv, std=0.05),
            )
        for ln in ("layer_norm1", "layer_norm2"):
            w[f"{p}{ln}.weight"], w[f"{p}{ln}.bias"] = norm(dv), normal(dv, std=0.05)
        w[f"{p}mlp.fc1.weight"], w[f"{p}mlp.fc1.bias"] = linear(dv_ff, dv), normal(dv_ff, std=0.05)
        w[f"{p}mlp.fc2.weight"], w[f"{p}mlp.fc2.bias"] = linear(dv, dv_ff), normal(dv, std=0.05)
    w[v + "post_layernorm.weight"], w[v + "post_layernorm.bias"] = norm(dv), normal(dv, std=0.05)
    w["multi_modal_projector.linear_1.weight"] = linear(dt, dv)
    w["multi_modal_projector.linear_1.bias"] = normal(dt, std=0.05)
    w["multi_modal_projector.linear_2.weight"] = linear(dt, dt)
    w["multi_modal_projector.linear_2.bias"] = normal(dt, std=0.05)

    t = PEFT_PREFIX
    w[t + "model.embed_tokens.weight"] = normal(vocab_size, dt, std=1.0)
    for i in range(text["num_hidden_layers"]):
        p = f"{t}model.layers.{i}."
        for proj, rows in (("q_proj", dt), ("v_proj", kv_dim)):
            w[f"{p}self_attn.{proj}.base_layer.weight"] = linear(rows, dt)
            w[f"{p}self_attn.{proj}.lora_A.default.weight"] = normal(LORA_RANK, dt, std=dt**-0.5)
            w[f"{p}self_attn.{proj}.lora_B.default.weight"] = normal(rows, LORA_RANK, std=0.5 * LORA_RANK**-0.5)
        w[f"{p}self_attn.k_proj.weight"] = linear(kv_dim, dt)
        w[f"{p}self_attn.o_proj.weight"] = linear(dt, dt)
        w[f"{p}mlp.gate_proj.weight"], w[f"{p}mlp.up_proj.weight"] = linear(dt_ff, dt), linear(dt_ff, dt)
        w[f"{p}mlp.down_proj.weight"] = linear(dt, dt_ff)
        w[f"{p}input_layernorm.weight"], w[f"{p}post_attention_layernorm.weight"] = norm(dt), norm(dt)
    w[t + "model.norm.weight"] = norm(dt)
    w[t + "lm_head.weight"] = linear(vocab_size, dt)
    return {name: tensor.to(torch.bfloat16) for name, tensor in w.items()}


def merge_lora_layout(weights: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """The plain merged layout: W = W0 + (alpha/r)*B@A, PEFT prefixes removed (as `merge_and_unload` saves)."""
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            module = name[: -len(".base_layer.weight")]
            a = weights[f"{module}.lora_A.default.weight"].float()
            b = weights[f"{module}.lora_B.default.weight"].float()
            tensor = (tensor.float() + (lora_alpha / a.shape[0]) * (b @ a)).to(tensor.dtype)
            name = f"{module}.weight"
        merged[name.replace(PEFT_PREFIX, "language_model.")] = tensor
    return merged


def _write_shards(weights: dict[str, torch.Tensor], outdir: Path) -> None:
    """Vision + projector in shard 1, the language model in shard 2, plus the index (as the hub layout)."""
    names = sorted(weights)
    groups = [
        [n for n in names if not n.startswith("language_model.")],
        [n for n in names if n.startswith("language_model.")],
    ]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: weights[n].contiguous() for n in group}, str(outdir / filename), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(group, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (outdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_checkpoint(
    outdir: str | Path,
    seed: int = 0,
    family: str = "vicuna",
    merged: bool = False,
    merge_alpha: float = 4.0,
    *,
    num_frames: int = 16,
    pooling_shape: tuple[int, int, int] | None = None,
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
    head_dim: int = TINY_HEAD_DIM,
    kv_heads: int | None = None,
) -> Path:
    """Writes the tiny checkpoint into `outdir` (created) and returns it.

    merged=True writes the plain merged layout with W = W0 + (merge_alpha/r)*B@A.
    num_frames / pooling_shape (default (num_frames, 12, 12)) go into config.json, image_mean / image_std
    into preprocessor_config.json: checkpoints that sample or normalise frames otherwise than the released
    ones (the weights do not depend on them).
    head_dim / kv_heads: the language model's attention shape (`text_dims`); e.g. head_dim=32 for vLLM's CPU
    attention, kv_heads=2 for grouped-query attention.
    """
    if family not in ("vicuna", "chatml"):
        raise ValueError(f"family must be 'vicuna' or 'chatml', got {family!r}")
    pooling_shape = (num_frames, 12, 12) if pooling_shape is None else tuple(pooling_shape)
    text = text_dims(head_dim, kv_heads)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family)
    tokenizer.save(str(out / "tokenizer.json"))
    for filename, content in _tokenizer_files(tokenizer, family).items():
        (out / filename).write_text(
            json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    image_token_index = tokenizer.token_to_id("<image>")
    vocab_size = (tokenizer.get_vocab_size() + 63) // 64 * 64  # padded like Vicuna's 32064
    shape = "" if text == TINY_TEXT else f"-hd{head_dim}-kv{text['num_key_value_heads']}"
    name = f"tiny-pllava-{family}{'-merged' if merged else ''}{shape}-seed{seed}"
    config = _tiny_config(family, vocab_size, image_token_index, name, num_frames, pooling_shape, text)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    preprocessor = {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": list(image_mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(image_std),
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")

    weights = _random_weights(vocab_size, seed, text)
    _write_shards(merge_lora_layout(weights, merge_alpha) if merged else weights, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints the checkpoint's path.")
    parser.add_argument("outdir", type=Path, metavar="OUTDIR",
                        help="folder to write the checkpoint into (created; existing files are overwritten)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights; the same seed gives byte-identical files "
                             "(default: %(default)s)")
    parser.add_argument("--family", choices=["vicuna", "chatml"], default="vicuna",
                        help="tokenizer and chat format: vicuna (</s> ends a turn) or chatml (<|im_start|> / "
                             "<|im_end|> tokens) (default: %(default)s)")
    parser.add_argument("--merged", action="store_true",
                        help="write the plain merged layout (language_model.model.*, LoRA folded in) instead "
                             "of the released PEFT layout with the LoRA unmerged (default: off)")
    parser.add_argument("--merge-alpha", type=float, default=4.0,
                        help="LoRA alpha folded into the weights by --merged, W = W0 + (alpha/r)*B@A; "
                             "ignored without --merged (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=TINY_HEAD_DIM,
                        help="the language model's head size; 4 heads, hidden = 4 x head_dim (32: the smallest "
                             "vLLM's CPU attention takes) (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads, 1, 2 or 4; fewer than 4 is grouped-query attention (default: 4)")
    args = parser.parse_args(argv)
    path = build_tiny_checkpoint(
        args.outdir, seed=args.seed, family=args.family, merged=args.merged, merge_alpha=args.merge_alpha,
        head_dim=args.head_dim, kv_heads=args.kv_heads,
    )
    print(path)


if __name__ == "__main__":
    main()
