import pytest

from model.describe import describe_checkpoint
from model.prompts import CHATML, SYSTEM_VIDEO, VICUNA, template_for


def test_vicuna_template():
    assert VICUNA.format("What happens?") == f"{SYSTEM_VIDEO} USER: <image>\nWhat happens? ASSISTANT:"
    assert (
        VICUNA.format("Translate: hi", with_image=False)
        == f"{VICUNA.text_system} USER: Translate: hi ASSISTANT:"
    )
    assert VICUNA.format() == VICUNA.format(VICUNA.default_question_en)


def test_chatml_template():
    assert CHATML.format("What happens?") == (
        f"<|im_start|>system\n{SYSTEM_VIDEO}<|im_end|>\n<|im_start|>user\n<image>\nWhat happens?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "<image>" not in CHATML.format("Translate: hi", with_image=False)
    assert CHATML.stop_tokens == ("<|im_end|>",)


def test_prompt_versions():
    assert VICUNA.prompt_version == "vicuna-v1/recaption-v1"
    assert CHATML.prompt_version == "chatml-v1/recaption-v1"
    assert VICUNA.version_for(VICUNA.default_question_en) == VICUNA.prompt_version
    custom = VICUNA.version_for("Describe the clip briefly.")
    assert custom.startswith("vicuna-v1/custom-") and custom != VICUNA.version_for("Describe the clip.")


def test_question_may_not_hold_its_own_image_slot():
    with pytest.raises(ValueError, match="<image>"):
        VICUNA.format("<image> what is this?")


def test_translate_question_takes_the_caption():
    filled = VICUNA.default_translate_zh.format(caption="A dog {runs}.")
    assert filled.endswith("A dog {runs}.")


def test_template_by_family_and_by_directory(tiny_dir, tiny_chatml_dir):
    assert template_for("vicuna") is VICUNA and template_for("chatml") is CHATML
    with pytest.raises(ValueError, match="unknown model family"):
        template_for("mistral")
    assert describe_checkpoint(tiny_dir).template is VICUNA
    assert describe_checkpoint(tiny_chatml_dir).template is CHATML
