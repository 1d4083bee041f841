"""Synthetic Panda-70M webdataset shards, written the way the Panda-70M fork of video2dataset writes them.

Used by the tests, the demo and the benchmarks. What a shard looks like (docs/CONTRACTS.md, Shard format):

- ``{shard}.tar`` with ``{key}.json``, ``{key}.mp4``, ``{key}.txt`` per clip (webdataset's TarWriter writes a
  sample's members sorted by extension), in download-completion order with the clips of one source video
  contiguous; a failed source video is ``{key}.json`` + ``{key}.txt`` with a key without ``_CCCCC``;
- ``{shard}.parquet`` with one all-string row per written sample;
- ``{shard}_stats.json`` with counts of *source videos*;
- ``_planted.json`` (ours, not the fork's): ``{shard: {key: "ok" | "source_failed" | "decode_error"}}``.

Videos are real H.264 High yuv420p made with PyAV/libx264, one keyframe at frame 0, moving colour patterns.

    python -m pipeline.synthetic OUTDIR --shards 2 --clips-per-shard 6 --failed 1 --corrupt 1 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import string
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

SAMPLES_PER_SHARD = 100  # Panda-70M's setting: keys are SSSSSRR_CCCCC
OOM_SHARD_COUNT = 5
OOM_CLIP_COUNT = 5
TAR_MTIME = 1_700_000_000.0  # fixed so that a seed gives byte-identical shards

# Columns of the input table in the order video2dataset selects them: extra columns, clips, caption, url.
EXTRA_COLUMNS = ["matching_score", "desirable_filtering", "shot_boundary_detection"]
PARQUET_COLUMNS = [*EXTRA_COLUMNS, "clips", "caption", "url", "key", "status", "error_message"]

SMALL_SIZES = [(96, 64), (64, 96), (80, 80), (128, 72), (72, 128), (112, 64)]
LARGE_SIZES = [(1920, 1080), (720, 1280)]  # only the first good clips planned, to keep generation fast
FRAME_RATES = [Fraction(30000, 1001), Fraction(25), Fraction(30), Fraction(24000, 1001), Fraction(24)]
FRAME_COUNTS = [5, 9, 12, 15, 16, 17, 24, 33, 40]

DOWNLOAD_ERRORS = [
    "ERROR: [youtube]: Video unavailable. This video has been removed by the uploader",
    "ERROR: [youtube]: Private video. Sign in if you've been granted access to this video",
]
SUBSAMPLE_ERRORS = ["Video had no clips longer than 0.0", "ffmpeg error (see stderr output for detail)"]
WORDS = ["a", "man", "woman", "dog", "cat", "red", "blue", "car", "street", "kitchen", "ball", "runs",
         "walks", "talks", "camera", "slowly", "the", "in", "on", "with", "while", "near", "table", "bright",
         "green"]


# ----------------------------------------------------------------------------------------------- video


def encode_clip(
    width: int,
    height: int,
    n_frames: int,
    fps: Fraction,
    *,
    audio: bool = False,
    pattern_seed: int = 0,
    rotation: int = 0,
    rotate_tag: bool = False,
    codec: str = "libx264",
) -> bytes:
    """An H.264 High yuv420p mp4 (one keyframe at frame 0) of a moving colour pattern, optionally with AAC.

    ``width`` x ``height`` is the coded size. ``rotation`` (clockwise degrees, as phones record portrait
    video) is written as the mp4's display matrix, or with ``rotate_tag`` as a ``rotate`` tag in a Matroska
    file (FFmpeg no longer writes that tag to mp4). ``codec`` is another PyAV encoder (e.g. ``libsvtav1``)
    with its default settings.
    """
    rng = np.random.default_rng(pattern_seed)
    base = rng.integers(30, 220, size=3)
    square = max(4, min(width, height) // 4)
    xs = np.arange(width, dtype=np.int32)[None, :]
    ys = np.arange(height, dtype=np.int32)[:, None]
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska" if rotate_tag else "mp4") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if rotate_tag:
            video.metadata["rotate"] = str(rotation)
        elif rotation:
            video.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees
        if codec == "libx264":
            # One keyframe at frame 0 like the re-encoded Panda clips; no scene cuts. rc-lookahead=0 and
            # keeping every frame referenced until the container closes: without them x264's output varied
            # from run to run (PyAV 18), and a seed must give byte-identical shards.
            video.options = {
                "preset": "veryfast",
                "profile": "high",
                "x264-params": "keyint=100000:min-keyint=100000:scenecut=0:rc-lookahead=0",
            }
        audio_stream = container.add_stream("aac", rate=44100) if audio else None
        frames = []
        for i in range(n_frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 0] = (base[0] + xs + 3 * i) % 256
            rgb[..., 1] = (base[1] + ys + 2 * i) % 256
            rgb[..., 2] = base[2]
            x0 = (5 * i) % max(1, width - square)
            y0 = (3 * i) % max(1, height - square)
            rgb[y0:y0 + square, x0:x0 + square] = 255 - base
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            frames.append(frame)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio_stream is not None:
            total = int(44100 * n_frames / fps)
            for start in range(0, total, 1024):
                t = np.arange(start, min(start + 1024, total)) / 44100
                samples = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 44100, start
                frames.append(frame)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode(None))
    return buf.getvalue()


def corrupt_mp4(kind: str, rng: random.Random) -> bytes:
    """A broken mp4 member: ``truncated`` (moov lost), ``random`` bytes or ``empty``."""
    if kind == "empty":
        return b""
    if kind == "random":
        return rng.randbytes(rng.randint(200, 4000))
    whole = encode_clip(96, 64, 12, Fraction(25), pattern_seed=rng.randint(0, 2**31))
    # libavformat writes the moov atom last, so cutting the file loses the index.
    return whole[: int(len(whole) * rng.uniform(0.3, 0.7))]


# ----------------------------------------------------------------------------------------------- time


def _strtime(t_sec: float, two_digit_hour: bool) -> str:
    """video2dataset's ``_get_strtime`` (two-digit hour) or Panda's source format (one-digit hour)."""
    hour, minute, second = int(t_sec // 3600), int((t_sec // 60) % 60), int(t_sec % 60)
    millis = round((t_sec - int(t_sec)) * 1000)
    return f"{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}" if two_digit_hour else (
        f"{hour}:{minute:02d}:{second:02d}.{millis:03d}")


# ----------------------------------------------------------------------------------------------- shard


@dataclass
class _Clip:
    clip_id: int
    start_s: float
    end_s: float
    caption: str
    score: float
    corrupt: str | None = None  # "truncated" | "random" | "empty"
    written: bool = True  # video2dataset silently drops a clip when ffmpeg yields fewer segments
    width: int = 96
    height: int = 64
    n_frames: int = 16
    fps: Fraction = Fraction(25)
    audio: bool = False


@dataclass
class _Video:
    row: int
    url: str
    clips: list[_Clip] = field(default_factory=list)
    failed: str | None = None  # "failed_to_download" | "failed_to_subsample"
    error: str | None = None
    yt_meta: dict | None = None


def _video_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(11))


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."


def _yt_meta(rng: random.Random, variant: int, video_id: str, clips: list[_Clip]) -> dict | None:
    """The four shapes seen in the wild, in turn: null, {}, a dict, a dict with subtitles."""
    if variant % 4 == 0:
        return None
    if variant % 4 == 1:
        return {}
    meta = {"id": video_id, "title": _caption(rng), "uploader": "synthetic", "duration": 600,
            "description": _caption(rng) + " \u00e9\u4e2d\u6587"}
    if variant % 4 == 3 and clips:
        start, end = clips[0].start_s, clips[-1].end_s
        step = max(0.5, (end - start) / 3)
        meta["subtitles"] = [
            {"start": _strtime(t, True), "end": _strtime(t + step, True), "lines": [_caption(rng)]}
            for t in np.arange(start, end, step).tolist()
        ]
    return meta


def _plan_shard(
    rng: random.Random, clips_per_shard: int, failed: int, corrupt: int, variety: dict
) -> list[_Video]:
    """Source videos of one shard (row order), each with 1-3 clips; K failed; K corrupt clips mixed in.

    ``variety`` carries counters across shards: sizes, frame counts, frame rates and audio go round their
    lists so that even a few clips cover them; ``variety["large"]`` goes to the first good clips.
    """
    kinds = ["ok"] * clips_per_shard + ["corrupt"] * corrupt
    rng.shuffle(kinds)
    videos: list[_Video] = []
    i = 0
    while i < len(kinds):
        n = min(rng.randint(1, 3), len(kinds) - i)
        videos.append(_Video(row=-1, url=""))
        videos[-1].clips = [_Clip(0, 0, 0, "", 0.0, corrupt="x" if k == "corrupt" else None)
                            for k in kinds[i:i + n]]
        i += n
    for j in range(failed):
        status = "failed_to_download" if j % 2 == 0 else "failed_to_subsample"
        errors = DOWNLOAD_ERRORS if status == "failed_to_download" else SUBSAMPLE_ERRORS
        videos.append(_Video(row=-1, url="", failed=status, error=rng.choice(errors),
                             clips=[_Clip(0, 0, 0, "", 0.0) for _ in range(rng.randint(1, 3))]))
    rng.shuffle(videos)
    corrupt_kinds = ["truncated", "random", "empty"]
    n_corrupt = 0
    for row, video in enumerate(videos):
        video.row = row
        vid = _video_id(rng)
        video.url = f"https://youtu.be/{vid}" if rng.random() < 0.15 else f"https://www.youtube.com/watch?v={vid}"
        t = round(rng.uniform(0, 20), 3)
        for clip_id, clip in enumerate(video.clips):
            clip.clip_id = clip_id
            n = variety["clips"]
            variety["clips"] += 1
            if variety["large"] and not clip.corrupt and not video.failed:
                clip.width, clip.height = variety["large"].pop(0)
                clip.n_frames = 10 if clip.width > clip.height else 20
            else:
                clip.width, clip.height = SMALL_SIZES[n % len(SMALL_SIZES)]
                clip.n_frames = FRAME_COUNTS[(n * 4) % len(FRAME_COUNTS)]
            clip.fps = FRAME_RATES[n % len(FRAME_RATES)]
            clip.audio = n % 2 == 0
            clip.start_s = t
            clip.end_s = round(t + clip.n_frames / clip.fps, 3)
            clip.caption = _caption(rng)
            clip.score = rng.randint(40, 140) / 256
            t = clip.end_s if rng.random() < 0.7 else round(clip.end_s + rng.uniform(0.1, 2.0), 3)
            if clip.corrupt:
                clip.corrupt = corrupt_kinds[n_corrupt % len(corrupt_kinds)]
                n_corrupt += 1
        # Rarely ffmpeg yields one segment fewer and the middle clip is lost: keys skip a clip number.
        middle = video.clips[1] if len(video.clips) == 3 and not video.failed else None
        good_middle = (middle is not None and not middle.corrupt
                       and (middle.width, middle.height) in SMALL_SIZES)
        if good_middle and rng.random() < 0.2:
            last = video.clips[2]
            video.clips.append(_Clip(3, last.end_s, round(last.end_s + last.n_frames / last.fps, 3),
                                     _caption(rng), 0.3, width=last.width, height=last.height,
                                     n_frames=last.n_frames, fps=last.fps))
            video.clips[1].written = False
        video.yt_meta = None if video.failed == "failed_to_download" else _yt_meta(
            rng, variety["videos"], vid, video.clips)
        variety["videos"] += 1
    return videos


def _source_columns(video: _Video) -> dict[str, str]:
    """The video's row in the Panda-70M csv (all strings; lists as Python reprs)."""
    timestamps = [[_strtime(c.start_s, False), _strtime(c.end_s, False)] for c in video.clips]
    return {
        "matching_score": str([c.score for c in video.clips]),
        "desirable_filtering": str(["desirable"] * len(video.clips)),
        "shot_boundary_detection": str([[ts] for ts in timestamps]),
        "clips": str(timestamps),
        "caption": str([c.caption for c in video.clips]),
        "url": video.url,
    }


def write_synthetic_shards(
    outdir: str | Path,
    shards: int,
    clips_per_shard: int,
    failed: int = 0,
    corrupt: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, str]]:
    """Write ``shards`` shards to ``outdir``; return (and write to ``_planted.json``) {shard: {key: status}}.

    Each shard holds ``clips_per_shard`` good clips, ``corrupt`` clips with broken mp4s (planted
    ``decode_error``) and ``failed`` source videos without mp4 (planted ``source_failed``).
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    planted: dict[str, dict[str, str]] = {}
    variety = {"clips": 0, "videos": 0, "large": list(LARGE_SIZES)}
    for shard_id in range(shards):
        shard = f"{shard_id:0{OOM_SHARD_COUNT}d}"
        videos = _plan_shard(rng, clips_per_shard, failed, corrupt, variety)
        oom = math.ceil(math.log10(max(SAMPLES_PER_SHARD, len(videos))))
        order = list(videos)
        rng.shuffle(order)  # download-completion order, not row order
        planted[shard] = {}
        parquet_rows: list[dict[str, str | None]] = []
        stats = {"success": 0, "failed_to_download": 0, "failed_to_subsample": 0}
        status_dict: dict[str, int] = {}
        bytes_downloaded = 0
        with open(outdir / f"{shard}.tar", "wb") as tar_file:
            tar = wds.TarWriter(tar_file, mtime=TAR_MTIME)
            for video in order:
                key = f"{shard_id * 10**oom + video.row:0{oom + OOM_SHARD_COUNT}d}"
                source = _source_columns(video)
                if video.failed:
                    meta = {**source, "key": key, "status": video.failed, "error_message": video.error,
                            "yt_meta_dict": video.yt_meta}
                    tar.write({"__key__": key, "txt": source["caption"], "json": json.dumps(meta, indent=4)})
                    parquet_rows.append({c: meta[c] for c in PARQUET_COLUMNS})
                    planted[shard][key] = "source_failed"
                    stats[video.failed] += 1
                    status_dict[video.error] = status_dict.get(video.error, 0) + 1
                    continue
                stats["success"] += 1
                status_dict["success"] = status_dict.get("success", 0) + 1
                for clip in video.clips:
                    if not clip.written:
                        continue
                    clip_key = f"{key}_{clip.clip_id:0{OOM_CLIP_COUNT}d}"
                    if clip.corrupt:
                        mp4 = corrupt_mp4(clip.corrupt, rng)
                    else:
                        mp4 = encode_clip(clip.width, clip.height, clip.n_frames, clip.fps,
                                          audio=clip.audio, pattern_seed=rng.randint(0, 2**31))
                    bytes_downloaded += len(mp4)
                    meta = {
                        "matching_score": str(clip.score),
                        "desirable_filtering": source["desirable_filtering"],
                        "shot_boundary_detection": source["shot_boundary_detection"],
                        "caption": clip.caption,
                        "url": video.url,
                        "key": clip_key,
                        "status": "success",
                        "error_message": None,
                        "yt_meta_dict": video.yt_meta,
                        "clips": str([(_strtime(clip.start_s, True), _strtime(clip.end_s, True))]),
                    }
                    subtitles = (video.yt_meta or {}).get("subtitles")
                    if subtitles is not None:
                        meta["clip_subtitles"] = [
                            line for line in subtitles
                            if max(clip.start_s, _seconds(line["start"]))
                            < min(clip.end_s, _seconds(line["end"]))
                        ]
                    tar.write({"__key__": clip_key, "mp4": mp4, "txt": clip.caption,
                               "json": json.dumps(meta, indent=4)})
                    parquet_rows.append({c: meta[c] for c in PARQUET_COLUMNS})
                    planted[shard][clip_key] = "decode_error" if clip.corrupt else "ok"
            tar.close()
        schema = pa.schema([pa.field(c, pa.string()) for c in PARQUET_COLUMNS])
        table = pa.Table.from_pylist(parquet_rows, schema=schema)
        pq.write_table(table, outdir / f"{shard}.parquet")
        start = TAR_MTIME + 60 * shard_id
        shard_stats = {
            "count": len(videos),
            "successes": stats["success"],
            "failed_to_download": stats["failed_to_download"],
            "failed_to_subsample": stats["failed_to_subsample"],
            "duration": 42.0,
            "bytes_downloaded": bytes_downloaded,
            "start_time": start,
            "end_time": start + 42.0,
            "status_dict": status_dict,
        }
        (outdir / f"{shard}_stats.json").write_text(json.dumps(shard_stats, indent=4))
    (outdir / "_planted.json").write_text(json.dumps(planted, indent=2, sort_keys=True))
    return planted


def _seconds(t: str) -> float:
    h, m, s = t.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] + " Also writes OUTDIR/_planted.json: {shard: {key: planted status}}.")
    parser.add_argument("outdir", metavar="OUTDIR", help="folder to write the shards into (created)")
    parser.add_argument("--shards", type=int, default=2,
                        help="number of shards, named 00000, 00001, ... (default: %(default)s)")
    parser.add_argument("--clips-per-shard", type=int, default=6,
                        help="good clips (real H.264) per shard (default: %(default)s)")
    parser.add_argument("--failed", type=int, default=0,
                        help="failed source videos per shard: a .json + .txt without mp4, planted "
                             "source_failed (default: %(default)s)")
    parser.add_argument("--corrupt", type=int, default=0,
                        help="clips with a broken mp4 per shard, planted decode_error (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the layout, order and videos; the same seed gives the same shards "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    planted = write_synthetic_shards(args.outdir, args.shards, args.clips_per_shard, args.failed,
                                     args.corrupt, args.seed)
    counts: dict[str, int] = {}
    for keys in planted.values():
        for status in keys.values():
            counts[status] = counts.get(status, 0) + 1
    print(f"wrote {len(planted)} shards to {args.outdir}: {counts}")


if __name__ == "__main__":
    main()
