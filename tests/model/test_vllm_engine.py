"""VllmEngine against CaptionEngine: every request's greedy ids equal, on tiny checkpoints at float32.

vLLM's CPU build runs the same engine as the GPU package. Its CPU attention refuses head_dim 16, so these
checkpoints have head_dim 32 (`build_tiny_checkpoint(head_dim=32)`). One engine per checkpoint for the whole
module: an engine takes 30-90 s to start here.
"""

from __future__ import annotations

import os

import pytest
import torch

try:  # the engine core, not just `vllm`: a partial install imports `vllm` and fails later
    import vllm.v1.engine.llm_engine  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"vLLM is not importable ({e}); the vLLM engine tests need the `vllm` extra",
                allow_module_level=True)

from model.engine import CaptionEngine, Request
from model.loading import LoadedPllava, load_pllava
from model.tiny import build_tiny_checkpoint
from model.vllm_engine import VllmEngine, VllmSettings

MAX_LEN = 256
MAX_NEW = 24
VISUAL = 36  # visual tokens per clip (small: the splice is the same whatever the count)


def settings(max_num_seqs: int) -> VllmSettings:
    return VllmSettings(enforce_eager=True, max_num_seqs=max_num_seqs)  # no compilation on 2 CPU cores


def start(loaded: LoadedPllava, identity: str, cache_root, max_num_seqs: int) -> VllmEngine:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV on the CPU (vLLM's default is 4)
    return VllmEngine(loaded, identity=identity, max_len=MAX_LEN, settings=settings(max_num_seqs),
                      cache_root=cache_root)


def run(engine, requests: list[Request]) -> dict:
    for r in requests:
        engine.submit(r)
    done = {}
    while engine.busy:
        for c in engine.step():
            assert c.id not in done
            done[c.id] = c.generation
    for c in engine.flush():
        done[c.id] = c.generation
    assert set(done) == {r.id for r in requests}
    return done


def native(loaded: LoadedPllava, requests: list[Request]) -> dict:
    return run(CaptionEngine(loaded, num_slots=4, max_len=MAX_LEN), requests)


def features(hidden: int, seed: int) -> torch.Tensor:
    return torch.randn(VISUAL, hidden, generator=torch.Generator().manual_seed(seed))


def assert_same(got: dict, want: dict) -> None:
    for rid in want:
        assert got[rid] == want[rid], rid  # token ids (no stop token), text, num_tokens, hit_max_new_tokens


# ------------------------------------------------------------------------------------------------ Vicuna


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory) -> LoadedPllava:
    """Vicuna layout, head_dim 32, with the eos row of the LM head doubled: captions stop at varied steps
    (1 to 15 tokens, some run to max_new_tokens), so stop ids, min_new_tokens and ignore_eos all bite."""
    loaded = load_pllava(build_tiny_checkpoint(tmp_path_factory.mktemp("vllm-vicuna"), seed=0, head_dim=32))
    with torch.no_grad():
        loaded.model.language_model.lm_head.weight[loaded.tokenizer.eos_token_id] *= 2.0
    return loaded


@pytest.fixture(scope="module")
def vicuna_engine(vicuna, tmp_path_factory):
    engine = start(vicuna, "tiny-vicuna-hd32-seed0-eos-x2", tmp_path_factory.mktemp("vllm-cache"), max_num_seqs=4)
    yield engine
    engine.close()


def vicuna_requests(loaded: LoadedPllava, **overrides) -> list[Request]:
    """Eight clips (embeddings prompts) and four Chinese translations (token ids), as the scheduler sends them."""
    tok, hidden = loaded.tokenizer, loaded.config.hidden_size
    out = []
    for i in range(8):
        ids = tok(f"USER: <image>\nDescribe the video number {i} in detail. ASSISTANT:")["input_ids"]
        out.append(Request((i, "en"), ids, features(hidden, i), max_new_tokens=MAX_NEW, **overrides))
    for i in range(4):
        ids = tok(f"USER: Translate the following English text into Chinese: A man walks {i}. ASSISTANT:")["input_ids"]
        out.append(Request((i, "zh"), ids, None, max_new_tokens=MAX_NEW, **overrides))
    return out


def test_greedy_ids_equal_with_captions_stopping_at_varied_steps(vicuna, vicuna_engine):
    requests = vicuna_requests(vicuna)
    want = native(vicuna, requests)
    stops = sorted(g.num_tokens for g in want.values() if not g.hit_max_new_tokens)
    assert len(set(stops)) >= 4 and any(g.hit_max_new_tokens for g in want.values())  # the test bites
    for r in requests:
        vicuna_engine.submit(r)
    vicuna_engine.step()
    assert len(vicuna_engine.waiting) == len(requests) - 4  # four in vLLM (max_num_seqs), the rest wait
    done = {}
    while vicuna_engine.busy:
        done.update((c.id, c.generation) for c in vicuna_engine.step())
    assert_same(done, want)


def test_repetition_penalty_over_prompt_text_and_generated_tokens(vicuna, vicuna_engine):
    requests = vicuna_requests(vicuna, repetition_penalty=1.5)
    want = native(vicuna, requests)
    plain = native(vicuna, vicuna_requests(vicuna))
    assert sum(want[rid] != plain[rid] for rid in want) >= 4  # the penalty changes these captions
    assert_same(run(vicuna_engine, requests), want)


def test_min_new_tokens_and_ignore_eos(vicuna, vicuna_engine):
    eos = vicuna.tokenizer.eos_token_id
    plain = native(vicuna, vicuna_requests(vicuna))
    stopped = {rid: g.num_tokens for rid, g in plain.items() if not g.hit_max_new_tokens}
    assert len(stopped) >= 4
    requests = []
    for r in vicuna_requests(vicuna):
        if r.id in stopped:  # past where it stopped: a repair of an empty/short caption
            requests.append(Request(("min", r.id), r.prompt_ids, r.video_features, max_new_tokens=MAX_NEW,
                                    min_new_tokens=min(stopped[r.id] + 3, MAX_NEW)))
            requests.append(Request(("eos", r.id), r.prompt_ids, r.video_features, max_new_tokens=MAX_NEW,
                                    ignore_eos=True))
    want = native(vicuna, requests)
    for rid, n in stopped.items():  # the test bites: both settings change these captions
        assert want[("min", rid)].num_tokens >= min(n + 3, MAX_NEW)
        assert want[("eos", rid)].token_ids[n] == eos and want[("eos", rid)].hit_max_new_tokens
    assert_same(run(vicuna_engine, requests), want)


def test_a_request_longer_than_max_len_is_refused_at_submit(vicuna, vicuna_engine):
    ids = vicuna.tokenizer("USER: <image>\nDescribe. ASSISTANT:")["input_ids"]
    too_long = Request("long", ids, torch.zeros(MAX_LEN, vicuna.config.hidden_size), max_new_tokens=8)
    with pytest.raises(ValueError, match="max_len"):
        vicuna_engine.submit(too_long)
    assert not vicuna_engine.busy


# ------------------------------------------------------------------------------------- ChatML with GQA


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> LoadedPllava:
    """ChatML (as the 34B's Yi) with grouped-query attention: 4 heads, 2 key/value heads, head_dim 32."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("vllm-chatml"), seed=1, family="chatml", head_dim=32,
                                 kv_heads=2)
    loaded = load_pllava(path)
    cfg = loaded.model.language_model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    return loaded


def test_chatml_gqa_greedy_ids_equal(chatml, tmp_path_factory):
    tok, hidden = chatml.tokenizer, chatml.config.hidden_size
    requests = []
    for i in range(6):
        ids = tok(f"<|im_start|>user\n<image>\nDescribe video {i}.<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        requests.append(Request((i, "en"), ids, features(hidden, 100 + i), max_new_tokens=MAX_NEW,
                                repetition_penalty=1.3 if i % 2 else None))
    for i in range(3):
        ids = tok(f"<|im_start|>user\nTranslate into Chinese: two children play {i}.<|im_end|>\n"
                  "<|im_start|>assistant\n")["input_ids"]
        requests.append(Request((i, "zh"), ids, None, max_new_tokens=MAX_NEW, repetition_penalty=1.3))
    want = native(chatml, requests)
    engine = start(chatml, "tiny-chatml-hd32-kv2-seed1", tmp_path_factory.mktemp("vllm-cache"), max_num_seqs=8)
    try:
        assert_same(run(engine, requests), want)
    finally:
        engine.close()
