"""A real S3-compatible server for the tests: moto on 127.0.0.1, one process per test module that needs it."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some request lines (4xx, 206)
REQUEST_LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def request_kinds(log: Path) -> list[str]:
    """The requests in moto's log so far, in order, by kind: LIST (a GET with list-type/prefix), GET, HEAD,
    PUT, DELETE, POST (multi-object delete)."""
    kinds = []
    with log.open("rb") as f:
        for raw in f:
            m = REQUEST_LINE.search(ANSI.sub("", raw.decode("utf-8", "replace")))
            if m:
                method, target = m.group(1), m.group(2)
                list_call = method == "GET" and ("list-type" in target or "prefix=" in target)
                kinds.append("LIST" if list_call else method)
    return kinds


def settled(kinds: Callable[[Path], list[str]], log: Path) -> list[str]:
    """`kinds(log)` once the log has stopped growing (a server writes a request's line once it has answered):
    moto's `request_kinds`, the emulators' (tests/emulators.py)."""
    seen = kinds(log)
    while True:
        time.sleep(0.2)
        again = kinds(log)
        if len(again) == len(seen):
            return again
        seen = again


def settled_requests(log: Path) -> list[str]:
    """`request_kinds` once moto's log has stopped growing."""
    return settled(request_kinds, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


@contextlib.contextmanager
def serving(argv: list[str], port: int, log_path: Path, what: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> Iterator[None]:
    """Start argv with stdout and stderr to log_path, wait until 127.0.0.1:port accepts, yield, stop it."""
    log = log_path.open("wb")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"{what} did not start (exit status {server.poll()}); its log {log_path} ends:\n"
                                f"{_tail(log_path)}", pytrace=False)
                time.sleep(0.1)
        yield
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Iterator[int]:
    """Start `moto_server` on a free loopback port, wait until it answers, yield the port, stop it."""
    port = free_port()
    argv = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serving(argv, port, log_dir / "moto.log", "moto_server"):
        yield port
