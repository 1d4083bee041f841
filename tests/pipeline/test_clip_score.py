"""`score.model`: each captioned row's `clip_score`, the cosine of CLIP's embedding of caption_en (cut at 77
tokens) and the mean embedding of a few of the clip's frames, with a tiny random CLIP written by our own
builder in the Hugging Face layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.clip_score import ClipScorer
from model.describe import CheckpointError, describe_score_model, evenly_spaced
from model.tiny_clip import build_tiny_clip
from pipeline.captioning import Captioner
from pipeline.dataset_card import render_card
from pipeline.manifest import ManifestError
from pipeline.scheduler import CaptionService
from tests.pipeline.test_captioning import make_manifest
from tests.pipeline.test_scheduler import art  # noqa: F401  (fixture: tiny checkpoint, shards, decoded clips)

CLIP_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip-tiny", seed=0)


def test_the_builder_writes_the_hugging_face_layout_byte_for_byte(tiny_clip, tmp_path):
    assert {p.name for p in tiny_clip.iterdir()} == CLIP_FILES
    again = build_tiny_clip(tmp_path / "again", seed=0)
    assert all((tiny_clip / n).read_bytes() == (again / n).read_bytes() for n in CLIP_FILES)
    config = json.loads((tiny_clip / "config.json").read_text())
    assert config["model_type"] == "clip" and config["text_config"]["max_position_embeddings"] == 77
    info = describe_score_model(tiny_clip)
    assert (info.name, info.image_size, info.max_text_tokens) == ("clip-tiny", 224, 77)


def test_the_score_is_clip_s_own_cosine(tiny_clip):
    """With one frame at CLIP's input size, the score is HF CLIPModel's logits_per_text / logit_scale."""
    scorer = ClipScorer(tiny_clip, frames=1)
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224, 3), dtype=np.uint8))
    texts = ["a man walks a dog along the beach", "a red car"]
    ours = scorer.score(texts, scorer.embed_clips(frames))
    middle = frames[:, 1].permute(0, 3, 1, 2).float() / 255  # frame_positions(3, 1) == [1]
    pixels = (middle - torch.tensor(scorer.info.image_mean).view(1, 3, 1, 1)) / torch.tensor(
        scorer.info.image_std).view(1, 3, 1, 1)
    enc = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels)
    cosine = out.logits_per_text / scorer.model.logit_scale.exp()
    assert ours == pytest.approx([cosine[0, 0].item(), cosine[1, 1].item()], abs=1e-5)
    assert all(-1 <= s <= 1 for s in ours)


def test_frames_are_averaged_and_text_is_cut_at_77_tokens(tiny_clip):
    scorer = ClipScorer(tiny_clip, frames=4)
    assert evenly_spaced(16, 4) == [0, 5, 10, 15] and evenly_spaced(16, 1) == [8] and evenly_spaced(3, 4) == [0, 1, 2]
    rng = np.random.default_rng(1)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 16, 336, 336, 3), dtype=np.uint8))  # resized to 224
    images = scorer.embed_clips(frames)
    per_frame = F.normalize(scorer.embed_clips(frames[:1, [0, 5, 10, 15]].reshape(4, 1, 336, 336, 3)), dim=-1)
    assert torch.allclose(images[0], F.normalize(per_frame.mean(0), dim=0), atol=1e-5)
    words = list("amanwalkshisdogalongabeachatsunsetwhilewavesrollin") * 4  # one-letter words: a token each
    caption = " ".join(words)
    assert len(scorer.tokenizer(caption)["input_ids"]) > 77
    cut = " ".join(words[:75])  # start + 75 + end = CLIP's 77
    assert scorer.score([caption], images[:1]) == pytest.approx(scorer.score([cut], images[:1]), abs=1e-6)
    assert scorer.score([" ".join(words[:40])], images[:1]) != pytest.approx(scorer.score([caption], images[:1]),
                                                                           abs=1e-6)
    assert scorer.score([caption], images[1:]) != pytest.approx(scorer.score([caption], images[:1]), abs=1e-6)


def test_bad_score_models_are_named(tiny_clip, art, tmp_path):  # noqa: F811
    _, ckpt, *_ = art
    with pytest.raises(CheckpointError, match="is not a directory"):
        describe_score_model(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        describe_score_model(ckpt)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in CLIP_FILES - {"model.safetensors"}:
        (pickled / name).write_bytes((tiny_clip / name).read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="score.allow_pickle"):
        describe_score_model(pickled)
    assert describe_score_model(pickled, allow_pickle=True).name == "pickled"
    (pickled / "tokenizer.json").unlink()
    (pickled / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        describe_score_model(pickled, allow_pickle=True)


def test_rows_get_a_clip_score_on_both_paths_and_none_when_off(tiny_clip, art, tmp_path):  # noqa: F811
    root, ckpt, mt, _, items = art
    with pytest.raises(ManifestError, match="score.frames"):
        make_manifest(root, ckpt, mt, tmp_path / "out", score={"model": str(tiny_clip), "frames": 0})
    m = make_manifest(root, ckpt, mt, tmp_path / "out", score={"model": str(tiny_clip), "frames": 4},
                      generation={"max_new_tokens": 12})
    captioner = Captioner.from_manifest(m)
    service = CaptionService(captioner, num_slots=3, threaded=False)
    rows = {r["key"]: r for r in service.caption_all(items)}
    static = {r["key"]: r for r in captioner.caption_batch(items)}
    plain = {r["key"]: r for r in Captioner.from_manifest(m.replace(score=type(m.score)())).caption_batch(items)}
    scorer = captioner.scorer
    frames = torch.from_numpy(np.stack([clip.frames for _, clip in items]))
    expected = scorer.score([rows[s.key]["caption_en"] or "-" for s, _ in items], scorer.embed_clips(frames))
    scored = 0
    for (sample, _), want in zip(items, expected):
        row = rows[sample.key]
        assert {k: v for k, v in row.items() if k != "clip_score"} == {
            k: v for k, v in plain[sample.key].items() if k != "clip_score"}  # a score changes no caption
        assert plain[sample.key]["clip_score"] is None
        if row["caption_en"].strip():
            scored += 1
            assert row["clip_score"] == pytest.approx(want, abs=1e-5)
            assert static[sample.key]["clip_score"] == pytest.approx(want, abs=1e-5)
        else:
            assert row["clip_score"] is None  # nothing to score
    assert scored >= 2 and captioner.stats.seconds_score > 0


def test_the_dataset_card_names_the_score_model(tiny_clip):
    job = {"manifest": {"model": {"path": "m"}, "languages": ["en"]}}
    from collections import Counter

    text = render_card(job, Counter(ok=2), Counter(), 1, {}, score=describe_score_model(tiny_clip), score_frames=4)
    assert "`clip_score` is the cosine of the CLIP `clip-tiny` embeddings" in text and "first 77 tokens" in text
    assert "clip_score` is" not in render_card(job, Counter(ok=2), Counter(), 1, {})


def test_a_failing_scorer_costs_no_caption(tiny_clip, art, tmp_path, caplog):  # noqa: F811
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out", score={"model": str(tiny_clip)},
                      generation={"max_new_tokens": 8})
    captioner = Captioner.from_manifest(m)
    captioner.scorer.model = None  # fault injection: every score fails
    rows = CaptionService(captioner, num_slots=2, threaded=False).caption_all(items)
    assert len(rows) == len(items) and all(r["status"] in ("ok", "flagged") for r in rows)
    assert all(r["clip_score"] is None for r in rows)
    assert "clip scoring of" in caplog.text and "their clip_score is null" in caplog.text
