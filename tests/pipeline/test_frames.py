"""PLLaVA frame sampling and decode_clip (docs/CONTRACTS.md, Frame sampling)."""

from __future__ import annotations

import faulthandler
import io
from datetime import timedelta
from fractions import Fraction

import decord
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.frames import (
    CLIP_MEAN,
    CLIP_STD,
    DecodedClip,
    DecodeFailure,
    decode_clip,
    normalize_frames,
    resized_size,
    sample_frame_indices,
)
from pipeline.synthetic import corrupt_mp4, encode_clip

# ----------------------------------------------------------------------------------------------- indices


def test_indices_hand_computed() -> None:
    # 100 frames: seg = 99/16 = 6.1875; k=3: int(3.09375 + round(18.5625)) = 22; k=8: seg*8 = 49.5 exactly,
    # rounded half to even: 50, so int(53.09) = 53.
    assert sample_frame_indices(100) == [3, 9, 15, 22, 28, 34, 40, 46, 53, 59, 65, 71, 77, 83, 90, 96]
    # 33 frames: seg = 2.0 exactly.
    assert sample_frame_indices(33) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31]


def test_indices_exactly_16_frames() -> None:
    # seg = 15/16: round(0.9375 * 9) = round(8.4375) = 8, so frame 8 repeats and frame 15 is never used.
    assert sample_frame_indices(16) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 13, 14]


def test_indices_fewer_frames_than_segments_repeat() -> None:
    # 5 frames: seg = 0.25; seg*k = 0.5, 1.5, 2.5, 3.5 round to 0, 2, 2, 4.
    assert sample_frame_indices(5) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4]
    assert sample_frame_indices(1) == [0] * 16
    # 2 frames: seg = 1/16; seg*8 = 0.5 rounds to 0.
    assert sample_frame_indices(2) == [0] * 9 + [1] * 7


def test_indices_round_half_to_even_like_numpy() -> None:
    # 9 frames: seg = 0.5; seg*k = 0.5, 1.5, 2.5 ... round half to even gives 0, 2, 2, 4, 4, ...
    assert sample_frame_indices(9) == [int(0.25 + np.round(0.5 * k)) for k in range(16)]
    assert sample_frame_indices(9)[:4] == [0, 0, 1, 2]


@given(st.integers(1, 5000), st.integers(1, 32))
def test_indices_are_in_range_and_sorted(n: int, segments: int) -> None:
    indices = sample_frame_indices(n, segments)
    assert len(indices) == segments
    assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] < n


def test_indices_reject_empty() -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(0)


# ----------------------------------------------------------------------------------------------- decoding


def test_resized_size_keeps_aspect() -> None:
    assert resized_size(1280, 720) == (597, 336)
    assert resized_size(720, 1280) == (336, 597)
    assert resized_size(96, 96) == (336, 336)


def test_from_frames_normalises_like_clip() -> None:
    frames = np.zeros((16, 4, 4, 3), np.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 255, 0, 128
    clip = DecodedClip(frames, 25.0, 16, 4, 4, 0.64, list(range(16)))
    assert clip.pixel_values.shape == (16, 3, 4, 4) and clip.pixel_values.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(clip.pixel_values[3, :, 2, 1], torch.tensor(expected), atol=1e-6)


def test_normalize_frames_takes_the_checkpoints_mean_and_std() -> None:
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 5, 5, 3), dtype=np.uint8))
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.4, 0.3)
    out = normalize_frames(frames, mean, std)
    x = frames.permute(0, 1, 4, 2, 3).double() / 255
    expected = (x - torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(3, 1, 1)
    assert out.shape == (2, 8, 3, 5, 5) and out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.equal(normalize_frames(frames), normalize_frames(frames, CLIP_MEAN, CLIP_STD))
    with pytest.raises(ValueError, match="3 values"):
        normalize_frames(frames, (0.5, 0.5), std)


def _reference(mp4: bytes) -> torch.Tensor:
    """PLLaVA's path done the slow, obvious way: full-size frames, torch resize, crop, normalise."""
    reader = decord.VideoReader(io.BytesIO(mp4))
    frames = torch.from_numpy(reader.get_batch(sample_frame_indices(len(reader))).asnumpy())
    x = frames.permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    new_w, new_h = resized_size(w, h)
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True)
    top, left = (new_h - 336) // 2, (new_w - 336) // 2
    x = x[..., top:top + 336, left:left + 336].clamp(0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize(("width", "height", "n_frames"), [(640, 360, 40), (360, 640, 12), (96, 96, 5)])
def test_decode_clip_matches_the_reference(width: int, height: int, n_frames: int) -> None:
    mp4 = encode_clip(width, height, n_frames, Fraction(30000, 1001), audio=True, pattern_seed=2)
    clip = decode_clip(mp4)
    assert isinstance(clip, DecodedClip), clip
    assert clip.pixel_values.shape == (16, 3, 336, 336) and clip.pixel_values.dtype == torch.float32
    assert (clip.width, clip.height, clip.num_frames) == (width, height, n_frames)
    assert clip.fps == pytest.approx(29.97, abs=0.01)
    assert clip.duration_s == pytest.approx(n_frames / clip.fps, abs=0.05)
    assert clip.frame_indices == sample_frame_indices(n_frames)
    diff = (clip.pixel_values - _reference(mp4)).abs()
    # Different resamplers (swscale vs torch), same geometry: a wrong crop or a transposed frame is ~1.0.
    assert diff.mean() < 0.05, diff.mean()


def test_decode_clip_on_the_synthetic_shards(shards_dir, planted) -> None:
    from pipeline.shards import ShardReader

    outcomes = {}
    for shard in ("00000", "00001"):
        for sample in ShardReader(str(shards_dir / f"{shard}.tar")):
            if sample.mp4 is not None:
                result = decode_clip(sample.mp4)
                outcomes[sample.key] = "ok" if isinstance(result, DecodedClip) else "decode_error"
                assert planted[shard][sample.key] == outcomes[sample.key], (sample.key, result)
    assert set(outcomes.values()) == {"ok", "decode_error"}


@pytest.mark.parametrize(
    ("mp4", "reason"),
    [
        (b"", "empty mp4 (0 bytes)"),
        (b"\x00" * 64, "could not read the mp4 container"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(100), "could not read the mp4 container"),
    ],
)
def test_decode_failures_are_readable(mp4: bytes, reason: str) -> None:
    result = decode_clip(mp4)
    assert isinstance(result, DecodeFailure) and result.reason.startswith(reason)


def test_truncated_and_random_mp4s_fail() -> None:
    import random

    rng = random.Random(0)
    for kind in ("truncated", "random", "empty"):
        result = decode_clip(corrupt_mp4(kind, rng))
        assert isinstance(result, DecodeFailure) and result.reason.isprintable()


_VALID = encode_clip(96, 64, 20, Fraction(25), audio=True, pattern_seed=9)


@st.composite
def mangled_mp4(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "random", "splice"]))
    if kind == "truncate":
        return _VALID[: draw(st.integers(0, len(_VALID)))]
    if kind == "random":
        return draw(st.binary(max_size=4096))
    data = bytearray(_VALID)
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=20)):
            data[pos] ^= draw(st.integers(1, 255))
        return bytes(data)
    start = draw(st.integers(0, len(data) - 1))
    return bytes(data[:start]) + draw(st.binary(min_size=1, max_size=256)) + bytes(data[start:])


@settings(max_examples=60, deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.too_slow])
@given(mangled_mp4())
def test_mangled_mp4s_never_crash_or_hang(mp4: bytes) -> None:
    # A hang inside C code cannot be interrupted from Python; faulthandler's watchdog thread ends the run.
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        result = decode_clip(mp4)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert isinstance(result, (DecodedClip, DecodeFailure))
    if isinstance(result, DecodedClip):
        assert result.pixel_values.shape == (16, 3, 336, 336)
        assert torch.isfinite(result.pixel_values).all()
