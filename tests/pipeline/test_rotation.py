"""Frames as displayed (issue 22): rotated clips reach the model upright and unstretched, the row holds the
displayed size, and a clip in a codec decord cannot decode is a readable decode_error.

decord 0.6.0 (its own FFmpeg 4.1) turns the picture itself for a clockwise rotation of 90, 180 or 270 found
in the stream's ``rotate`` tag or display matrix, then scales it to the size it is asked for; the probe
(PyAV, FFmpeg 8) must find the same rotation so that the size asked is the displayed one. The references
here are PyAV's coded frames turned with numpy: they do not depend on what decord does.
"""

from __future__ import annotations

import io
import math
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.frames import (
    DecodedClip,
    DecodeFailure,
    decode_clip,
    decord_reason,
    display_rotation,
    probe_video,
    resized_size,
    sample_frame_indices,
)
from pipeline.synthetic import encode_clip

CODED = (96, 54)  # coded width x height: landscape, so a turn by 90° changes the aspect ratio
N_FRAMES = 10
ROTATIONS = (90, 180, 270)


def rotated_clip(rotation: int, rotate_tag: bool = False) -> bytes:
    return encode_clip(*CODED, N_FRAMES, Fraction(25), pattern_seed=5, rotation=rotation, rotate_tag=rotate_tag)


def displayed_frames(mp4: bytes, rotation: int) -> np.ndarray:
    """(N, H, W, 3) uint8: every frame decoded by PyAV as coded, then turned ``rotation`` degrees clockwise."""
    with av.open(io.BytesIO(mp4)) as container:
        coded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return np.ascontiguousarray(np.rot90(coded, k=-(rotation // 90), axes=(1, 2)))


def model_view(frames: np.ndarray, size: int = 336) -> np.ndarray:
    """PLLaVA's resize (shortest side ``size``, bicubic) and center crop, done with torch: (N, size, size, 3)
    float in 0..255."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    new_w, new_h = resized_size(x.shape[-1], x.shape[-2], size)
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True).clamp(0, 255)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size].permute(0, 2, 3, 1).numpy()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# Different resamplers (swscale in decord, torch here), same geometry: ~1 level apart; a wrong turn or a
# stretch is tens of levels.
SAME_PICTURE = 4.0


# ----------------------------------------------------------------------------------------------- clips


@pytest.mark.parametrize("rotation", ROTATIONS)
def test_encode_clip_writes_the_rotation_ffmpeg_reads(rotation: int) -> None:
    with av.open(io.BytesIO(rotated_clip(rotation))) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height) == CODED
        assert frame.rotation % 360 == -rotation % 360  # PyAV reports counter-clockwise degrees
    with av.open(io.BytesIO(rotated_clip(rotation, rotate_tag=True))) as container:
        assert {k.lower(): v for k, v in container.streams.video[0].metadata.items()}["rotate"] == str(rotation)


def matrix(clockwise: float, scale: float = 1.0) -> bytes:
    """FFmpeg's display matrix (16.16 fixed point) of a clockwise turn, as av_display_rotation_set writes it."""
    c, s = math.cos(math.radians(clockwise)) * scale, math.sin(math.radians(clockwise)) * scale
    return struct.pack("=9i", round(c * 65536), round(s * 65536), 0, round(-s * 65536), round(c * 65536), 0,
                       0, 0, 1 << 30)


def test_display_rotation_follows_decords_rule() -> None:
    assert display_rotation(None, None) == 0
    assert [display_rotation(None, matrix(a)) for a in (0, 90, 180, 270, -90)] == [0, 90, 180, 270, 270]
    assert display_rotation(None, matrix(89.9999)) == 90  # FFmpeg 4 printed the angle with %g: "90"
    assert display_rotation(None, matrix(90, scale=2.5)) == 90
    assert display_rotation(None, matrix(45)) == 0  # decord only turns by quarter turns
    assert display_rotation(None, bytes(36)) == 0  # a degenerate matrix: no angle
    assert display_rotation(None, b"\x00" * 8) == 0
    assert [display_rotation(t, None) for t in ("90", "-90", "450", "180.0", "0", "x", "nan", "inf")] == [
        90, 270, 90, 180, 0, 0, 0, 0]
    assert display_rotation("270", matrix(90)) == 270  # the tag wins, as in decord
    assert display_rotation("0", matrix(90)) == display_rotation("x", matrix(90)) == 90


# ----------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("rotate_tag", [False, True], ids=["display-matrix", "rotate-tag"])
@pytest.mark.parametrize("rotation", ROTATIONS)
def test_rotated_clips_are_decoded_as_displayed(rotation: int, rotate_tag: bool) -> None:
    mp4 = rotated_clip(rotation, rotate_tag)
    clip = decode_clip(mp4)
    assert isinstance(clip, DecodedClip), clip
    displayed = CODED[::-1] if rotation in (90, 270) else CODED
    assert (clip.width, clip.height) == displayed
    probe = probe_video(mp4)
    assert not isinstance(probe, DecodeFailure) and (probe.rotation, probe.codec) == (rotation, "h264")
    sampled = sample_frame_indices(N_FRAMES)
    assert clip.frame_indices == sampled and clip.frames.shape == (16, 336, 336, 3)
    # The reference for every candidate turn: only the right one matches; a stretch matches none.
    diffs = {turn: mean_abs_diff(clip.frames, model_view(displayed_frames(mp4, turn)[sampled]))
             for turn in (0, 90, 180, 270)}
    assert diffs[rotation] < SAME_PICTURE, diffs
    assert all(d > 3 * SAME_PICTURE for turn, d in diffs.items() if turn != rotation), diffs


def test_a_clip_decord_cannot_decode_has_a_readable_reason() -> None:
    if "libsvtav1" not in av.codecs_available:
        pytest.fail("PyAV's wheel is expected to ship the libsvtav1 encoder (av==18.1.0 does)")
    mp4 = encode_clip(*CODED, N_FRAMES, Fraction(25), codec="libsvtav1")
    probe = probe_video(mp4)
    assert not isinstance(probe, DecodeFailure) and probe.codec == "av1"  # PyAV (dav1d) reads it: decord cannot
    result = decode_clip(mp4)
    assert isinstance(result, DecodeFailure), result
    assert result.reason == "unsupported codec av1: decord has no decoder for it"
    assert result.kind == "decode: unsupported codec av1"


def test_decord_errors_lose_their_location_and_compared_values() -> None:
    raw = ("[23:09:26] /github/workspace/src/video/video_reader.cc:151: Check failed: st_nb >= 0 (-1128613112 vs. 0)"
           " ERROR cannot find video stream with wanted index: -1\n\nStack trace:\n  [bt] (0) libdecord.so")
    assert decord_reason(RuntimeError(raw)) == (
        "Check failed: st_nb >= 0 ERROR cannot find video stream with wanted index: -1")
    assert decord_reason(RuntimeError("Error: av_read_frame failed with -5")) == "Error: av_read_frame failed with -5"
    assert decord_reason(RuntimeError("")) == "RuntimeError"


# ----------------------------------------------------------------------------------------------- rows


def test_rows_hold_the_displayed_size_and_the_codec_reason(tmp_path: Path) -> None:
    """run_shard with the tiny model and decoder processes over rotated clips and an AV1 clip."""
    from model.tiny import build_tiny_checkpoint
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.manifest import manifest_from_dict
    from pipeline.shard_runner import ShardSettings, run_shard
    from pipeline.writing import OutputStore
    from tests.pipeline.test_hostile import meta, shard, tar_member

    clips = {f"000000{i}_00000": rotated_clip(rotation) for i, rotation in enumerate((0, *ROTATIONS))}
    clips["0000004_00000"] = encode_clip(*CODED, N_FRAMES, Fraction(25), codec="libsvtav1")
    parts = [p for key, mp4 in clips.items() for p in (tar_member(f"{key}.json", meta(key)),
                                                         tar_member(f"{key}.mp4", mp4))]
    url = shard(tmp_path, parts, name="rotated.tar")
    ckpt = build_tiny_checkpoint(tmp_path / "pllava", seed=0)
    m = manifest_from_dict({
        "shards": url, "output": str(tmp_path / "out"), "languages": ["en"],
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": 3, "batch_size": 4},
    })
    with DecodePool(workers=1, max_ahead=4, mode="process", timeout_s=60) as pool:
        run_shard(url, "rotated", store=OutputStore(m.output), captioner=Captioner.from_manifest(m),
                  decode_pool=pool, attempt=1, file_metadata={}, settings=ShardSettings.from_manifest(m))
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "data" / "rotated.parquet").to_pylist()}
    assert {k: (r["width"], r["height"]) for k, r in rows.items() if k != "0000004_00000"} == {
        "0000000_00000": (96, 54), "0000001_00000": (54, 96), "0000002_00000": (96, 54),
        "0000003_00000": (54, 96)}
    av1 = rows["0000004_00000"]
    assert (av1["status"], av1["error"]) == ("decode_error", "unsupported codec av1: decord has no decoder for it")
