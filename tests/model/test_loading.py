import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.loading import CheckpointError, load_pllava

VISION_Q = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
K1 = "language_model.base_model.model.model.layers.1.self_attn.k_proj.weight"


def copy_checkpoint(src, tmp_path, name="ckpt"):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def edit_tensors(model_dir, drop=(), add=None):
    """Rewrites the shards (and the index) without `drop` and with `add` put in the last shard."""
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    for i, shard in enumerate(shards):
        tensors = load_file(str(model_dir / shard))
        for name in drop:
            tensors.pop(name, None)
        if i == len(shards) - 1:
            tensors.update(add or {})
        save_file(tensors, str(model_dir / shard), metadata={"format": "pt"})
        for name in tensors:
            index["weight_map"][name] = shard
    for name in drop:
        index["weight_map"].pop(name, None)
    index_path.write_text(json.dumps(index))


def test_loads_the_released_layout(loaded, tiny_dir):
    assert loaded.family == "vicuna" and loaded.template.family == "vicuna"
    assert loaded.name == "tiny-pllava-vicuna-seed0"
    assert (loaded.lora_rank, loaded.lora_alpha) == (8, 4.0)
    assert loaded.image_size == 336
    assert loaded.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert loaded.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert loaded.tokenizer.padding_side == "left"
    model = loaded.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.dtype == torch.float32


def test_bfloat16_load(tiny_dir):
    loaded = load_pllava(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    ids = loaded.tokenizer(["A man walks."], return_tensors="pt")
    logits, _ = loaded.model(ids["input_ids"], ids["attention_mask"])
    assert torch.isfinite(logits).all()


def test_missing_and_unexpected_tensors_are_all_listed(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    extra = "language_model.base_model.model.model.layers.0.self_attn.rotary.weight"
    edit_tensors(out, drop=[K1, VISION_Q], add={extra: torch.zeros(2, 2)})
    with pytest.raises(CheckpointError) as err:
        load_pllava(out)
    message = str(err.value)
    assert "language_model.model.layers.1.self_attn.k_proj.weight" in message
    assert VISION_Q in message
    assert "language_model.model.layers.0.self_attn.rotary.weight" in message
    assert "missing tensors (2)" in message and "unexpected tensors (1)" in message


def test_incomplete_lora_is_an_error(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    edit_tensors(
        out, drop=["language_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    )
    with pytest.raises(CheckpointError, match="layers.0.self_attn.v_proj is incomplete"):
        load_pllava(out)


def test_lora_on_another_module_is_unexpected(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    extra = "language_model.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"
    edit_tensors(out, add={extra: torch.zeros(8, 64)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\).*mlp\.up_proj\.lora_A"):
        load_pllava(out)


def test_shape_mismatch_is_an_error(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes do not match.*gate_proj"):
        load_pllava(out)


@torch.inference_mode()
def test_post_layernorm_may_be_absent(tiny_dir, tmp_path, loaded):
    out = copy_checkpoint(tiny_dir, tmp_path)
    edit_tensors(
        out,
        drop=[
            "vision_tower.vision_model.post_layernorm.weight",
            "vision_tower.vision_model.post_layernorm.bias",
        ],
    )
    without = load_pllava(out)
    clips = torch.randn(1, 2, 3, 336, 336)
    torch.testing.assert_close(without.model.encode_videos(clips), loaded.model.encode_videos(clips))


def test_pickle_weights_are_refused(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    for shard in out.glob("*.safetensors"):
        shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    (out / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(CheckpointError, match="pickle.*pytorch_model.bin"):
        load_pllava(out)


def test_stray_deprecated_file_and_bin_beside_safetensors_are_ignored(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    (out / "model.safetensors-deprecated").write_bytes(b"garbage")
    (out / "pytorch_model.bin").write_bytes(b"garbage")
    assert load_pllava(out).lora_rank == 8


@torch.inference_mode()
def test_single_file_layout_loads_the_same(tiny_dir, tmp_path, loaded):
    out = copy_checkpoint(tiny_dir, tmp_path)
    tensors = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
        shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    single = load_pllava(out)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(single.model.state_dict()[name], value), name


def test_index_naming_a_missing_shard_is_an_error(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        load_pllava(out)


def test_merged_layout_loads_and_equals_the_unmerged_one(tiny_merged_dir, tiny_dir):
    merged = load_pllava(tiny_merged_dir, dtype="bfloat16")
    assert merged.lora_alpha is None and merged.lora_rank is None
    unmerged = load_pllava(tiny_dir, lora_alpha=4.0, dtype="bfloat16")
    merged_state, unmerged_state = merged.model.state_dict(), unmerged.model.state_dict()
    assert merged_state.keys() == unmerged_state.keys()
    for name, value in unmerged_state.items():
        assert torch.equal(merged_state[name], value), name


def test_alpha_on_a_merged_checkpoint_warns(tiny_merged_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        loaded = load_pllava(tiny_merged_dir, lora_alpha=32.0)
    assert loaded.lora_alpha is None
    assert "merged already" in caplog.text and "32" in caplog.text


def test_tokenizer_image_token_must_match_config(tiny_dir, tmp_path):
    out = copy_checkpoint(tiny_dir, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["image_token_index"] -= 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="<image>"):
        load_pllava(out)


def test_chatml_checkpoint_loads_as_chatml(tiny_chatml_dir):
    loaded = load_pllava(tiny_chatml_dir)
    assert loaded.family == "chatml" and loaded.template.version == "chatml-v1"
    assert loaded.tokenizer.eos_token == "<|im_end|>"
