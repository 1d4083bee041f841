"""Conversation templates per model family, and the default prompt wording, with version strings.

Vicuna (PLLaVA 7B/13B, as the reference's `conv_eval_vcg`):
    "{system} USER: <image>\\n{question} ASSISTANT:"
ChatML (PLLaVA 34B on Yi, as the reference's `*_llavanext` templates):
    "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"
`prompt_version` ("{template version}/{wording version}", e.g. "vicuna-v1/recaption-v1") goes into every output
row, so a change of the format or of the default wording shows up in the job fingerprint. Which template a
checkpoint uses, and the wording in effect for a manifest's prompts, are decided by model/describe.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from model.config import Family

IMAGE_TOKEN = "<image>"

# The reference's Video-ChatGPT evaluation system prompt (its missing space after "language." kept on purpose:
# this is the string the checkpoints were evaluated with).
SYSTEM_VIDEO = (
    "You are Video-ChatGPT, a large vision-language assistant. "
    "You are able to understand the video content that the user provides, and assist the user with a variety of "
    "tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail based on the provided video."
)
SYSTEM_TEXT = "You are a helpful assistant. Follow the instructions carefully."

# Default wording; bump WORDING_VERSION whenever one of these strings changes.
WORDING_VERSION = "recaption-v1"
DEFAULT_QUESTION_EN = "Describe the background, characters and the actions in the provided video in detail."
DEFAULT_QUESTION_ZH = "请用中文详细描述视频中的背景、人物和动作。"
# Text-only translation pass; `{caption}` is filled with the English caption.
DEFAULT_TRANSLATE_ZH = (
    "Translate the following English video description into Chinese. "
    "Reply with the Chinese translation only.\n\n{caption}"
)


@dataclass(frozen=True)
class PromptTemplate:
    family: Family
    version: str  # changes whenever the surrounding format changes
    system: str  # system prompt of visual prompts
    text_system: str  # system prompt of text-only prompts (translation pass)
    stop_tokens: tuple[str, ...]  # end-of-turn markers, in addition to the tokenizer's eos
    default_question_en: str = DEFAULT_QUESTION_EN
    default_question_zh: str = DEFAULT_QUESTION_ZH
    default_translate_zh: str = DEFAULT_TRANSLATE_ZH

    @property
    def prompt_version(self) -> str:
        """Version of this template with the default wording."""
        return f"{self.version}/{WORDING_VERSION}"

    def version_for(self, question: str) -> str:
        """Version of this template with `question`: the default's, or a hash of a custom wording."""
        defaults = (self.default_question_en, self.default_question_zh, self.default_translate_zh)
        if question in defaults:
            return self.prompt_version
        return f"{self.version}/custom-{hashlib.sha256(question.encode('utf-8')).hexdigest()[:12]}"

    def format(self, question: str | None = None, *, with_image: bool = True) -> str:
        """The full prompt for one turn; with_image puts the single `<image>` slot before the question."""
        question = self.default_question_en if question is None else question
        if with_image and IMAGE_TOKEN in question:
            raise ValueError("the question must not contain <image>; the template places the one slot")
        user = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        system = self.system if with_image else self.text_system
        if self.family == "chatml":
            return (
                f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n"
            )
        return f"{system} USER: {user} ASSISTANT:"


VICUNA = PromptTemplate(
    family="vicuna", version="vicuna-v1", system=SYSTEM_VIDEO, text_system=SYSTEM_TEXT, stop_tokens=("</s>",)
)
CHATML = PromptTemplate(
    family="chatml",
    version="chatml-v1",
    system=SYSTEM_VIDEO,
    text_system=SYSTEM_TEXT,
    stop_tokens=("<|im_end|>",),
)


def template_for(family: str) -> PromptTemplate:
    if family == "vicuna":
        return VICUNA
    if family == "chatml":
        return CHATML
    raise ValueError(f"unknown model family {family!r} (expected 'vicuna' or 'chatml')")

