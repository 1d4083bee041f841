"""hf:// shards (the Hugging Face Hub, read-only) through huggingface_hub's HfFileSystem, against a fake Hub on
127.0.0.1 (tests/hf_hub_server.py): no internet, no token, no mocks of the library."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.manifest import HfStorageSpec, ManifestError, StorageSpec, manifest_from_dict
from pipeline.preflight import SetupError, check_shards
from pipeline.shards import ShardReader, ShardReadError
from pipeline.storage import filesystem, streams
from tests.hf_hub_server import HfHub, git_blob_id, hf_hub_server

pytest.importorskip("huggingface_hub")

from huggingface_hub import HfFileSystem, constants  # noqa: E402
from huggingface_hub.utils import _http as hf_http  # noqa: E402

URL = "hf://datasets/org/panda/shards/00000.tar"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The dataset repo org/panda: README.md and shards/00000.tar."""
    repo = tmp_path_factory.mktemp("hf-panda")
    (repo / "shards").mkdir()
    shutil.copy(shards_dir / "00000.tar", repo / "shards" / "00000.tar")
    (repo / "README.md").write_text("# panda\n")
    with hf_hub_server({"org/panda": repo}, tmp_path_factory.mktemp("hf-log")) as server:
        yield server


@pytest.fixture(autouse=True)
def hf_env(hub: HfHub, monkeypatch: pytest.MonkeyPatch):
    """No token, no offline mode, no telemetry; a fresh HfFileSystem per test (it caches listings and the repo's
    existence per instance, and fsspec keeps instances), and an empty request log."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (read at import)
    HfFileSystem.clear_instance_cache()
    hub.requests.clear()
    hub.plan = None
    yield
    hub.plan = None
    HfFileSystem.clear_instance_cache()


def storage(hub: HfHub) -> StorageSpec:
    return StorageSpec(hf=HfStorageSpec(endpoint_url=hub.endpoint))


def _start(range_header: str | None) -> int:
    assert range_header and range_header.startswith("bytes="), range_header
    return int(range_header.removeprefix("bytes=").split("-")[0])


def test_the_fake_hub_answers_hffilesystem(hub, shard_bytes) -> None:
    fs = HfFileSystem(endpoint=hub.endpoint, token=False)
    path = "datasets/org/panda/shards/00000.tar"
    info = fs.info(path)
    assert info["type"] == "file" and info["size"] == len(shard_bytes)
    assert info["blob_id"] == git_blob_id(shard_bytes) and info["lfs"] is None and info["xet_hash"] is None
    assert sorted(fs.ls("datasets/org/panda", detail=False)) == ["datasets/org/panda/README.md",
                                                                  "datasets/org/panda/shards"]
    assert fs.exists(path) and not fs.exists("datasets/org/panda/shards/99999.tar")
    assert not fs.exists("datasets/org/nope/shards/00000.tar")
    assert fs.cat_file(path) == shard_bytes
    assert fs.cat_file(path, start=1000, end=70000) == shard_bytes[1000:70000]
    with fs.open(path) as f:
        assert f.read() == shard_bytes
    reads = hub.gets()
    assert reads[0] is None and _start(reads[1]) == 1000 and reads[2] is None
    assert not [t for _, t, _ in hub.requests if "xet" in t.lower()], "plain files: the Xet protocol is never tried"


def test_shard_read_from_the_hub(hub, local_samples, shard_bytes) -> None:
    reader = ShardReader(URL, storage(hub))
    assert list(reader) == local_samples
    assert reader.incomplete is None and reader.samples_read == len(local_samples)
    # the repo lookup, main's commit (every read is pinned to it) and that commit's lookup, the listing of the
    # shard's folder at that commit (info), one GET of the whole shard (8 MiB buffer)
    sha = next(t.split("/tree/")[1].split("/")[0] for _, t, _ in hub.requests if "/tree/" in t)
    assert re.fullmatch(r"[0-9a-f]{40}", sha), hub.requests
    assert [(m, t.split("?")[0]) for m, t, _ in hub.requests] == [
        ("GET", "/api/datasets/org/panda"),
        ("GET", "/api/datasets/org/panda/revision/main"),
        ("GET", f"/api/datasets/org/panda/revision/{sha}"),
        ("GET", f"/api/datasets/org/panda/tree/{sha}/shards"),
        ("GET", f"/datasets/org/panda/resolve/{sha}/shards/00000.tar"),
    ]
    assert hub.gets() == [f"bytes=0-{len(shard_bytes) - 1}"]


def test_hf_endpoint_from_the_environment(hub, local_samples, monkeypatch) -> None:
    """HF_ENDPOINT is read once, when huggingface_hub is imported (into constants.ENDPOINT): it holds for a
    process started with it (a Ray worker), not when changed later in a running one."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    fs, _ = filesystem(URL, StorageSpec())
    assert fs.endpoint == constants.ENDPOINT != hub.endpoint, "a changed HF_ENDPOINT is not seen at runtime"

    script = (
        "import hashlib, sys\n"
        "from pipeline.manifest import StorageSpec\n"
        "from pipeline.shards import ShardReader\n"
        f"reader = ShardReader({URL!r}, StorageSpec())\n"
        "samples = list(reader)\n"
        "print(len(samples), reader.incomplete, hashlib.sha256(repr(samples).encode()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    expected = hashlib.sha256(repr(local_samples).encode()).hexdigest()
    assert done.stdout.split() == [str(len(local_samples)), "None", expected]
    assert hub.gets(), "the subprocess read the shard from the fake Hub"


def test_cut_ranged_read_resumes_at_the_byte_reached(hub, local_samples, shard_bytes, caplog, monkeypatch) -> None:
    monkeypatch.setattr(streams, "STORE_READ_BUFFER_BYTES", 64 << 10)  # several ranged GETs per shard
    # huggingface_hub's own backoff sleeps 1, 2, 4, 8, 8 s between its 6 tries of a GET: not in a unit test
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    size, buffer = len(shard_bytes), 64 << 10
    resume_at = 2 * buffer
    # the library retries a 5xx and a body cut short itself (6 tries a read): more failures than that reach our
    # layer, which reopens at the byte reached
    failures = [("status", 500)] * 3 + [("cut", 1000)] * 8

    def plan(method: str, target: str, range_: str | None) -> tuple[str, int] | None:
        if method == "GET" and "/resolve/" in target and range_ and _start(range_) == resume_at and failures:
            return failures.pop(0)
        return None

    hub.plan = plan
    caplog.set_level(logging.WARNING, logger="pipeline.storage.streams")
    reader = ShardReader(URL, storage(hub), read_retries=3, retry_backoff_s=0.01)
    samples = list(reader)
    assert samples == local_samples and reader.incomplete is None
    assert not failures, "every planned failure was served"
    ours = [r.getMessage() for r in caplog.records
            if r.name == "pipeline.storage.streams" and r.levelno == logging.WARNING]
    assert len(ours) == 1 and f"byte {resume_at} of {size}" in ours[0] and URL in ours[0]
    starts = [_start(r) for r in hub.gets()]
    fills = list(range(0, size, buffer))
    assert starts == fills[:2] + [resume_at] * 12 + fills[3:], "the failed range is asked for again, not the shard"


def test_missing_file_or_repo_fails_at_once(hub) -> None:
    for url, reason in ((URL.replace("00000", "99999"), ""), ("hf://datasets/org/nope/shards/00000.tar",
                                                              "repository not found")):
        reader = ShardReader(url, storage(hub), read_retries=5, retry_backoff_s=30)
        started = time.monotonic()
        with pytest.raises(ShardReadError, match=f"cannot open shard {url}") as err:
            next(iter(reader))
        assert time.monotonic() - started < 5, "no retries"
        assert reason in str(err.value)
        assert reader.incomplete.startswith("cannot open shard")
    assert hub.gets() == [], "nothing was downloaded"
    # panda: the repo lookup, main's commit and its lookup, the shards/ listing; nope: the repo lookup (404)
    assert len(hub.requests) == 5, hub.requests


def test_preflight_and_manifest(hub) -> None:
    assert check_shards([URL], storage(hub)) == [("00000", URL)]
    assert hub.gets() == [], "preflight opens the shard (info) without reading it"
    with pytest.raises(SetupError, match="the first remote shard does not answer: cannot open shard hf://"):
        check_shards([URL.replace("00000", "99999")], storage(hub))
    minimal = {"shards": [URL], "output": "out", "model": {"path": "ckpt"},
               "storage": {"hf": {"endpoint_url": hub.endpoint}}}
    assert manifest_from_dict(minimal).storage.hf.endpoint_url == hub.endpoint
    with pytest.raises(ManifestError, match=r"field 'output' is on the Hugging Face Hub, which the job reads") as err:
        manifest_from_dict({**minimal, "output": "hf://datasets/org/panda/out"})
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- what the library alone would not do
# A file replaced mid-read (reads are pinned to the commit main pointed to at open), a refusal of the file's GET
# (final, not retried), exact ranges (no read-ahead): pipeline/storage/streams.py's _StoreOpener.


def test_a_file_replaced_while_read_is_not_spliced(hub, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(streams, "STORE_READ_BUFFER_BYTES", 64 << 10)
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    old, new = os.urandom(300_000), os.urandom(300_000)  # the same size: only the content tells them apart
    repo = tmp_path / "changing"
    (repo / "shards").mkdir(parents=True)
    (repo / "shards" / "00000.tar").write_bytes(old)
    monkeypatch.setitem(hub.repos, "org/changing", repo)
    reads = []

    def plan(method: str, target: str, range_: str | None) -> tuple[str, int] | None:
        if method == "GET" and "/resolve/" in target:
            reads.append(range_)
            if len(reads) == 2:  # another commit replaces the file between two ranged reads, and the read breaks
                (repo / "shards" / "00000.tar").write_bytes(new)
                return ("cut", 1000)
        return None

    hub.plan = plan
    stream = streams.open_shard_stream("hf://datasets/org/changing/shards/00000.tar", storage(hub),
                                       read_retries=2, retry_backoff_s=0.001)
    got = b""
    try:
        while chunk := stream.read(1 << 20):
            got += chunk
    except (streams.ShardStreamError, ShardReadError):
        return  # refused: fine
    assert got == old, "the stream returned bytes of two versions of the file, and no error"


def test_a_refused_file_read_is_final(hub) -> None:
    hub.plan = lambda method, target, range_: ("status", 403) if "/resolve/" in target else None
    reader = ShardReader(URL, storage(hub), read_retries=2, retry_backoff_s=0.001)
    list(reader)
    assert reader.incomplete and "403" in reader.incomplete
    assert len(hub.gets()) == 1, "a refusal is not retried"


def test_a_ranged_read_asks_for_its_range(hub, shard_bytes, monkeypatch) -> None:
    monkeypatch.setattr(streams, "STORE_READ_BUFFER_BYTES", 64 << 10)
    list(ShardReader(URL, storage(hub)))
    size, buffer = len(shard_bytes), 64 << 10
    assert hub.gets() == [f"bytes={s}-{min(s + buffer, size) - 1}" for s in range(0, size, buffer)]
