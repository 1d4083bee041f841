"""CaptionEngine: continuous batching must give exactly the batch-1 `greedy_generate` tokens."""

import math

import pytest
import torch

import model.engine as engine_mod
from model.engine import (
    CaptionEngine,
    Request,
    check_cache_keyword,
    kv_bytes_per_slot,
    slots_for_memory,
)
from model.generation import greedy_generate
from tests.model.conftest import eos_biased_lm_head, random_clips

QUESTIONS = [
    "Hi?",
    "Describe the video.",
    "What does the man in the red jacket do on the snowy trail?",
    "Why?",
    "Describe the background, characters and the actions in the provided video in detail.",
    "Who?",
]
CAPTIONS = [
    "A man walks.",
    "Two children play football on a green field at sunset.",
    "A dog.",
    "The camera pans over a city at night while cars pass below.",
]
MAX_LEN = 512


@pytest.fixture(scope="module")
def features(loaded_small):
    return loaded_small.model.encode_videos(random_clips(len(QUESTIONS), frames=3, seed=31))  # (6, 144, D)


def ids_of(loaded, prompt: str) -> list[int]:
    return loaded.tokenizer([prompt])["input_ids"][0]


def reference(loaded, request: Request) -> list[int]:
    """The batch-1 loop of generation.py on the same request."""
    ids = torch.tensor([list(request.prompt_ids)])
    feats = request.video_features[None] if request.video_features is not None else None
    (gen,) = greedy_generate(loaded, ids, torch.ones_like(ids), feats, max_new_tokens=request.max_new_tokens,
                             repetition_penalty=request.repetition_penalty, ignore_eos=request.ignore_eos)
    return gen.token_ids


def mixed_requests(loaded, features) -> list[Request]:
    """Visual English-style prompts and text-only translate-style prompts, lengths 3..20, some penalised."""
    template = loaded.template
    lengths = [3, 20, 7, 15, 11, 5, 18, 9, 13, 4]
    requests = []
    for i, q in enumerate(QUESTIONS):
        requests.append(Request(id=f"en{i}", prompt_ids=ids_of(loaded, template.format(q)),
                                video_features=features[i], max_new_tokens=lengths[i],
                                repetition_penalty=1.3 if i % 2 else None))
    for i, c in enumerate(CAPTIONS):
        prompt = template.format(template.default_translate_zh.format(caption=c), with_image=False)
        requests.append(Request(id=f"zh{i}", prompt_ids=torch.tensor(ids_of(loaded, prompt)),
                                max_new_tokens=lengths[len(QUESTIONS) + i],
                                repetition_penalty=1.5 if i % 2 == 0 else None))
    return requests


@pytest.fixture(scope="module")
def mixed(loaded_small, features):
    requests = mixed_requests(loaded_small, features)
    return requests, {r.id: reference(loaded_small, r) for r in requests}


@pytest.mark.parametrize("num_slots,sync_every", [(1, 1), (3, 4), (4, 2)])
def test_engine_matches_batch_of_one_exactly(loaded_small, mixed, num_slots, sync_every):
    requests, expected = mixed
    engine = CaptionEngine(loaded_small, num_slots=num_slots, max_len=MAX_LEN, sync_every=sync_every)
    done = {c.id: c for c in engine.generate(requests)}
    assert set(done) == set(expected)
    for rid, ids in expected.items():
        gen = done[rid].generation
        assert gen.token_ids == ids, rid
        assert gen.num_tokens == len(ids)
        text = loaded_small.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert gen.text == text.strip()
    assert len({tuple(ids) for ids in expected.values()}) > 3  # not one degenerate answer
    if num_slots < len(requests):  # admitted mid-flight while others decoded
        admitted = sorted({c.admitted_step for c in done.values()})
        assert len(admitted) > 1 and admitted[-1] > 0
    assert engine.stats.prefills == len(requests)


def test_one_slot_and_four_slots_agree(loaded_small, mixed):
    requests, _ = mixed
    one = {c.id: c.generation for c in CaptionEngine(loaded_small, 1, MAX_LEN).generate(requests)}
    four = {c.id: c.generation for c in CaptionEngine(loaded_small, 4, MAX_LEN).generate(requests)}
    assert one == four


def test_requests_stop_at_different_steps(loaded_small, features):
    """Per request, a stop id equal to the token the free-running batch-1 loop emits at step k_i (first
    occurrence), so requests stop at different steps; results must be the batch-1 prefix."""
    template = loaded_small.template
    requests, expected_len = [], {}
    for i, q in enumerate(QUESTIONS):
        free = Request(id=f"s{i}", prompt_ids=ids_of(loaded_small, template.format(q)),
                       video_features=features[i], max_new_tokens=16, ignore_eos=True)
        tokens = reference(loaded_small, free)
        # the first token whose first occurrence is at step >= 1 + 2*i (distinct stopping steps where possible)
        k = next((j for j in range(min(1 + 2 * i, 15), 16) if tokens.index(tokens[j]) == j), None)
        if k is None:
            k = len(tokens)  # never stops: runs to max_new_tokens
            stop = []
        else:
            stop = [tokens[k]]
        expected_len[free.id] = k
        requests.append(Request(id=free.id, prompt_ids=free.prompt_ids, video_features=free.video_features,
                                max_new_tokens=16, stop_ids=stop))
    engine = CaptionEngine(loaded_small, num_slots=2, max_len=MAX_LEN, sync_every=3)
    done = {c.id: c for c in engine.generate(requests)}
    stopped_lengths = set()
    for r in requests:
        gen = done[r.id].generation
        assert gen.num_tokens == expected_len[r.id], r.id
        if r.stop_ids:
            assert not gen.hit_max_new_tokens
            stopped_lengths.add(gen.num_tokens)
        # and exactly the batch-1 loop's ids under the same stop id
        free_tokens = reference(loaded_small, Request(r.id, r.prompt_ids, r.video_features, 16, ignore_eos=True))
        assert gen.token_ids == free_tokens[: gen.num_tokens]
    assert len(stopped_lengths) >= 3
    # a slot freed by an early stop is refilled while the other slot is still decoding
    assert len({c.finished_step for c in done.values()}) >= 3


def test_eos_stops_like_the_batch_one_loop(loaded_small, features):
    """An lm_head biased towards eos: every request stops at once with an empty caption, unless ignore_eos."""
    with eos_biased_lm_head(loaded_small):
        prompt = ids_of(loaded_small, loaded_small.template.format("Hi?"))
        requests = [Request(id=i, prompt_ids=prompt, video_features=features[i], max_new_tokens=6,
                            ignore_eos=i == 1) for i in range(3)]
        done = {c.id: c.generation for c in CaptionEngine(loaded_small, 2, MAX_LEN).generate(requests)}
        assert done[0].token_ids == [] and not done[0].hit_max_new_tokens and done[0].text == ""
        assert done[1].num_tokens == 6 and done[1].hit_max_new_tokens
        assert done[1].token_ids == reference(loaded_small, requests[1])


def test_full_pooling_request_matches(loaded):
    """The released 2304-token visual span, one visual and one text request sharing the engine."""
    feats = loaded.model.encode_videos(random_clips(1, frames=2, seed=32))
    requests = [
        Request("v", ids_of(loaded, loaded.template.format(QUESTIONS[2])), feats[0], max_new_tokens=6),
        Request("t", ids_of(loaded, loaded.template.format("Say hi.", with_image=False)), None, max_new_tokens=9),
    ]
    done = {c.id: c.generation.token_ids for c in CaptionEngine(loaded, 2, 2600).generate(requests)}
    assert done == {r.id: reference(loaded, r) for r in requests}


def test_kv_cache_is_allocated_once(loaded_small, mixed):
    requests, _ = mixed
    engine = CaptionEngine(loaded_small, num_slots=3, max_len=MAX_LEN, sync_every=2)
    ptrs, nbytes = engine.cache.data_ptrs(), engine.cache.nbytes
    cfg = loaded_small.model.language_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert nbytes == 3 * kv_bytes_per_slot(loaded_small, MAX_LEN)
    per_step = 3 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # one position per row
    for r in requests:
        engine.submit(r)
    seen_steps = 0
    while engine.busy:
        before = engine.stats.kv_bytes_decode
        engine.step()
        if engine.stats.steps > seen_steps:
            seen_steps = engine.stats.steps
            assert engine.stats.kv_bytes_decode - before == per_step  # never a copy of the whole cache
        assert engine.cache.data_ptrs() == ptrs
        assert all(layer.keys.shape == (3, cfg.num_key_value_heads, MAX_LEN, head_dim)
                   for layer in engine.cache.layers)
    engine.flush()
    assert engine.stats.kv_bytes_per_decode_step == per_step
    assert engine.stats.kv_bytes_prefill == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * \
        engine.stats.prefill_tokens


def test_engine_refuses_a_transformers_whose_forward_takes_no_cache_keyword(loaded_small, monkeypatch):
    import model.generation as generation

    assert check_cache_keyword(loaded_small.model) in ("cache", "past_key_values")  # the installed one's
    monkeypatch.setattr(generation, "CACHE_KEYWORDS", ("past_kv",))
    generation._forward_keyword.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"LlamaForCausalLM.forward takes none of past_kv"):
            CaptionEngine(loaded_small, 2, MAX_LEN)
    finally:
        generation._forward_keyword.cache_clear()


def test_a_forward_that_skips_the_cache_raises(loaded_small, features, monkeypatch):
    """Even past the signature check, a forward that does not write our cache (the keyword swallowed by
    **kwargs, the model building its own DynamicCache) must raise, not decode silently without a cache."""
    monkeypatch.setattr(engine_mod, "check_cache_keyword", lambda model: "past_kv")
    engine = CaptionEngine(loaded_small, 2, MAX_LEN)
    engine.submit(Request("x", ids_of(loaded_small, loaded_small.template.format("Hi?")), features[0], 4))
    with pytest.raises(RuntimeError, match="did not write the engine's KV cache"):
        engine.step()


def test_utilisation_stats_add_up(loaded_small, mixed):
    requests, _ = mixed
    engine = CaptionEngine(loaded_small, num_slots=4, max_len=MAX_LEN, sync_every=4)
    for r in requests:
        engine.submit(r)
    done = engine.run_until_idle()
    s = engine.stats
    assert len(done) == len(requests) == s.completed
    gens = [c.generation for c in done]
    assert s.useful_tokens == sum(g.num_tokens for g in gens) + sum(not g.hit_max_new_tokens for g in gens)
    assert s.slot_steps == s.steps * 4 == s.useful_tokens + s.wasted_slot_steps + s.idle_slot_steps
    assert s.wasted_slot_steps > 0  # finished slots wait for the next sync
    assert 0 < s.utilisation < 1 and s.utilisation == s.useful_tokens / s.slot_steps
    assert s.full_steps > 0 and 0 < s.steady_utilisation <= 1
    assert s.syncs <= math.ceil(s.steps / 4) + 1
    assert s.prefills == len(requests)


def test_slot_is_reused_on_the_next_step(loaded_small, features):
    prompt = ids_of(loaded_small, loaded_small.template.format("Hi?"))
    engine = CaptionEngine(loaded_small, num_slots=1, max_len=MAX_LEN, sync_every=1)
    done = list(engine.generate([Request(i, prompt, features[i], max_new_tokens=3 + i) for i in range(3)]))
    assert [c.id for c in done] == [0, 1, 2]
    assert [(c.admitted_step, c.finished_step) for c in done] == [(0, 2), (3, 6), (7, 11)]
    assert engine.stats.wasted_slot_steps == 0 and engine.stats.utilisation == 1.0


def test_submit_validates(loaded_small, features):
    engine = CaptionEngine(loaded_small, 1, MAX_LEN)
    text = ids_of(loaded_small, loaded_small.template.format("Hi?", with_image=False))
    visual = ids_of(loaded_small, loaded_small.template.format("Hi?"))
    with pytest.raises(ValueError, match="must not contain <image>"):
        engine.submit(Request("a", visual, None, 4))
    with pytest.raises(ValueError, match="one <image>"):
        engine.submit(Request("b", text, features[0], 4))
    with pytest.raises(ValueError, match="> max_len 512"):
        engine.submit(Request("c", visual, features[0], 200))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(Request("d", text, None, 0))


def test_slots_for_memory(loaded_small):
    per_slot = kv_bytes_per_slot(loaded_small, 1024)
    cfg = loaded_small.model.language_model.config
    assert per_slot == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // 4) * 1024 * 4
    many = slots_for_memory(loaded_small, 1024, free_bytes=2**30)
    assert many > 100
    assert slots_for_memory(loaded_small, 1024, free_bytes=2**30, cap=8) == 8
    assert slots_for_memory(loaded_small, 1024, free_bytes=2 * 2**30) > many
    with pytest.raises(RuntimeError, match="not even one slot fits"):
        slots_for_memory(loaded_small, 1024, free_bytes=per_slot)


def test_cuda_graphs_option_is_ignored_on_cpu(loaded_small, mixed):
    requests, expected = mixed
    engine = CaptionEngine(loaded_small, 4, MAX_LEN, use_cuda_graphs=True)
    assert not engine.cuda_graphs and engine._compiled_decode is None
    assert {c.id: c.generation.token_ids for c in engine.generate(requests[:4])} == {
        r.id: expected[r.id] for r in requests[:4]
    }


def test_benchmark_quick_runs():
    from benchmarks.engine import main

    result = main(["--quick"])
    assert result["identical_en_captions"] == result["clips"] == 4
    assert result["kv_bytes_per_decode_step"]["engine"] < result["kv_bytes_per_decode_step"]["static"]
    assert 0 < result["utilisation"]["engine"] <= 1
