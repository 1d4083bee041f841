"""The tiny checkpoint builder: released layout, deterministic, offline tokenizer that round-trips en/zh."""

import json
import re
import time

import pytest
from safetensors import safe_open

from model.config import CLIP_VISION_437_DEFAULTS, LLAMA_437_DEFAULTS
from model.loading import load_pllava
from model.tiny import build_tiny_checkpoint, main

# The released key patterns (PLLAVA_CHECKPOINT.md), PEFT layout with the LoRA unmerged.
RELEASED_PATTERNS = [
    r"vision_tower\.vision_model\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)",
    r"vision_tower\.vision_model\.pre_layrnorm\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.(layer_norm1|layer_norm2)\.(weight|bias)",
    r"vision_tower\.vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)",
    r"vision_tower\.vision_model\.post_layernorm\.(weight|bias)",
    r"multi_modal_projector\.linear_[12]\.(weight|bias)",
    r"language_model\.base_model\.model\.model\.embed_tokens\.weight",
    r"language_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.(q|v)_proj\.base_layer\.weight",
    r"language_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.(q|v)_proj\.lora_[AB]\.default\.weight",
    r"language_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.(k|o)_proj\.weight",
    r"language_model\.base_model\.model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"language_model\.base_model\.model\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight",
    r"language_model\.base_model\.model\.model\.norm\.weight",
    r"language_model\.base_model\.model\.lm_head\.weight",
]


def tensors_of(model_dir):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            names = f.keys()
            out.update({k: f.get_tensor(k) for k in names})
    return index, out


def test_layout_matches_the_released_checkpoint(tiny_dir):
    index, tensors = tensors_of(tiny_dir)
    assert len(set(index["weight_map"].values())) >= 2
    assert set(index["weight_map"]) == set(tensors)
    for name in tensors:
        assert any(re.fullmatch(p, name) for p in RELEASED_PATTERNS), name
    for pattern in RELEASED_PATTERNS:
        assert any(re.fullmatch(pattern, name) for name in tensors), pattern
    assert not (tiny_dir / "adapter_config.json").exists()
    lora_b = [t for n, t in tensors.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # non-zero, so alpha matters
    a = tensors["language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert a.shape == (8, 64)
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ]:
        assert (tiny_dir / name).is_file()
    assert sum(p.stat().st_size for p in tiny_dir.iterdir()) < 5_000_000


def test_config_has_the_released_fields_and_sub_configs_as_437_differences(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["PllavaForConditionalGeneration"]
    assert config["model_type"] == "llava" and config["transformers_version"] == "4.37.1"
    assert (config["num_frames"], config["pooling_method"]) == (16, "avg")
    assert (config["pooling_shape"], config["frame_shape"]) == ([16, 12, 12], [24, 24])
    assert (config["vision_feature_layer"], config["torch_dtype"]) == (-2, "bfloat16")
    for extra in [
        "register",
        "slide_pooling_shape",
        "stride",
        "causal_conv_ks",
        "dilation",
        "highres",
        "image_grid_pinpoints",
        "use_cc",
        "use_image_newline_parameter",
        "use_pooling",
        "gradient_checkpointing",
        "_name_or_path",
    ]:
        assert extra in config
    text, vision = config["text_config"], config["vision_config"]
    assert all(LLAMA_437_DEFAULTS.get(k, object()) != v for k, v in text.items())
    assert all(CLIP_VISION_437_DEFAULTS.get(k, object()) != v for k, v in vision.items())
    assert "hidden_act" not in vision and "layer_norm_eps" not in vision  # left to the 4.37 defaults
    assert (vision["image_size"], vision["patch_size"]) == (336, 14)
    assert vision["num_hidden_layers"] >= 2  # layer -2 exists


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, tiny_dir):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    for path in tiny_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    shard = "model-00002-of-00002.safetensors"
    assert (other / shard).read_bytes() != (tiny_dir / shard).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_build_is_quick(tmp_path):
    start = time.perf_counter()
    build_tiny_checkpoint(tmp_path / "quick", seed=3)
    assert time.perf_counter() - start < 5.0


def test_cli_writes_a_loadable_merged_checkpoint(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--seed", "2", "--merged"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    loaded = load_pllava(tmp_path / "cli")
    assert loaded.lora_alpha is None and loaded.name == "tiny-pllava-vicuna-merged-seed2"


TEXTS = [
    "A man in a red jacket walks along a snowy mountain trail.",
    "视频中一个穿红色夹克的男人沿着雪山小路行走。",
    "視頻中一個穿紅色夾克的男人沿著雪山小路行走。",
    "鬱龜鑾 — rare traditional characters, 罕见字, emoji 🎬, tabs\tand\nnewlines, Ünïcödé.",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_english_and_chinese(loaded, text):
    tok = loaded.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text
    assert tok.unk_token_id not in ids


def test_tokenizer_special_tokens(loaded, tiny_chatml_dir):
    tok = loaded.tokenizer
    for name in ["<s>", "</s>", "<unk>", "<pad>", "<image>"]:
        assert tok.convert_tokens_to_ids(name) != tok.unk_token_id or name == "<unk>"
    assert tok.convert_tokens_to_ids("<image>") == loaded.config.image_token_index
    ids = tok(loaded.template.format())["input_ids"]
    assert ids[0] == tok.bos_token_id  # Llama-style BOS
    assert ids.count(loaded.config.image_token_index) == 1  # one token, not split into pieces
    assert loaded.config.vocab_size % 64 == 0 and loaded.config.vocab_size >= len(tok)
    chatml = load_pllava(tiny_chatml_dir).tokenizer
    prompt = load_pllava(tiny_chatml_dir).template.format()
    start = chatml.convert_tokens_to_ids("<|im_start|>")
    assert chatml(prompt)["input_ids"].count(start) == 3


def test_head_dim_and_kv_heads_options_give_a_loadable_gqa_checkpoint(tmp_path, tiny_dir):
    """head_dim 32 (what vLLM's CPU attention takes) with 2 key/value heads for 4 heads: the 34B's layout in
    small; the default checkpoint keeps hidden 64 and 4 key/value heads."""
    path = build_tiny_checkpoint(tmp_path / "gqa", seed=0, family="chatml", head_dim=32, kv_heads=2)
    loaded = load_pllava(path)
    cfg = loaded.model.language_model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (128, 4, 2, 32)
    assert loaded.name == "tiny-pllava-chatml-hd32-kv2-seed0"
    assert loaded.model.language_model.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)
    assert json.loads((tiny_dir / "config.json").read_text())["text_config"]["hidden_size"] == 64
    with pytest.raises(ValueError, match="kv_heads"):
        build_tiny_checkpoint(tmp_path / "bad", kv_heads=3)
