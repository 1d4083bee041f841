"""Synthetic Panda-70M shards, built once per test session."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from pipeline.synthetic import write_synthetic_shards

SEED = 7


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards: 6 good clips, 2 failed source videos and 3 corrupt mp4s each (one 1080p, one 720p clip)."""
    outdir = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(outdir, shards=2, clips_per_shard=6, failed=2, corrupt=3, seed=SEED)
    return outdir


@pytest.fixture(scope="session")
def shard_bytes(shards_dir: Path) -> bytes:
    """The first shard as a remote store holds it (the transport tests upload or serve it)."""
    return (shards_dir / "00000.tar").read_bytes()


@pytest.fixture(scope="session")
def local_samples(shards_dir: Path) -> list:
    """The first shard's samples read from the local file: what every remote read of it must give."""
    from pipeline.shards import ShardReader

    reader = ShardReader(str(shards_dir / "00000.tar"))
    samples = list(reader)
    assert reader.incomplete is None and reader.samples_read == len(samples) > 5
    return samples


@pytest.fixture(scope="session")
def planted(shards_dir: Path) -> dict[str, dict[str, str]]:
    import json

    return json.loads((shards_dir / "_planted.json").read_text())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def http_base(shards_dir: Path):
    """``http://127.0.0.1:PORT`` serving the shards folder."""
    handler = functools.partial(_QuietHandler, directory=str(shards_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
