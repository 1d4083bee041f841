"""A bounded decode pool that runs ahead of the model (docs/CONTRACTS.md, Frame sampling).

``DecodePool.imap(samples)`` yields ``(sample, DecodedClip | DecodeFailure | None)`` in input order: None
for a sample without mp4. At most ``max_ahead`` samples are held between the input and the consumer,
decoded or not, so memory stays bounded whatever the shard size.

Mode ``"process"`` (the default) decodes in worker processes: only a process can be killed when a clip
hangs or crashes the decoder, and on the 2-core benchmark machine it scaled better from 1 to 2 workers
than threads did (benchmarks/RESULTS.md). Workers return uint8 frames over a pipe (a JSON header and raw
bytes; nothing is pickled) and the consumer normalises them. Mode ``"thread"`` is for callers that cannot
start processes; there a timeout only abandons the clip (the stuck thread keeps its worker) and a segfault
kills the caller. Processes are started with "spawn" (no fork: the caller may hold threads and CUDA), so
the program's main module must be importable (a script guarded by ``if __name__ == "__main__"``).
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Literal, Self

import numpy as np

from pipeline.frames import NUM_FRAMES, SIZE, DecodedClip, DecodeFailure, decode_frames
from pipeline.shards import Sample

log = logging.getLogger(__name__)

Result = DecodedClip | DecodeFailure | None
# A decoder process may grow its address space by this much after start-up (8K decodes in ~0.25 GB); a
# clip that needs more fails, or kills only its decoder, instead of taking the node's memory.
DECODER_MEMORY_HEADROOM = 2 << 30


# ----------------------------------------------------------------------------------------------- worker


def _limit_address_space(headroom: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at its current size plus ``headroom`` bytes."""
    import resource

    size = _address_space()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + headroom if hard == resource.RLIM_INFINITY else min(size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _address_space() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _worker_main(conn: multiprocessing.connection.Connection, num_frames: int, size: int,
                 memory_headroom: int | None) -> None:
    """Decoder process: mp4 bytes in, a JSON header (+ raw uint8 frames when ok) out, until EOF."""
    # decord and ffmpeg log to stderr, sometimes with bytes of the (untrusted) file: silence them here.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    baseline = 0
    if memory_headroom is not None:
        import av  # noqa: F401 - the decoders' libraries are mapped before the cap is measured
        import decord  # noqa: F401

        _limit_address_space(memory_headroom)
        baseline = _address_space()
    while True:
        try:
            mp4 = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            result = decode_frames(mp4, num_frames=num_frames, size=size)
        except Exception as err:  # noqa: BLE001 - reported, the worker lives on
            result = DecodeFailure(f"unexpected error while decoding: {type(err).__name__}: {err}"[:300])
        if isinstance(result, DecodeFailure):
            # A clip that ran into the cap can leave the heap grown (freed, not returned): the next clip would
            # fail for want of room (seen: a thread not created, EAGAIN). Such a decoder asks to be replaced.
            spent = memory_headroom is not None and _address_space() - baseline > memory_headroom // 4
            conn.send_bytes(json.dumps({"failure": result.reason, "replace": spent}).encode())
            if spent:
                return
            continue
        header = {
            "shape": list(result.frames.shape), "fps": result.fps, "num_frames": result.num_frames,
            "width": result.width, "height": result.height, "duration_s": result.duration_s,
            "frame_indices": result.frame_indices,
        }
        conn.send_bytes(json.dumps(header).encode())
        conn.send_bytes(result.frames.data.cast("B"))  # flat bytes: send_bytes counts len(), not nbytes


def _receive_frames(conn: multiprocessing.connection.Connection, header: dict) -> DecodedClip:
    shape = [int(n) for n in header["shape"]]
    payload = bytearray(int(np.prod(shape)))  # writable, so torch can wrap it without a copy
    if conn.recv_bytes_into(payload) != len(payload):
        raise ValueError("frame payload of the wrong size")
    frames = np.frombuffer(payload, dtype=np.uint8).reshape(shape)
    indices = [int(i) for i in header["frame_indices"]]
    return DecodedClip(frames, float(header["fps"]), int(header["num_frames"]), int(header["width"]),
                  int(header["height"]), float(header["duration_s"]), indices)


@dataclass
class _Job:
    sample: Sample
    done: bool = False
    result: DecodedClip | DecodeFailure | None = None
    future: Future | None = field(default=None, repr=False)
    deadline: float = 0.0


class _Worker:
    def __init__(self, ctx: multiprocessing.context.BaseContext, num_frames: int, size: int,
                 memory_headroom: int | None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, num_frames, size, memory_headroom),
                                   daemon=True, name="pllava-decoder")
        self.process.start()
        child.close()
        self.job: _Job | None = None
        self.started = 0.0

    def stop(self) -> None:
        self.conn.close()
        self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ----------------------------------------------------------------------------------------------- pool


class DecodePool:
    """Decode clips ahead of the consumer; see the module docstring.

    ``workers`` decoders; ``max_ahead`` samples at most between input and output; ``timeout_s`` per clip;
    ``num_frames`` frames per clip, cropped to ``size`` px: the model's (``ModelDescription.num_frames`` and
    ``.image_size``; the defaults are the released checkpoints' 16 and 336); ``memory_headroom`` bytes of
    address space each decoder process may add after start-up (process mode; None: no cap).
    """

    def __init__(
        self,
        workers: int = 2,
        max_ahead: int = 8,
        mode: Literal["process", "thread"] = "process",
        timeout_s: float = 60.0,
        *,
        num_frames: int = NUM_FRAMES,
        size: int = SIZE,
        memory_headroom: int | None = DECODER_MEMORY_HEADROOM,
    ):
        if workers < 1 or max_ahead < 1 or timeout_s <= 0:
            raise ValueError("workers and max_ahead must be >= 1 and timeout_s > 0")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', not {mode!r}")
        self.workers, self.max_ahead, self.mode, self.timeout_s = workers, max_ahead, mode, timeout_s
        self.num_frames, self.size, self.memory_headroom = num_frames, size, memory_headroom
        self.restarts = 0  # decoder processes replaced after a crash or a timeout
        self._ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads and CUDA
        self._procs: list[_Worker] = []
        self._threads: ThreadPoolExecutor | None = None
        self._closed = False
        if mode == "process":
            self._procs = [_Worker(self._ctx, num_frames, size, memory_headroom) for _ in range(workers)]

    def worker_pids(self) -> list[int]:
        """Process ids of the decoder processes (empty in thread mode), e.g. for monitoring."""
        return [w.process.pid for w in self._procs]

    # -- public

    def imap(self, samples: Iterable[Sample]) -> Iterator[tuple[Sample, Result]]:
        """``(sample, result)`` per input sample, in input order, decoding up to ``max_ahead`` ahead."""
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        window: collections.deque[_Job] = collections.deque()
        queued: collections.deque[_Job] = collections.deque()  # submitted, not yet given to a process
        source = iter(samples)
        exhausted = False
        while True:
            while not exhausted and len(window) < self.max_ahead:
                sample = next(source, None)
                if sample is None:
                    exhausted = True
                    break
                job = _Job(sample)
                if sample.mp4 is None:
                    job.done = True
                else:
                    self._submit(job, queued)
                window.append(job)
            if not window:
                return
            head = window[0]
            while not head.done:
                self._progress(head, queued)
            window.popleft()
            yield head.sample, head.result

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        self._closed = True
        for worker in self._procs:
            worker.stop()
        self._procs = []
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals

    def _submit(self, job: _Job, queued: collections.deque[_Job]) -> None:
        if self.mode == "thread":
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="pllava-decoder")
            job.future = self._threads.submit(decode_frames, job.sample.mp4, num_frames=self.num_frames,
                                              size=self.size)
            job.deadline = 0.0  # set when the consumer starts waiting: queue time is not decode time
            return
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        queued.append(job)
        self._dispatch(queued)

    def _dispatch(self, queued: collections.deque[_Job]) -> None:
        for worker in self._procs:
            if worker.job is None and queued:
                job = queued.popleft()
                try:
                    worker.conn.send_bytes(job.sample.mp4)
                except OSError:  # the process died while idle
                    worker.process.join(timeout=5.0)
                    reason = f"decoder process crashed (exit code {worker.process.exitcode})"
                    job.result, job.done = DecodeFailure(reason), True
                    log.warning("key %s: %s, decoder restarted", job.sample.key, reason)
                    self._replace(worker)
                    continue
                worker.job, worker.started = job, time.monotonic()

    def _progress(self, head: _Job, queued: collections.deque[_Job]) -> None:
        """Wait for some result (or a timeout) and record it."""
        if self.mode == "thread":
            if not head.deadline:
                head.deadline = time.monotonic() + self.timeout_s
            try:
                head.result = head.future.result(timeout=max(0.0, head.deadline - time.monotonic()))
            except FutureTimeout:
                reason = f"decoding took longer than {self.timeout_s:g}s (thread abandoned)"
                head.result = DecodeFailure(reason)
                log.warning("key %s: decode timed out after %gs in a thread", head.sample.key, self.timeout_s)
            except Exception as err:  # noqa: BLE001
                head.result = DecodeFailure(f"unexpected error while decoding: {type(err).__name__}: {err}")
            head.done = True
            return
        busy = [w for w in self._procs if w.job is not None]
        if not busy:
            self._dispatch(queued)
            return
        now = time.monotonic()
        wait_s = max(0.0, min(w.started + self.timeout_s for w in busy) - now)
        ready = multiprocessing.connection.wait(
            [w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s)
        for worker in busy:
            if worker.conn in ready or worker.process.sentinel in ready:
                self._receive(worker)
            elif time.monotonic() - worker.started >= self.timeout_s:
                job = worker.job
                job.result = DecodeFailure(f"decoding took longer than {self.timeout_s:g}s; decoder killed")
                job.done = True
                log.warning("key %s: decode timed out after %gs, decoder restarted", job.sample.key,
                            self.timeout_s)
                self._replace(worker)
        self._dispatch(queued)

    def _receive(self, worker: _Worker) -> None:
        job = worker.job
        try:
            header = json.loads(worker.conn.recv_bytes())
            if "failure" in header:
                job.result = DecodeFailure(str(header["failure"]))
                if header.get("replace"):  # its address space is spent (see _worker_main): a fresh one
                    self._replace(worker)
            else:
                job.result = _receive_frames(worker.conn, header)
            worker.job = None
        except (EOFError, OSError, ValueError, KeyError, multiprocessing.BufferTooShort):
            worker.process.join(timeout=5.0)
            reason = f"decoder process crashed (exit code {worker.process.exitcode})"
            job.result = DecodeFailure(reason)
            log.warning("key %s: %s, decoder restarted", job.sample.key, reason)
            self._replace(worker)
        job.done = True

    def _replace(self, worker: _Worker) -> None:
        worker.job = None
        worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        self._procs[self._procs.index(worker)] = _Worker(self._ctx, self.num_frames, self.size,
                                                         self.memory_headroom)
        self.restarts += 1
