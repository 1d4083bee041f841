"""Conversation templates per model family, and the default prompt wording, each with a version string.

Vicuna (PLLaVA 7B/13B, as the reference's `conv_eval_vcg`):
    "{system} USER: <image>\\n{question} ASSISTANT:"
ChatML (PLLaVA 34B on Yi, as the reference's `*_llavanext` templates):
    "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"
`prompt_version` ("{template version}/{wording version}") goes into every output row, so a change of either
shows up in the job fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

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

# Known wordings, by version. A wording not listed here is versioned by its hash.
QUESTIONS = {
    "recaption-en-v1": "Describe the background, characters and the actions in the provided video in detail.",
    "translate-zh-v1": (
        "Translate the following English video description into Chinese. "
        "Reply with the Chinese translation only.\n\n{text}"
    ),
}
DEFAULT_CAPTION_QUESTION = QUESTIONS["recaption-en-v1"]
TRANSLATE_ZH_QUESTION = QUESTIONS["translate-zh-v1"]


def wording_version(question: str) -> str:
    for version, text in QUESTIONS.items():
        if text == question:
            return version
    return "custom-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class PromptTemplate:
    family: str  # "vicuna" | "chatml"
    version: str  # changes whenever the surrounding format changes
    system: str  # system prompt for visual prompts
    text_system: str  # system prompt for text-only prompts (translation pass)
    stop_tokens: tuple[str, ...]  # end-of-turn markers, in addition to the tokenizer's eos

    def format(self, question: str = DEFAULT_CAPTION_QUESTION, *, with_image: bool = True) -> str:
        """The full prompt; with_image puts the single `<image>` slot before the question."""
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

    def prompt_version(self, question: str = DEFAULT_CAPTION_QUESTION) -> str:
        return f"{self.version}/{wording_version(question)}"


VICUNA = PromptTemplate(
    family="vicuna", version="vicuna-v1", system=SYSTEM_VIDEO, text_system=SYSTEM_TEXT, stop_tokens=("</s>",)
)
CHATML = PromptTemplate(
    family="chatml", version="chatml-v1", system=SYSTEM_VIDEO, text_system=SYSTEM_TEXT, stop_tokens=("<|im_end|>",)
)


def template_for(family: str) -> PromptTemplate:
    if family == "vicuna":
        return VICUNA
    if family == "chatml":
        return CHATML
    raise ValueError(f"unknown model family {family!r} (expected 'vicuna' or 'chatml')")
