"""The dataset card's frame facts come from the checkpoint's description."""

from __future__ import annotations

from collections import Counter

from model.describe import describe_checkpoint
from pipeline.dataset_card import frames_lines, render_card

RELEASED = [
    "- Frames: 16 per clip, the middle frame of 16 equal segments (PLLaVA's sampling), resized to 336",
    "  on the short side and center-cropped; visual tokens pooled to 16×12×12.",
]


def test_released_checkpoints_read_as_before(tmp_path):
    from model.tiny import build_tiny_checkpoint

    assert frames_lines(None) == RELEASED
    assert frames_lines(describe_checkpoint(build_tiny_checkpoint(tmp_path / "ckpt"))) == RELEASED


def test_other_frames_and_normalisation_are_written(tmp_path):
    from model.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", num_frames=8, image_mean=(0.5, 0.5, 0.5),
                                 image_std=(0.25, 0.25, 0.25))
    job = {"manifest": {"model": {"path": str(ckpt)}}, "fingerprint_parts": {}}
    card = render_card(job, Counter(), Counter(), 0, {"en": "Describe."}, describe_checkpoint(ckpt))
    assert "- Frames: 8 per clip, the middle frame of 8 equal segments" in card
    assert "visual tokens pooled to 8×12×12." in card
    assert "- Pixel normalisation: mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25] (the checkpoint's)" in card
