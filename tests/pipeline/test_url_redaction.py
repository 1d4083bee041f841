"""Shard URLs are recorded and logged without their credentials (a presigned signature, user:password@), by
one function, `safe_url`, at every place the job writes one; the shard's name, and so resume, do not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.manifest import manifest_from_dict
from pipeline.progress import JobIdentity, ensure_job, mark_running, record_failure, write_shard_list
from pipeline.shards import REDACTED, ShardReader, ShardReadError, redact_urls, safe_url, shard_name
from pipeline.writing import OutputStore

SIGNED = ("https://bucket.s3.amazonaws.com/panda/00042.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
          "&X-Amz-Credential=AKIAPLANTED%2F20260101&X-Amz-Signature=PLANTEDSECRET0123")
WITH_USER = "https://reader:PLANTEDPASSWORD@data.example.org:8443/p/00042.tar"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (SIGNED, f"https://bucket.s3.amazonaws.com/panda/00042.tar?{REDACTED}"),
        (WITH_USER, f"https://{REDACTED}@data.example.org:8443/p/00042.tar"),
        ("http://u:p@h/x.tar?sig=1#part", f"http://{REDACTED}@h/x.tar?{REDACTED}"),
        ("http://h/x.tar#frag", "http://h/x.tar"),
        ("http://h/x.tar?", "http://h/x.tar?"),  # nothing after the `?`: nothing to hide
        ("s3://bucket/panda/00042.tar", "s3://bucket/panda/00042.tar"),
        ("file:///d/my%20shard.tar", "file:///d/my%20shard.tar"),
        ("/data/ü:*?.tar", "/data/ü:*?.tar"),  # a local path: `?` is part of the name
        ("relative/a?b=c.tar", "relative/a?b=c.tar"),
        ("http://[::1/x.tar?sig=1", "<unparsable URL>"),
    ],
)
def test_safe_url_hides_credentials_and_keeps_the_shard_name(url: str, shown: str) -> None:
    assert safe_url(url) == shown
    assert "PLANTED" not in safe_url(url)
    assert safe_url(safe_url(url)) == safe_url(url)
    if shown != "<unparsable URL>":
        assert shard_name(safe_url(url)) == shard_name(url)


def test_redact_urls_in_free_text() -> None:
    text = (f"HTTPError: cannot open '{SIGNED}': HTTP 403 (tried {WITH_USER} too); "
            "see http://h/help?page=2 or /local/a?b.tar")
    redacted = redact_urls(text)
    assert "PLANTED" not in redacted and "page=2" not in redacted
    assert redacted == (f"HTTPError: cannot open 'https://bucket.s3.amazonaws.com/panda/00042.tar?{REDACTED}': "
                        f"HTTP 403 (tried https://{REDACTED}@data.example.org:8443/p/00042.tar too); "
                        f"see http://h/help?{REDACTED} or /local/a?b.tar")
    assert redact_urls(redacted) == redacted
    assert redact_urls("no URL here: a?b") == "no URL here: a?b"


@pytest.mark.parametrize(("url", "reason"), [
    ("http://127.0.0.1:1/x.tar?X-Amz-Signature=PLANTED SECRET", "URL can't contain control characters"),
    ("http://127.0.0.1:port/x.tar?X-Amz-Signature=PLANTEDSECRET", "nonnumeric port"),
])
def test_a_malformed_signed_url_is_refused_without_quoting_it(url: str, reason: str) -> None:
    """http.client quotes the request's path and query in its message; the reader's error does not."""
    with pytest.raises(ShardReadError) as err:
        next(iter(ShardReader(url, read_retries=0)))
    assert str(err.value) == f"cannot open shard {safe_url(url)}: {reason}"


def test_what_the_job_records_holds_no_credentials(tmp_path: Path) -> None:
    """_job.json, _shards.json, progress records (url, failure reasons) and the data files' config metadata."""
    m = manifest_from_dict({"shards": [SIGNED, WITH_USER.replace("00042", "00043"), "/local/00044.tar"],
                            "output": str(tmp_path / "out"), "model": {"path": str(tmp_path / "model")}})
    assert m.shards[0] == SIGNED, "the job itself keeps the full URL to read the shard"
    assert m.to_dict()["shards"] == [safe_url(s) for s in m.shards]
    store = OutputStore(str(tmp_path / "out"))
    ensure_job(store, m, JobIdentity("f" * 16, {"model": "sha256:0"}, "tiny", "v1"))
    urls = {shard_name(u): u for u in m.shards}
    write_shard_list(store, list(urls.items()))
    mark_running(store, "00042", SIGNED, 1, 123)
    record_failure(store, "00043", urls["00043"], 1, f"ShardReadError: cannot open shard {urls['00043']}: 401",
                   final=False)
    written = {p.relative_to(tmp_path): p.read_text() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {str(p) for p in written} >= {"out/_job.json", "out/_shards.json", "out/_progress/00042.json",
                                         "out/_progress/00043.json"}
    for path, text in written.items():
        assert "PLANTED" not in text, path
    assert json.loads(written[Path("out/_shards.json")])["shards"] == {
        "00042": safe_url(SIGNED), "00043": safe_url(urls["00043"]), "00044": "/local/00044.tar"}
    reason = json.loads(written[Path("out/_progress/00043.json")])["errors"][0]["reason"]
    assert reason == f"ShardReadError: cannot open shard {safe_url(urls['00043'])}: 401"
