"""Remote shards over broken connections: real servers on 127.0.0.1 that cut, reset and fail (no mocks).

A read that was resumed must yield exactly what a local read of the same file yields; a read that could not
be resumed keeps what it read and says why in ``ShardReader.incomplete``.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import logging
import os
import re
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.manifest import StorageSpec
from pipeline.shards import Sample, ShardReader, ShardReadError
from pipeline.storage import streams
from tests.moto_server import moto_server

FAST = {"retry_backoff_s": 0.001}


def read_all(reader: ShardReader) -> list[Sample]:
    samples = list(reader)
    assert reader.samples_read == len(samples)
    return samples


# ----------------------------------------------------------------------------------------------- HTTP


class FaultyServer:
    """Serves ``data`` at ``/00000.tar`` with faults planned per request, in order:

    ``("cut", n)``: announce the full length, send ``n`` body bytes, close; ``("reset", n)``: the same, then a
    TCP reset (SO_LINGER 0); ``("status", code)``: answer that status. ``cut_at``: every body stops at that
    byte of the file. ``Range: bytes=N-`` is honoured (206) unless ``honour_range`` is False (200, full body).
    ``chunked``: bodies are sent with ``Transfer-Encoding: chunked`` and no Content-Length. ``authorization``:
    a request without this ``Authorization`` header gets 401.
    """

    def __init__(self, data: bytes, plan: list[tuple[str, int]] = (), *, honour_range: bool = True,
                 cut_at: int | None = None, etag_for: Callable[[int], str] = lambda i: '"v1"',
                 chunked: bool = False, authorization: str | None = None):
        self.data, self.plan, self.honour_range, self.cut_at = data, list(plan), honour_range, cut_at
        self.chunked, self.authorization = chunked, authorization
        self.etag_for = etag_for
        self.ranges: list[str | None] = []  # the Range header of each request
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # for chunked bodies; every answer closes its connection

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.serve(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a reset connection is the point
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/00000.tar"

    def __enter__(self) -> FaultyServer:
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            index = len(self.ranges)
            self.ranges.append(h.headers.get("Range"))
            action = self.plan.pop(0) if self.plan else None
        if self.authorization and h.headers.get("Authorization") != self.authorization:
            h.send_error(401)
            return
        if action and action[0] == "status":
            h.send_error(action[1])
            return
        size, start = len(self.data), 0
        wanted = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if wanted and self.honour_range:
            start = int(wanted.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            h.send_response(200)
        if self.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(size - start))
        h.send_header("ETag", self.etag_for(index))
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        body = self.data[start:]
        if self.chunked:
            step = 1 << 16
            body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                            for i in range(0, len(body), step)) + b"0\r\n\r\n"
        if self.cut_at is not None:
            body = body[: max(0, self.cut_at - start)]
        if action:
            body = body[: action[1]]
        h.wfile.write(body)
        if action and action[0] == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()


def test_http_cut_twice_resumes_with_range(shard_bytes, local_samples, caplog) -> None:
    size = len(shard_bytes)
    first, second = size // 3, size // 4
    caplog.set_level(logging.WARNING, logger="pipeline.shards")
    with FaultyServer(shard_bytes, [("cut", first), ("cut", second)]) as server:
        # one retry allowed: the count starts again once bytes come in, so two cuts in a row are fine
        reader = ShardReader(server.url, read_retries=1, **FAST)
        samples = read_all(reader)
    assert samples == local_samples
    assert reader.incomplete is None and not reader.truncated and reader.error is None
    assert reader.stream_retries == 2
    assert server.ranges == [None, f"bytes={first}-", f"bytes={first + second}-"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert server.url in warnings[0] and f"byte {first} of {size}" in warnings[0]
    assert f"byte {first + second} of {size}" in warnings[1]


def test_http_server_that_ignores_range(shard_bytes, local_samples) -> None:
    size = len(shard_bytes)
    with FaultyServer(shard_bytes, [("cut", size // 2), ("cut", size * 3 // 4)], honour_range=False) as server:
        reader = ShardReader(server.url, read_retries=2, **FAST)
        samples = read_all(reader)
    assert samples == local_samples and reader.incomplete is None
    assert server.ranges == [None, f"bytes={size // 2}-", f"bytes={size * 3 // 4}-"]  # answered 200 each time


def test_http_connection_reset_mid_body(shard_bytes, local_samples) -> None:
    with FaultyServer(shard_bytes, [("reset", len(shard_bytes) // 2)]) as server:
        reader = ShardReader(server.url, read_retries=3, **FAST)
        samples = read_all(reader)
    assert samples == local_samples and reader.incomplete is None
    assert len(server.ranges) == 2 and server.ranges[1].startswith("bytes=")


def test_http_chunked_body_cut_mid_chunk(shard_bytes, local_samples) -> None:
    # no Content-Length: the cut shows as http.client.IncompleteRead; the 206 answer tells the size
    with FaultyServer(shard_bytes, [("cut", len(shard_bytes) // 2)], chunked=True) as server:
        reader = ShardReader(server.url, read_retries=1, **FAST)
        samples = read_all(reader)
    assert samples == local_samples and reader.incomplete is None and reader.stream_retries == 1
    assert len(server.ranges) == 2 and server.ranges[1].startswith("bytes=")


def test_http_5xx_and_429_are_retried(shard_bytes, local_samples) -> None:
    plan = [("status", 503), ("cut", 1000), ("status", 500), ("status", 429)]
    with FaultyServer(shard_bytes, plan) as server:
        reader = ShardReader(server.url, read_retries=3, **FAST)
        samples = read_all(reader)
    assert samples == local_samples and reader.incomplete is None
    assert server.ranges == [None, None, "bytes=1000-", "bytes=1000-", "bytes=1000-"]


def test_http_always_cut_gives_up_with_what_it_read(shard_bytes, local_samples, tmp_path) -> None:
    size, cut = len(shard_bytes), len(shard_bytes) // 2
    (tmp_path / "00000.tar").write_bytes(shard_bytes[:cut])
    cut_locally = list(ShardReader(str(tmp_path / "00000.tar")))
    started = time.monotonic()
    with FaultyServer(shard_bytes, cut_at=cut) as server:
        reader = ShardReader(server.url, read_retries=3, **FAST)
        samples = read_all(reader)
    assert time.monotonic() - started < 5
    assert len(server.ranges) == 4 and set(server.ranges[1:]) == {f"bytes={cut}-"}
    assert reader.truncated
    assert reader.incomplete == reader.error
    assert reader.incomplete.startswith("stream ended early after 3 retries: ")
    assert reader.incomplete.endswith(f"(byte {cut} of {size})")
    # the same samples as a local file cut at the same byte; the last one says why it is short
    assert len(samples) == len(cut_locally) and 0 < len(samples) < len(local_samples)
    assert samples[:-1] == cut_locally[:-1] == local_samples[: len(samples) - 1]
    last, local_last = samples[-1], cut_locally[-1]
    assert (last.key, last.mp4, last.source_caption) == (local_last.key, local_last.mp4, local_last.source_caption)
    assert "stream ended early after 3 retries" in last.read_error


def test_http_shard_changed_between_requests(shard_bytes) -> None:
    with FaultyServer(shard_bytes, [("cut", len(shard_bytes) // 2)], etag_for=lambda i: f'"v{i}"') as server:
        reader = ShardReader(server.url, read_retries=3, **FAST)
        read_all(reader)
    assert reader.truncated and "changed on the server" in reader.incomplete
    assert len(server.ranges) == 2, "a changed shard is not retried"


@pytest.mark.parametrize("code", [404, 403])
def test_http_4xx_on_open_is_final(shard_bytes, code) -> None:
    with FaultyServer(shard_bytes, [("status", code)]) as server:
        reader = ShardReader(server.url, read_retries=5, retry_backoff_s=30)
        started = time.monotonic()
        with pytest.raises(ShardReadError, match=f"cannot open shard .*HTTP {code}"):
            next(iter(reader))
    assert time.monotonic() - started < 5 and len(server.ranges) == 1
    assert reader.incomplete.startswith("cannot open shard")


def test_http_unreachable_server_is_retried_then_fails() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there
    reader = ShardReader(f"http://127.0.0.1:{port}/x.tar?X-Amz-Signature=secret", read_retries=2, **FAST)
    with pytest.raises(ShardReadError, match="after 2 retries: .*Connection refused") as err:
        next(iter(reader))
    assert "secret" not in str(err.value), "a query string may hold a signature"


def test_http_user_and_password_in_the_url_are_sent_as_basic_auth(shard_bytes, local_samples, caplog) -> None:
    """urllib would take `user:password@host` for a host name; the reader sends them as HTTP Basic auth (on every
    resumed request too) and never shows them, nor the query string, in a message."""
    expected = "Basic " + base64.b64encode(b"reader:PLANTED@pw").decode()
    caplog.set_level(logging.WARNING, logger="pipeline.shards")
    with FaultyServer(shard_bytes, [("cut", len(shard_bytes) // 2)], authorization=expected) as server:
        url = server.url.replace("http://", "http://reader:PLANTED%40pw@") + "?X-Amz-Signature=PLANTEDSIG"
        reader = ShardReader(url, read_retries=1, **FAST)
        assert read_all(reader) == local_samples and reader.stream_retries == 1
        assert len(server.ranges) == 2
        wrong = ShardReader(url.replace("PLANTED%40pw", "PLANTED-wrong"), read_retries=1, **FAST)
        with pytest.raises(ShardReadError, match="HTTP 401") as err:
            next(iter(wrong))
    messages = [str(err.value), wrong.incomplete, *(r.getMessage() for r in caplog.records)]
    assert len(messages) == 3 and not [m for m in messages if "PLANTED" in m], messages


# ----------------------------------------------------------------------------------------------- local


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read_local(path: Path, data: bytes) -> ShardReader:
    path.write_bytes(data)
    reader = ShardReader(str(path))
    read_all(reader)
    return reader


def test_local_incomplete_reasons(shards_dir, shard_bytes, local_samples, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline.shards")
    with tarfile.open(shards_dir / "00000.tar") as tar:
        members = tar.getmembers()
    mp4 = next(m for m in members if m.name.endswith(".mp4"))
    path = tmp_path / "s.tar"

    assert _read_local(path, b"").incomplete == "shard is empty (0 bytes)"
    cut_inside = _read_local(path, shard_bytes[: mp4.offset_data + mp4.size // 2])
    assert cut_inside.truncated and cut_inside.incomplete.startswith("shard ends inside member")
    boundary = members[3].offset
    assert _read_local(path, shard_bytes[:boundary]).incomplete == (
        f"shard ends at byte {boundary} without an end-of-archive block")
    jpgs = _read_local(path, _tar([("a.jpg", b"x"), ("b.jpg", b"y"), ("c.cls", b"1")]))
    assert not jpgs.truncated and jpgs.samples_read == 0
    assert jpgs.incomplete == "no usable sample: 3 members skipped (not .mp4/.json/.txt: 3)"
    empty = _read_local(path, _tar([]))
    assert not empty.truncated and empty.incomplete == "no usable sample: the tar has no members"
    assert not caplog.records, "local files are never retried"

    whole = ShardReader(str(shards_dir / "00000.tar"))
    assert whole.incomplete == "the shard was not read to its end"
    for _ in whole:
        break
    assert whole.incomplete == "the shard was not read to its end" and whole.samples_read == 1
    assert read_all(whole) == local_samples and whole.incomplete is None

    missing = ShardReader(str(tmp_path / "missing.tar"))
    with pytest.raises(ShardReadError):
        list(missing)
    assert missing.incomplete.startswith("cannot open shard")


# ----------------------------------------------------------------------------------------------- S3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory, shard_bytes):
    """A moto S3 server holding the shard at s3://shards/panda/00000.tar; yields its port."""
    import boto3

    with moto_server(tmp_path_factory.mktemp("moto")) as port:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="AKIATRANSPORTTEST", aws_secret_access_key="fake")
        client.create_bucket(Bucket="shards")
        client.put_object(Bucket="shards", Key="panda/00000.tar", Body=shard_bytes)
        yield port


@pytest.fixture()
def s3_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATRANSPORTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


class FaultyS3Proxy:
    """An HTTP proxy in front of a store's server (moto; the GCS and Azure emulators in tests/jobs/test_stores.py).
    Requests for the shard object (`match(path)`: by default moto's path of s3://shards/panda/00000.tar) take
    faults from ``plan(method, range)``: None (forward), ``("status", code)`` or ``("cut", n)`` (forward the
    headers, then only ``n`` body bytes). The range is the Range header, or Azure's x-ms-range."""

    def __init__(self, port: int, plan: Callable[[str, str | None], tuple[str, int] | None],
                 match: Callable[[str], bool] = lambda path: path == "/shards/panda/00000.tar"):
        self.port, self.plan, self.match = port, plan, match
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                outer.relay(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FaultyS3Proxy:
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def relay(self, h: http.server.BaseHTTPRequestHandler) -> None:
        action = None
        if self.match(h.path.split("?")[0]):
            range_ = h.headers.get("Range") or h.headers.get("x-ms-range")
            self.requests.append((h.command, range_))
            action = self.plan(h.command, range_)
        length = int(h.headers.get("Content-Length") or 0)
        payload = h.rfile.read(length) if length else None
        if action and action[0] == "status":
            body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            h.send_response(action[1])
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(h.command, h.path, body=payload, headers=dict(h.headers.items()))
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        h.send_response(response.status)
        headers = [(n, v) for n, v in response.getheaders()
                   if n.lower() not in ("connection", "transfer-encoding", "keep-alive", "date", "server")]
        if h.command != "HEAD" and not any(n.lower() == "content-length" for n, _ in headers):
            headers.append(("Content-Length", str(len(body))))  # a chunked answer, relayed whole
        for name, value in headers:
            h.send_header(name, value)
        h.end_headers()
        if h.command == "HEAD":
            return
        if action and action[0] == "cut":
            h.wfile.write(body[: action[1]])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)


def _s3_reader(proxy: FaultyS3Proxy, **kwargs: object) -> ShardReader:
    return ShardReader("s3://shards/panda/00000.tar", StorageSpec(endpoint_url=proxy.endpoint), **kwargs)


@pytest.mark.slow
def test_s3_read_resumes_at_the_offset_after_5xx_and_cut_bodies(moto, s3_env, local_samples, caplog,
                                                                 monkeypatch) -> None:
    monkeypatch.setattr(streams, "STORE_READ_BUFFER_BYTES", 64 << 10)  # several ranged GETs per shard
    resume_at = 2 * (64 << 10)
    # botocore retries a 5xx itself and s3fs a body cut short (5 tries): more cuts than that reach our layer,
    # which reopens at the byte reached
    failures = [("status", 500)] * 3 + [("cut", 1000)] * 8

    def plan(method: str, range_: str | None) -> tuple[str, int] | None:
        if method == "GET" and range_ and range_.startswith(f"bytes={resume_at}-") and failures:
            return failures.pop(0)
        return None

    caplog.set_level(logging.WARNING, logger="pipeline.shards")
    with FaultyS3Proxy(moto, plan) as proxy:
        reader = _s3_reader(proxy, read_retries=3, retry_backoff_s=0.01)
        samples = read_all(reader)
    assert samples == local_samples and reader.incomplete is None
    assert not failures, "every planned failure was served"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all(f"byte {resume_at} of " in w and "s3://shards/panda/00000.tar" in w for w in warnings)
    gets = [r for m, r in proxy.requests if m == "GET"]
    assert gets[:3] == [f"bytes=0-{(64 << 10) - 1}", f"bytes={64 << 10}-{resume_at - 1}",
                        f"bytes={resume_at}-{resume_at + (64 << 10) - 1}"]
    assert gets.count(gets[2]) == 12, "the failed range is asked for again, not the shard from its start"


@pytest.mark.slow
def test_s3_always_failing_gets_make_the_shard_incomplete(moto, s3_env, shard_bytes) -> None:
    with FaultyS3Proxy(moto, lambda method, range_: ("status", 500) if method == "GET" else None) as proxy:
        reader = _s3_reader(proxy, read_retries=1, retry_backoff_s=0.01)
        samples = read_all(reader)
    assert samples == [] and reader.truncated
    assert reader.incomplete.startswith("stream ended early after 1 retries: ")
    assert reader.incomplete.endswith(f"(byte 0 of {len(shard_bytes)})")
    assert [m for m, _ in proxy.requests].count("HEAD") == 2  # the first open, and one reopen


@pytest.mark.slow
def test_s3_forbidden_is_final(moto, s3_env) -> None:
    with FaultyS3Proxy(moto, lambda method, range_: ("status", 403)) as proxy:
        started = time.monotonic()
        with pytest.raises(ShardReadError, match="cannot open shard s3://shards/panda/00000.tar"):
            next(iter(_s3_reader(proxy, read_retries=5, retry_backoff_s=30)))
    assert time.monotonic() - started < 10 and [m for m, _ in proxy.requests] == ["HEAD"]
