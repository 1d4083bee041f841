"""From mp4 bytes to PLLaVA's input: N frames, S×S, RGB, normalised (docs/CONTRACTS.md, Frame sampling).

N, S and the mean/std are the checkpoint's (``model.describe.ModelDescription``: ``num_frames``,
``image_size``, ``image_mean``/``image_std``); the defaults here are the released checkpoints' (16 frames,
336 px, CLIP's mean/std).

``decode_clip`` never raises: a clip that cannot be decoded is a ``DecodeFailure`` with a readable reason.
Decoding is split in two so that a decoder process only ships uint8 frames (5.4 MB per clip instead of
21.7 MB of float32): ``decode_frames`` (decord, numpy, no torch), and ``normalize_frames``, run on a whole
batch on the model's device. A hang or a crash inside the decoder (C code) cannot be stopped in-process:
``pipeline.decode.DecodePool`` in process mode enforces the per-clip time limit by killing its worker.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.describe import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, NUM_FRAMES
from pipeline.failures import Failure

if TYPE_CHECKING:
    import av.container
    import av.video.stream
    import decord
    import torch

SIZE = IMAGE_SIZE
# Refuse clips that no Panda-70M clip is before spending time and memory on them. Frames are resized
# while decoding, but the decoder still holds full-size reference frames: 8192x4320 (H.264/HEVC level 6.2,
# "8K") bounds those. Panda clips last seconds; sampling 16 frames of a long clip with one keyframe means
# decoding all of it, so a long clip is refused instead of left to the per-clip time limit.
MAX_PIXELS = 8192 * 4320
MAX_DURATION_S = 600.0
MAX_FRAMES = 36_000  # 600 s at 60 fps


def sample_frame_indices(n_frames: int, num_segments: int = NUM_FRAMES) -> list[int]:
    """PLLaVA's sampling: the middle frame of each of ``num_segments`` equal segments.

    ``seg = (n_frames - 1) / N``; index ``k`` is ``int(seg / 2 + round(seg * k))`` (round half to even, as
    numpy's round in the reference). Fewer than N frames repeat frames; one frame gives N zeros.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    seg = (n_frames - 1) / num_segments
    return [int(seg / 2 + round(seg * k)) for k in range(num_segments)]


def resized_size(width: int, height: int, size: int = SIZE) -> tuple[int, int]:
    """(width, height) with the shortest side scaled to ``size`` (CLIP's rule: the long side truncated)."""
    if width <= height:
        return size, max(size, int(size * height / width))
    return max(size, int(size * width / height)), size


class DecodeFailure(Failure):
    """Why a clip could not be decoded, e.g. ``"empty mp4 (0 bytes)"``: a ``pipeline.rows.Failure`` of stage
    "decode" (its row's status is ``decode_error``)."""

    def __init__(self, reason: str):
        super().__init__("decode", reason)


@dataclass
class DecodedClip:
    """A decoded clip: N sampled, resized and center-cropped frames, and what was learnt about the source.

    ``width``/``height``/``num_frames`` describe the source clip, its size as displayed (``probe_video``). The frames stay uint8 until the model
    batch is built (``normalize_frames`` on the model's device): a quarter of the bytes to ship from a
    decoder process, to stack and to copy to the GPU, and one vectorised normalisation per batch.
    """

    frames: np.ndarray  # (T, size, size, 3) uint8 RGB
    fps: float
    num_frames: int
    width: int
    height: int
    duration_s: float
    frame_indices: list[int]

    @property
    def pixel_values(self) -> torch.Tensor:
        """(T, 3, size, size) float32, normalised with CLIP's mean/std (the captioner uses the checkpoint's)."""
        import torch  # here, not at the top: decoder processes import this module and need no torch

        return normalize_frames(torch.from_numpy(self.frames))


def normalize_frames(frames: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 RGB (..., H, W, 3) → float32 (..., 3, H, W): / 255, then ``mean`` and ``std`` per channel (the
    checkpoint's ``image_mean``/``image_std``; CLIP's by default), on frames' device."""
    import torch

    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    scale = torch.tensor([1 / (255 * s) for s in std], device=frames.device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=frames.device).view(3, 1, 1)
    pixels = frames.movedim(-1, -3)  # (..., 3, H, W) uint8, a view
    out = torch.empty(pixels.shape, dtype=torch.float32, device=frames.device).copy_(pixels)
    return out.mul_(scale).add_(shift)


def _short_reason(err: BaseException) -> str:
    """An exception as one printable line (decoder messages may carry bytes from the file)."""
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    first_line = text.splitlines()[0] if text.strip() else type(err).__name__
    return "".join(c if c.isprintable() else "?" for c in first_line)[:300]


@dataclass(frozen=True)
class VideoProbe:
    """The video stream as the container describes it, read before decord opens the clip."""

    width: int  # as displayed: the coded size, width and height swapped by a 90° or 270° rotation
    height: int
    rotation: int  # clockwise degrees a player turns the coded picture: 0, 90, 180 or 270
    codec: str  # e.g. "h264", "av1"


def display_rotation(rotate_tag: str | None, display_matrix: bytes | None) -> int:
    """The clockwise rotation (0, 90, 180 or 270) decord applies, by decord's own rule, so that the size we
    ask of it is the size it returns: the stream's ``rotate`` tag when set and not 0, else the display
    matrix (FFmpeg's 9 int32, read as the ``rotate`` tag FFmpeg 4 made of it: degrees printed with %g).
    Any other angle is 0: decord shows it as coded. Flips in the matrix are ignored, as decord does."""
    theta = 0.0
    if rotate_tag and rotate_tag != "0":
        try:
            theta = float(rotate_tag)
        except ValueError:
            theta = 0.0
    if not theta and display_matrix is not None and len(display_matrix) == 36:
        m = struct.unpack("=9i", display_matrix)
        scale_x, scale_y = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
        if scale_x and scale_y:
            clockwise = math.degrees(math.atan2(m[1] / scale_y, m[0] / scale_x))
            theta = float(f"{clockwise + 360 if clockwise < 0 else clockwise:g}")
    if not math.isfinite(theta):
        return 0
    theta = math.fmod(theta, 360)
    degrees = int(theta + 360 if theta < 0 else theta)
    return degrees if degrees in (90, 180, 270) else 0


def _display_matrix(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> bytes | None:
    """The stream's display matrix. FFmpeg 8 (PyAV) hands the container's matrix to the decoder, not to the
    stream's metadata, so the first frame is decoded to read it (one thread: ~5 ms at 720p). None when there
    is none, or when PyAV cannot decode the first frame: decord then reports what is wrong with the clip."""
    from av.sidedata.sidedata import Type

    stream.thread_count = 1
    try:
        frame = next(container.decode(stream), None)
    except Exception:  # noqa: BLE001 - a broken first frame is decord's to report
        return None
    if frame is None:
        return None
    return next((bytes(data) for data in frame.side_data if data.type == Type.DISPLAYMATRIX), None)


def probe_video(mp4: bytes) -> VideoProbe | DecodeFailure:
    """The video stream's displayed size, rotation and codec, read with PyAV; sizes decord is not asked to
    decode (none, or over ``MAX_PIXELS``) are refused here, before any frame is decoded."""
    import av  # here: only needed for probing

    try:
        with av.open(io.BytesIO(mp4), mode="r") as container:
            if not container.streams.video:
                return DecodeFailure("no video stream in the mp4")
            stream = container.streams.video[0]
            codec = stream.codec_context
            width, height = codec.width, codec.height
            if width <= 0 or height <= 0:
                return DecodeFailure(f"unsupported frame size {width}x{height}")
            if width * height > MAX_PIXELS:
                return DecodeFailure(f"video is {width}x{height}, over the {MAX_PIXELS / 1e6:.1f}-megapixel cap")
            rotate_tag = next((v for k, v in stream.metadata.items() if k.lower() == "rotate"), None)
            rotation = display_rotation(rotate_tag, _display_matrix(container, stream))
            name = codec.codec.canonical_name
    except Exception as err:  # noqa: BLE001 - any parser error is a property of the file
        return DecodeFailure(f"could not read the mp4 container: {_short_reason(err)}")
    if rotation in (90, 270):
        width, height = height, width
    return VideoProbe(width, height, rotation, name)


# decord's C++ errors start with a time and a source location, and a failed CHECK prints the values it
# compared, often uninitialised memory: "[23:09:26] /src/video_reader.cc:151: Check failed: st_nb >= 0
# (-1128613112 vs. 0) ERROR cannot find video stream with wanted index: -1".
_DECORD_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")
_DECORD_CHECK_VALUES = re.compile(r" \([^()]* vs\. [^()]*\)")


def decord_reason(err: BaseException) -> str:
    """A decord error as one readable line, without its source location and the values a CHECK compared."""
    text = (str(err).splitlines() or [""])[0]
    text = _DECORD_CHECK_VALUES.sub("", _DECORD_LOCATION.sub("", text)).strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:300] or type(err).__name__


def open_video(mp4: bytes, probe: VideoProbe, width: int, height: int) -> decord.VideoReader | DecodeFailure:
    """decord's reader of ``mp4``, giving frames of ``width`` x ``height`` as displayed: decord turns the
    picture by the rotation the probe found (same rule), then scales it to the size asked. One decoder
    thread: parallelism comes from decoding several clips at once."""
    import decord  # here: decord is imported in the process that decodes

    decord.logging.set_level(decord.logging.QUIET)
    try:
        return decord.VideoReader(io.BytesIO(mp4), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except AssertionError:  # decord asserts a positive frame count
        return DecodeFailure("no frames")
    except Exception as err:  # noqa: BLE001
        if "cannot find video stream" in str(err):  # the probe found one: decord's FFmpeg 4.1 cannot decode it
            return DecodeFailure(f"unsupported codec {probe.codec}: decord has no decoder for it")
        return DecodeFailure(f"decord could not open the mp4: {decord_reason(err)}")


def decode_frames(mp4: bytes, *, num_frames: int = NUM_FRAMES, size: int = SIZE) -> DecodedClip | DecodeFailure:
    """Decode ``num_frames`` PLLaVA-sampled frames, resized (shortest side ``size``) and center-cropped.

    decord turns the picture as displayed (rotation metadata) and resizes it while decoding (swscale, in C);
    we pass the exact target of the displayed size, so the aspect ratio is kept.
    """
    if not mp4:
        return DecodeFailure("empty mp4 (0 bytes)")
    probe = probe_video(mp4)
    if isinstance(probe, DecodeFailure):
        return probe
    target_w, target_h = resized_size(probe.width, probe.height, size)
    reader = open_video(mp4, probe, target_w, target_h)
    if isinstance(reader, DecodeFailure):
        return reader
    try:
        n = len(reader)
        if n < 1:
            return DecodeFailure("no frames")
        if n > MAX_FRAMES:
            return DecodeFailure(f"clip has {n} frames, over the {MAX_FRAMES} cap")
        # Timestamps come from the packet index decord built on opening: nothing is decoded yet.
        duration_s = float(reader.get_frame_timestamp(n - 1)[1])
        if duration_s > MAX_DURATION_S:
            return DecodeFailure(f"clip is {duration_s:.0f} s long, over the {MAX_DURATION_S:.0f} s cap")
        indices = sample_frame_indices(n, num_frames)
        batch = reader.get_batch(indices).asnumpy()  # (T, target_h, target_w, 3) uint8
        fps = float(reader.get_avg_fps())
    except Exception as err:  # noqa: BLE001
        return DecodeFailure(f"decord could not decode frames: {decord_reason(err)}")
    finally:
        del reader
    if batch.shape != (num_frames, target_h, target_w, 3):
        return DecodeFailure(f"decord returned frames of shape {batch.shape}")
    top, left = (target_h - size) // 2, (target_w - size) // 2
    frames = np.ascontiguousarray(batch[:, top:top + size, left:left + size])
    if not np.isfinite(fps) or fps <= 0:
        fps = 0.0
    if not np.isfinite(duration_s) or duration_s <= 0:
        duration_s = n / fps if fps else 0.0
    return DecodedClip(frames, fps, n, probe.width, probe.height, duration_s, indices)


def decode_clip(mp4: bytes, *, num_frames: int = NUM_FRAMES, size: int = SIZE) -> DecodedClip | DecodeFailure:
    """PLLaVA's input for one clip, or why there is none. Never raises."""
    try:
        return decode_frames(mp4, num_frames=num_frames, size=size)
    except Exception as err:  # noqa: BLE001 - the contract is "never raises"
        return DecodeFailure(f"unexpected error while decoding: {_short_reason(err)}")
