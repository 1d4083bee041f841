"""Hostile shards (issue 9): every malformed input gives the right status and reason, memory stays bounded,
nothing is written outside OUT, nothing hangs.

Decisions these tests pin down:
- A key that comes back after other keys is a duplicate: the first run of its members wins (it was already
  yielded when the second one shows up); later members are skipped and counted as "duplicate key".
- A member whose name gives no key (``.mp4``, ``dir/.json``, ``README``) or that is not a regular file (a
  directory, a link) belongs to no sample: skipped and counted by reason.
- A key that cannot be a row's key as it is (NUL, control or zero-width characters, bytes that are not
  UTF-8, more than MAX_KEY_CHARS) is still a sample: its key is normalised (``usable_key``: a readable prefix
  and a hash), the tar's key kept in ``source_key``, and the sample is captioned as any other.
  A key that looks like a path (``../x``, ``/abs/x``) is kept as it is: keys are row data, never paths.
- An 8K clip decodes at reduced resolution (597x336, then the 336 crop); a clip over MAX_DURATION_S or
  MAX_FRAMES is a decode_error with the cap in the reason, found from the packet index, before decoding.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tracemalloc
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import frames
from pipeline.decode import DecodePool
from pipeline.frames import DecodedClip, DecodeFailure, decode_clip
from pipeline.shards import (
    MAX_KEY_CHARS,
    MAX_MEMBER_BYTES,
    MAX_SHARD_NAME_CHARS,
    MAX_TEXT_CHARS,
    Sample,
    ShardReader,
    build_sample,
    member_skip_reason,
    shard_name,
    source_key_bytes,
    usable_key,
)
from pipeline.synthetic import encode_clip
from pipeline.writing import OutputStore

REPO = Path(__file__).resolve().parents[2]
GOOD_JSON = {"caption": "A dog.", "url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "status": "success",
             "error_message": None, "yt_meta_dict": None, "clips": "[('00:00:01.000', '00:00:02.500')]"}


def meta(key: str, **over: object) -> bytes:
    return json.dumps({**GOOD_JSON, "key": key, **over}, indent=4).encode()


# ----------------------------------------------------------------------------------------------- builders


def encode_plain(width: int, height: int, pts: list[int], rate: Fraction = Fraction(30)) -> bytes:
    """An H.264 mp4 of flat frames at the given pts (in 1/rate units): cheap even at 8K."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=100000:scenecut=0"}
        stream.codec_context.time_base = 1 / rate
        for i, pts_i in enumerate(pts):
            frame = av.VideoFrame(width, height, "yuv420p")
            for k, plane in enumerate(frame.planes):
                plane.update(bytes([(40 * i + 60 * k) % 256]) * plane.buffer_size)
            frame.pts = pts_i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def encode_audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        for start in range(0, 44100, 1024):
            samples = np.zeros((1, 1024), np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def tar_member(name: str, data: bytes) -> bytes:
    """One member as tarfile writes it (pax headers for long or non-ASCII names)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return _strip_end(buf.getvalue())


def _strip_end(archive: bytes) -> bytes:
    """A tarfile archive without its end-of-archive blocks (tarfile pads the file to 10 KiB)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        last = tar.getmembers()[-1]
    return archive[: last.offset_data + -(-last.size // 512) * 512]


def raw_header(name: bytes, size: int, typeflag: bytes = b"0", size_field: bytes | None = None) -> bytes:
    """A ustar header whose name field holds exactly ``name`` (NUL and non-UTF-8 bytes included)."""
    header = bytearray(tarfile.TarInfo("placeholder").tobuf(tarfile.USTAR_FORMAT))
    header[0:100] = name[:100].ljust(100, b"\0")
    header[124:136] = size_field or b"%011o\0" % size
    header[156:157] = typeflag
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def raw_member(name: bytes, data: bytes, typeflag: bytes = b"0") -> bytes:
    return raw_header(name, len(data), typeflag) + data + bytes(-len(data) % 512)


def pax_member(path: bytes, data: bytes) -> bytes:
    """A pax header whose ``path`` record is ``path`` (may hold NUL), then the member it names."""
    body = b" path=" + path + b"\n"
    length = len(body) + 1
    while len(str(length).encode() + body) != length:
        length = len(str(length).encode() + body)
    record = str(length).encode() + body
    return raw_member(b"PaxHeader", record, typeflag=b"x") + raw_member(b"placeholder", data)


def shard(tmp_path: Path, parts: list[bytes], name: str = "hostile.tar") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(parts) + bytes(1024))
    return str(path)


def read(url: str) -> tuple[ShardReader, list[Sample]]:
    reader = ShardReader(url)
    return reader, list(reader)


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("hostile-clips")
    good = encode_clip(96, 64, 8, Fraction(25))
    # 8K in a subprocess: x264 needs ~0.5 GB to encode it, which this (shared) test process should not keep.
    subprocess.run([sys.executable, "-c", "import sys; from tests.pipeline.test_hostile import encode_plain; "
                    "open(sys.argv[1], 'wb').write(encode_plain(7680, 4320, [0, 1, 2]))", str(root / "8k.mp4")],
                   cwd=REPO, check=True, timeout=120)
    return {
        "good": good,
        "truncated": good[: len(good) // 2],
        "random": random.Random(0).randbytes(4096),
        "empty": b"",
        "audio_only": encode_audio_only(),
        "hour_by_pts": encode_plain(64, 48, [0, 3600], rate=Fraction(1)),  # 2 frames, 3600 s apart
        "hour_by_rate": encode_plain(64, 48, [0, 1], rate=Fraction(1, 3600)),  # 1 frame per hour
        "8k": (root / "8k.mp4").read_bytes(),
    }


# Each bad mp4 and the reason it must give (decode_error rows carry it in `error`).
EXPECTED_FAILURES = {
    "truncated": "could not read the mp4 container",
    "random": "could not read the mp4 container",
    "empty": "empty mp4 (0 bytes)",
    "audio_only": "no video stream in the mp4",
    "hour_by_pts": "clip is 3601 s long, over the 600 s cap",
    "hour_by_rate": "clip is 7200 s long, over the 600 s cap",
}


# ----------------------------------------------------------------------------------------------- tar structure


def test_duplicate_keys_first_run_wins(tmp_path: Path, clips: dict[str, bytes]) -> None:
    url = shard(tmp_path, [
        tar_member("0000001_00000.json", meta("0000001_00000", caption="first")),
        tar_member("0000001_00000.mp4", clips["good"]),
        tar_member("0000002_00000.json", meta("0000002_00000")),
        tar_member("0000001_00000.json", meta("0000001_00000", caption="second")),  # key again: skipped
        tar_member("0000001_00000.mp4", clips["random"]),
        tar_member("0000002_00000.mp4", clips["good"]),  # 0000002 again, after 0000001: skipped
        tar_member("0000003_00000.json", meta("0000003_00000", caption="a")),
        tar_member("0000003_00000.json", meta("0000003_00000", caption="b")),  # same run: the last one kept
    ])
    reader, samples = read(url)
    assert [s.key for s in samples] == ["0000001_00000", "0000002_00000", "0000003_00000"]
    first, second, third = samples
    assert first.source_caption == "first" and first.mp4 == clips["good"]
    assert second.mp4 is None  # its mp4 came after another key: a success without mp4 is a decode_error row
    assert third.source_caption == "b" and "duplicate .json member, the last one kept" in third.read_error
    assert reader.skipped == {"duplicate key": 3} and not reader.truncated


def test_members_without_a_key_are_skipped_and_counted(tmp_path: Path, clips: dict[str, bytes]) -> None:
    url = shard(tmp_path, [
        tar_member("0000001_00000.json", meta("0000001_00000")),
        tar_member(".mp4", clips["good"]),  # no key
        tar_member("README", b"hello"),  # no extension: not a sample member, and does not split 0000001
        tar_member("0000001_00000", b"no dot"),
        tar_member("dir/.json", b"{}"),
        tar_member("0000001_00000.pth", b"\x80\x04K\x01."),  # never unpickled
        tar_member("0000001_00000.mp4", clips["good"]),
    ])
    reader, samples = read(url)
    assert [s.key for s in samples] == ["0000001_00000"]
    assert samples[0].mp4 == clips["good"] and samples[0].read_error is None
    assert reader.skipped == {"no key": 2, "not .mp4/.json/.txt": 3} and reader.members_skipped == 5


def test_hostile_member_names_are_keys_normalised_keys_or_skipped_never_paths(tmp_path: Path) -> None:
    long_key = "k" * (MAX_KEY_CHARS + 1)
    url = shard(tmp_path, [
        tar_member("../../escape.json", meta("x")),
        tar_member("/tmp/absolute.json", meta("x")),
        raw_member(b"0000001_00000\0/../../nul.json", meta("x")),  # ustar: the name ends at the NUL
        pax_member(b"0000002\0_00000.json", meta("x")),  # pax: the NUL is kept, so no valid key
        pax_member(b"0000003_00000.json\n", meta("x")),  # extension "json\n": not a data member
        raw_member(b"\xff\xfe.json", meta("x")),  # not UTF-8
        tar_member("bell\a.json", meta("x")),
        tar_member(f"{long_key}.json", meta("x")),
        tar_member(f"{'k' * MAX_KEY_CHARS}.json", meta("x")),
    ])
    reader, samples = read(url)
    normalised = {"0000002\0_00000": b"0000002\0_00000", "\udcff\udcfe": b"\xff\xfe", "bell\a": b"bell\a",
                  long_key: long_key.encode()}
    assert [s.key for s in samples] == ["../../escape", "/tmp/absolute", *(usable_key(k)[0] for k in normalised),
                                        "k" * MAX_KEY_CHARS]
    by_key = {s.key: s for s in samples}
    for key, raw in normalised.items():
        sample = by_key[usable_key(key)[0]]
        assert sample.key.isprintable() and len(sample.key) <= MAX_KEY_CHARS
        assert source_key_bytes(sample.source_key) == raw and sample.input_flags == ["key_normalised"]
    assert by_key[usable_key("bell\a")[0]].source_key == "bell\a"
    assert by_key[usable_key("\udcff\udcfe")[0]].source_key == "\\xff\\xfe"
    assert "is not valid UTF-8" in by_key[usable_key("\udcff\udcfe")[0]].input_note
    assert f"is {MAX_KEY_CHARS + 1} characters long" in by_key[usable_key(long_key)[0]].input_note
    assert all(s.source_key is None and s.input_flags == [] for s in samples if s.key in ("../../escape", "k" * 256))
    assert reader.skipped == {"not .mp4/.json/.txt": 2} and not reader.truncated
    assert not (tmp_path.parent / "escape.json").exists() and not (tmp_path.parent.parent / "escape.json").exists()


def test_oversized_and_negative_headers(tmp_path: Path) -> None:
    big_pax = raw_member(b"PaxHeader", b"9" * (2 << 20), typeflag=b"x")  # 2 MB extended header: skipped
    negative = raw_header(b"neg.json", 0, size_field=b"\xff" * 12)  # base-256 size field, negative
    url = shard(tmp_path, [big_pax, tar_member("0000001_00000.json", meta("0000001_00000")), negative])
    reader, samples = read(url)
    assert [s.key for s in samples] == ["0000001_00000"]
    assert reader.truncated and "negative size" in reader.error


# ----------------------------------------------------------------------------------------------- json


def test_json_that_is_not_utf8_or_of_the_wrong_types(tmp_path: Path) -> None:
    url = shard(tmp_path, [
        tar_member("a.json", b'{"status": "success", "caption": "caf\xe9", "clips": "[(1, 2)]"}'),
        tar_member("b.json", b"\xff\xfe{}"),
        tar_member("c.json", json.dumps({"status": ["success"], "url": ["x"], "caption": {"a": 1}, "clips": 5,
                                         "key": 7, "error_message": {"code": 1}, "yt_meta_dict": "x"}).encode()),
        tar_member("d.json", b"[1, 2]"),
        tar_member("e.json", b"9" * 5000),  # an int longer than Python's int-from-string limit
        tar_member("f.json", b"[" * 100_000),  # nesting
        tar_member("g.json", meta("g", caption="c" * (MAX_TEXT_CHARS + 10))),
    ])
    _, samples = read(url)
    by_key = {s.key: s for s in samples}
    assert by_key["a"].source_caption == "caf\ufffd" and ".json is not UTF-8" in by_key["a"].meta_error
    assert by_key["a"].clip_start_s == 1.0 and by_key["a"].clip_end_s == 2.0
    assert by_key["b"].source_error.startswith("invalid .json member")
    wrong = by_key["c"]
    for problem in ["status is ['success']", "url is a list", "caption is a dict", "clips is not one (start, end) pair",
                    "json key '7' differs"]:
        assert problem in wrong.meta_error
    assert wrong.source_error == '{"code": 1}' and wrong.source_status == "unknown" and wrong.url is None
    assert "not an object" in by_key["d"].source_error
    assert by_key["e"].source_error.startswith("invalid .json member")
    assert by_key["f"].source_error.startswith("invalid .json member")
    assert len(by_key["g"].source_caption) == MAX_TEXT_CHARS and "caption cut from" in by_key["g"].meta_error


def test_huge_json_is_skipped_without_holding_it(tmp_path: Path, clips: dict[str, bytes]) -> None:
    size = 50 << 20
    assert size > MAX_MEMBER_BYTES["json"]
    path = tmp_path / "huge.tar"
    with path.open("wb") as f:
        f.write(raw_header(b"0000001_00000.json", size))
        chunk = b"[1, " * (1 << 18)  # 1 MiB of a json list that never ends
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(tar_member("0000001_00000.mp4", clips["good"]) + bytes(1024))
    tracemalloc.start()
    try:
        reader, samples = read(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading a shard with a 50 MB json peaked at {peak / 1e6:.0f} MB of Python memory"
    (sample,) = samples
    assert sample.read_error == f".json member too large ({size} bytes, cap {MAX_MEMBER_BYTES['json']}), skipped"
    assert sample.source_error == "no .json member for this key" and sample.mp4 == clips["good"]
    assert reader.skipped == {"too large": 1}


# ----------------------------------------------------------------------------------------------- mp4


@pytest.mark.parametrize("case", sorted(EXPECTED_FAILURES))
def test_bad_mp4s_fail_with_a_reason(clips: dict[str, bytes], case: str) -> None:
    result = decode_clip(clips[case])
    assert isinstance(result, DecodeFailure), result
    assert result.reason.startswith(EXPECTED_FAILURES[case]), result.reason


def test_the_process_pool_gives_the_same_reasons_and_keeps_its_workers(clips: dict[str, bytes]) -> None:
    cases = [*sorted(EXPECTED_FAILURES), "good", "8k"]
    samples = [Sample(key=case, shard="s", mp4=clips[case]) for case in cases]
    with DecodePool(workers=2, max_ahead=4, mode="process", timeout_s=60) as pool:
        results = list(pool.imap(samples))
        assert pool.restarts == 0
    assert [s.key for s, _ in results] == cases
    for sample, result in results:
        if sample.key in EXPECTED_FAILURES:
            assert isinstance(result, DecodeFailure) and result.reason.startswith(EXPECTED_FAILURES[sample.key])
        else:
            assert isinstance(result, DecodedClip) and result.pixel_values.shape == (16, 3, 336, 336)
    assert (results[-1][1].width, results[-1][1].height) == (7680, 4320)


_PEAK_RSS = """
import json, resource, sys
from pipeline.frames import decode_frames
mp4 = open(sys.argv[1], "rb").read()
result = decode_frames(mp4)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would include the forking test process
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"shape": list(result.frames.shape), "size": [result.width, result.height], "peak_rss": peak}))
"""


def test_8k_decodes_at_reduced_resolution_in_bounded_memory(clips: dict[str, bytes], tmp_path: Path) -> None:
    (tmp_path / "8k.mp4").write_bytes(clips["8k"])
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / "8k.mp4")], cwd=REPO, check=True,
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [16, 336, 336, 3] and report["size"] == [7680, 4320]
    print(f"peak RSS of an 8K decode: {report['peak_rss'] / 2**20:.0f} MiB")
    assert report["peak_rss"] < 1.5 * 2**30


def test_frames_over_the_pixel_cap_are_refused(clips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "MAX_PIXELS", 7680 * 4320 - 1)
    result = frames.decode_frames(clips["8k"])
    assert isinstance(result, DecodeFailure) and result.reason == "video is 7680x4320, over the 33.2-megapixel cap"


def test_a_decoder_over_its_memory_cap_fails_that_clip_only(clips: dict[str, bytes]) -> None:
    samples = [Sample(key="8k", shard="s", mp4=clips["8k"]), Sample(key="good", shard="s", mp4=clips["good"])]
    with DecodePool(workers=1, mode="process", timeout_s=60, memory_headroom=128 << 20) as pool:
        (_, big), (_, small) = list(pool.imap(samples))
    assert isinstance(big, DecodeFailure), "an 8K decode needs more than 128 MB of address space"
    # the next clip decodes: a decoder whose address space the 8K clip left grown is replaced first (it failed
    # with EAGAIN once, under load); whether the heap stayed grown varies from run to run
    assert isinstance(small, DecodedClip)
    assert pool.restarts <= 1


# ----------------------------------------------------------------------------------------------- property


_HOSTILE_NAMES = ["../../x.json", "/etc/x.mp4", ".mp4", "README", "a/.txt", "a..b.json", "x.tar.gz", "\x00.json",
                  "k\x07.json", "\udcff.json", "k" * 300 + ".json", "./k.json", "k.JSON", "k.mp4.json", "dir/k.mp4"]


@st.composite
def member_names(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.sampled_from(_HOSTILE_NAMES))
    if kind == 1:
        key = draw(st.sampled_from(["0000001_00000", "0000002_00000", "0000003", "k"]))
        return f"{key}.{draw(st.sampled_from(['json', 'mp4', 'txt', 'pth', '']))}"
    return draw(st.text(min_size=0, max_size=40))


@st.composite
def hostile_tars(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, bytes]], bool]:
    members = draw(st.lists(st.tuples(member_names(), st.binary(max_size=300)), max_size=12))
    parts = []
    for name, data in members:
        raw = name.encode("utf-8", "surrogateescape")
        if "\x00" in name or len(raw) > 100:
            parts.append(pax_member(raw, data))
        else:
            parts.append(raw_member(raw, data))
    archive = b"".join(parts) + bytes(1024)
    mangled = draw(st.booleans())
    if mangled:
        cut = draw(st.integers(0, len(archive)))
        flips = draw(st.lists(st.tuples(st.integers(0, max(0, cut - 1)), st.integers(0, 255)), max_size=4))
        archive = bytearray(archive[:cut])
        for pos, value in flips:
            if pos < len(archive):
                archive[pos] = value
        archive = bytes(archive)
    return archive, members, mangled


def _expected_samples(members: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """The reader's grouping, written the simple way: usable members, runs by key, first run wins."""
    from pipeline.shards import _split_member_name

    runs: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    for name, data in members:
        key, ext = _split_member_name(name or "placeholder")  # an empty pax path leaves the header's name
        if member_skip_reason(key, ext) is not None:
            continue
        if not runs or runs[-1][0] != key:
            runs.append((key, {}))
        runs[-1][1][ext] = data
    kept = []
    for key, found in runs:
        if usable_key(key)[0] not in seen:
            kept.append((key, found))
        seen.add(usable_key(key)[0])
    return kept


@settings(max_examples=300, deadline=timedelta(seconds=5),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tar=hostile_tars())
def test_random_tars_never_break_the_reader(tmp_path: Path, tar: tuple[bytes, list, bool]) -> None:
    archive, members, mangled = tar
    path = tmp_path / "random.tar"
    path.write_bytes(archive)
    reader = ShardReader(str(path))
    samples = list(reader)  # no exception at all: a readable file never raises ShardReadError either
    keys = [s.key for s in samples]
    assert len(keys) == len(set(keys))
    for sample in samples:
        assert sample.key.isprintable() and 0 < len(sample.key) <= MAX_KEY_CHARS
        assert sample.mp4 is None or len(sample.mp4) <= MAX_MEMBER_BYTES["mp4"]
        assert sample.read_error is None or len(sample.read_error) < 4000
    if not mangled:
        assert not reader.truncated
        expected = _expected_samples(members)
        assert keys == [usable_key(key)[0] for key, _ in expected]  # every key a sample, none dropped
        for sample, (key, found) in zip(samples, expected):
            assert sample.mp4 == found.get("mp4")
            if sample.key != key:  # normalised: the tar's key, byte for byte, is in source_key
                assert source_key_bytes(sample.source_key) == key.encode("utf-8", "surrogateescape")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["status", "error_message", "url", "caption", "clips", "key", "yt_meta_dict"]


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(doc=st.dictionaries(st.sampled_from(FIELDS), json_values), txt=st.none() | st.binary(max_size=50))
def test_build_sample_takes_any_json(doc: dict, txt: bytes | None) -> None:
    members = {"json": json.dumps(doc).encode()} | ({"txt": txt} if txt is not None else {})
    sample = build_sample("0000001_00000", "s", members)
    assert isinstance(sample.source_status, str)
    for value in (sample.url, sample.source_caption, sample.source_error, sample.meta_error):
        assert value is None or isinstance(value, str)
    assert (sample.clip_start_s is None) == (sample.clip_end_s is None)
    if sample.clip_start_s is not None:
        assert 0 <= sample.clip_start_s <= sample.clip_end_s


# ----------------------------------------------------------------------------------------------- names, paths


@pytest.mark.parametrize("url", [
    "../../etc/passwd.tar", "/data/../../../etc/cron.d/x.tar", "s3://b/%2e%2e%2f%2e%2e%2fetc.tar",
    "https://h/a.tar?x=../../y", "/data/a\x00b.tar", "/data/" + "x" * 5000 + ".tar", "http://[::1/a.tar",
    "C:\\shards\\..\\..\\a.tar", "/data/.", "/data/%00", "file:///d/%2F..%2F..%2Fx.tar",
])
def test_shard_names_are_one_safe_path_component(url: str, tmp_path: Path) -> None:
    name = shard_name(url)
    assert_safe_component(name)
    store = OutputStore(str(tmp_path / "out"))
    root = os.path.realpath(tmp_path / "out")
    for path in (store.data_path(name), store.chunk_dir(name), store.state_path(name)):
        assert os.path.realpath(path).startswith(root + os.sep)
        assert len(os.path.basename(path).encode()) + len(".tmp-12345678.") <= 255


def assert_safe_component(name: str) -> None:
    assert name and name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
    assert ".." not in name and len(name) <= MAX_SHARD_NAME_CHARS and name.isascii() and name.isprintable()


@settings(max_examples=300, deadline=timedelta(seconds=1))
@given(url=st.text(max_size=300) | st.builds(lambda a, b: f"{a}://{b}", st.sampled_from(["s3", "http", "file"]),
                                               st.text(max_size=300)))
def test_any_url_gives_a_safe_shard_name(url: str) -> None:
    assert_safe_component(shard_name(url))


def test_long_shard_names_stay_distinct() -> None:
    a, b = shard_name("/d/" + "x" * 500 + "a.tar"), shard_name("/d/" + "x" * 500 + "b.tar")
    assert a != b and len(a) == len(b) == MAX_SHARD_NAME_CHARS


# ----------------------------------------------------------------------------------------------- end to end


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_hostile_shard_end_to_end(tmp_path: Path, clips: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """run_shard with the tiny model on every case at once: one row per key, the right status and reason,
    and nothing written outside OUT (the job runs with its cwd in a scratch folder)."""
    from model.tiny import build_tiny_checkpoint
    from pipeline.captioning import Captioner
    from pipeline.manifest import manifest_from_dict
    from pipeline.shard_runner import ShardSettings, run_shard

    ckpt = build_tiny_checkpoint(tmp_path / "pllava", seed=0)
    shards_dir, out, cwd = tmp_path / "shards", tmp_path / "out", tmp_path / "cwd" / "a" / "b"
    shards_dir.mkdir()
    cwd.mkdir(parents=True)
    parts, expected = [], {}
    for i, case in enumerate([*sorted(EXPECTED_FAILURES), "good", "8k"]):
        key = f"00000{i:02d}_00000"
        parts += [tar_member(f"{key}.json", meta(key)), tar_member(f"{key}.mp4", clips[case])]
        expected[key] = ("decode_error", EXPECTED_FAILURES[case]) if case in EXPECTED_FAILURES else ("ok", None)
    parts += [
        tar_member("0000020_00000.json", meta("0000020_00000", url=["x"], clips=5)),  # wrong types, good clip
        tar_member("0000020_00000.mp4", clips["good"]),
        tar_member("0000021.json", meta("0000021", status="failed_to_download", error_message="gone")),
        tar_member("0000020_00000.json", meta("0000020_00000")),  # a duplicate key: skipped
        tar_member("../../../../escape_e2e.json", meta("x")),  # a path-like key: a row, not a file
        tar_member("../../../../escape_e2e.mp4", clips["good"]),
        raw_member(b"/tmp/abs_e2e\0.mp4", clips["good"]),  # no extension left after the NUL: skipped
        tar_member(".mp4", clips["good"]),
        tar_member("0000022_00000.json", b"\xff" + b"x" * 100),
    ]
    expected |= {"0000020_00000": ("ok", None), "0000021": ("source_failed", "gone"),
                 "../../../../escape_e2e": ("ok", None),
                 "0000022_00000": ("decode_error", "mp4 member missing from the shard")}
    url = shard(shards_dir, parts, name="../..%2fhostile.tar".replace("/", "_"))
    m = manifest_from_dict({
        "shards": url, "output": str(out), "languages": ["en"],
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": 3, "batch_size": 4}, "chunk_size": 3,
    })
    before = _tree(tmp_path)
    monkeypatch.chdir(cwd)
    name = shard_name(url)
    with DecodePool(workers=1, max_ahead=4, mode="process", timeout_s=60) as pool:
        outcome = run_shard(url, name, store=OutputStore(str(out)), captioner=Captioner.from_manifest(m),
                            decode_pool=pool, attempt=1, file_metadata={}, settings=ShardSettings.from_manifest(m))
    created = _tree(tmp_path) - before
    assert created and all(p.startswith("out") for p in created), sorted(created)
    assert not list(tmp_path.parent.glob("**/escape_e2e*")) and not Path("/tmp/abs_e2e").exists()
    rows = pq.read_table(out / "data" / f"{name}.parquet").to_pylist()
    got = {r["key"]: (r["status"], r["error"]) for r in rows}
    assert len(rows) == len(got) == len(expected), "a key lost or duplicated"
    for key, (status, reason) in expected.items():
        assert got[key][0] == status or (status == "ok" and got[key][0] == "flagged"), (key, got[key])
        assert reason is None or (got[key][1] or "").startswith(reason), (key, got[key])
    assert outcome.stats.keys_skipped == 0 and outcome.truncated is None


def gnu_tar(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """A tar written by the tarfile module (GNU format: long names, raw bytes kept): ``(name, data)``, data
    None for a directory. A name's surrogate escapes (``\\udcff``) are written as the bytes they stand for."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_every_tar_key_gets_one_row_and_status_counts_input_problems(
        tmp_path: Path, clips: dict[str, bytes]) -> None:
    """Issue 22: keys the writer cannot use as they are (300 characters, a zero-width space, bytes that are not
    UTF-8) and unusable .json members (an array, Latin-1) each get a row that says so; the tar's stray members
    are counted; a rerun after a killed attempt skips the normalised keys it had committed; `recaption status`
    reports both counts per shard, from the progress record."""
    from collections import Counter

    from jobs.status import collect_status, format_report
    from model.tiny import build_tiny_checkpoint
    from pipeline.captioning import Captioner
    from pipeline.manifest import manifest_from_dict
    from pipeline.progress import touch_running, write_shard_list
    from pipeline.rows import Failure, failure_row
    from pipeline.shard_runner import ShardSettings, run_shard
    from pipeline.stats import Stats

    long_key, zero_width, latin1 = "k" * 300, "0000003\u200b_00000", "\udcff0000004_00000"
    url = gnu_tar(tmp_path / "00000.tar", [
        ("subdir", None),  # a directory entry: no sample, counted
        ("0000001_00000.json", meta("0000001_00000")), ("0000001_00000.mp4", clips["good"]),
        (f"{long_key}.json", meta(long_key)), (f"{long_key}.mp4", clips["good"]),
        (f"{zero_width}.json", meta(zero_width)), (f"{zero_width}.mp4", clips["good"]),
        (f"{latin1}.json", meta("x")),  # not UTF-8, no mp4: a decode_error row, still a row
        ("0000005_00000.json", b"[1, 2]"), ("0000005_00000.mp4", clips["good"]),
        ("0000006_00000.json", json.dumps({**GOOD_JSON, "caption": "Un caf\u00e9."}, ensure_ascii=False).encode("latin-1")),
        ("0000006_00000.mp4", clips["good"]),
        ("README.md", b"stray"),  # not a sample member, counted
    ])
    normalised = {raw: usable_key(raw)[0] for raw in (long_key, zero_width, latin1)}
    ckpt = build_tiny_checkpoint(tmp_path / "pllava", seed=0)
    out = tmp_path / "out"
    m = manifest_from_dict({
        "shards": url, "output": str(out), "languages": ["en"],
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": 3, "batch_size": 4}, "chunk_size": 2,
    })
    store, captioner = OutputStore(str(out)), Captioner.from_manifest(m)

    # A killed first attempt had committed the rows of two normalised keys (and its record said so).
    samples = {s.key: s for s in ShardReader(url)}
    early = [failure_row(samples[normalised[k]], Failure("caption", "planted: an earlier attempt's row"),
                         ctx=captioner).to_dict() for k in (long_key, zero_width)]
    store.commit_chunk("00000", early, attempt=1)
    committed = Stats()
    committed.add_rows(early)
    touch_running(store, "00000", committed)

    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        outcome = run_shard(url, "00000", store=store, captioner=captioner, decode_pool=pool, attempt=2,
                            file_metadata={}, settings=ShardSettings.from_manifest(m))
    assert outcome.stats.keys_skipped == 2  # the rerun matched the committed normalised keys
    rows = {r["key"]: r for r in pq.read_table(out / "data" / "00000.parquet").to_pylist()}
    assert sorted(rows) == sorted(["0000001_00000", *normalised.values(), "0000005_00000", "0000006_00000"])

    assert rows["0000001_00000"]["source_key"] is None and rows["0000001_00000"]["input_flags"] == []
    assert rows["0000001_00000"]["error"] is None
    for raw, key in normalised.items():
        row = rows[key]
        assert row["input_flags"] == ["key_normalised"]
        assert source_key_bytes(row["source_key"]) == raw.encode("utf-8", "surrogateescape")
        assert key.isprintable() and len(key) <= MAX_KEY_CHARS
    for raw in (long_key, zero_width):  # committed by the first attempt: kept, not captioned again
        assert rows[normalised[raw]]["status"] == "error" and rows[normalised[raw]]["error"].startswith("planted")
    assert rows[normalised[zero_width]]["source_key"] == zero_width
    bad_utf8 = rows[normalised[latin1]]
    assert bad_utf8["source_key"] == "\\xff0000004_00000"
    assert (bad_utf8["status"], bad_utf8["error"]) == ("decode_error", "mp4 member missing from the shard")

    array = rows["0000005_00000"]  # captioned: the mp4 is good, the json's fields are null, and the row says why
    assert array["status"] in ("ok", "flagged") and array["caption_en"] is not None and array["url"] is None
    assert array["input_flags"] == ["json_invalid"] and array["error"] == ".json member is a list, not an object"
    latin = rows["0000006_00000"]
    assert latin["status"] in ("ok", "flagged") and latin["source_caption"] == "Un caf\ufffd."
    assert latin["input_flags"] == ["json_not_utf8"] and latin["error"].startswith(".json is not UTF-8")

    # The progress record counts them (whole data file, both attempts), and status reads them from it.
    record = json.loads((out / "_progress" / "00000.json").read_text())
    assert record["input_flags"] == dict(Counter(f for r in rows.values() for f in r["input_flags"])) == {
        "key_normalised": 3, "json_invalid": 1, "json_not_utf8": 1}
    assert record["members_skipped"] == {"not a regular file": 1, "not .mp4/.json/.txt": 1}
    write_shard_list(store, [("00000", url)])  # as the driver does
    report = collect_status(store)
    shard_info = report["shards"]["00000"]
    assert shard_info["input_flags"] == record["input_flags"] and report["input_flags"] == record["input_flags"]
    assert shard_info["members_skipped"] == report["members_skipped"] == record["members_skipped"]
    text = format_report(report)
    assert ("input: rows with input problems: json_invalid=1 json_not_utf8=1 key_normalised=3; "
            "tar members skipped: 2 (not .mp4/.json/.txt: 1, not a regular file: 1)") in text
