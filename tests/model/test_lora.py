"""The inference alpha: merged weights must equal W0 x + (alpha/r) B A x, on one layer and a whole forward."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open

from model.loading import CheckpointError, load_pllava
from tests.model.conftest import random_clips

ALPHAS = [0.0, 4.0, 32.0]
Q0 = "language_model.base_model.model.model.layers.0.self_attn.q_proj"
V1 = "language_model.base_model.model.model.layers.1.self_attn.v_proj"


def raw_tensor(model_dir, name):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    with safe_open(str(model_dir / index["weight_map"][name]), framework="pt") as f:
        return f.get_tensor(name).float()


@pytest.fixture(scope="module")
def by_alpha(tiny_dir):
    return {alpha: load_pllava(tiny_dir, lora_alpha=alpha) for alpha in ALPHAS}


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("module", [Q0, V1])
def test_merged_layer_equals_base_plus_scaled_lora(tiny_dir, by_alpha, alpha, module):
    w0 = raw_tensor(tiny_dir, f"{module}.base_layer.weight")
    a = raw_tensor(tiny_dir, f"{module}.lora_A.default.weight")
    b = raw_tensor(tiny_dir, f"{module}.lora_B.default.weight")
    r = a.shape[0]
    assert r == by_alpha[alpha].lora_rank == 8
    x = torch.randn(5, w0.shape[1])
    expected = x @ w0.T + (alpha / r) * ((x @ a.T) @ b.T)
    name = module.replace("language_model.base_model.model.", "")
    layer = by_alpha[alpha].model.language_model.get_submodule(name)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert by_alpha[alpha].lora_alpha == alpha


def test_clip_attention_is_not_touched_by_the_lora(tiny_dir, by_alpha):
    name = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    raw = raw_tensor(tiny_dir, name)
    for loaded in by_alpha.values():
        assert torch.equal(loaded.model.get_parameter(name), raw)


@pytest.fixture(scope="module")
def peft_reference(tiny_dir, by_alpha):
    """An independent oracle: the alpha=0 model (= base weights) with PEFT's *unmerged* LoRA on q/v_proj."""
    base = load_pllava(tiny_dir, lora_alpha=0.0).model
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=r".*layers\.\d+\.self_attn\.(q_proj|v_proj)", lora_dropout=0.0
    )
    base.language_model = get_peft_model(base.language_model, config)
    with torch.no_grad():
        for layer in range(2):
            for proj in ("q_proj", "v_proj"):
                module = base.language_model.get_submodule(
                    f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                )
                prefix = f"language_model.base_model.model.model.layers.{layer}.self_attn.{proj}"
                module.lora_A["default"].weight.copy_(raw_tensor(tiny_dir, f"{prefix}.lora_A.default.weight"))
                module.lora_B["default"].weight.copy_(raw_tensor(tiny_dir, f"{prefix}.lora_B.default.weight"))
    return base.eval()


def _set_peft_alpha(peft_model, alpha):
    for module in peft_model.language_model.modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            module.scaling["default"] = alpha / 8


@torch.inference_mode()
@pytest.mark.parametrize("alpha", ALPHAS)
def test_whole_forward_equals_peft_unmerged_lora(loaded_small, by_alpha, peft_reference, alpha):
    from tests.model.conftest import with_pooling

    prompts = [by_alpha[alpha].template.format(), by_alpha[alpha].template.format("Short?")]
    enc = loaded_small.tokenizer(prompts, padding=True, return_tensors="pt")
    clips = random_clips(2, frames=2, seed=11)
    merged = with_pooling(by_alpha[alpha], (4, 6, 6)).model
    peft_reference.pooling = merged.pooling
    peft_reference.config = merged.config
    _set_peft_alpha(peft_reference, alpha)
    expected, mask = peft_reference(enc["input_ids"], enc["attention_mask"], pixel_values=clips)
    got, _ = merged(enc["input_ids"], enc["attention_mask"], pixel_values=clips)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    if alpha == 0:  # alpha 0 is the base model: PEFT with the adapter switched off
        with peft_reference.language_model.disable_adapter():
            base, _ = peft_reference(enc["input_ids"], enc["attention_mask"], pixel_values=clips)
        torch.testing.assert_close(got[real], base[real], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_alpha_changes_the_output(by_alpha):
    ids = by_alpha[0.0].tokenizer(["A man walks on a trail."], return_tensors="pt")
    logits = {a: m.model(ids["input_ids"], ids["attention_mask"])[0] for a, m in by_alpha.items()}
    assert (logits[4.0] - logits[0.0]).abs().max() > 1e-2
    assert (logits[32.0] - logits[4.0]).abs().max() > 1e-2


def _copy(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


def test_adapter_config_supplies_alpha_when_asked_and_its_rank_is_checked(tiny_dir, tmp_path, by_alpha):
    out = _copy(tiny_dir, tmp_path)
    (out / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    loaded = load_pllava(out, lora_alpha=None)
    assert loaded.lora_alpha == 32.0
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.model.get_parameter(name), by_alpha[32.0].model.get_parameter(name))
    assert load_pllava(out).lora_alpha == 4.0  # an explicit alpha still wins
    (out / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
    with pytest.raises(CheckpointError, match="r=16"):
        load_pllava(out)


def test_alpha_none_without_adapter_config_is_an_error(tiny_dir):
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_pllava(tiny_dir, lora_alpha=None)
