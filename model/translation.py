"""The `mt` Chinese mode: a separate seq2seq translation model (e.g. Marian opus-mt en→zh) over caption_en.

Loaded from a local directory through transformers, like PLLaVA: no hub access at run time, no remote
code, safetensors weights only. Decoding is batched and greedy so that a caption's translation does
not depend on its batch neighbours or on sampling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Translation:
    """One translated text, shaped like `model.generation.Generation` so rows treat both alike."""

    text: str
    token_ids: list[int]  # generated ids, without the decoder start token, the EOS token and padding
    num_tokens: int
    hit_max_new_tokens: bool  # no EOS within max_new_tokens: the text may be cut


class Translator:
    """A loaded seq2seq model and its tokenizer; `translate` turns source texts into target texts."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        source_prefix: str = "",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source_prefix = source_prefix
        self.device = model.device
        self.max_positions = model.config.max_position_embeddings
        self.max_source_tokens = min(tokenizer.model_max_length, self.max_positions)
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        # No forced EOS at the budget: Marian configs set `forced_eos_token_id`, which would end a cut-off
        # translation with EOS and hide the truncation. It is cleared on the model's own generation config
        # because `generate` fills the None fields of the config it is given from that one.
        model.generation_config.forced_eos_token_id = None
        self.generation_config = copy.deepcopy(model.generation_config)
        self.generation_config.update(do_sample=False, num_beams=1)  # greedy, one sequence per input

    @torch.inference_mode()
    def translate(self, texts: list[str], *, max_new_tokens: int, batch_size: int) -> list[Translation]:
        """Translations of `texts`, in order. Blank texts give an empty translation without a model call.

        A source longer than the model's positions is truncated to fit (a caption rarely is).
        """
        if max_new_tokens < 1 or max_new_tokens + 1 > self.max_positions:
            raise ValueError(
                f"max_new_tokens must be in 1..{self.max_positions - 1} for this model, got {max_new_tokens}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results = [Translation("", [], 0, False)] * len(texts)
        # Similar lengths together waste less compute on padding; results go back to input order.
        todo = sorted((i for i, text in enumerate(texts) if text.strip()), key=lambda i: len(texts[i]))
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.max_new_tokens = max_new_tokens
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            translations = self._translate_batch([texts[i] for i in batch], generation_config)
            for i, translation in zip(batch, translations):
                results[i] = translation
        return results

    def _translate_batch(self, texts: list[str], generation_config: GenerationConfig) -> list[Translation]:
        inputs = self.tokenizer(
            [self.source_prefix + text for text in texts],
            padding=True,
            truncation=True,
            max_length=self.max_source_tokens,
            return_tensors="pt",
        ).to(self.device)
        sequences = self.model.generate(**inputs, generation_config=generation_config)
        generated = sequences[:, 1:].tolist()  # (B, <= max_new_tokens): drop the decoder start token
        out = []
        for ids in generated:
            end = next((k for k, token in enumerate(ids) if token in self.eos_token_ids), None)
            ids = ids if end is None else ids[:end]  # EOS, then batch padding
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Translation(text, ids, len(ids), hit_max_new_tokens=end is None))
        return out


def load_translator(
    model_dir: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    source_prefix: str = "",
) -> Translator:
    """A Translator for the seq2seq model saved (safetensors, tokenizer files) in the local `model_dir`.

    `source_prefix` is prepended to every source text, for multi-target models that pick the target
    language by a token: Helsinki-NLP/opus-mt-en-zh wants ">>cmn_Hans<< " (or ">>cmn_Hant<< ").
    """
    model_dir = Path(model_dir)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no translation model at {model_dir}: config.json missing")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (other formats are not loaded)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        model_dir,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=DTYPES[dtype],
    ).to(device)
    return Translator(model, tokenizer, source_prefix=source_prefix)
