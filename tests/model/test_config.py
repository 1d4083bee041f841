import copy
import json

import pytest

from model.config import CLIP_VISION_437_DEFAULTS, LLAMA_437_DEFAULTS, PllavaConfig, detect_family

# Shaped like the released pllava-7b config.json: sub-configs hold only differences from 4.37 defaults.
RELEASED_7B = {
    "_name_or_path": "ermu2001/pllava-7b",
    "architectures": ["PllavaForConditionalGeneration"],
    "causal_conv_ks": None,
    "dilation": None,
    "gradient_checkpointing": False,
    "highres": None,
    "image_grid_pinpoints": [[336, 672], [672, 336]],
    "register": False,
    "slide_pooling_shape": None,
    "stride": None,
    "use_cc": False,
    "use_image_newline_parameter": False,
    "use_pooling": True,
    "frame_shape": [24, 24],
    "image_token_index": 32000,
    "model_type": "llava",
    "num_frames": 16,
    "pad_token_id": 0,
    "pooling_method": "avg",
    "pooling_shape": [16, 12, 12],
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "use_cache": False,
        "vocab_size": 32064,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.1",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def released(**changes):
    raw = copy.deepcopy(RELEASED_7B)
    raw.update(changes)
    return raw


@pytest.mark.parametrize("architecture", ["PllavaForConditionalGeneration", "MagicForConditionalGeneration"])
def test_released_config_parses_for_both_architectures(architecture):
    cfg = PllavaConfig.from_dict(released(architectures=[architecture]))
    assert cfg.architecture == architecture
    assert (cfg.num_frames, cfg.pooling_shape, cfg.frame_shape) == (16, (16, 12, 12), (24, 24))
    assert cfg.num_visual_tokens == 2304
    assert (cfg.image_token_index, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (
        32000,
        -2,
        "default",
    )
    assert cfg.text["hidden_size"] == 4096 and cfg.text["num_hidden_layers"] == 32  # 4.37 defaults = Llama-7B
    assert cfg.text["rms_norm_eps"] == 1e-5 and cfg.text["vocab_size"] == 32064  # from the file
    assert cfg.vision["hidden_size"] == 1024 and cfg.vision["num_hidden_layers"] == 24
    assert cfg.pad_token_id == 0 and cfg.name_or_path == "ermu2001/pllava-7b"


def test_missing_sub_config_fields_take_transformers_437_defaults():
    raw = released(text_config={"vocab_size": 32064}, vision_config={"image_size": 336, "patch_size": 14})
    cfg = PllavaConfig.from_dict(raw)
    assert cfg.text["rms_norm_eps"] == 1e-6
    assert cfg.text["max_position_embeddings"] == 2048
    assert cfg.text["rope_theta"] == 10000.0
    assert cfg.vision["hidden_act"] == "quick_gelu"
    assert cfg.vision["layer_norm_eps"] == 1e-5
    assert cfg.vision["hidden_size"] == 768
    llama = cfg.llama_config()
    assert llama.rms_norm_eps == 1e-6 and llama.max_position_embeddings == 2048
    assert llama.num_key_value_heads == llama.num_attention_heads == 32
    clip = cfg.clip_vision_config()
    assert clip.hidden_act == "quick_gelu" and clip.layer_norm_eps == 1e-5
    # The tables are the 4.37 values, not whatever the installed transformers has.
    assert (
        LLAMA_437_DEFAULTS["rms_norm_eps"] == 1e-6 and CLIP_VISION_437_DEFAULTS["hidden_act"] == "quick_gelu"
    )


def test_missing_top_level_fields_take_reference_defaults():
    raw = released()
    for field in (
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "projector_hidden_act",
        "frame_shape",
    ):
        del raw[field]
    cfg = PllavaConfig.from_dict(raw)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert (cfg.projector_hidden_act, cfg.frame_shape) == ("gelu", (24, 24))


def test_extra_released_fields_are_ignored():
    bare = released()
    for field in (
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
        "model_type",
        "transformers_version",
    ):
        del bare[field]
    with_extras = released(some_future_field={"x": 1})
    assert PllavaConfig.from_dict(bare, "f") == PllavaConfig.from_dict(with_extras, "f")


@pytest.mark.parametrize(
    "field", ["architectures", "text_config", "vision_config", "num_frames", "pooling_shape"]
)
def test_missing_required_field_names_field_and_file(tmp_path, field):
    raw = released()
    del raw[field]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        PllavaConfig.from_dir(tmp_path)
    assert field in str(err.value) and str(tmp_path / "config.json") in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_frames": "16"}, "num_frames"),
        ({"pooling_shape": [16, 12]}, "pooling_shape"),
        ({"pooling_shape": [16, 12.0, 12]}, "pooling_shape"),
        ({"image_token_index": 32000.0}, "image_token_index"),
        ({"vision_feature_layer": True}, "vision_feature_layer"),
        ({"text_config": "llama"}, "text_config"),
        ({"text_config": {**RELEASED_7B["text_config"], "hidden_size": "4096"}}, "text_config.hidden_size"),
        ({"text_config": {**RELEASED_7B["text_config"], "rms_norm_eps": None}}, "text_config.rms_norm_eps"),
        (
            {"vision_config": {**RELEASED_7B["vision_config"], "image_size": 336.0}},
            "vision_config.image_size",
        ),
        ({"vision_config": {**RELEASED_7B["vision_config"], "hidden_act": 1}}, "vision_config.hidden_act"),
        ({"architectures": ["LlavaForConditionalGeneration"]}, "architectures"),
        ({"pooling_method": "max"}, "pooling_method"),
        ({"frame_shape": [12, 12]}, "frame_shape"),
        ({"image_token_index": 40000}, "image_token_index"),
    ],
)
def test_ill_typed_or_invalid_field_names_field_and_file(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps(released(**change)))
    with pytest.raises(ValueError) as err:
        PllavaConfig.from_dir(tmp_path)
    assert f"'{field}'" in str(err.value) and "config.json" in str(err.value)


def test_34b_yi_is_llama_with_grouped_query_attention_and_chatml():
    raw = released(
        image_token_index=64002,
        text_config={
            "hidden_size": 7168,
            "intermediate_size": 20480,
            "num_hidden_layers": 60,
            "num_attention_heads": 56,
            "num_key_value_heads": 8,
            "vocab_size": 64064,
            "rope_theta": 5000000.0,
            "max_position_embeddings": 4096,
        },
    )
    cfg = PllavaConfig.from_dict(raw)
    llama = cfg.llama_config()
    assert llama.num_key_value_heads == 8 and llama.hidden_size == 7168
    assert llama.rope_parameters["rope_theta"] == 5000000.0
    assert detect_family(cfg) == "chatml"


def test_family_detection():
    vicuna = PllavaConfig.from_dict(released())
    assert detect_family(vicuna) == "vicuna"
    assert detect_family(vicuna, {"<s>": 1, "<image>": 32000}) == "vicuna"
    assert detect_family(vicuna, {"<|im_start|>": 6}) == "chatml"
    big_vocab = released(text_config={**RELEASED_7B["text_config"], "vocab_size": 64064})
    assert detect_family(PllavaConfig.from_dict(big_vocab)) == "chatml"


def test_tiny_checkpoint_config_round_trips(tiny_dir):
    cfg = PllavaConfig.from_dir(tiny_dir)
    assert cfg.architecture == "PllavaForConditionalGeneration"
    assert cfg.vision["hidden_act"] == "quick_gelu"  # absent from the file: the 4.37 default
    assert cfg.vision["image_size"] == 336 and cfg.vision["patch_size"] == 14
    assert cfg.text["rms_norm_eps"] == 1e-5
