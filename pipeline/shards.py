"""Reading Panda-70M webdataset shards: shard lists, streaming, and one ``Sample`` per key.

The format accepted is the one of docs/CONTRACTS.md, Shard format.

Shard contents are untrusted: only ``.mp4``, ``.json`` and ``.txt`` members are read, nothing is unpickled
or ``eval``-ed, and member names are never used as paths. Errors in a sample are data
(``Sample.source_error``, ``Sample.meta_error``, ``Sample.read_error``); only an unreadable shard raises
(``ShardReadError``). Every key of the tar becomes one sample: a key that cannot be a row's key as it is
(too long, unprintable characters, bytes that are not UTF-8) is normalised (``usable_key``), the tar's
key kept in ``Sample.source_key``; what was wrong with a sample's input is in ``Sample.input_flags``.

Remote shards (http(s)://, and s3://, gs://, az://, hf:// through pipeline/storage.py) are streamed, and a stream that breaks (connection reset, a body shorter
than announced, a 5xx) is reopened at the byte already read (``_ResumableStream``), so a dropped connection
costs a retry, not the rest of the shard. A shard that still could not be read to its end-of-archive block
is reported by ``ShardReader.incomplete``: what was read is valid, but the shard must not count as done.

The tar is parsed here, one 512-byte header at a time (``tarfile.TarInfo.frombuf``), instead of with
``tarfile``'s stream mode, because the latter ends silently on a shard cut at a member boundary: we must
tell a complete shard (end-of-archive block) from a truncated one.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import logging
import math
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, BinaryIO

# Opening shards wherever they are lives in pipeline/storage; these names are the reader's API as before.
from pipeline.storage.streams import (  # noqa: F401
    READ_RETRIES,
    REDACTED,
    RETRY_BACKOFF_S,
    ShardReadError,
    ShardStreamError,
    _skip,
    open_shard_stream,
    redact_urls,
    safe_url,
)

if TYPE_CHECKING:
    from pipeline.manifest import StorageSpec

BLOCK = 512
READ_EXTENSIONS = ("mp4", "json", "txt")
# A member larger than this is skipped (not held in memory) and reported in Sample.read_error. json.loads
# can need ~25x its input in Python objects (``[{},{},...]``), so a Panda json (a few hundred KB with
# yt_meta_dict and subtitles) gets 8 MB, not more.
MAX_MEMBER_BYTES = {"mp4": 2 << 30, "json": 8 << 20, "txt": 1 << 20}
# Longer text fields (caption, error_message, url) are cut here, with a note in Sample.meta_error: a row
# is held in memory until its chunk is committed.
MAX_TEXT_CHARS = 1 << 16
# Keys longer than this, or with unprintable characters (NUL, control or zero-width characters, bytes that
# are not UTF-8), are normalised (see usable_key). Panda keys have 13 characters.
MAX_KEY_CHARS = 256
# A normalised key keeps this many characters of the tar's key, for a reader to recognise it.
NORMALISED_KEY_PREFIX_CHARS = 64
MAX_EXTENDED_HEADER_BYTES = 1 << 20  # pax / GNU long-name headers; a bigger one is skipped
# Output files are named after the shard ("data/{shard}.parquet", ".{shard}.parquet.tmp-…").
MAX_SHARD_NAME_CHARS = 200

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------- naming


_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shard_spec(spec: str | list[str]) -> list[str]:
    """Shard URLs from a path/URL or a list of them; ``{00000..00099}`` ranges expand, zero-padded.

    Local paths, ``file://``, ``s3://`` and ``http(s)://`` are passed through as they are.
    """
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shard_spec(item)]
    match = _BRACE_RANGE.search(spec)
    if match is None:
        return [spec]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    step = 1 if int(last) >= int(first) else -1
    head, tail = spec[: match.start()], spec[match.end():]
    return [
        url
        for n in range(int(first), int(last) + step, step)
        for url in expand_shard_spec(f"{head}{n:0{width}d}{tail}")
    ]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def shard_name(url: str) -> str:
    """The shard's name for output paths: its basename without ``.tar``, made safe as one path component.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``, ``..`` becomes ``__``, an empty or dot-only name
    becomes ``_``. A name over ``MAX_SHARD_NAME_CHARS`` keeps its start and ends with a hash of the whole,
    so that file names built from it stay under the usual 255-byte limit. Shards with the same basename in
    different folders get the same name: a job must not mix them (the job's shard list is checked for that,
    not this function).
    """
    try:
        path = urllib.parse.urlsplit(url).path if "://" in url else url
    except ValueError:  # e.g. an unclosed IPv6 host: the name is still made from the text
        path = url
    base = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    base = urllib.parse.unquote(base)
    base = base.removesuffix(".tar")
    name = _UNSAFE.sub("_", base).replace("..", "__")
    if len(name) > MAX_SHARD_NAME_CHARS:
        digest = hashlib.blake2b(base.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        name = f"{name[:MAX_SHARD_NAME_CHARS - 17]}-{digest}".replace("..", "__")
    return "_" if not name.strip(".") else name


# ----------------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One key of a shard: a clip (``SSSSSRR_CCCCC``) or a failed source video (``SSSSSRR``).

    ``mp4`` is None when the tar has no mp4 member for the key (failed source video), when that member was
    cut off by a truncated shard, or when it was too large; ``read_error`` then says which of the latter.
    A sample whose source status is ``success`` but which has no mp4 is a decode error for the job.
    """

    key: str
    shard: str
    mp4: bytes | None = None
    url: str | None = None
    video_id: str | None = None
    clip_start_s: float | None = None
    clip_end_s: float | None = None
    source_caption: str | None = None
    title: str | None = None  # the source video's title, when the metadata has one (video2dataset yt_meta_dict)
    source_status: str = "unknown"  # the json's status ("success", "failed_to_download", ...)
    source_error: str | None = None  # the json's error_message, or why the json is missing/unusable
    meta_error: str | None = None  # fields of a readable json that could not be parsed (non-fatal)
    read_error: str | None = None  # members that could not be read (truncated shard, oversized member)
    # The shard ended while this key was being read: a complete copy may hold more of its members. The job
    # does not commit such a sample; the next attempt reads it again.
    cut_by_end: bool = False
    # The tar's key (``source_key_text``) when ``key`` is its normalised form, else None.
    source_key: str | None = None
    # What is wrong with the input, as names (``InputFlag``) and as readable notes (the row's ``error`` when
    # it has no failure of its own); the sample is processed all the same.
    input_flags: list[str] = field(default_factory=list)
    input_notes: list[str] = field(default_factory=list)

    @property
    def input_note(self) -> str | None:
        return "; ".join(self.input_notes) or None

    def flag_input(self, flag: InputFlag, note: str) -> None:
        if flag.value not in self.input_flags:
            self.input_flags.append(flag.value)
            self.input_notes.append(note)

    @property
    def source_failed(self) -> bool:
        """The source video failed in video2dataset (``failed_to_download`` / ``failed_to_subsample``)."""
        return self.source_status.startswith("failed")


class InputFlag(StrEnum):
    """A name in a row's ``input_flags``: a problem of the sample's tar members that did not stop it."""

    KEY_NORMALISED = "key_normalised"  # the tar's key could not be a row's key; see usable_key
    JSON_MISSING = "json_missing"  # no .json member (or one over the size cap): the json's fields are null
    JSON_INVALID = "json_invalid"  # the .json is not JSON, or not a JSON object: the json's fields are null
    JSON_NOT_UTF8 = "json_not_utf8"  # the .json is not UTF-8: read with U+FFFD for the bytes that are not


def _key_bytes(key: str) -> bytes:
    """The tar name's bytes of a key (keys are decoded with surrogateescape, so this gives them back)."""
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF: not from a tar name, but not a crash
        return key.encode("utf-8", "surrogatepass")


def key_problem(key: str) -> str | None:
    """Why the tar's ``key`` cannot be a row's key as it is ("is not valid UTF-8", "is 300 characters long,
    over 256", "holds unprintable characters (U+200B)"), or None: a row's key is printable UTF-8 text of at
    most MAX_KEY_CHARS characters, as it goes into Parquet, logs and the HTML contact sheet."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(key) > MAX_KEY_CHARS:
        return f"is {len(key)} characters long, over {MAX_KEY_CHARS}"
    odd = sorted({c for c in key if not c.isprintable()})
    if odd:
        shown = ", ".join(f"U+{ord(c):04X}" for c in odd[:4])
        return f"holds unprintable characters ({shown}{', ...' if len(odd) > 4 else ''})"
    return None


def usable_key(key: str) -> tuple[str, str | None]:
    """(the row's key, why the tar's key had to be normalised or None).

    A normalised key is the tar key's first ``NORMALISED_KEY_PREFIX_CHARS`` characters with each unprintable
    one (or byte that is not UTF-8) made ``_``, then ``~`` and 16 hex digits of a hash of the key's bytes: the
    same tar key always gives the same row key (a resumed shard skips it). Two tar keys share a row key only
    through a 64-bit hash collision or a valid key spelt like a normalised one; the reader then keeps the
    first, as for any key that comes back.
    """
    problem = key_problem(key)
    if problem is None:
        return key, None
    prefix = "".join(c if c.isprintable() else "_" for c in key[:NORMALISED_KEY_PREFIX_CHARS])
    return f"{prefix}~{hashlib.blake2b(_key_bytes(key), digest_size=8).hexdigest()}", problem


def source_key_text(key: str) -> str:
    """A normalised key's ``source_key``: the tar key's bytes as text, a byte that is not UTF-8 written
    ``\\xNN`` and a backslash doubled, so that ``source_key_bytes`` gives back the exact bytes."""
    return _key_bytes(key).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


_SOURCE_KEY_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def source_key_bytes(source_key: str) -> bytes:
    """The tar key's bytes from a row's ``source_key`` (the inverse of ``source_key_text``)."""
    return _SOURCE_KEY_ESCAPE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                                  source_key.encode("utf-8"))


_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")


def youtube_video_id(url: str | None) -> str | None:
    """The 11-character id of a YouTube ``watch?v=``, ``youtu.be/``, ``/shorts/`` or ``/embed/`` URL."""
    if not isinstance(url, str):
        return None
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    candidate = None
    if host == "youtu.be":
        candidate = parts.path.lstrip("/").split("/")[0]
    elif host == "youtube.com" or host.endswith(".youtube.com"):
        if parts.path == "/watch":
            candidate = (urllib.parse.parse_qs(parts.query).get("v") or [None])[0]
        elif parts.path.startswith(("/shorts/", "/embed/", "/v/")):
            candidate = parts.path.split("/")[2]
    return candidate if candidate and _YOUTUBE_ID.match(candidate) else None


def parse_timestamp(value: object) -> float:
    """Seconds from ``"H:MM:SS.mmm"`` / ``"HH:MM:SS.mmm"`` / ``"MM:SS"`` / a number. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")  # noqa: TRY004 - callers handle one error type
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        parts = value.strip().split(":")
        if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d+)?", p) for p in parts):
            raise ValueError(f"not a timestamp: {value!r}")
        seconds = 0.0
        for part in parts:
            seconds = seconds * 60 + float(part)
    else:
        raise ValueError(f"not a timestamp: {value!r}")  # noqa: TRY004 - callers handle one error type
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a timestamp: {value!r}")
    return seconds


def parse_clip_span(clips: object) -> tuple[float, float]:
    """(start_s, end_s) of a success row's ``clips``: ``"[('00:00:03.500', '00:00:07.033')]"``.

    Parsed with ``ast.literal_eval`` (never ``eval``); a list holding one pair or a bare pair is accepted.
    Raises ValueError for anything else (several clips, bad timestamps, start after end).
    """
    value = clips
    if isinstance(clips, str):
        if len(clips) > 10_000:
            raise ValueError("clips string too long")
        try:
            value = ast.literal_eval(clips)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
            raise ValueError(f"clips is not a Python literal: {clips[:80]!r}") from err
    if isinstance(value, list) and value and all(isinstance(span, (list, tuple)) for span in value):
        if len(value) != 1:
            raise ValueError(f"clips holds {len(value)} spans, not one (start, end) pair")
        value = value[0]
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"clips is not one (start, end) pair: {str(clips)[:80]!r}")
    start, end = parse_timestamp(value[0]), parse_timestamp(value[1])
    if end < start:
        raise ValueError(f"clip ends before it starts: {str(clips)[:80]!r}")
    return start, end


def _decode_text(data: bytes, what: str, problems: list[str], sample: Sample | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{what} is not UTF-8")
        if sample is not None:
            sample.flag_input(InputFlag.JSON_NOT_UTF8,
                              f"{what} is not UTF-8 (read with U+FFFD for the bytes that are not)")
        return data.decode("utf-8", errors="replace")


def _capped(text: str, what: str, problems: list[str]) -> str:
    if len(text) <= MAX_TEXT_CHARS:
        return text
    problems.append(f"{what} cut from {len(text)} to {MAX_TEXT_CHARS} characters")
    return text[:MAX_TEXT_CHARS]


def build_sample(key: str, shard: str, members: dict[str, bytes], read_error: str | None = None) -> Sample:
    """A ``Sample`` from a key's members (``{"json": ..., "mp4": ..., "txt": ...}``); never raises.

    ``key`` is the tar's key; the sample's is ``usable_key(key)``. Input problems (a normalised key, a
    missing, invalid or non-UTF-8 .json) are flagged in ``input_flags`` with a note each."""
    row_key, key_problem_ = usable_key(key)
    sample = Sample(key=row_key, shard=shard, mp4=members.get("mp4"), read_error=read_error)
    if key_problem_ is not None:
        sample.source_key = source_key_text(key)
        sample.flag_input(InputFlag.KEY_NORMALISED, f"key normalised: the tar's key {key_problem_} "
                                                    f"(source_key holds it)")
    problems: list[str] = []
    txt = _decode_text(members["txt"], ".txt", problems) if "txt" in members else None
    meta: object = None
    if "json" not in members:
        sample.source_error = "no .json member for this key"
        sample.flag_input(InputFlag.JSON_MISSING, sample.source_error)
    else:
        try:
            meta = json.loads(_decode_text(members["json"], ".json", problems, sample))
        except (ValueError, RecursionError) as err:
            sample.source_error = f"invalid .json member: {str(err)[:200]}"
        else:
            if not isinstance(meta, dict):
                sample.source_error = f".json member is a {type(meta).__name__}, not an object"
                meta = None
        if meta is None:
            sample.flag_input(InputFlag.JSON_INVALID, sample.source_error or "invalid .json member")
    if isinstance(meta, dict):
        status = meta.get("status")
        if isinstance(status, str) and status:
            sample.source_status = status
        else:
            problems.append(f"status is {repr(status)[:80]}")
        error = meta.get("error_message")
        if error is not None:
            sample.source_error = (_capped(error, "error_message", problems) if isinstance(error, str)
                                   else json.dumps(error)[:1000])
        url = meta.get("url")
        if isinstance(url, str):
            sample.url = _capped(url, "url", problems)
            sample.video_id = youtube_video_id(sample.url)
        elif url is not None:
            problems.append(f"url is a {type(url).__name__}")
        caption = meta.get("caption")
        if isinstance(caption, str):
            sample.source_caption = _capped(caption, "caption", problems)
        elif caption is not None:
            problems.append(f"caption is a {type(caption).__name__}")
        title = meta.get("title")
        yt_meta = meta.get("yt_meta_dict")
        if title is None and isinstance(yt_meta, dict) and isinstance(yt_meta.get("info"), dict):
            title = yt_meta["info"].get("title")
        if isinstance(title, str):
            sample.title = _capped(title, "title", problems)
        json_key = meta.get("key")
        if json_key is not None and json_key != key:
            problems.append(f"json key {str(json_key)[:40]!r} differs from the member key")
        # Failed source videos keep the original multi-clip list: no single span to report.
        if not sample.source_failed and "clips" in meta:
            try:
                sample.clip_start_s, sample.clip_end_s = parse_clip_span(meta["clips"])
            except ValueError as err:
                problems.append(str(err))
    if sample.source_caption is None and txt is not None:
        sample.source_caption = _capped(txt, ".txt", problems)
    if problems:
        sample.meta_error = "; ".join(problems)
    return sample


# ----------------------------------------------------------------------------------------------- tar


class _TarEnd(Exception):
    """The tar stream stopped: ``truncated`` says whether that was before the end-of-archive block."""

    def __init__(self, reason: str, truncated: bool):
        super().__init__(reason)
        self.truncated = truncated


@dataclass
class _Member:
    name: str
    size: int
    data: bytes | None  # None when skipped
    complete: bool = True
    regular: bool = True  # False: a directory, link, device or fifo, never part of a sample


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any (records are ``"<len> key=value\\n"``)."""
    pos = 0
    while pos < len(data):
        match = re.match(rb"(\d+) ", data[pos:pos + 20])
        if not match or int(match.group(1)) <= 0:
            return None
        record = data[pos + len(match.group(0)):pos + int(match.group(1))]
        pos += int(match.group(1))
        if record.startswith(b"path="):
            return record[5:].removesuffix(b"\n").decode("utf-8", errors="surrogateescape")  # one newline ends a record
    return None


def _iter_tar_members(stream: BinaryIO, wanted: tuple[str, ...]) -> Iterator[_Member]:
    """Regular-file members in order; data read for names ending in ``.{wanted}``. Ends with ``_TarEnd``."""
    offset = 0
    long_name: str | None = None
    while True:
        header = _read_exact(stream, BLOCK)
        if not header:
            raise _TarEnd("shard is empty (0 bytes)" if offset == 0 else
                          f"shard ends at byte {offset} without an end-of-archive block", truncated=True)
        if len(header) < BLOCK:
            raise _TarEnd(f"shard ends inside a tar header at byte {offset}", truncated=True)
        if header == bytes(BLOCK):
            raise _TarEnd("end of archive", truncated=False)
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise _TarEnd(f"invalid tar header at byte {offset}: {err}", truncated=True) from None
        if info.size < 0:  # base-256 size fields can be negative
            raise _TarEnd(f"invalid tar header at byte {offset}: negative size", truncated=True)
        offset += BLOCK
        padded = -(-info.size // BLOCK) * BLOCK
        name = long_name or info.name
        long_name = None
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE) and info.size > MAX_EXTENDED_HEADER_BYTES:
            got = _skip(stream, padded)  # ignored: the member keeps the name in its own header
            offset += got
            if got < padded:
                raise _TarEnd(f"shard ends inside an extended header at byte {offset}", truncated=True)
            continue
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise _TarEnd(f"shard ends inside an extended header at byte {offset}", truncated=True)
            offset += padded
            # surrogateescape, as for ustar names: bytes that are not UTF-8 stay visible (and the key is
            # normalised), instead of two names becoming one key through U+FFFD
            long_name = (data[: info.size].split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
                         if info.type == tarfile.GNUTYPE_LONGNAME else _pax_path(data[: info.size]))
            continue
        if info.type not in tarfile.REGULAR_TYPES:
            got = _skip(stream, padded)
            offset += got
            yield _Member(name, info.size, None, got == padded, regular=False)
            if got < padded:
                raise _TarEnd(f"shard ends inside member {name[:100]!r}", truncated=True)
            continue
        ext = name.rsplit("/", 1)[-1].partition(".")[2].lower()
        if ext in wanted and info.size <= MAX_MEMBER_BYTES.get(ext, 0):
            data = _read_exact(stream, info.size)
            complete = len(data) == info.size
            if complete:
                complete = _skip(stream, padded - info.size) == padded - info.size
            offset += padded
            yield _Member(name, info.size, data, complete)
        else:
            got = _skip(stream, padded)
            offset += padded
            complete = got == padded
            yield _Member(name, info.size, None, complete)
        if not complete:
            raise _TarEnd(f"shard ends inside member {name[:100]!r}", truncated=True)


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the basename's first dot; the rest is the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def member_skip_reason(key: str, ext: str) -> str | None:
    """Why a member named ``{key}.{ext}`` is not part of any sample, or None when it is.

    Keys are only ever data (a row's ``key``), never paths. Any non-empty key is a sample's: one that cannot
    be a row's key as it is is normalised (``usable_key``), not skipped.
    """
    if ext not in READ_EXTENSIONS:
        return "not .mp4/.json/.txt"
    if not key or key.endswith("/"):
        return "no key"
    return None


class ShardReader:
    """Iterate a shard's samples in tar order, grouping consecutive members by key (webdataset-style).

    ``ShardReader(url)`` opens nothing; iteration opens the stream and raises ``ShardReadError`` if it
    cannot. ``storage`` says where s3:// shards live (else the AWS_* environment). A remote stream that
    breaks is resumed at the byte already read (``read_retries`` attempts in a row without progress,
    ``retry_backoff_s`` doubling): a resumed read yields exactly what an unbroken one does. A shard that
    still ends early (or holds a corrupt header) stops the iteration after the last sample it could form;
    ``truncated`` is then True and ``error`` says why. The key being read when the shard ended is still
    yielded if any of its members was seen, with ``read_error`` set: a member cut short is dropped (its mp4
    is None, never a partial file); an mp4 that is there was read completely.

    After iteration, ``samples_read`` counts the samples yielded and ``incomplete`` is None only when the
    whole tar was read to its end-of-archive block and gave at least one sample; otherwise it says why in
    one line. A shard that is ``incomplete`` must not be marked done: what was read stays valid.

    Each key is yielded once, under its ``usable_key``. Members that belong to no sample (see
    ``member_skip_reason``; directories, links and other entries that are not regular files) are skipped
    and counted in ``skipped`` by reason. A key that comes back after other keys (not contiguous) is a
    duplicate: the first run of members wins, as it was already yielded; later ones are skipped. Within one
    run, a repeated member (two ``.json``) keeps the last one, noted in ``read_error``.
    """

    def __init__(
        self,
        url: str,
        storage: StorageSpec | None = None,
        read_retries: int = READ_RETRIES,
        retry_backoff_s: float = RETRY_BACKOFF_S,
    ):
        self.url = url
        self.shard = shard_name(url)
        self.storage = storage
        self.read_retries = read_retries
        self.retry_backoff_s = retry_backoff_s
        self.truncated = False
        self.error: str | None = None
        self.skipped: Counter[str] = Counter()  # members skipped, by reason
        self.samples_read = 0  # samples yielded
        self.stream_retries = 0  # times a remote stream was reopened (see _ResumableStream)
        self._finished = False  # the end-of-archive block was read
        self._open_error: str | None = None

    @property
    def members_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def incomplete(self) -> str | None:
        """None when the tar was read to its end-of-archive block and gave a sample; else why not."""
        if self.error is not None:
            return self.error
        if self._open_error is not None:
            return self._open_error
        if not self._finished:
            return "the shard was not read to its end"
        if self.samples_read == 0:
            if not self.skipped:
                return "no usable sample: the tar has no members"
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            return f"no usable sample: {self.members_skipped} members skipped ({reasons})"
        return None

    def __iter__(self) -> Iterator[Sample]:
        self.truncated, self.error, self.skipped = False, None, Counter()
        self.samples_read, self.stream_retries, self._finished, self._open_error = 0, 0, False, None
        try:
            stream = open_shard_stream(self.url, self.storage, read_retries=self.read_retries,
                                       retry_backoff_s=self.retry_backoff_s)
        except ShardReadError as err:
            self._open_error = str(err)
            raise
        seen: set[bytes] = set()  # digests of the keys yielded: 16 bytes each, whatever the key length
        key: str | None = None
        duplicate = False
        members: dict[str, bytes] = {}
        problems: list[str] = []

        def note(problem: str) -> None:  # a hostile run of members must not grow read_error without bound
            if problem not in problems and len(problems) < 8:
                problems.append(problem)

        try:
            for member in _iter_tar_members(stream, READ_EXTENSIONS):
                member_key, ext = _split_member_name(member.name)
                reason = member_skip_reason(member_key, ext) if member.regular else "not a regular file"
                if reason is not None:
                    self.skipped[reason] += 1
                    continue
                if member_key != key:
                    if key is not None and not duplicate:
                        self.samples_read += 1
                        yield build_sample(key, self.shard, members, "; ".join(problems) or None)
                    key, members, problems = member_key, {}, []
                    row_key = usable_key(key)[0]  # unique per tar key: a key normalised the same is one key
                    digest = hashlib.blake2b(row_key.encode(), digest_size=16).digest()
                    duplicate = digest in seen
                    seen.add(digest)
                    if duplicate:
                        log.warning("shard %s: key %r appears again after other keys; the first one is kept",
                                    self.shard, row_key[:100])
                if duplicate:
                    self.skipped["duplicate key"] += 1
                elif not member.complete:
                    note(f".{ext} member cut off by the end of the shard")
                elif member.data is None:
                    self.skipped["too large"] += 1
                    note(f".{ext} member too large ({member.size} bytes, cap {MAX_MEMBER_BYTES[ext]}), skipped")
                elif ext in members:
                    note(f"duplicate .{ext} member, the last one kept")
                    members[ext] = member.data
                else:
                    members[ext] = member.data
        except _TarEnd as end:
            if end.truncated:
                self.truncated, self.error = True, end.args[0]
                if key is not None:
                    note(f"shard truncated: {end.args[0]}")
            else:
                self._finished = True
        except ShardStreamError as err:  # a remote stream that could not be resumed
            self.truncated, self.error = True, str(err)
            if key is not None:
                note(f"shard truncated: {self.error}")
        except (OSError, http.client.HTTPException) as err:  # a local read error
            self.truncated, self.error = True, f"reading the shard failed: {err}"
            if key is not None:
                note(f"shard truncated: {self.error}")
        finally:
            self.stream_retries = getattr(stream, "retries_done", 0)
            stream.close()
        if key is not None and not duplicate:
            self.samples_read += 1
            sample = build_sample(key, self.shard, members, "; ".join(problems) or None)
            sample.cut_by_end = self.truncated
            yield sample
