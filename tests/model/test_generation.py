import dataclasses

import pytest
import torch

from model.generation import generate_captions, generate_text, stop_token_ids
from tests.model.conftest import eos_biased_lm_head, random_clips

QUESTIONS = [
    "Hi?",
    "Describe the video.",
    "What does the man in the red jacket do on the snowy trail?",
    "Why?",
]


@pytest.fixture(scope="module")
def clips_features(loaded_small):
    return loaded_small.model.encode_videos(random_clips(4, frames=3, seed=21))  # (4, 144, D)


def test_batch_of_one_and_batch_of_n_give_the_same_tokens(loaded_small, clips_features):
    prompts = [loaded_small.template.format(q) for q in QUESTIONS]
    batched = generate_captions(loaded_small, prompts, clips_features, max_new_tokens=24)
    for i, prompt in enumerate(prompts):
        single = generate_captions(loaded_small, [prompt], clips_features[i : i + 1], max_new_tokens=24)
        assert single[0].token_ids == batched[i].token_ids
        assert single[0].text == batched[i].text
    assert len({tuple(g.token_ids) for g in batched}) > 1  # not one degenerate answer for every row


def test_full_pooling_batch_matches_single_rows(loaded):
    """The released 2304-token pooling, 3 clips, prompts of different lengths."""
    feats = loaded.model.encode_videos(random_clips(3, frames=2, seed=22))
    prompts = [loaded.template.format(q) for q in QUESTIONS[:3]]
    batched = generate_captions(loaded, prompts, feats, max_new_tokens=8)
    for i, prompt in enumerate(prompts):
        assert (
            generate_captions(loaded, [prompt], feats[i : i + 1], max_new_tokens=8)[0].token_ids
            == batched[i].token_ids
        )


@torch.inference_mode()
def test_cached_generation_equals_no_cache_argmax(loaded_small, clips_features):
    prompts = [loaded_small.template.format(q) for q in QUESTIONS[:2]]
    gens = generate_captions(loaded_small, prompts, clips_features[:2], max_new_tokens=12, ignore_eos=True)
    tok = loaded_small.tokenizer
    for i, gen in enumerate(gens):
        enc = tok([prompts[i]], return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([gen.token_ids])], dim=1)
        logits, _ = loaded_small.model(ids, torch.ones_like(ids), video_features=clips_features[i : i + 1])
        steps = logits[0, -len(gen.token_ids) - 1 : -1]  # logits that predicted each generated token
        assert steps.argmax(-1).tolist() == gen.token_ids


def test_ignore_eos_forces_max_new_tokens_and_eos_stops_otherwise(loaded_small, clips_features):
    """An lm_head biased towards eos: without ignore_eos the caption is empty, with it exactly N tokens."""
    with eos_biased_lm_head(loaded_small):
        prompts = [loaded_small.template.format(q) for q in QUESTIONS[:2]]
        stopped = generate_captions(loaded_small, prompts, clips_features[:2], max_new_tokens=10)
        assert all(g.token_ids == [] and g.num_tokens == 0 and not g.hit_max_new_tokens for g in stopped)
        assert all(g.text == "" for g in stopped)
        forced = generate_captions(
            loaded_small, prompts, clips_features[:2], max_new_tokens=10, ignore_eos=True
        )
        assert all(g.num_tokens == 10 == len(g.token_ids) and g.hit_max_new_tokens for g in forced)


def test_rows_stop_independently_and_counts_exclude_pads_and_eos(loaded_small, clips_features):
    """Make one prompt's natural 3rd token the stop token: that row ends, the other rows go on untouched."""
    prompts = [loaded_small.template.format(q) for q in QUESTIONS]
    free = generate_captions(loaded_small, prompts, clips_features, max_new_tokens=16, ignore_eos=True)
    target = free[0].token_ids[2]
    other = [g for g in free[1:] if target not in g.token_ids]
    assert other, "pick another seed: every row uses the target token"
    stop_template = dataclasses.replace(
        loaded_small.template, stop_tokens=(loaded_small.tokenizer.convert_ids_to_tokens(target),)
    )
    variant = dataclasses.replace(loaded_small, template=stop_template)
    gens = generate_captions(variant, prompts, clips_features, max_new_tokens=16)
    first = free[0].token_ids.index(target)
    assert gens[0].token_ids == free[0].token_ids[:first] and gens[0].num_tokens == first
    assert not gens[0].hit_max_new_tokens
    for g, f in zip(gens[1:], free[1:]):
        if target not in f.token_ids:
            assert g.token_ids == f.token_ids and g.hit_max_new_tokens and g.num_tokens == 16


def test_repetition_penalty_discourages_seen_tokens(loaded_small, clips_features):
    prompt = [loaded_small.template.format("Hi?")]
    plain = generate_captions(loaded_small, prompt, clips_features[:1], max_new_tokens=16, ignore_eos=True)[0]
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # the tiny model repeats itself
    penalised = generate_captions(
        loaded_small, prompt, clips_features[:1], max_new_tokens=16, ignore_eos=True, repetition_penalty=1e6
    )[0]
    assert len(set(penalised.token_ids)) == len(penalised.token_ids)


def test_text_only_generation(loaded_small):
    template = loaded_small.template
    prompts = [
        template.format(template.default_translate_zh.format(caption=c), with_image=False)
        for c in ["A man walks.", "Two children play football on a green field at sunset."]
    ]
    gens = generate_text(loaded_small, prompts, max_new_tokens=6)
    singles = [generate_text(loaded_small, [p], max_new_tokens=6)[0] for p in prompts]
    assert [g.token_ids for g in gens] == [g.token_ids for g in singles]
    assert all(g.num_tokens == len(g.token_ids) <= 6 for g in gens)
    with pytest.raises(ValueError, match="<image>"):
        generate_text(loaded_small, [template.format()], max_new_tokens=2)


def test_prompt_and_clip_counts_must_match(loaded_small, clips_features):
    with pytest.raises(ValueError, match="3 prompts for 4 clips"):
        generate_captions(
            loaded_small, [loaded_small.template.format()] * 3, clips_features, max_new_tokens=2
        )


def test_stop_tokens_include_eos_and_the_template_end_of_turn(loaded_small, tiny_chatml_dir):
    from model.loading import load_pllava

    assert stop_token_ids(loaded_small) == [loaded_small.tokenizer.eos_token_id]
    chatml = load_pllava(tiny_chatml_dir)
    assert chatml.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(chatml)


def test_the_cache_goes_in_under_the_installed_keyword_and_a_swallowed_one_raises(loaded_small, monkeypatch):
    """transformers 5.24's Llama forward takes `cache=`, up to 5.20 `past_key_values=`; an unknown keyword is
    swallowed by **kwargs and the model decodes with a throwaway cache of its own (fast and wrong): the loop
    passes the keyword the installed forward takes, and refuses a forward that did not write the cache."""
    import inspect

    import model.generation as generation

    lm = loaded_small.model.language_model
    assert generation.cache_keyword(lm) in inspect.signature(type(lm).forward).parameters
    prompt = loaded_small.template.format("Hi?", with_image=False)
    monkeypatch.setattr(generation, "cache_keyword", lambda lm: "past_kv")
    with pytest.raises(RuntimeError, match="did not take the cache argument"):
        generate_text(loaded_small, [prompt], max_new_tokens=3)
