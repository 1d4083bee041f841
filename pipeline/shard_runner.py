"""One shard, start to finish: read → decode ahead → caption in batches → commit chunks → finalize.

Plain Python (the Ray actor in jobs/ only wraps it). Resumable: keys already committed for this
shard are skipped, and a finished shard is not touched again.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.captioning import Captioner, base_row
from pipeline.decode import DecodePool
from pipeline.frames import DecodedClip, DecodeFailure
from pipeline.progress import mark_done, mark_running
from pipeline.shards import Sample, ShardReader
from pipeline.writing import OutputStore

log = logging.getLogger(__name__)


class ShardTimeout(RuntimeError):
    """The shard ran past its time limit; committed chunks are kept and the next attempt resumes after them."""


@dataclass
class ShardOutcome:
    shard: str
    url: str
    counts: dict[str, int] = field(default_factory=dict)
    rows_new: int = 0
    keys_skipped: int = 0
    chunks: int = 0
    truncated: str | None = None
    already_done: bool = False
    seconds: float = 0.0
    wait_decode_s: float = 0.0  # time the model side spent waiting for decoded clips
    model_s: float = 0.0


def run_shard(
    url: str,
    shard: str,
    *,
    store: OutputStore,
    captioner: Captioner,
    decode_pool: DecodePool,
    attempt: int,
    file_metadata: dict[bytes, bytes],
    on_commit: Callable[[list[dict[str, Any]], ShardOutcome], None] | None = None,
) -> ShardOutcome:
    m = captioner.manifest
    t_start = time.perf_counter()
    deadline = time.monotonic() + m.shard_timeout_s
    out = ShardOutcome(shard=shard, url=url)
    if store.is_finished(shard):
        store.discard_leftover_chunks(shard)
        out.already_done = True
        return out
    mark_running(store, shard, url, attempt, os.getpid())
    done_keys = store.committed_keys(shard)
    reader = ShardReader(url)

    def fresh_samples() -> Iterator[Sample]:
        seen = set(done_keys)
        for sample in reader:
            if sample.key in seen:  # committed by an earlier attempt, or a duplicate key in the tar
                out.keys_skipped += 1
                continue
            seen.add(sample.key)
            yield sample

    pending: list[dict[str, Any]] = []
    batch: list[tuple[Sample, DecodedClip]] = []

    def flush_batch() -> None:
        t = time.perf_counter()
        pending.extend(captioner.caption_batch(batch))
        out.model_s += time.perf_counter() - t
        batch.clear()

    def commit() -> None:
        if pending:
            store.commit_chunk(shard, pending, attempt)
            out.rows_new += len(pending)
            out.chunks += 1
            if on_commit:
                on_commit(list(pending), out)
            pending.clear()

    results = decode_pool.imap(fresh_samples())
    while True:
        if time.monotonic() > deadline:
            flush_batch()
            commit()
            raise ShardTimeout(f"shard {shard} ran past its {m.shard_timeout_s:g} s limit "
                               f"({out.rows_new} new rows committed; the next attempt resumes after them)")
        t_wait = time.perf_counter()
        item = next(results, None)
        out.wait_decode_s += time.perf_counter() - t_wait
        if item is None:
            break
        sample, decoded = item
        if decoded is None and sample.source_failed:
            reason = sample.source_error or f"source video {sample.source_status}"
            pending.append(base_row(sample, None, captioner, status="source_failed", error=reason))
        elif decoded is None:  # the source says success but the tar has no (complete) mp4 for the key
            reason = sample.read_error or "mp4 member missing from the shard"
            pending.append(base_row(sample, None, captioner, status="decode_error", error=reason))
        elif isinstance(decoded, DecodeFailure):
            pending.append(base_row(sample, None, captioner, status="decode_error", error=decoded.reason))
        else:
            batch.append((sample, decoded))
            if len(batch) >= m.generation.batch_size:
                flush_batch()
        if len(pending) >= m.chunk_size:
            commit()
    flush_batch()
    commit()
    if reader.members_skipped:
        log.warning("shard %s: %d tar members skipped (%s)", shard, reader.members_skipped,
                    ", ".join(f"{k}: {v}" for k, v in sorted(reader.skipped.items())))
    if reader.truncated:
        out.truncated = reader.error or "tar ended early"
        log.warning("shard %s: truncated tar (%s); keeping the %d samples read", shard, out.truncated,
                    out.rows_new + len(done_keys))
    counts = store.finalize_shard(shard, file_metadata)
    out.counts = dict(counts)
    out.seconds = time.perf_counter() - t_start
    mark_done(store, shard, counts, out.truncated, out.seconds)
    return out


def summarize(counts: Counter | dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no rows"
