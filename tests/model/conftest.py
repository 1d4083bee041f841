"""Tiny PLLaVA checkpoints in the released layout, built once per test session."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest
import torch

from model.loading import LoadedPllava, load_pllava
from model.pllava import PllavaModel
from model.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vicuna"), seed=0)


@pytest.fixture(scope="session")
def tiny_chatml_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chatml"), seed=1, family="chatml")


@pytest.fixture(scope="session")
def tiny_merged_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-merged"), seed=0, merged=True, merge_alpha=4.0)


@pytest.fixture(scope="session")
def loaded(tiny_dir) -> LoadedPllava:
    return load_pllava(tiny_dir)


def with_pooling(loaded: LoadedPllava, pooling_shape: tuple[int, int, int]) -> LoadedPllava:
    """Same weights, another pooling shape (pooling has no parameters); small shapes keep tests fast."""
    config = dataclasses.replace(loaded.config, pooling_shape=pooling_shape)
    model = PllavaModel(config)
    model.load_state_dict(loaded.model.state_dict())
    return dataclasses.replace(loaded, model=model.eval().requires_grad_(False), config=config)


@pytest.fixture(scope="session")
def loaded_small(loaded) -> LoadedPllava:
    """The tiny model with pooling (4, 6, 6): 144 visual tokens per clip instead of 2304."""
    return with_pooling(loaded, (4, 6, 6))


def random_clips(batch: int, frames: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, T, 3, 336, 336) CLIP-normalised-looking frames."""
    return torch.randn(batch, frames, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def eos_biased_lm_head(loaded):
    """The LM head with a huge bias on eos (every step picks it), restored afterwards."""
    lm = loaded.model.language_model
    original = lm.lm_head
    biased = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(original.weight)
        biased.bias.zero_()
        biased.bias[loaded.tokenizer.eos_token_id] = 1e4
    lm.lm_head = biased
    try:
        yield biased
    finally:
        lm.lm_head = original
