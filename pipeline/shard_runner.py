"""One shard, start to finish: read → decode ahead → caption in batches → commit chunks → finalize.

Plain Python (the Ray actor in jobs/ only wraps it). Resumable: keys already committed for this
shard are skipped, and a finished shard is not touched again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.captioning import Captioner
from pipeline.decode import DecodePool
from pipeline.key_claims import KeyClaims
from pipeline.progress import ShardResume, file_stats, mark_done, mark_running, settle_record, touch_running
from pipeline.rows import Row, Status, failure_row, sample_failure
from pipeline.scheduler import CaptionService
from pipeline.settings import ShardSettings  # noqa: F401  (re-exported: callers build it with run_shard)
from pipeline.shards import Sample, ShardReader
from pipeline.stats import Stats
from pipeline.writing import OutputStore

log = logging.getLogger(__name__)


class ShardTimeout(RuntimeError):
    """The shard ran past its time limit; committed chunks are kept and the next attempt resumes after them."""


class ShardIncomplete(RuntimeError):
    """The shard's stream ended early (after the reader's retries), or it held no usable sample. What was
    read is committed; the shard is not finalized, so it is never `done` with clips missing."""


class ShardInterrupted(RuntimeError):
    """The driver asked the shard to stop (Ctrl-C, SIGTERM): rows captioned so far are committed."""


@dataclass
class ShardOutcome:
    shard: str
    url: str
    stats: Stats = field(default_factory=Stats)  # this attempt's counters (pipeline/stats.py)
    counts: dict[str, int] = field(default_factory=dict)  # the finished data file's rows by status
    truncated: str | None = None
    already_done: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    should_stop: Callable[[], bool] | None = None,
    service: CaptionService | None = None,
    settings: ShardSettings,
    redo: tuple[str, ...] | None = None,
) -> ShardOutcome:
    """One attempt at one shard: resume state → read, decode and submit every fresh clip → wait for its last
    captions → finalize (or raise ShardIncomplete / ShardTimeout / ShardInterrupted with the rows committed).

    `redo` (statuses): a finished shard's rows with these statuses are captioned again and replace the old ones;
    every other row stays as it was."""
    run = _ShardRun(url, shard, store=store, captioner=captioner, attempt=attempt, on_commit=on_commit,
                    should_stop=should_stop, service=service or default_service(captioner),
                    settings=settings, redo=redo)
    if run.resume.finished:
        run.out.already_done = True
        settle_record(store, shard)
        return run.out
    mark_running(store, shard, url, attempt, os.getpid(), redo=redo, engine=run.service.engine_choice.record())
    try:
        run.read_and_submit(decode_pool)
        run.wait_for_captions()
    except BaseException:
        run.ticket.cancel()
        raise
    run.finish(file_metadata)
    return run.out


class _ShardRun:
    """The state of one shard attempt: its reader, its ticket in the captioning service, the rows not yet
    committed (with their failure kinds) and the outcome; each step of `run_shard` is one method."""

    def __init__(self, url: str, shard: str, *, store: OutputStore, captioner: Captioner, attempt: int,
                 on_commit: Callable[[list[dict[str, Any]], ShardOutcome], None] | None,
                 should_stop: Callable[[], bool] | None, service: CaptionService, settings: ShardSettings,
                 redo: tuple[str, ...] | None = None):
        self.shard, self.store, self.captioner, self.attempt = shard, store, captioner, attempt
        self.on_commit, self.should_stop, self.service, self.settings = on_commit, should_stop, service, settings
        self.t_start = time.perf_counter()
        self.deadline = time.monotonic() + settings.policy.shard_timeout_s
        self.redo = redo
        self.resume = ShardResume.load(store, shard, redo)
        self.out = ShardOutcome(shard=shard, url=url)
        self.reader = ShardReader(url, storage=settings.storage, read_retries=settings.policy.stream_retries,
                                  retry_backoff_s=settings.policy.stream_backoff_s)
        self.ticket = service.open(shard)
        self.model_s_at_start = service.stats.model_s
        self.pending: list[dict[str, Any]] = []
        self.claims = KeyClaims(store, shard)
        # key -> the shard that claimed it first; written by the reading thread before the sample is queued
        self.duplicates: dict[str, str] = {}

    # ---- the steps

    def read_and_submit(self, decode_pool: DecodePool) -> None:
        """Read and decode the fresh samples, hand clips to the engine and failures straight to `pending`.
        One shard reads and decodes at a time (the decode pool is the actor's); the next shard's reading starts
        as soon as this one's last clip is in the engine, while its captions are still generating."""
        service = self.service
        while not service.reading.acquire(timeout=0.2):
            self.check_limits()
            self.collect()
        try:
            results = _Prefetcher(decode_pool.imap(self.fresh_samples()))
            try:
                while True:
                    self.check_limits()
                    self.collect()
                    item = results.poll()
                    if item is _NOT_READY:
                        t_wait = time.perf_counter()
                        item = results.get(timeout=0.2)
                        if self.ticket.outstanding == 0:  # the model side had nothing of this shard to work on
                            self.out.stats.wait_decode_s += time.perf_counter() - t_wait
                        if item is _NOT_READY:
                            continue
                    if item is _END:
                        break
                    self.route(item)
            finally:
                results.close()
        finally:
            service.reading.release()

    def wait_for_captions(self) -> None:
        """The shard's last clips are generating (the next shard is already reading)."""
        while self.ticket.outstanding:
            self.check_limits()
            self.ticket.wait(timeout=0.5)
            self.collect()
        self.collect()
        self.commit()

    def finish(self, file_metadata: dict[bytes, bytes]) -> None:
        out, reader = self.out, self.reader
        out.stats.model_s = self.service.stats.model_s - self.model_s_at_start  # engine busy time (shared)
        out.stats.members_skipped = dict(reader.skipped)  # the whole tar's, for the record and status
        if reader.members_skipped:
            log.warning("shard %s: %d tar members skipped (%s)", self.shard, reader.members_skipped,
                        ", ".join(f"{k}: {v}" for k, v in sorted(reader.skipped.items())))
        if reader.incomplete:
            committed = out.stats.rows_new + len(self.resume.committed_keys)
            raise ShardIncomplete(f"incomplete: {reader.incomplete} ({committed} rows committed; the next "
                                  f"attempt reads the shard again and resumes after them)")
        counts = self.store.finalize_shard(self.shard, file_metadata, replace=bool(self.redo))
        out.counts = dict(counts)
        out.seconds = time.perf_counter() - self.t_start
        stats = file_stats(self.store, self.shard) if self.redo else self.resume.stats + out.stats
        stats.members_skipped = dict(reader.skipped)
        mark_done(self.store, self.shard, counts, out.truncated, out.seconds, stats)

    # ---- helpers

    def fresh_samples(self) -> Iterator[Sample]:
        seen = set(self.resume.committed_keys)
        redo = self.resume.redo_keys
        for sample in self.reader:
            if sample.cut_by_end:  # not committed: the shard is incomplete, the next attempt reads it whole
                continue
            if redo is not None and sample.key not in redo:  # a redo: only the rows asked for
                continue
            if sample.key in seen:  # committed by an earlier attempt, or a duplicate key in the tar
                self.out.stats.keys_skipped += 1
                continue
            seen.add(sample.key)
            holder = self.claims.holder(sample.key)
            if holder is not None:  # another shard captions this key: a `duplicate` row, nothing decoded
                self.duplicates[sample.key] = holder
                sample = dataclasses.replace(sample, mp4=None)
            yield sample

    def route(self, item: tuple[Sample, Any]) -> None:
        sample, decoded = item
        holder = self.duplicates.pop(sample.key, None)
        if holder is not None:
            self.pending.append(self.duplicate_row(sample, holder))
            return
        failure = sample_failure(sample, decoded)  # source failed, mp4 missing/cut from the tar, undecodable
        if failure is not None:
            self.pending.append(failure_row(sample, failure, ctx=self.captioner).to_dict())
        else:
            while not self.service.submit(self.ticket, sample, decoded, timeout=0.2):  # the engine is full
                self.check_limits()
                self.collect()

    def duplicate_row(self, sample: Sample, holder: str) -> dict[str, Any]:
        return Row.for_sample(sample, None, self.captioner, status=Status.DUPLICATE,
                              error=f"duplicate key: already in shard {holder}").to_dict()

    def collect(self) -> None:
        self.pending.extend(self.ticket.take())  # captioned clips' rows, or the captioner's `error` rows
        if len(self.pending) >= self.settings.chunk_size:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        out = self.out
        self.store.commit_chunk(self.shard, self.pending, self.attempt)
        out.stats.chunks += 1
        out.stats.add_rows(self.pending)
        touch_running(self.store, self.shard, self.resume.stats + out.stats)
        if self.on_commit:
            self.on_commit(list(self.pending), out)
        self.pending.clear()

    def check_limits(self) -> None:
        self.service.raise_if_failed()
        if time.monotonic() > self.deadline:
            self.collect()
            self.commit()
            raise ShardTimeout(f"shard {self.shard} ran past its {self.settings.policy.shard_timeout_s:g} s limit "
                               f"({self.out.stats.rows_new} new rows committed; the next attempt resumes after them)")
        if self.should_stop is not None and self.should_stop():
            self.collect()
            self.commit()  # rows captioned so far; clips still in the engine are redone by the rerun
            raise ShardInterrupted(f"shard {self.shard} stopped on request ({self.out.stats.rows_new} new rows "
                                   f"committed)")


_NOT_READY = object()
_END = object()


def default_service(captioner: Captioner) -> CaptionService:
    """The captioner's one engine service, shared by every shard run with it (made on first use)."""
    service = getattr(captioner, "_service", None)
    if service is None:
        service = CaptionService(captioner)
        captioner._service = service
    return service


class _Prefetcher:
    """Runs the read → decode iterator in a thread, so the caller can ask "is a decoded clip ready?"

    At most `depth` results wait in the queue (the decode pool bounds what is in flight behind it).
    An exception in the iterator (e.g. an unreadable shard) is re-raised by get()/poll() in the caller.
    """

    def __init__(self, iterator: Iterator[Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), name="shard-prefetch", daemon=True)
        self._thread.start()

    def _run(self, iterator: Iterator[Any]) -> None:
        try:
            for item in iterator:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the caller, who decides
            self._put(("error", e))

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _unwrap(self, entry: tuple[str, Any]) -> Any:
        kind, value = entry
        if kind == "error":
            raise value
        return _END if kind == "end" else value

    def poll(self) -> Any:
        try:
            return self._unwrap(self._queue.get_nowait())
        except queue.Empty:
            return _NOT_READY

    def get(self, timeout: float | None = None) -> Any:
        try:
            return self._unwrap(self._queue.get(timeout=timeout))
        except queue.Empty:
            return _NOT_READY

    def close(self) -> None:
        """Stop and wait for the thread, so the decode pool is free for the next shard."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def summarize(counts: Counter | dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no rows"
