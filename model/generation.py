"""Batched greedy generation with a KV cache, left padding, and precomputed visual features.

A small explicit loop rather than `generate()`: position ids come from the attention mask, the repetition
penalty sees the prompt's text tokens (not the 2304 visual slots), and `ignore_eos` is a plain switch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache

from model.loading import LoadedPllava


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # generated ids, without pads and without the stop token
    num_tokens: int
    hit_max_new_tokens: bool  # no stop token within max_new_tokens: the text may be cut


def stop_token_ids(loaded: LoadedPllava) -> list[int]:
    tokenizer = loaded.tokenizer
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in loaded.template.stop_tokens if tok in vocab)
    return sorted(ids)


CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers 5.24 / up to 5.20 (the Llama forward's name for it)


@functools.cache
def _forward_keyword(forward_types: tuple[type, ...]) -> str | None:
    for name in CACHE_KEYWORDS:
        if all(name in inspect.signature(t.forward).parameters for t in forward_types):
            return name
    return None


def cache_keyword(lm: torch.nn.Module) -> str:
    """The cache argument the installed transformers' Llama forward takes: `cache` (5.24) or `past_key_values`
    (up to 5.20). Taken from the signature, because an unknown keyword is swallowed by **kwargs and the model
    decodes with a throwaway cache of its own: fast and wrong. `lm`: a LlamaForCausalLM (or a PllavaModel)."""
    lm = getattr(lm, "language_model", lm)
    name = _forward_keyword((type(lm), type(lm.model)))
    if name is None:
        params = [p for p in inspect.signature(lm.forward).parameters if p != "self"]
        raise RuntimeError(f"the installed transformers {transformers.__version__}: {type(lm).__name__}.forward takes "
                           f"none of {', '.join(CACHE_KEYWORDS)} (its arguments: {', '.join(params)}); the "
                           f"tested versions are listed in the README")
    return name


def check_cache_grew(cache: DynamicCache, expected: int, where: str) -> None:
    """A forward given `cache` must have written it: else transformers did not take the keyword."""
    if cache.get_seq_length() != expected:
        raise RuntimeError(f"{where}: the KV cache holds {cache.get_seq_length()} positions, expected {expected}: "
                           f"transformers {transformers.__version__} did not take the cache argument; decoding "
                           "would run without it")


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style, as transformers does: seen tokens' positive logits divided, negative ones multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@torch.inference_mode()
def greedy_generate(
    loaded: LoadedPllava,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    video_features: torch.Tensor | None,
    *,
    max_new_tokens: int,
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    min_new_tokens: int = 0,
) -> list[Generation]:
    """Greedy decoding for a left-padded batch. input_ids/attention_mask (B, L); video_features (B, N, D) or None.
    `min_new_tokens`: the stop tokens cannot be picked before that many tokens (the repair of an empty caption)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model, tokenizer = loaded.model, loaded.tokenizer
    lm = model.language_model
    device = model.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    vocab_size = lm.config.vocab_size
    stops = torch.tensor(stop_token_ids(loaded), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)  # (B, V)
    if repetition_penalty is not None:
        prompt_tokens = (attention_mask == 1) & (input_ids != loaded.config.image_token_index)
        rows, cols = prompt_tokens.nonzero(as_tuple=True)
        seen[rows, input_ids[rows, cols]] = True

    embeds, mask, position_ids = model.prepare_inputs(input_ids, attention_mask, video_features)
    next_position = mask.sum(-1, keepdim=True)  # (B, 1): the first new token's position
    cache = DynamicCache(config=lm.config)
    keyword = cache_keyword(lm)
    out = lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{keyword: cache},
    )
    check_cache_grew(cache, embeds.shape[1], "greedy_generate prefill")

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        if repetition_penalty is not None:
            logits = _apply_repetition_penalty(logits, seen, repetition_penalty)
        if step < min_new_tokens and not ignore_eos:
            logits[:, stops] = float("-inf")
        token = logits.argmax(-1)  # (B,)
        if not ignore_eos:
            token = token.masked_fill(finished, pad_id)
            finished |= torch.isin(token, stops)
        steps.append(token)
        seen[torch.arange(batch, device=device), token] = True
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = lm(
            inputs_embeds=model.embed_tokens(token[:, None]),
            attention_mask=mask,
            position_ids=next_position,
            use_cache=True,
            **{keyword: cache},
        )
        check_cache_grew(cache, mask.shape[1], "greedy_generate decode step")
        next_position = next_position + 1

    generated = torch.stack(steps, dim=1).tolist()  # (B, steps)
    stop_set = set(stops.tolist())
    results = []
    for row in generated:
        ids, stopped = row, False
        if not ignore_eos:
            for i, tok in enumerate(row):
                if tok in stop_set:
                    ids, stopped = row[:i], True
                    break
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        results.append(
            Generation(text=text, token_ids=ids, num_tokens=len(ids), hit_max_new_tokens=not stopped)
        )
    return results


def tokenize_prompts(loaded: LoadedPllava, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, L), left-padded."""
    batch = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def generate_captions(
    loaded: LoadedPllava,
    prompts: list[str],
    video_features: torch.Tensor,
    *,
    max_new_tokens: int,
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    min_new_tokens: int = 0,
) -> list[Generation]:
    """One caption per (prompt, clip). Each prompt holds one `<image>`; video_features (B, N, D) from
    `loaded.model.encode_videos`, so the same features can serve an English and a Chinese prompt."""
    if len(prompts) != video_features.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {video_features.shape[0]} clips")
    input_ids, attention_mask = tokenize_prompts(loaded, prompts)
    return greedy_generate(
        loaded,
        input_ids,
        attention_mask,
        video_features,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        min_new_tokens=min_new_tokens,
    )


def generate_text(
    loaded: LoadedPllava,
    prompts: list[str],
    *,
    max_new_tokens: int,
    repetition_penalty: float | None = None,
    ignore_eos: bool = False,
    min_new_tokens: int = 0,
) -> list[Generation]:
    """Text-only prompts (no `<image>`), e.g. the translation pass."""
    input_ids, attention_mask = tokenize_prompts(loaded, prompts)
    if torch.any(input_ids == loaded.config.image_token_index):
        raise ValueError("text-only prompts must not contain <image>")
    return greedy_generate(
        loaded,
        input_ids,
        attention_mask,
        None,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        ignore_eos=ignore_eos,
        min_new_tokens=min_new_tokens,
    )
