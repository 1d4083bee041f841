"""Setup mistakes in the shard list fail before any work, with one line naming what to fix."""

from __future__ import annotations

import http.server
import sys
import threading

import pytest

from pipeline.preflight import SetupError, check_shards


@pytest.fixture()
def shard_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"\0" * 1024)
    return tmp_path


def test_plain_paths_and_globs(shard_files):
    pairs = check_shards([str(shard_files / "00000.tar"), str(shard_files / "00001.tar")])
    assert pairs == [("00000", str(shard_files / "00000.tar")), ("00001", str(shard_files / "00001.tar"))]
    globbed = check_shards([str(shard_files / "*.tar")])  # a quoted glob is expanded, sorted
    assert [name for name, _ in globbed] == ["00000", "00001", "00002"]
    with pytest.raises(SetupError, match="matches no file.*brace range"):
        check_shards([str(shard_files / "*.tgz")])


def test_missing_shards_and_directories_are_refused(shard_files):
    urls = [str(shard_files / f"{i:05d}.tar") for i in range(6)]
    with pytest.raises(SetupError) as err:
        check_shards(urls)
    assert "3 of 6 local shards do not exist" in str(err.value) and "00005.tar" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(SetupError, match="is a directory"):
        check_shards([str(shard_files)])
    with pytest.raises(SetupError, match="empty"):
        check_shards([])


def test_remote_globs_and_duplicate_names(shard_files):
    with pytest.raises(SetupError, match="remote shards cannot be listed"):
        check_shards(["s3://bucket/shards/*.tar"])
    with pytest.raises(SetupError, match="appear twice"):
        check_shards([str(shard_files / "00000.tar"), f"{shard_files}/./00000.tar"])


def test_the_first_remote_shard_must_answer(shard_files):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(shard_files), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        # a presigned URL's "?" is not a glob
        assert check_shards([f"{base}/00000.tar?X-Amz-Signature=abc"])[0][0] == "00000"
        with pytest.raises(SetupError, match="first remote shard does not answer.*404"):
            check_shards([f"{base}/missing.tar", f"{base}/00000.tar"])
    finally:
        server.shutdown()


@pytest.mark.parametrize("url, module, extra", [
    ("gs://bucket/shards/00000.tar", "gcsfs", "gcs"),
    ("az://container/shards/00000.tar", "adlfs", "azure"),
    ("abfss://container@acct.dfs.core.windows.net/shards/00000.tar", "adlfs", "azure"),
])
def test_a_store_whose_library_is_missing_fails_at_preflight_naming_the_extra(monkeypatch, capsys, url, module,
                                                                               extra):
    """As on a machine without the extra installed (None in sys.modules is how Python marks a module absent)."""
    from jobs.status import main as status_main
    from pipeline.preflight import check_stores

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SetupError) as shards:
        check_stores([url], "/tmp/out")
    assert str(shards.value).startswith("shards: ") and f"pip install 'pllava-recaption[{extra}]'" in str(shards.value)
    with pytest.raises(SetupError, match=rf"^output: .*needs the {module} library.*\[{extra}\]'$"):
        check_stores(["/data/00000.tar"], url.rsplit("/", 2)[0] + "/out")
    check_stores(["/data/00000.tar", "https://example.com/00001.tar"], "/tmp/out")  # nothing to install for these
    assert status_main([url.rsplit("/", 2)[0] + "/out"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and f"[{extra}]" in line
