"""Signed shard URLs (a presigned query string, user:password@) are read with their credentials and recorded and
logged without them: a planted secret is in no file of the output, in no log and in no command's output; a
rerun with new signatures resumes the same shards."""

from __future__ import annotations

import base64
import collections
import http.server
import json
import secrets
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.jobs.conftest import REPO, VENV_BIN, assert_exactly_once, run_job, shard_state, write_manifest

pytestmark = pytest.mark.slow

# In every signature, the user name and the password. Drawn per run: the test greps the cluster's files, where
# another test's `ray job submit --working-dir .` leaves a copy of this repository (its source names no secret).
SECRET = f"PLANTED{secrets.token_hex(6).upper()}"
USER, PASSWORD = f"{SECRET}USER", f"{SECRET}PASSWORD"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class SignedShardServer:
    """Serves the shards at /{name}.tar to requests whose X-Amz-Signature is in `valid` (and, for 00000.tar,
    with the planted user and password), else 403; honours `Range`; the first answer for 00001.tar is cut
    halfway (the actor resumes it and logs a warning naming the shard's URL)."""

    def __init__(self, shard_dir: Path):
        self.valid: set[str] = set()
        self.hits: collections.Counter = collections.Counter()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                parts = urllib.parse.urlsplit(self.path)
                name = parts.path.lstrip("/")
                outer.hits[name] += 1
                signature = urllib.parse.parse_qs(parts.query).get("X-Amz-Signature", [""])[0]
                self.close_connection = True
                if signature not in outer.valid or (name == "00000.tar" and self.headers.get("Authorization") != BASIC):
                    self.send_error(403)
                    return
                data = (shard_dir / name).read_bytes()
                start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                cut = name == "00001.tar" and outer.hits[name] == 1
                self.wfile.write(data[start: len(data) // 2 if cut else len(data)])

            def log_message(self, *args):  # it would print the signatures
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def urls(self, run: str, expired: tuple[str, ...] = ()) -> list[str]:
        """Signed URLs of shards 00000 (with user:password@), 00001 and 00002, signed for this `run` (the only
        valid signatures from now on), the `expired` ones with a signature the server refuses."""
        self.valid = {f"{SECRET}SECRET-{run}-{n}" for n in range(3)}
        port = self.httpd.server_address[1]
        out = []
        for n in range(3):
            name = f"{n:05d}"
            sig = f"{SECRET}SECRET-expired-{n}" if name in expired else f"{SECRET}SECRET-{run}-{n}"
            host = f"{USER}:{PASSWORD}@127.0.0.1:{port}" if n == 0 else f"127.0.0.1:{port}"
            out.append(f"http://{host}/{name}.tar?X-Amz-Credential=AKIA{SECRET}%2F20260101&X-Amz-Signature={sig}")
        return out


def leaks(root: Path) -> list[str]:
    """Files under `root` holding the secret (or the Basic auth header made of it) in their bytes."""
    found = []
    for path in sorted(root.rglob("*")):
        try:
            data = path.read_bytes() if path.is_file() else b""
        except OSError:  # a socket, a log file rotated away while listing
            continue
        if SECRET.encode() in data or BASIC.split()[1].encode() in data:
            found.append(str(path))
    return found


def test_signed_urls_are_never_recorded_or_logged_and_a_new_signature_resumes(ray_cluster, tiny_checkpoint, shards,
                                                                             tmp_path):
    shard_dir, planted = shards
    server = SignedShardServer(shard_dir)
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    out = tmp_path / "out"
    said: list[str] = []  # everything the commands printed
    try:
        # 1. 00002's signature has expired (403 on both attempts): failed, with the reason recorded
        manifest = write_manifest(tmp_path / "job.yaml", shards=server.urls("1", expired=("00002",)), output=out,
                                  model=tiny_checkpoint, max_attempts=2)
        first = run_job([str(manifest)], env)
        said += [first.stdout, first.stderr]
        assert first.returncode == 1, (first.stdout + first.stderr)[-5000:]
        assert server.hits["00001.tar"] >= 2 and "retry 1 of" in first.stdout + first.stderr, "no resumed read"
        failed = shard_state(out, "00002")
        assert failed["state"] == "failed" and "HTTP 403" in failed["errors"][-1]["reason"], failed
        assert failed["url"] == f"http://127.0.0.1:{server.httpd.server_address[1]}/00002.tar?<redacted>"
        assert shard_state(out, "00000")["url"].startswith("http://<redacted>@127.0.0.1:")
        finished = {n: ((out / f"data/{n}.parquet").stat(), shard_state(out, n)) for n in ("00000", "00001")}

        # 2. new signatures for every shard (the old ones refused from now on): only the failed shard runs
        manifest = write_manifest(tmp_path / "job.yaml", shards=server.urls("2"), output=out, model=tiny_checkpoint,
                                  max_attempts=2)
        second = run_job([str(manifest), "--retry-failed"], env)
        said += [second.stdout, second.stderr]
        assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
        assert "2 done, 1 to run" in second.stderr, second.stderr[-3000:]
        for name, (stat, record) in finished.items():
            now = (out / f"data/{name}.parquet").stat()
            assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), f"{name} was written again"
            assert shard_state(out, name) == record, f"{name} ran again"
        # 3. a plain rerun with yet other signatures: everything is done, nothing runs
        urls = server.urls("3")
        manifest = write_manifest(tmp_path / "job.yaml", shards=urls, output=out, model=tiny_checkpoint)
        third = run_job([str(manifest)], env)
        said += [third.stdout, third.stderr]
        assert third.returncode == 0 and "3 done, 0 to run" in third.stderr, (third.stdout + third.stderr)[-3000:]
        assert_exactly_once(out, planted, ["00000", "00001", "00002"])

        # what an operator runs on the output: status, and the contact sheet (signed shards need --shards)
        for args in ([], ["--json"]):
            status = subprocess.run([sys.executable, "-m", "jobs.status", str(out), *args], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
            assert status.returncode == 0, status.stderr
            said += [status.stdout, status.stderr]
        assert json.loads(status.stdout)["shards_by_state"] == {"done": 3}
        reports = tmp_path / "reports"
        for name, extra in (("recorded.html", []), ("given.html", ["--shards", ",".join(urls)])):
            sheet = subprocess.run([sys.executable, "-m", "jobs.inspect", str(out), "--html", str(reports / name),
                                    "--sample", "6", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
            assert sheet.returncode == 0, sheet.stderr[-3000:]
            said += [sheet.stdout, sheet.stderr]
        assert "is recorded without its credentials; give its URL with --shards" in (reports / "recorded.html").read_text()
        assert "data:image/jpeg" in (reports / "given.html").read_text(), "the full URLs given did not read the shards"
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()

    assert (out / "README.md").exists() and (out / "_shards.json").exists() and (out / "_job.json").exists()
    assert not leaks(out), leaks(out)  # every file: _job.json, _shards.json, _progress/, data/*.parquet, README.md
    assert not leaks(reports)
    for path in out.glob("data/*.parquet"):  # row values too (compressed pages hide them from the byte scan)
        table = pq.read_table(path)
        assert SECRET not in repr(table.schema.metadata) + repr(table.to_pylist())
    session = Path(ray_cluster["temp_dir"])
    assert list(session.rglob("worker-*.out")), "no Ray worker log found"
    assert not leaks(session), leaks(session)  # the driver's, the actors' and Ray's own logs of the test cluster
    tasks = subprocess.run([str(VENV_BIN / "ray"), "list", "tasks", "--detail", "--limit", "10000", "--address",
                            ray_cluster["dashboard"]], env=ray_cluster["env"], capture_output=True, text=True,
                           timeout=120)
    assert tasks.returncode == 0 and "process_shard" in tasks.stdout, tasks.stderr[-2000:]
    assert SECRET not in tasks.stdout, "Ray's task table (names, errors) holds the secret"
    assert not [text for text in said if SECRET in text], "a command printed the secret"
