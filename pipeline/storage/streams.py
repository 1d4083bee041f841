"""Reading a shard as one forward-only stream, wherever it is: local files, http(s):// (our opener, below), and
the object stores of pipeline/storage (s3://, gs://, az://, hf://) through their fsspec filesystems.

What is ours here, and why: the libraries read bytes, but none tells a stream cut short from a whole one and
goes on from the byte reached (``_ResumableStream``: a dropped connection costs a retry, not the shard, and a
body shorter than announced is an error, never the end of the tar); and URLs are made safe to log and record
(``safe_url``: credentials and presigned signatures never reach a log line or an output file).
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pipeline.storage import StoreUnavailable, backend

if TYPE_CHECKING:
    from pipeline.manifest import StorageSpec

BLOCK = 512  # a tar block: the smallest read buffer worth having

HTTP_TIMEOUT_S = 60
# Shards on object stores are read through a buffer of this size (one ranged GET per fill).
STORE_READ_BUFFER_BYTES = 8 << 20
# Remote shards (http(s)://, s3://) whose connection drops are reopened at the byte already read: up to
# READ_RETRIES attempts in a row without progress, waiting RETRY_BACKOFF_S, then twice as long each time, at
# most RETRY_MAX_BACKOFF_S. ShardReader takes the first two as arguments.
READ_RETRIES = 5
RETRY_BACKOFF_S = 0.5
RETRY_MAX_BACKOFF_S = 10.0

log = logging.getLogger(__name__)


class ShardReadError(Exception):
    """The shard cannot be opened at all (missing file, HTTP error, no such object)."""



# ----------------------------------------------------------------------------------------------- opening


def open_shard_stream(
    url: str,
    storage: StorageSpec | None = None,
    *,
    read_retries: int = READ_RETRIES,
    retry_backoff_s: float = RETRY_BACKOFF_S,
) -> BinaryIO:
    """A forward-only binary stream of the shard; nothing is staged on disk. Raises ``ShardReadError``.

    ``storage`` says where object stores are (pipeline/storage.py). Remote streams (http(s)://, object stores)
    resume where they stopped after a dropped connection (see ``_ResumableStream``): up to ``read_retries``
    consecutive attempts without progress, ``retry_backoff_s`` before the first, doubling. A stream that still
    cannot go on raises ``ShardStreamError`` from ``read``. Local files are read as they are: a short local
    file is final.
    """
    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    retry = {"retries": read_retries, "backoff_s": retry_backoff_s}
    try:
        if scheme in ("", "file"):
            path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path) if scheme else url
            return open(path, "rb")
        if scheme in ("http", "https"):
            return cast(BinaryIO, _ResumableStream(_HttpOpener(url), safe_url(url), **retry))
        if backend(url) is not None:
            return cast(BinaryIO, _ResumableStream(_StoreOpener(url, storage), safe_url(url), **retry))
    except (OSError, ValueError, StoreUnavailable) as err:  # local files; a store's library missing or set-up
        raise ShardReadError(f"cannot open shard {url if not scheme else safe_url(url)}: {err}") from err
    raise ShardReadError(f"cannot open shard {safe_url(url)}: unsupported scheme {scheme!r}")


REDACTED = "<redacted>"  # stands where a URL's credentials were: user:password@ and the query string
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def safe_url(url: str) -> str:
    """``url`` as the job logs and records it: ``user:password@`` and the query string (a presigned URL's
    signature) replaced by ``REDACTED``, the fragment dropped. Scheme, host and path stay, so the shard's
    name, and what a rerun resumes, are the same with any signature. Text without ``://`` (a local path,
    where ``?`` is part of the name) and a URL with nothing to hide come back unchanged.
    Only the actor reading the shard ever gets the full URL."""
    if "://" not in url or not any(c in url for c in "@?#"):  # (the common case, without parsing: 100k shards)
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.netloc.rpartition("@")[2]
    if host == parts.netloc and not parts.query and not parts.fragment:
        return url
    netloc = f"{REDACTED}@{host}" if host != parts.netloc else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + (f"?{REDACTED}" if parts.query else "")


def redact_urls(text: str) -> str:
    """``text`` (an exception message, a failure reason) with every URL in it passed through ``safe_url``."""
    return _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)), text) if "://" in text else text


class ShardStreamError(OSError):
    """A remote shard's stream broke and could not be resumed (retries spent, or the shard changed)."""


class _TransientError(OSError):
    """A failure worth retrying that is not an OSError of its own (a 5xx answer, a body cut short)."""


# What a retry may cure. urllib's HTTPError / URLError are OSErrors; a 4xx answer is turned into
# ShardReadError (final) before it gets here. TimeoutError (socket timeouts) is an OSError too.
_TRANSIENT = (OSError, http.client.HTTPException)


class _ResumableStream:
    """A remote shard read front to back, reopened at the byte offset already consumed when it breaks.

    ``open_at(offset)`` returns ``(stream, total)``: a stream whose next byte is byte ``offset`` of the shard,
    and the shard's size when known (Content-Length, S3 object size). It raises ``ShardReadError`` for what
    no retry can cure (404, 403, the shard changed) and anything in ``_TRANSIENT`` for the rest. A body that
    ends before ``total`` is an error, not the end of the shard. After ``retries`` consecutive failed
    attempts without a byte gained (the count starts again once bytes come in), ``read`` raises
    ``ShardStreamError``; the first open raises ``ShardReadError`` instead. Waits ``backoff_s`` before the
    first retry, doubling up to ``max_backoff_s``.
    """

    def __init__(
        self,
        open_at: Callable[[int], tuple[BinaryIO, int | None]],
        url: str,
        *,
        retries: int = READ_RETRIES,
        backoff_s: float = RETRY_BACKOFF_S,
        max_backoff_s: float = RETRY_MAX_BACKOFF_S,
    ):
        self.url = url  # already made safe for logs
        self.pos = 0  # bytes handed out by read()
        self.total: int | None = None
        self.retries_done = 0  # over the whole read, for reports
        self._open_at = open_at
        self._retries, self._backoff_s, self._max_backoff_s = max(0, retries), backoff_s, max_backoff_s
        self._failures = 0  # consecutive, without progress
        self._stream: BinaryIO | None = None
        self.closed = False
        try:
            self._open()
        except _TRANSIENT as err:
            self._recover(err, first=True)

    def _open(self) -> None:
        stream, total = self._open_at(self.pos)
        if total is not None and self.total is not None and total != self.total:
            stream.close()
            raise ShardReadError(f"shard {self.url} changed while being read: {total} bytes, was {self.total}")
        if total is not None:
            self.total = total
        self._stream = stream

    def _drop_stream(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is dropped anyway
                pass
            self._stream = None

    def _where(self) -> str:
        if self.total is None:
            return "the start" if self.pos == 0 else f"byte {self.pos} of an unknown size"
        return f"byte {self.pos} of {self.total}"

    def _recover(self, err: BaseException, first: bool = False) -> None:
        """Back off and reopen at ``self.pos``; raise once ``retries`` attempts in a row have failed."""
        self._drop_stream()
        while True:
            self._failures += 1
            if self._failures > self._retries:
                if first:
                    raise ShardReadError(f"cannot open shard {self.url} after {self._retries} retries: "
                                         f"{_describe(err)}")
                raise ShardStreamError(f"stream ended early after {self._retries} retries: {_describe(err)} "
                                       f"({self._where()})")
            delay = min(self._backoff_s * 2 ** (self._failures - 1), self._max_backoff_s)
            log.warning("shard %s: %s at %s; retry %d of %d in %.2g s", self.url, _describe(err),
                        self._where(), self._failures, self._retries, delay)
            time.sleep(delay)
            self.retries_done += 1
            try:
                self._open()
                return
            except ShardReadError as final:
                if first:
                    raise
                raise ShardStreamError(f"stream ended early: {final} ({self._where()})") from final
            except _TRANSIENT as again:
                err = again

    def read(self, n: int = -1) -> bytes:
        while True:
            if self.closed or n == 0 or (self.total is not None and self.pos >= self.total):
                return b""
            want = n if n is not None and n >= 0 else -1
            if self.total is not None:
                want = self.total - self.pos if want < 0 else min(want, self.total - self.pos)
            try:
                if self._stream is None:
                    self._open()
                chunk = self._stream.read(want)
                if not chunk:
                    if self.total is None:
                        return b""  # no announced size (chunked HTTP): a clean end is the end
                    raise _TransientError("the connection closed before the announced end of the body")
            except ShardReadError as final:
                self._drop_stream()
                raise ShardStreamError(f"stream ended early: {final} ({self._where()})") from final
            except _TRANSIENT as err:
                self._recover(err)
                continue
            self.pos += len(chunk)
            self._failures = 0
            return chunk

    def close(self) -> None:
        self.closed = True
        self._drop_stream()

    def __enter__(self) -> _ResumableStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(err: BaseException) -> str:
    """The error in one line (some clients' messages run over several: the Hub's name the request and its id),
    at most 500 characters; its type when it has no message (http.client.RemoteDisconnected(""))."""
    text = " ".join(str(err).split())
    return (text[:497] + "..." if len(text) > 500 else text) or type(err).__name__


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _HttpOpener:
    """``open_at`` for http(s):// shards: one streaming GET per attempt, ``Range: bytes=N-`` to resume.

    The standard library rather than fsspec's HTTP filesystem (aiohttp): fsspec reads by ranged blocks
    through an event loop and its streaming mode does not resume, while one plain GET per attempt keeps a
    single connection streaming and shows the status and headers that tell a resumed body is the right one
    (206 at the right offset, same size, same ETag / Last-Modified).
    """

    def __init__(self, url: str):
        self.url, self.authorization = _split_user_info(url)
        self.safe = safe_url(url)
        self.validators: dict[str, str] | None = None  # ETag and Last-Modified of the first answer

    def __call__(self, offset: int) -> tuple[BinaryIO, int | None]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = urllib.request.Request(self.url, headers=headers)
        if self.authorization:  # not sent on to where a redirect points
            request.add_unredirected_header("Authorization", self.authorization)
        try:
            response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code in (408, 425, 429) or err.code >= 500:
                raise _TransientError(f"HTTP {err.code} {err.reason}") from None
            raise ShardReadError(f"cannot open shard {self.safe}: HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):  # no retry makes a certificate valid
                raise ShardReadError(f"cannot open shard {self.safe}: {err.reason}") from None
            raise
        except (http.client.InvalidURL, ValueError) as err:
            # the message quotes the request's path and query ("URL can't contain control characters. '/…'"):
            # keep the words before the quote
            reason = str(err).split(" '")[0].rstrip(" .:") or type(err).__name__
            raise ShardReadError(f"cannot open shard {self.safe}: {reason}") from None
        try:
            return response, self._check(response, offset)
        except BaseException:
            response.close()
            raise

    def _check(self, response: http.client.HTTPResponse, offset: int) -> int | None:
        """The shard's size from the answer's headers; positions ``response`` at ``offset``."""
        validators = {k: v for k in ("ETag", "Last-Modified") if (v := response.headers.get(k))}
        if self.validators is None:
            self.validators = validators
        elif any(self.validators.get(k) not in (None, v) for k, v in validators.items()):
            raise ShardReadError(f"shard {self.safe} changed on the server while being read ({validators})")
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not match or int(match.group(1)) != offset:
                raise _TransientError(f"asked for bytes {offset}-, got Content-Range "
                                      f"{response.headers.get('Content-Range')!r}")
            start, end, total = int(match.group(1)), int(match.group(2)), match.group(3)
            if length is not None and length != end - start + 1:
                raise _TransientError(f"Content-Length {length} does not match Content-Range {start}-{end}")
            return int(total) if total != "*" else None
        if response.status != 200:
            raise _TransientError(f"unexpected HTTP {response.status} {response.reason}")
        if offset:  # the server ignored Range and sent the whole body: drop what was already read
            if _skip(response, offset) < offset:
                raise _TransientError(f"the body ended while skipping to byte {offset}")
        return length


def _split_user_info(url: str) -> tuple[str, str | None]:
    """(``url`` without ``user:password@``, the HTTP Basic ``Authorization`` value for them or None): urllib
    sends no credentials from a URL, it takes ``user:password@host`` for the host's name."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    user_info, _, host = parts.netloc.rpartition("@")
    user, _, password = user_info.partition(":")
    token = base64.b64encode(f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


class _StoreOpener:
    """``open_at`` for shards on object stores (s3://, gs://, az://, hf://, through pipeline/storage.py's fsspec
    filesystem): the object's size and version from a fresh ``info`` per attempt, then ranged reads.

    Ours, over the library's calls: a ranged read that comes back short is an error here, never the end of the
    shard (fsspec's buffered files hand back what came), and the object changing between attempts (another
    ETag / generation) ends the read instead of splicing two versions of the tar."""

    def __init__(self, url: str, storage: StorageSpec | None):
        from pipeline.storage import HF, filesystem

        self.fs, self.path = filesystem(url, storage)
        self.safe = safe_url(url)
        self.version: str | None = None
        self._hf = backend(url) is HF
        # The Hub's cat_file reads through fsspec's read-ahead cache, which asks for 5 MiB past every range: exact
        # ranges instead (the other stores' cat_file is one ranged GET and takes no such argument)
        self._range_options = {"cache_type": "none"} if self._hf else {}

    def __call__(self, offset: int) -> tuple[BinaryIO, int | None]:
        try:
            if self._hf and self.version is None:
                self.path = _pin_hf_commit(self.fs, self.path)
            info = self.fs.info(self.path)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError) as err:
            raise ShardReadError(f"cannot open shard {self.safe}: {_describe(err)}") from err
        except Exception as err:
            if _final(err):
                raise ShardReadError(f"cannot open shard {self.safe}: {_describe(err)}") from err
            raise _TransientError(_describe(err)) from err
        if info.get("type") != "file":
            raise ShardReadError(f"cannot open shard {self.safe}: not a file (a folder or bucket?)")
        version = _object_version(info)
        if self.version is None:
            self.version = version
        elif version != self.version:
            raise ShardReadError(f"shard {self.safe} changed on the store while being read ({version})")
        size = int(info["size"])
        return cast(BinaryIO, _RangeReader(self._read_range, offset, size, STORE_READ_BUFFER_BYTES)), size

    def _read_range(self, start: int, end: int) -> bytes:
        try:
            return self.fs.cat_file(self.path, start=start, end=end, **self._range_options)
        except (FileNotFoundError, PermissionError) as err:
            raise ShardReadError(f"cannot read shard {self.safe}: {_describe(err)}") from err
        except Exception as err:
            if _final(err):
                raise ShardReadError(f"cannot read shard {self.safe}: {_describe(err)}") from err
            raise _TransientError(_describe(err)) from err


def _pin_hf_commit(fs: Any, path: str) -> str:
    """`path` at the commit its revision (a branch: main) points to now. Every read of the shard then gets that
    commit's bytes: a push during the read cannot splice two versions (the Hub serves a branch's newest file to
    each request, and huggingface_hub retries a cut GET by itself, out of our sight)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

    resolved = fs.resolve_path(path)
    if not isinstance(resolved, HfFileSystemResolvedRepositoryPath):
        return path  # a Hub storage bucket: no commits
    api = getattr(fs, "_api", None) or HfApi(endpoint=fs.endpoint, token=fs.token)
    sha = api.repo_info(resolved.repo_id, repo_type=resolved.repo_type, revision=resolved.revision).sha
    if not sha or sha == resolved.revision:
        return path
    return HfFileSystemResolvedRepositoryPath(resolved.repo_type, resolved.repo_id, sha, resolved.path_in_repo).unresolve()


def _object_version(info: dict[str, Any]) -> str | None:
    """What changes when an object is replaced, from an fsspec ``info``: S3's ETag, GCS's generation, Azure's
    etag, the Hub's blob id (or its LFS sha256)."""
    for key in ("ETag", "generation", "etag", "blob_id"):
        if info.get(key):
            return f"{key} {info[key]}"
    lfs = info.get("lfs")
    return f"sha256 {lfs.get('sha256')}" if isinstance(lfs, dict) and lfs.get("sha256") else None


def _final(err: BaseException) -> bool:
    """A store's answer no retry changes: refused, no such bucket (pipeline/storage.storage_fault), or the object
    gone (404/410 from a client that does not raise FileNotFoundError for it: huggingface_hub's HfHubHTTPError)."""
    from pipeline.storage import http_status, storage_fault

    return storage_fault(err) is not None or http_status(err) in (404, 410)


class _RangeReader:
    """Sequential, buffered reads of an object from ``offset``: one ranged read per buffer fill.

    Buffered because the tar is parsed in 512-byte headers and each unbuffered read would be one GET. A
    fill that comes back short of the object's size is an error (``_TransientError``), not the end.
    """

    def __init__(self, read_range: Callable[[int, int], bytes], offset: int, size: int, buffer_bytes: int):
        self._read_range, self._pos, self._size = read_range, offset, size
        self._buffer_bytes = max(BLOCK, buffer_bytes)
        self._buf, self._at = b"", 0

    def read(self, n: int = -1) -> bytes:
        if self._at >= len(self._buf):
            want = min(self._buffer_bytes, self._size - self._pos)
            if want <= 0:
                return b""
            data = self._read_range(self._pos, self._pos + want)
            if len(data) != want:
                raise _TransientError(f"a ranged read at byte {self._pos} returned {len(data)} of {want} bytes")
            self._buf, self._at = data, 0
            self._pos += want
        end = len(self._buf) if n is None or n < 0 else min(len(self._buf), self._at + n)
        chunk = self._buf[self._at:end]
        self._at = end
        return chunk

    def close(self) -> None:
        self._buf = b""



def _skip(stream: BinaryIO, n: int) -> int:
    """Read and drop ``n`` bytes (streams cannot seek); return how many were there."""
    done = 0
    while done < n:
        chunk = stream.read(min(n - done, 1 << 20))
        if not chunk:
            break
        done += len(chunk)
    return done
