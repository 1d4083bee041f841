"""Shard lists, streaming and the tolerant reader (docs/CONTRACTS.md, Shard format)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.shards import (
    Sample,
    ShardReader,
    ShardReadError,
    build_sample,
    expand_shard_spec,
    parse_clip_span,
    parse_timestamp,
    shard_name,
    youtube_video_id,
)

# ----------------------------------------------------------------------------------------------- specs


def test_expand_brace_range_keeps_zero_padding() -> None:
    assert expand_shard_spec("s3://bucket/panda/{00008..00011}.tar") == [
        "s3://bucket/panda/00008.tar", "s3://bucket/panda/00009.tar",
        "s3://bucket/panda/00010.tar", "s3://bucket/panda/00011.tar"]
    assert len(expand_shard_spec("/data/{00000..09999}.tar")) == 10_000


def test_expand_lists_several_ranges_and_plain_urls() -> None:
    assert expand_shard_spec(["a/{0..1}/{08..10}.tar", "http://h/x.tar", "file:///d/y.tar"]) == [
        "a/0/08.tar", "a/0/09.tar", "a/0/10.tar", "a/1/08.tar", "a/1/09.tar", "a/1/10.tar",
        "http://h/x.tar", "file:///d/y.tar"]
    assert expand_shard_spec("/local/00042.tar") == ["/local/00042.tar"]


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("/data/00042.tar", "00042"),
        ("s3://bucket/panda/00042.tar", "00042"),
        ("https://host/x/00042.tar?sig=abc", "00042"),
        ("file:///d/my%20shard.tar", "my_shard"),
        ("/data/../..", "__"),
        ("/data/.tar", "_"),
        ("/data/a..b.tar", "a__b"),
        ("/data/ü:*?.tar", "____"),
        ("/data/", "data"),
        ("", "_"),
    ],
)
def test_shard_name_is_a_safe_path_component(url: str, name: str) -> None:
    assert shard_name(url) == name


@pytest.mark.parametrize(
    ("url", "video_id"),
    [
        ("https://www.youtube.com/watch?v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://youtube.com/watch?feature=x&v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://youtu.be/dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://www.youtube.com/shorts/dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://vimeo.com/12345", None),
        ("https://www.youtube.com/watch?v=short", None),
        ("https://evil.com/watch?v=dQw4w9WgXcQ", None),
        (None, None),
    ],
)
def test_youtube_video_id(url: str | None, video_id: str | None) -> None:
    assert youtube_video_id(url) == video_id


def test_timestamps_and_clip_spans() -> None:
    assert parse_timestamp("00:00:03.500") == 3.5
    assert parse_timestamp("1:02:03.250") == 3723.25
    assert parse_clip_span("[('00:00:03.500', '00:00:07.033')]") == (3.5, 7.033)
    assert parse_clip_span([[1.0, 2.5]]) == (1.0, 2.5)
    for bad in ["[('00:00:07', '00:00:03')]", "[('a', 'b')]", "__import__('os')", "[(1, 2), (3, 4)]", "[]",
                "[('00:00:01', None)]", "[(True, 2)]"]:
        with pytest.raises(ValueError):
            parse_clip_span(bad)


# ----------------------------------------------------------------------------------------------- reading


def _check_against_planted(samples: list[Sample], planted: dict[str, str]) -> None:
    assert [s.key for s in samples] == list(dict.fromkeys(s.key for s in samples))
    assert {s.key for s in samples} == set(planted)
    for s in samples:
        assert s.meta_error is None and s.read_error is None
        if planted[s.key] == "source_failed":
            assert s.mp4 is None and s.source_failed
            assert s.source_status in ("failed_to_download", "failed_to_subsample")
            assert s.source_error and s.source_caption.startswith("[")
            assert s.clip_start_s is None and s.clip_end_s is None
        else:
            assert s.source_status == "success" and s.source_error is None and not s.source_failed
            assert s.mp4 is not None and s.source_caption
            assert 0 <= s.clip_start_s < s.clip_end_s
        assert s.video_id is not None and s.url.endswith(s.video_id)


def test_reads_every_status_in_tar_order(shards_dir: Path, planted: dict) -> None:
    for shard in ("00000", "00001"):
        reader = ShardReader(str(shards_dir / f"{shard}.tar"))
        samples = list(reader)
        assert not reader.truncated and reader.error is None
        with tarfile.open(shards_dir / f"{shard}.tar") as tar:
            tar_keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
        assert [s.key for s in samples] == tar_keys
        assert all(s.shard == shard for s in samples)
        _check_against_planted(samples, planted[shard])


def test_streams_over_http_and_file_urls(shards_dir: Path, planted: dict, http_base: str) -> None:
    over_http = list(ShardReader(f"{http_base}/00001.tar"))
    over_file = list(ShardReader((shards_dir / "00001.tar").as_uri()))
    _check_against_planted(over_http, planted["00001"])
    assert [(s.key, s.mp4) for s in over_http] == [(s.key, s.mp4) for s in over_file]


def test_unreadable_shards_raise(shards_dir: Path, http_base: str) -> None:
    for url in [str(shards_dir / "missing.tar"), f"{http_base}/missing.tar", "ftp://host/x.tar"]:
        reader = ShardReader(url)  # opening is lazy
        with pytest.raises(ShardReadError, match="cannot open shard"):
            next(iter(reader))


def test_truncated_shard_keeps_keys_and_flags_the_cut(shards_dir: Path, tmp_path: Path) -> None:
    data = (shards_dir / "00000.tar").read_bytes()
    full = list(ShardReader(str(shards_dir / "00000.tar")))
    with tarfile.open(shards_dir / "00000.tar") as tar:
        members = tar.getmembers()
    # Cut in the middle of the first sample's mp4, right after the second sample's json, inside a header.
    first_mp4 = next(m for m in members if m.name.endswith(".mp4"))
    second_json = [m for m in members if m.name.endswith(".json")][1]
    cuts = [  # (where, the last sample's mp4 is complete)
        (first_mp4.offset_data + first_mp4.size // 2, False),
        (second_json.offset_data + 512, False),
        (second_json.offset + 100, True),
    ]
    for cut, last_mp4_complete in cuts:
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        reader = ShardReader(str(path))
        samples = list(reader)
        assert reader.truncated and "shard ends" in reader.error
        assert samples, "the key whose json was read is not lost"
        last = samples[-1]
        assert last.read_error and "truncated" in last.read_error
        if last_mp4_complete:
            assert last.mp4 == full[len(samples) - 1].mp4
        else:
            assert last.mp4 is None, "a cut mp4 is never passed on"
        for got, want in zip(samples[:-1], full):
            assert (got.key, got.mp4, got.read_error) == (want.key, want.mp4, None)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    reader = ShardReader(str(empty))
    assert list(reader) == [] and reader.truncated and "empty" in reader.error


def test_truncated_http_stream(shards_dir: Path, http_base: str, tmp_path: Path) -> None:
    data = (shards_dir / "00001.tar").read_bytes()
    (shards_dir / "cut_http.tar").write_bytes(data[: len(data) // 2 + 7])
    try:
        reader = ShardReader(f"{http_base}/cut_http.tar")
        samples = list(reader)
    finally:
        (shards_dir / "cut_http.tar").unlink()
    assert reader.truncated and samples and samples[-1].read_error
    assert reader.incomplete == reader.error  # a short file served whole: the tar is cut, not the stream


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes tarfile write pax headers, like webdataset's TarWriter
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(tmp_path: Path, members: list[tuple[str, bytes]]) -> tuple[ShardReader, list[Sample]]:
    path = tmp_path / "hand.tar"
    path.write_bytes(_tar(members))
    reader = ShardReader(str(path))
    return reader, list(reader)


def test_json_quirks_and_malformed_members(tmp_path: Path) -> None:
    good = {"caption": "A dog.", "url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "key": "0000001_00000",
            "status": "success", "error_message": None, "yt_meta_dict": None,
            "clips": "[('00:00:01.000', '00:00:02.500')]"}
    long_name = "x" * 120 + "/0000009_00000"
    reader, samples = _read(tmp_path, [
        ("0000001_00000.json", json.dumps(good, indent=4).encode()),
        ("0000001_00000.mp4", b"\x00\x00\x00\x18ftypisom"),
        ("0000001_00000.pth", b"\x80\x04K\x01."),  # never unpickled: skipped
        ("0000001_00000.txt", b"A dog."),
        ("0000002_00000.json", b"{not json"),
        ("0000002_00000.mp4", b"bytes"),
        ("0000003_00000.json", b"[1, 2]"),
        ("0000004_00000.json", json.dumps({**good, "caption": 5, "url": ["x"], "clips": "[(1, 2), (3, 4)]",
                                           "status": None, "key": "other"}).encode()),
        ("0000004_00000.txt", b"\xff\xfe caption"),
        ("0000005_00000.mp4", b"only an mp4"),
        ("0000006.json", json.dumps({**good, "status": "failed_to_download", "key": "0000006",
                                     "error_message": "ERROR: [youtube]: gone",
                                     "clips": "[['0:00:01.000', '0:00:02.500']]"}).encode()),
        ("0000007_00000.json", b"\xff\xfe{}"),
        ("0000008_00000.json", json.dumps({**good, "clips": "[('00:00:05.000', '00:00:01.000')]"}).encode()),
        ("0000008_00000.json", json.dumps(good).encode()),
        (f"{long_name}.json", json.dumps({**good, "key": long_name}).encode()),
    ])
    assert not reader.truncated and reader.members_skipped == 1
    by_key = {s.key: s for s in samples}
    assert list(by_key) == ["0000001_00000", "0000002_00000", "0000003_00000", "0000004_00000",
                            "0000005_00000", "0000006", "0000007_00000", "0000008_00000", long_name]
    ok = by_key["0000001_00000"]
    assert (ok.source_status, ok.clip_start_s, ok.clip_end_s, ok.video_id, ok.meta_error) == (
        "success", 1.0, 2.5, "dQw4w9WgXcQ", None)
    assert by_key["0000002_00000"].source_error.startswith("invalid .json member")
    assert by_key["0000002_00000"].mp4 == b"bytes" and by_key["0000002_00000"].source_status == "unknown"
    assert "not an object" in by_key["0000003_00000"].source_error
    odd = by_key["0000004_00000"]
    assert odd.source_caption == "\ufffd\ufffd caption"  # from the .txt, as the json caption is a number
    for problem in ["caption is a int", "url is a list", "2 spans, not one", "status is None",
                    "differs from the member key", ".txt is not UTF-8"]:
        assert problem in odd.meta_error
    assert by_key["0000005_00000"].source_error == "no .json member for this key"
    failed = by_key["0000006"]
    assert failed.source_failed and failed.source_error == "ERROR: [youtube]: gone"
    assert failed.clip_start_s is None and failed.meta_error is None
    assert ".json is not UTF-8" in by_key["0000007_00000"].meta_error
    dup = by_key["0000008_00000"]
    assert "duplicate .json" in dup.read_error and dup.clip_end_s == 2.5
    assert by_key[long_name].meta_error is None


def test_build_sample_never_raises_on_odd_values() -> None:
    weird = [None, 1, 1.5, True, [], {}, "x" * 20_000, {"a": [1]}, "[('1', '2')]" * 3]
    for value in weird:
        for field in ["status", "error_message", "url", "caption", "clips", "key"]:
            data = json.dumps({"status": "success", field: value}).encode()
            sample = build_sample("k", "s", {"json": data, "txt": b"t"})
            assert sample.key == "k"
