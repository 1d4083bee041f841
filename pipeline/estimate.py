"""What a job will cost, measured before it runs: the real path (read, decode, engine, both languages, guards,
repairs) on a sample of clips, nothing written.

`pick_samples` spreads the sample across the shard list (evenly spaced shards, the first clips of each);
`measure` captions them through a `CaptionService` as a shard run does, timing from the first clip in to the
last row out after a short warm-up; `count_clips` counts the job's keys (every local shard's tar headers,
read with seeks; for remote shards, the sampled shards read whole and the rest extrapolated); `project` turns
the numbers into GPU-hours, wall time and cost. The Ray side (one actor with the job's resources) is
jobs/estimate.py. No ray here.
"""

from __future__ import annotations

import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.decode import DecodePool
from pipeline.manifest import StorageSpec
from pipeline.rows import failure_row, sample_failure
from pipeline.scheduler import CaptionService
from pipeline.shards import Sample, ShardReader

WARMUP_CLIPS = 4  # captioned first and not timed: model warm-up, first CUDA kernels, allocator growth
REMOTE_SHARDS_COUNTED = 2  # remote shards read whole to count their keys (the rest is extrapolated)


def pick_shards(shards: list[tuple[str, str]], n: int) -> list[tuple[str, str, int]]:
    """(name, url, clips to take) for up to n clips spread over evenly spaced shards."""
    if not shards or n <= 0:
        return []
    k = min(len(shards), n)
    idx = sorted({round(i * (len(shards) - 1) / max(k - 1, 1)) for i in range(k)})
    per, extra = divmod(n, len(idx))
    return [(shards[j][0], shards[j][1], per + (1 if i < extra else 0)) for i, j in enumerate(idx)]


def read_picks(picks: list[tuple[str, str, int]], storage: StorageSpec | None = None) -> Iterator[Sample]:
    """The first `count` whole samples of each picked shard (a shard with fewer gives what it has)."""
    for _name, url, count in picks:
        taken = 0
        for sample in ShardReader(url, storage=storage):
            if sample.cut_by_end:
                continue
            yield sample
            taken += 1
            if taken >= count:
                break


@dataclass
class Measurement:
    clips: int = 0  # samples measured (rows), warm-up excluded
    captioned: int = 0  # of them, clips that reached the model
    seconds: float = 0.0  # first sample in -> last row out
    rows: list[dict[str, Any]] = field(default_factory=list)
    repairs: int = 0
    tokens_repair: int = 0

    def summary(self) -> dict[str, Any]:
        statuses = Counter(r["status"] for r in self.rows)
        flags = Counter(f for r in self.rows for f in r.get("caption_flags") or ())
        captioned = [r for r in self.rows if r.get("tokens_en") is not None]
        n = max(len(self.rows), 1)
        return {
            "clips": self.clips,
            "seconds": self.seconds,
            "clips_per_s": self.clips / self.seconds if self.seconds > 0 else 0.0,
            "tokens_en_per_clip": sum(r["tokens_en"] or 0 for r in captioned) / max(len(captioned), 1),
            "tokens_zh_per_clip": sum(r["tokens_zh"] or 0 for r in captioned) / max(len(captioned), 1),
            "repair_tokens_per_clip": self.tokens_repair / max(len(captioned), 1),
            "status_share": {k: v / n for k, v in sorted(statuses.items())},
            "flag_share": {k: v / n for k, v in sorted(flags.items())},
        }


def measure(service: CaptionService, decode_pool: DecodePool, samples: list[Sample],
            warmup: int = WARMUP_CLIPS) -> Measurement:
    """Caption `samples` through the service as a shard run does (decode ahead, the engine, failures as rows),
    after captioning the first `warmup` of them untimed; nothing is written."""
    captioner = service.captioner
    if warmup:
        _run(service, decode_pool, samples[:warmup], captioner)
    before = captioner.stats.snapshot()
    t0 = time.perf_counter()
    rows = _run(service, decode_pool, samples, captioner)
    seconds = time.perf_counter() - t0
    spent = captioner.stats.since(before)
    return Measurement(clips=len(rows), captioned=sum(r.get("tokens_en") is not None for r in rows),
                       seconds=seconds, rows=rows, repairs=spent.repairs, tokens_repair=spent.tokens_repair)


def _run(service: CaptionService, decode_pool: DecodePool, samples: list[Sample], ctx: Any) -> list[dict[str, Any]]:
    ticket = service.open("estimate")
    rows: list[dict[str, Any]] = []
    for sample, decoded in decode_pool.imap(iter(samples)):
        failure = sample_failure(sample, decoded)
        if failure is not None:
            rows.append(failure_row(sample, failure, ctx=ctx).to_dict())
            continue
        while not service.submit(ticket, sample, decoded, timeout=0.5):
            service.raise_if_failed()
            rows.extend(ticket.take())
    while ticket.outstanding:
        service.raise_if_failed()
        ticket.wait(timeout=0.5)
        rows.extend(ticket.take())
    return rows + ticket.take()


# ------------------------------------------------------------------------------------------ the job's size


@dataclass(frozen=True)
class ClipCount:
    keys: int  # rows the job will write (one per key)
    how: str  # "counted" or "extrapolated from N shards"


def tar_keys(path: str) -> int:
    """Distinct webdataset keys in a local tar, from its headers (tarfile seeks over the members' data; nothing
    is extracted)."""
    keys = set()
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                base = member.name.rsplit("/", 1)
                keys.add((base[0] + "/" if len(base) == 2 else "") + base[-1].split(".", 1)[0])
    return len(keys)


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def count_clips(shards: list[tuple[str, str]], storage: StorageSpec | None = None) -> ClipCount:
    """Every local shard counted from its headers; remote shards: the first REMOTE_SHARDS_COUNTED read whole,
    their mean key count times the shard count."""
    local = [_local_path(url) for _, url in shards]
    if all(p is not None for p in local):
        return ClipCount(sum(tar_keys(p) for p in local), "counted")
    sampled = shards[:REMOTE_SHARDS_COUNTED]
    counts = [sum(1 for s in ShardReader(url, storage=storage) if not s.cut_by_end) for _, url in sampled]
    mean = sum(counts) / len(counts)
    return ClipCount(round(mean * len(shards)), f"extrapolated from {len(sampled)} of {len(shards)} shards "
                                                f"({mean:.1f} keys each)")


def project(clips_per_s: float, keys: int, gpus_per_actor: float, actors: int,
            gpu_hour_price: float | None) -> dict[str, Any]:
    """Actor-hours and GPU-hours for `keys` rows at the measured rate per actor, wall time with `actors` actors
    (the job's own count), and the cost at `gpu_hour_price`."""
    if clips_per_s <= 0:
        return {"actor_hours": None, "gpu_hours": None, "actors": actors, "wall_hours": None, "cost": None}
    actor_hours = keys / clips_per_s / 3600
    gpu_hours = actor_hours * gpus_per_actor
    return {
        "actor_hours": actor_hours,
        "gpu_hours": gpu_hours,
        "actors": actors,
        "wall_hours": actor_hours / max(actors, 1),
        # no GPU (a CPU cluster): no GPU-hours to price
        "cost": gpu_hours * gpu_hour_price if gpu_hour_price is not None and gpus_per_actor > 0 else None,
    }
