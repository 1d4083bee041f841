"""The synthetic shards follow docs/CONTRACTS.md, Shard format (the Panda-70M video2dataset fork's
webdataset output)."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from pipeline.synthetic import encode_clip, main, write_synthetic_shards

CLIP_KEY = re.compile(r"^(\d{7})_(\d{5})$")
VIDEO_KEY = re.compile(r"^\d{7}$")
SUCCESS_FIELDS = ["matching_score", "desirable_filtering", "shot_boundary_detection", "caption", "url", "key",
                  "status", "error_message", "yt_meta_dict", "clips"]
FAILED_FIELDS = ["matching_score", "desirable_filtering", "shot_boundary_detection", "clips", "caption",
                 "url", "key", "status", "error_message", "yt_meta_dict"]
TWO_DIGIT_CLIP = re.compile(r"^\[\('\d\d:\d\d:\d\d\.\d{3}', '\d\d:\d\d:\d\d\.\d{3}'\)\]$")


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _samples(tar_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: data}) in tar order, grouping consecutive members."""
    out: list[tuple[str, dict[str, bytes]]] = []
    for name, data in _members(tar_path):
        key, ext = name.split(".", 1)
        if not out or out[-1][0] != key:
            out.append((key, {}))
        out[-1][1][ext] = data
    return out


def test_files_and_planted_mapping(shards_dir: Path, planted: dict) -> None:
    names = sorted(p.name for p in shards_dir.iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "_planted.json"]
    for shard in ("00000", "00001"):
        keys = [key for key, _ in _samples(shards_dir / f"{shard}.tar")]
        assert len(keys) == len(set(keys))
        assert set(keys) == set(planted[shard])
        assert Counter(planted[shard].values()) == {"ok": 6, "decode_error": 3, "source_failed": 2}


def test_keys_members_and_order(shards_dir: Path, planted: dict) -> None:
    for shard_id, shard in enumerate(("00000", "00001")):
        names = [name for name, _ in _members(shards_dir / f"{shard}.tar")]
        samples = _samples(shards_dir / f"{shard}.tar")
        keys = [key for key, _ in samples]
        assert keys != sorted(keys), "download-completion order, not key order"
        seen_videos: list[str] = []
        for key, members in samples:
            if planted[shard][key] == "source_failed":
                assert VIDEO_KEY.match(key)
                assert list(members) == ["json", "txt"]
                video = key
            else:
                match = CLIP_KEY.match(key)
                assert match, key
                assert list(members) == ["json", "mp4", "txt"]
                video = match.group(1)
            assert int(video) // 100 == shard_id  # {shard*10**2 + row:07d}
            if not seen_videos or seen_videos[-1] != video:
                assert video not in seen_videos, "clips of one video are contiguous"
                seen_videos.append(video)
        assert all(re.match(r"^\d{7}(_\d{5})?\.(json|mp4|txt)$", n) for n in names)


def test_success_json_format(shards_dir: Path, planted: dict) -> None:
    subtitles_seen = 0
    for key, members in _samples(shards_dir / "00000.tar") + _samples(shards_dir / "00001.tar"):
        text = members["json"].decode()
        meta = json.loads(text)
        assert text == json.dumps(meta, indent=4)
        if "mp4" not in members:
            continue
        fields = list(meta)
        assert fields[:10] == SUCCESS_FIELDS
        assert fields[10:] in ([], ["clip_subtitles"])
        subtitles_seen += fields[10:] == ["clip_subtitles"]
        assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
        assert isinstance(meta["matching_score"], str) and float(meta["matching_score"]) > 0
        assert isinstance(meta["shot_boundary_detection"], str)
        assert isinstance(ast.literal_eval(meta["shot_boundary_detection"]), list)
        assert TWO_DIGIT_CLIP.match(meta["clips"]), meta["clips"]
        assert meta["yt_meta_dict"] is None or isinstance(meta["yt_meta_dict"], dict)
        assert members["txt"].decode() == meta["caption"]
        assert re.match(r"^https://(www\.youtube\.com/watch\?v=|youtu\.be/)[\w-]{11}$", meta["url"])
    assert subtitles_seen > 0


def test_failed_json_format(shards_dir: Path, planted: dict) -> None:
    statuses = set()
    for key, members in _samples(shards_dir / "00000.tar") + _samples(shards_dir / "00001.tar"):
        if "mp4" in members:
            continue
        meta = json.loads(members["json"])
        assert list(meta) == FAILED_FIELDS
        statuses.add(meta["status"])
        assert meta["key"] == key and meta["error_message"]
        captions = ast.literal_eval(meta["caption"])
        assert isinstance(captions, list) and members["txt"].decode() == meta["caption"]
        clips = ast.literal_eval(meta["clips"])
        assert isinstance(clips, list) and all(isinstance(c, list) for c in clips)
        assert re.match(r"^\d:\d\d:\d\d\.\d{3}$", clips[0][0]), "one-digit hour on failed rows"
        assert len(ast.literal_eval(meta["matching_score"])) == len(clips) == len(captions)
    assert statuses == {"failed_to_download", "failed_to_subsample"}


def test_parquet_and_stats(shards_dir: Path, planted: dict) -> None:
    for shard in ("00000", "00001"):
        table = pq.read_table(shards_dir / f"{shard}.parquet")
        assert all(str(t) == "string" for t in table.schema.types)
        assert table.column_names == ["matching_score", "desirable_filtering", "shot_boundary_detection",
                                      "clips", "caption", "url", "key", "status", "error_message"]
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [key for key, _ in _samples(shards_dir / f"{shard}.tar")]
        stats = json.loads((shards_dir / f"{shard}_stats.json").read_text())
        videos = {k.split("_")[0] for k in planted[shard]}
        assert stats["count"] == len(videos)
        assert stats["failed_to_download"] + stats["failed_to_subsample"] == 2
        assert stats["successes"] == len(videos) - 2
        assert sum(stats["status_dict"].values()) == stats["count"]


def test_videos_are_real_h264_with_variety(shards_dir: Path, planted: dict) -> None:
    seen = Counter()
    for shard in ("00000", "00001"):
        for key, members in _samples(shards_dir / f"{shard}.tar"):
            if planted[shard][key] != "ok":
                continue
            with av.open(io.BytesIO(members["mp4"])) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264"
                assert stream.codec_context.profile == "High"
                assert stream.codec_context.format.name == "yuv420p"
                frames = list(container.decode(video=0))
                assert [f.key_frame for f in frames].count(True) == 1 and frames[0].key_frame
                w, h = stream.codec_context.width, stream.codec_context.height
                seen["portrait" if h > w else "square" if h == w else "landscape"] += 1
                seen["short"] += len(frames) < 16
                seen["ntsc"] += stream.average_rate == Fraction(30000, 1001)
                seen["audio"] += bool(container.streams.audio)
                seen["no_audio"] += not container.streams.audio
                seen["1080p"] += (w, h) == (1920, 1080)
    for kind in ("portrait", "square", "landscape", "short", "ntsc", "audio", "no_audio", "1080p"):
        assert seen[kind] > 0, kind


def test_corrupt_mp4s_are_planted(shards_dir: Path, planted: dict) -> None:
    sizes = []
    for shard in ("00000", "00001"):
        for key, members in _samples(shards_dir / f"{shard}.tar"):
            if planted[shard][key] == "decode_error":
                sizes.append(len(members["mp4"]))
                assert json.loads(members["json"])["status"] == "success"
    assert 0 in sizes and len(sizes) == 6


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_synthetic_shards(tmp_path / "a", shards=1, clips_per_shard=4, failed=1, corrupt=2, seed=3)
    b = write_synthetic_shards(tmp_path / "b", shards=1, clips_per_shard=4, failed=1, corrupt=2, seed=3)
    write_synthetic_shards(tmp_path / "c", shards=1, clips_per_shard=4, failed=1, corrupt=2, seed=4)
    assert a == b
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_encode_clip_is_reproducible() -> None:
    clips = {encode_clip(96, 64, 17, Fraction(25), audio=True, pattern_seed=1) for _ in range(4)}
    assert len(clips) == 1


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(tmp_path), "--shards", "1", "--clips-per-shard", "2", "--failed", "1", "--corrupt", "1",
          "--seed", "5"])
    planted = json.loads((tmp_path / "_planted.json").read_text())
    assert Counter(planted["00000"].values()) == {"ok": 2, "source_failed": 1, "decode_error": 1}
    assert "wrote 1 shards" in capsys.readouterr().out
