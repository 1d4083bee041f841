import pytest
import torch
import torch.nn.functional as F

from model.pllava import position_ids_from_mask, repeat_frame_indices
from tests.model.conftest import random_clips, with_pooling


def test_released_pooling_gives_2304_tokens_per_clip(loaded):
    feats = loaded.model.encode_videos(random_clips(2, seed=1))
    assert feats.shape == (2, 16 * 12 * 12, loaded.config.hidden_size) == (2, 2304, 64)


@pytest.mark.parametrize("shape", [(4, 6, 6), (8, 12, 12), (16, 24, 24), (1, 1, 1)])
def test_other_pooling_shapes(loaded, shape):
    variant = with_pooling(loaded, shape)
    assert variant.model.encode_videos(random_clips(1, seed=2)).shape == (
        1,
        shape[0] * shape[1] * shape[2],
        64,
    )


@torch.inference_mode()
def test_pooling_averages_2x2_patches_of_each_frame_in_frame_major_order(loaded):
    """(16, 12, 12) from 16 x 24 x 24: token (t, i, j) is the mean of the projected patches
    (t, 2i..2i+1, 2j..2j+1) of CLIP layer -2 without CLS."""
    model = loaded.model
    clips = random_clips(1, seed=3)
    hidden = model.vision_tower.vision_model(clips[0], output_hidden_states=True).hidden_states[-2][:, 1:]
    projected = model.multi_modal_projector(hidden).view(16, 24, 24, -1)  # (T, 24, 24, D)
    expected = projected.view(16, 12, 2, 12, 2, -1).mean(dim=(2, 4)).reshape(16 * 144, -1)
    torch.testing.assert_close(model.encode_videos(clips)[0], expected, atol=1e-5, rtol=1e-5)


def test_repeat_frame_indices_keep_order_and_use_every_frame():
    for real in range(1, 17):
        idx = repeat_frame_indices(real, 16)
        assert len(idx) == 16 and idx[0] == 0 and idx[-1] == real - 1
        assert torch.all(idx[1:] >= idx[:-1]) and set(idx.tolist()) == set(range(real))


@torch.inference_mode()
@pytest.mark.parametrize("real", [1, 5, 15])
def test_fewer_frames_are_padded_by_repetition(loaded_small, real):
    clips = random_clips(2, frames=real, seed=4)
    explicit = clips[:, repeat_frame_indices(real, 16)]  # (B, 16, 3, H, W)
    model = loaded_small.model
    torch.testing.assert_close(
        model.encode_videos(clips), model.encode_videos(explicit), atol=1e-5, rtol=1e-5
    )


def test_frame_count_is_checked(loaded_small):
    with pytest.raises(ValueError, match="1..16 frames"):
        loaded_small.model.encode_videos(random_clips(1, frames=17))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        loaded_small.model.encode_videos(torch.zeros(16, 3, 336, 336))


def _batch(loaded, questions):
    prompts = [loaded.template.format(q) for q in questions]
    enc = loaded.tokenizer(prompts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


QUESTIONS = [
    "Hi?",
    "Describe the video.",
    "What does the man in the red jacket do on the snowy mountain trail?",
]


@torch.inference_mode()
def test_merge_puts_visual_tokens_at_the_image_slot(loaded_small):
    model = loaded_small.model
    ids, mask = _batch(loaded_small, QUESTIONS)
    feats = model.encode_videos(random_clips(3, frames=2, seed=5))  # (3, 144, D)
    embeds, merged_mask, pos = model.merge_visual_tokens(ids, mask, feats)
    n = feats.shape[1]
    assert embeds.shape == (3, ids.shape[1] - 1 + n, 64)
    text = model.embed_tokens(ids)
    for row in range(3):
        slot = int((ids[row] == loaded_small.config.image_token_index).nonzero())
        torch.testing.assert_close(embeds[row, slot : slot + n], feats[row])
        torch.testing.assert_close(embeds[row, :slot], text[row, :slot])
        torch.testing.assert_close(embeds[row, slot + n :], text[row, slot + 1 :])
        pads = int((mask[row] == 0).sum())
        assert merged_mask[row, :pads].sum() == 0 and merged_mask[row, pads:].all()  # pads stay in front
        assert pos[row, pads:].tolist() == list(range(ids.shape[1] - pads - 1 + n))


@torch.inference_mode()
def test_left_padded_batch_equals_single_rows(loaded_small):
    model = loaded_small.model
    clips = random_clips(3, frames=2, seed=6)
    ids, mask = _batch(loaded_small, QUESTIONS)
    assert mask[0].sum() < mask[2].sum()  # the prompts really have different lengths
    batch_logits, batch_mask = model(ids, mask, pixel_values=clips)
    for row, question in enumerate(QUESTIONS):
        one_ids, one_mask = _batch(loaded_small, [question])
        single, _ = model(one_ids, one_mask, pixel_values=clips[row : row + 1])
        length = single.shape[1]
        assert batch_mask[row, -length:].all() and batch_mask[row, :-length].sum() == 0
        torch.testing.assert_close(batch_logits[row, -length:], single[0], atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_slot_found_by_token_id_even_if_pad_embedding_is_zero(loaded_small):
    """The reference found image slots by all-zero embeddings; a zero pad embedding broke left padding."""
    model = loaded_small.model
    emb = model.language_model.get_input_embeddings().weight
    pad = loaded_small.tokenizer.pad_token_id
    saved = emb[pad].clone()
    emb[pad] = 0
    try:
        test_left_padded_batch_equals_single_rows(loaded_small)
    finally:
        emb[pad] = saved


@torch.inference_mode()
def test_precomputed_features_equal_pixel_forward(loaded_small):
    model = loaded_small.model
    clips = random_clips(2, frames=3, seed=7)
    ids, mask = _batch(loaded_small, QUESTIONS[:2])
    from_pixels, _ = model(ids, mask, pixel_values=clips)
    from_features, _ = model(ids, mask, video_features=model.encode_videos(clips))
    torch.testing.assert_close(from_pixels, from_features)


def test_each_prompt_needs_exactly_one_image_token(loaded_small):
    model = loaded_small.model
    feats = torch.zeros(1, 144, 64)
    tok = loaded_small.tokenizer
    for text in ["no image here", "<image> twice <image>"]:
        enc = tok([text], return_tensors="pt")
        with pytest.raises(ValueError, match="exactly one <image>"):
            model.merge_visual_tokens(enc["input_ids"], enc["attention_mask"], feats)


def test_position_ids_count_real_tokens_from_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_projector_is_linear_gelu_linear(loaded):
    proj = loaded.model.multi_modal_projector
    x = torch.randn(3, 32)
    expected = proj.linear_2(F.gelu(proj.linear_1(x)))
    torch.testing.assert_close(proj(x), expected)
