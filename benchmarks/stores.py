"""Requests per shard on each object store (issue 24): what `recaption status`, planning, reading a shard and
committing one cost in requests, on S3 (moto), GCS (gcp-storage-emulator) and Azure Blob (Azurite), all on
127.0.0.1 as the tests start them. Request counts do not depend on the machine: they are what a real store bills
and what its latency multiplies.

    python -m benchmarks.stores [--shards 200] [--chunks 4]

For each store: an output holding `--shards` finished shards (records, data files, the shard list) is written
through OutputStore; then `collect_status` and `plan_shards` run on it and the server's log is counted. One
shard of the synthetic set is read with ShardReader (the 8 MiB buffer: one ranged GET per 8 MiB), and one shard
of `--chunks` chunks is committed and finalized (the job's write path: chunk PUTs, then list, read, create
exclusively, delete). Local disk is the baseline for wall time (same operations, same run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported (tests/conftest.py)

from jobs.status import collect_status  # noqa: E402
from pipeline.progress import plan_shards  # noqa: E402
from pipeline.shards import ShardReader  # noqa: E402
from pipeline.writing import COLUMNS, OutputStore  # noqa: E402


def rows(shard: str, n: int, first: int = 0) -> list[dict]:
    return [{**dict.fromkeys(COLUMNS), "key": f"{shard}{i:04d}", "shard": shard, "status": "ok",
             "caption_flags": [], "frame_indices": []} for i in range(first, first + n)]


def fill(out: OutputStore, shards: int) -> list[str]:
    from tests.jobs.test_output_view import write_finished_shards

    names = [f"{i:05d}" for i in range(shards)]
    write_finished_shards(out, names)
    out.write_json(out.path("_job.json"), {"fingerprint": "bench", "manifest": {"shards": ["/x"]}})
    return names


@contextlib.contextmanager
def servers(work: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """The three stores: per store its env, a bucket maker, and its log's request kinds."""
    import adlfs
    import boto3
    import gcsfs.core

    from tests.emulators import azure_request_kinds, azurite_server, gcs_request_kinds, gcs_server
    from tests.moto_server import moto_server, request_kinds

    for d in ("moto", "gcs", "azure"):
        (work / d).mkdir()
    with moto_server(work / "moto") as port, gcs_server(work / "gcs") as g, azurite_server(work / "azure") as a:
        s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIASTORESBENCH",
                  "AWS_SECRET_ACCESS_KEY": "fake", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.update(s3_env, **g.env, **a.env)
        boto3.client("s3").create_bucket(Bucket="bench")
        gcsfs.core.GCSFileSystem(**g.storage_options).mkdir("bench")
        adlfs.AzureBlobFileSystem(**a.storage_options).mkdir("bench")
        yield {
            "s3 (moto)": {"scheme": "s3", "log": work / "moto" / "moto.log", "kinds": request_kinds},
            "gcs (gcp-storage-emulator)": {"scheme": "gs", "log": g.log, "kinds": gcs_request_kinds},
            "azure (Azurite)": {"scheme": "az", "log": a.log, "kinds": azure_request_kinds},
        }


def counted(store: dict, action: Callable[[], Any]) -> tuple[collections.Counter, float]:
    from tests.emulators import settled

    before = len(settled(store["kinds"], store["log"]))
    t = time.perf_counter()
    action()
    seconds = time.perf_counter() - t
    return collections.Counter(settled(store["kinds"], store["log"])[before:]), seconds


def measure(store: dict | None, root: str, shards: int, chunks: int, shard: Path) -> dict:
    out = OutputStore(root)
    names = fill(out, shards)
    ops = {
        "status": lambda: collect_status(OutputStore(root)),
        "plan": lambda: plan_shards(OutputStore(root), [(n, f"/shards/{n}.tar") for n in names], False),
        "read shard": lambda: list(ShardReader(shard_url)),
        "commit shard": lambda: commit_one(OutputStore(root), chunks),
    }
    result = {}
    for name, action in ops.items():
        if store is None:
            t = time.perf_counter()
            action()
            result[name] = (collections.Counter(), time.perf_counter() - t)
        else:
            result[name] = counted(store, action)
    return result


def commit_one(out: OutputStore, chunks: int) -> None:
    name = "99999"
    for c in range(chunks):
        out.commit_chunk(name, rows(name, 2, 2 * c), 1)
    out.finalize_shard(name, {})


shard_url = ""


def main(argv: list[str] | None = None) -> int:
    global shard_url
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--chunks", type=int, default=4)
    args = p.parse_args(argv)
    from pipeline.synthetic import write_synthetic_shards

    work = Path(tempfile.mkdtemp(prefix="stores-bench-"))
    results: dict[str, dict] = {}
    shard_bytes = 0
    try:
        write_synthetic_shards(work / "shards", shards=1, clips_per_shard=5, failed=1, corrupt=0, seed=7)
        shard = work / "shards" / "00000.tar"
        shard_url, shard_bytes = str(shard), shard.stat().st_size
        results["local disk (baseline)"] = measure(None, str(work / "local"), args.shards, args.chunks, shard)
        with servers(work) as stores:
            for label, store in stores.items():
                from pipeline.storage import filesystem

                fs, path = filesystem(f"{store['scheme']}://bench/shards/00000.tar")
                fs.put_file(str(shard), path)
                shard_url = f"{store['scheme']}://bench/shards/00000.tar"
                results[label] = measure(store, f"{store['scheme']}://bench/out", args.shards, args.chunks, shard)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"- Date: {date.today()}. Machine: {os.cpu_count()} CPU {platform.machine()}, {platform.system()} "
          f"{platform.release()}; Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}.")
    print(f"- Command: `.venv/bin/python -m benchmarks.stores --shards {args.shards} --chunks {args.chunks}`; "
          f"the shard read: {shard_bytes} bytes (one ranged GET per 8 MiB).")
    print()
    print("| store | status: requests (per shard) | plan: requests | read one shard | commit one shard "
          f"({args.chunks} chunks) | status wall s |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        def fmt(c: collections.Counter, per: int | None = None) -> str:
            if not c:
                return "-"
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            total = sum(c.values())
            return f"{total} ({kinds})" + (f" = {total / per:.2f}/shard" if per else "")
        print(f"| {label} | {fmt(r['status'][0], args.shards)} | {fmt(r['plan'][0])} | {fmt(r['read shard'][0])} "
              f"| {fmt(r['commit shard'][0])} | {r['status'][1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
