"""Keys unique across the output (pipeline/key_claims.py): the first shard to claim a key captions it, a later
shard gets a `duplicate` row naming the holder; two shards racing on one key leave exactly one winner, on the
local disk and on S3 (moto); the `refuse` policy names the repeated keys at preflight."""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter

import pytest

from pipeline.captioning import Captioner
from pipeline.decode import DecodePool
from pipeline.key_claims import KeyClaims, claim_path
from pipeline.manifest import manifest_from_dict
from pipeline.preflight import SetupError, check_unique_keys
from pipeline.shard_runner import ShardInterrupted, ShardSettings, run_shard
from pipeline.writing import OutputStore
from tests.moto_server import moto_server

MAX_NEW = 6


def race(store_factory, keys: list[str], shards=("a", "b", "c")) -> dict[str, list[str]]:
    """Each shard claims every key from its own thread, all at once; {key: [shards told it is theirs]}."""
    won: dict[str, list[str]] = {k: [] for k in keys}
    holders: dict[tuple[str, str], str | None] = {}
    barrier = threading.Barrier(len(shards))
    lock = threading.Lock()

    def claim_all(shard: str) -> None:
        claims = KeyClaims(store_factory(), shard)
        barrier.wait()
        for key in keys:
            holder = claims.holder(key)
            with lock:
                holders[(shard, key)] = holder
                if holder is None:
                    won[key].append(shard)

    threads = [threading.Thread(target=claim_all, args=(s,)) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (shard, key), holder in holders.items():  # every loser names the one winner
        assert holder is None or [holder] == won[key], (shard, key, holder, won[key])
    return won


def test_claims_on_the_local_disk(tmp_path):
    keys = [f"{i:09d}" for i in range(60)] + ["odd key/with ../ and ünïcode", "x" * 400]
    won = race(lambda: OutputStore(str(tmp_path / "out")), keys)
    assert all(len(w) == 1 for w in won.values()), {k: w for k, w in won.items() if len(w) != 1}
    # a claim is a file named by the key's hash: an odd key never becomes a path
    assert claim_path(OutputStore(str(tmp_path / "out")), keys[-2]).count("..") == 0
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
    # the winner asking again (its next attempt) is told the key is still its own
    for key, (shard,) in won.items():
        assert KeyClaims(OutputStore(str(tmp_path / "out")), shard).holder(key) is None


@pytest.fixture(scope="module")
def s3_out(tmp_path_factory):
    import boto3

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID="AKIAKEYCLAIMS", AWS_SECRET_ACCESS_KEY="fake", AWS_EC2_METADATA_DISABLED="true")
    try:
        with moto_server(tmp_path_factory.mktemp("moto")) as port:
            endpoint = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="out")
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_claims_on_s3_use_conditional_creates(s3_out):
    from pipeline.manifest import StorageSpec

    storage = StorageSpec(endpoint_url=s3_out, region="us-east-1")
    keys = [f"{i:09d}" for i in range(30)]
    won = race(lambda: OutputStore("s3://out/claims", storage), keys)
    assert all(len(w) == 1 for w in won.values()), {k: w for k, w in won.items() if len(w) != 1}
    assert Counter(w[0] for w in won.values()).total() == len(keys)


# ---- a shard repeated under another name, through run_shard ----------------------------------------------

@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint
    from pipeline.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("dupes")
    ckpt = build_tiny_checkpoint(root / "pllava", seed=0)
    planted = write_synthetic_shards(root / "shards", shards=1, clips_per_shard=4, failed=1, corrupt=1, seed=5)
    shutil.copy(root / "shards/00000.tar", root / "shards/00000-copy.tar")
    return root, ckpt, planted["00000"]


def _manifest(root, ckpt, out, shards="shards/00000.tar", **extra):
    return manifest_from_dict({
        "shards": str(root / shards), "output": str(out), "languages": ["en"],
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": MAX_NEW, "batch_size": 2}, "chunk_size": 2, **extra})


def _run(m, captioner, pool, url, shard, attempt=1, **kw):
    return run_shard(url, shard, store=OutputStore(m.output), captioner=captioner, decode_pool=pool,
                     attempt=attempt, file_metadata={}, settings=ShardSettings.from_manifest(m), **kw)


def test_a_shard_repeated_under_another_name_gets_duplicate_rows(artefacts, tmp_path):
    """The copy is interrupted after its first chunk (its claims made), the original then runs whole, the copy
    resumes: every key is captioned exactly once over the two shards, the other row of each key says
    `duplicate` and names the shard holding it, and nothing is captioned twice."""
    import pyarrow.dataset as ds

    root, ckpt, planted = artefacts
    out = tmp_path / "out"
    m = _manifest(root, ckpt, out)
    captioner = Captioner.from_manifest(m)
    original, copy = str(root / "shards/00000.tar"), str(root / "shards/00000-copy.tar")
    commits = []
    with DecodePool(workers=1, max_ahead=2, mode="thread") as pool:
        with pytest.raises(ShardInterrupted):
            _run(m, captioner, pool, copy, "00000-copy", should_stop=lambda: bool(commits),
                 on_commit=lambda rows, _: commits.append(rows))
        fresh = Captioner.from_manifest(m)  # its own counters: the copy's cancelled clips may still be encoding
        _run(m, fresh, pool, original, "00000")
        _run(m, captioner, pool, copy, "00000-copy", attempt=2)
    rows = ds.dataset(str(out / "data"), format="parquet").to_table().to_pylist()
    by_key: dict[str, list[dict]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    assert set(by_key) == set(planted)
    for key, kept in by_key.items():
        statuses = sorted(r["status"] for r in kept)
        assert len(kept) == 2 and statuses.count("duplicate") == 1, (key, statuses)
        first = next(r for r in kept if r["status"] != "duplicate")
        dup = next(r for r in kept if r["status"] == "duplicate")
        allowed = {"ok", "flagged"} if planted[key] == "ok" else {planted[key]}
        assert first["status"] in allowed, (key, first["status"])
        assert dup["error"] == f"duplicate key: already in shard {first['shard']}" and dup["shard"] != first["shard"]
        assert dup["caption_en"] is None and dup["frame_indices"] is None
    # the copy's first chunk held keys it claimed: the original left those to it and captioned only the rest
    claimed_by_copy = {r["key"] for chunk in commits for r in chunk}
    assert claimed_by_copy and all(next(r for r in by_key[k] if r["status"] != "duplicate")["shard"] == "00000-copy"
                                   for k in claimed_by_copy)
    captioned = sum(1 for r in rows if r["status"] in ("ok", "flagged") and r["shard"] == "00000")
    assert fresh.stats.clips == captioned, "a duplicate key went through the model"


def test_refuse_policy_names_the_key_and_both_shards_at_preflight(artefacts):
    root, _, planted = artefacts
    shards = [("00000", str(root / "shards/00000.tar")), ("00000-copy", str(root / "shards/00000-copy.tar"))]
    with pytest.raises(SetupError) as err:
        check_unique_keys(shards)
    message = str(err.value)
    assert "\n" not in message and f"{len(planted)} keys appear in more than one shard" in message
    assert "00000, 00000-copy" in message and sorted(planted)[0] in message or any(k in message for k in planted)
    check_unique_keys(shards[:1])  # one shard: nothing repeated


def test_duplicate_keys_policy_is_validated(artefacts, tmp_path):
    from pipeline.manifest import ManifestError

    root, ckpt, _ = artefacts
    with pytest.raises(ManifestError, match="duplicate_keys"):
        _manifest(root, ckpt, tmp_path / "out", duplicate_keys="drop")


def test_a_disk_that_refuses_claims_is_a_storage_fault_not_a_shard_fault(tmp_path):
    """Claiming writes to the output: a full or read-only disk raises OutputStorageError naming the path (the
    driver stops the job once, exit 4), never a bare OSError that would fail the shard."""
    from pipeline.writing import OutputStorageError
    from tests.tmpfs import fill, remount, small_tmpfs

    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = OutputStore(str(disk / "out"))
        assert KeyClaims(store, "a").holder("k1") is None
        ballast = fill(disk)
        with pytest.raises(OutputStorageError, match="ENOSPC") as full:  # a new shard's holder file
            KeyClaims(store, "b").holder("k2")
        assert str(disk / "out/_keys/holders") in str(full.value)
        ballast.unlink()
        remount(disk, "ro")
        try:
            with pytest.raises(OutputStorageError, match="EROFS") as ro:  # the link of a fresh key
                KeyClaims(store, "a").holder("k3")
            assert "/_keys/" in str(ro.value)
        finally:
            remount(disk, "rw")
