"""Keys unique across the whole output: each key is claimed by the first shard that captions it.

A webdataset key is unique inside a shard, but datasets are re-sharded, re-downloaded and merged, so the same
key can arrive in two shards of one job (or of two runs writing one output). Exactly-once per shard would then
caption it twice and hand training a silent duplicate. Before a shard captions a key it claims it:

    OUT/_keys/{h[:3]}/{h}.json      h = sha256(key), holding {"shard": ...}

created exclusively (a hard link to the shard's holder file locally, `If-None-Match: *` on S3), so of two
shards racing on one key exactly one wins. A claim is never removed: a shard that claimed a key and was killed
before committing its row finds its own claim on the next attempt and captions the key then. The loser writes a
row with status `duplicate` whose `error` names the shard that holds the key (nothing captioned twice, nothing
hidden). The policy `duplicate_keys: refuse` instead refuses a job whose shards repeat a key, at preflight
(`find_duplicate_keys`).

Cost: one conditional create per fresh key (plus one GET when it is taken), independent of the output's size:
no listing, no scan of other shards. Why not a library: no storage library offers a uniqueness index over
objects; the conditional create is the one primitive every store has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.writing import OutputStore

log = logging.getLogger(__name__)

KEYS_DIR = "_keys"
HOLDERS_DIR = "holders"  # local stores: the files every claim of a shard is a hard link to
POLICIES = ("keep_first", "refuse")


def claim_path(store: OutputStore, key: str) -> str:
    h = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return store.path(KEYS_DIR, h[:3], f"{h}.json")


class KeyClaims:
    """The claims of one shard: `holder(key)` claims the key for this shard, or names the shard that has it.

    On a local (or shared POSIX) filesystem a claim is a hard link to a small holder file of this shard: creating
    a link is atomic and fails on an existing name, like the data file's create, and costs one directory entry,
    not a file's block (10M keys: ~1 GB of directory entries instead of ~40 GB of 4 KiB files) and no fsync
    per key. A holder file takes at most `LINKS_PER_HOLDER` links (ext4 allows 65,000 per inode). On S3 a claim
    is one `If-None-Match: *` PUT."""

    LINKS_PER_HOLDER = 20_000

    def __init__(self, store: OutputStore, shard: str):
        self.store, self.shard = store, shard
        self._body = json.dumps({"shard": shard}).encode()
        self._holder: str | None = None
        self._links = 0

    def holder(self, key: str) -> str | None:
        """None when `key` is this shard's to caption (claimed now, or by an earlier attempt of this shard);
        else the name of the shard that claimed it first."""
        path = claim_path(self.store, key)
        for _ in range(3):
            if self._create(path):
                return None
            owner = _owner(self.store.read_bytes(path))
            if owner is not None:
                return None if owner == self.shard else owner
            # exists but unreadable: only a store without atomic creates can show a torn claim; look again
        raise RuntimeError(f"key claim {path} exists but cannot be read")

    def _create(self, path: str) -> bool:
        if not self.store.is_local:
            return self.store.create_exclusive(path, self._body)
        if self._holder is None or self._links >= self.LINKS_PER_HOLDER:
            self._holder = self._new_holder()
            self._links = 0
        if not self.store.link_exclusive(self._holder, path):
            return False
        self._links += 1
        return True

    def _new_holder(self) -> str:
        """A complete, durable holder file (its name is this shard's, sanitised, plus a random suffix)."""
        path = self.store.path(KEYS_DIR, HOLDERS_DIR, f"{self.shard}.{uuid.uuid4().hex[:12]}")
        self.store.write_atomic(path, self._body)
        return path


def _owner(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    shard = record.get("shard") if isinstance(record, dict) else None
    return shard if isinstance(shard, str) else None


@dataclass(frozen=True)
class DuplicateKey:
    key: str
    shards: tuple[str, ...]  # every shard of the job holding it, in job order


def find_duplicate_keys(shards: Iterable[tuple[str, str]], keys_of: Callable[[str, str], Iterable[str]]
                        ) -> list[DuplicateKey]:
    """Keys that appear in more than one shard (`keys_of(name, url)` lists a shard's keys). For the policy
    `refuse`: the driver reads every shard's member names before any work."""
    first: dict[str, list[str]] = {}
    for name, url in shards:
        for key in set(keys_of(name, url)):
            first.setdefault(key, []).append(name)
    return [DuplicateKey(k, tuple(v)) for k, v in first.items() if len(v) > 1]


def describe_duplicates(dupes: list[DuplicateKey], limit: int = 3) -> str:
    shown = "; ".join(f"{d.key!r} in {', '.join(d.shards)}" for d in dupes[:limit])
    more = f" (and {len(dupes) - limit} more)" if len(dupes) > limit else ""
    return f"{len(dupes)} keys appear in more than one shard: {shown}{more}"
