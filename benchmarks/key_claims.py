"""Keys unique across the output (issue 22): what claiming a shard's keys costs, and whether it grows with the
output.

    python -m benchmarks.key_claims [--shards 10000] [--keys 100] [--sample 50] [--s3-shards 20] [--work DIR]

Local: fills one output with the claims of `--shards` shards of `--keys` keys each, through `KeyClaims` as the
shard runner makes them (hard links to each shard's holder file), then times claiming the keys of `--sample`
more shards: fresh keys in an EMPTY output (the baseline) against fresh keys in the FULL output, and keys another
shard holds (the `duplicate` path). A design that looked for a key by scanning the output would grow with it;
the ratio full/empty says this one does not. Also the disk the claims take (`du`, blocks and inodes).

S3: a moto server on 127.0.0.1 (as the tests start it); claims `--s3-shards` shards' keys fresh, then again as
duplicates from other shards, and counts the requests per key from the server's log (hardware-independent).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.key_claims import KEYS_DIR, KeyClaims  # noqa: E402
from pipeline.manifest import StorageSpec  # noqa: E402
from pipeline.writing import OutputStore  # noqa: E402


def keys_of(shard: int, keys: int) -> list[str]:
    # Panda-70M style keys: SSSSSRR_CCCCC (shard, row, clip)
    return [f"{shard:05d}{k // 10:02d}_{k % 10:05d}" for k in range(keys)]


def claim_shard(store: OutputStore, shard: int, keys: list[str]) -> tuple[float, int]:
    claims = KeyClaims(store, f"{shard:05d}")
    t = time.perf_counter()
    taken = sum(claims.holder(k) is not None for k in keys)
    return time.perf_counter() - t, taken


def timed_sample(store: OutputStore, first: int, n: int, keys: int, owner_offset: int | None = None) -> list[float]:
    """Seconds to claim each of `n` shards' keys; with `owner_offset`, shard i claims the keys of shard
    i - owner_offset (all already held: the duplicate path)."""
    times = []
    for shard in range(first, first + n):
        source = shard if owner_offset is None else shard - owner_offset
        seconds, taken = claim_shard(store, shard, keys_of(source, keys))
        assert taken == (0 if owner_offset is None else keys), (shard, taken)
        times.append(seconds)
    return times


def du(path: Path) -> tuple[int, int]:
    """(bytes of disk blocks, inodes) under path."""
    blocks = int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True).stdout.split()[0])
    inodes = int(subprocess.run(["du", "-s", "--inodes", str(path)], capture_output=True, text=True).stdout.split()[0])
    return blocks, inodes


def measure_local(work: Path, shards: int, keys: int, sample: int) -> dict:
    empty = OutputStore(str(work / "empty"))
    full = OutputStore(str(work / "full"))
    t = time.perf_counter()
    for shard in range(shards):
        claim_shard(full, shard, keys_of(shard, keys))
    fill_s = time.perf_counter() - t
    blocks, inodes = du(work / "full" / KEYS_DIR)
    res = {
        "fill_s": fill_s,
        "claims": shards * keys,
        "du_bytes": blocks,
        "inodes": inodes,
        "empty": timed_sample(empty, 10**6, sample, keys),
        "full": timed_sample(full, 10**6, sample, keys),
        "duplicate": timed_sample(full, 2 * 10**6, sample, keys, owner_offset=2 * 10**6 - shards + sample),
    }
    return res


def measure_s3(work: Path, shards: int, keys: int) -> dict:
    import boto3

    from tests.moto_server import moto_server, settled_requests

    os.environ.update(AWS_ACCESS_KEY_ID="AKIAKEYCLAIMSBENCH", AWS_SECRET_ACCESS_KEY="fake",
                      AWS_EC2_METADATA_DISABLED="true")
    log_dir = work / "moto"
    log_dir.mkdir()
    with moto_server(log_dir) as port:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        store = OutputStore("s3://bench/out", StorageSpec(endpoint_url=endpoint, region="us-east-1"))
        log = log_dir / "moto.log"
        before = len(settled_requests(log))
        fresh = timed_sample(store, 0, shards, keys)
        mid = settled_requests(log)
        dup = timed_sample(store, shards, shards, keys, owner_offset=shards)
        after = settled_requests(log)
    n = shards * keys
    count = lambda kinds: {k: round(kinds.count(k) / n, 3) for k in sorted(set(kinds))}  # noqa: E731
    return {"fresh": count(mid[before:]), "duplicate": count(after[len(mid):]), "fresh_s": fresh, "dup_s": dup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--sample", type=int, default=50)
    p.add_argument("--s3-shards", type=int, default=20)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="claims-", dir=args.work))
    try:
        local = measure_local(work, args.shards, args.keys, args.sample)
        s3 = measure_s3(work, args.s3_shards, args.keys) if args.s3_shards else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(local[k]) for k in ("empty", "full", "duplicate")}
    print(f"- Date: {date.today()}. Machine: {os.cpu_count()} CPU {platform.machine()}, {platform.system()} "
          f"{platform.release()}; Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}.")
    print(f"- Command: `.venv/bin/python -m benchmarks.key_claims --shards {args.shards} --keys {args.keys} "
          f"--sample {args.sample} --s3-shards {args.s3_shards}`")
    print()
    print(f"Local output holding {local['claims']:,} claims ({args.shards:,} shards × {args.keys} keys), filled in "
          f"{local['fill_s']:.1f} s ({local['fill_s'] / local['claims'] * 1e6:.0f} µs a claim); `_keys/` takes "
          f"{local['du_bytes'] / 2**20:.0f} MiB of disk blocks and {local['inodes']:,} inodes.")
    print()
    print(f"| claiming one shard's {args.keys} keys (median of {args.sample} shards) | seconds | per key | "
          "vs empty output |")
    print("| --- | --- | --- | --- |")
    for label, k in (("fresh keys, empty output (baseline)", "empty"),
                     (f"fresh keys, output holding {args.shards:,} shards' claims", "full"),
                     ("keys another shard holds (duplicate rows)", "duplicate")):
        print(f"| {label} | {med[k]:.4f} | {med[k] / args.keys * 1e6:.0f} µs | {med[k] / med['empty']:.2f}× |")
    if s3:
        print()
        print(f"S3 (moto), {args.s3_shards} shards × {args.keys} keys: requests per key, fresh claims "
              f"{s3['fresh']}, duplicate keys {s3['duplicate']}; median seconds per shard on loopback "
              f"{statistics.median(s3['fresh_s']):.2f} fresh, {statistics.median(s3['dup_s']):.2f} duplicate.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
