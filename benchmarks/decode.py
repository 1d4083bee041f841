"""Decode throughput: our frames path (decode_clip, DecodePool) against decord alone, on 720p clips.

    python -m benchmarks.decode [--clips 4] [--frames 60] [--repeat 4] [--rounds 3]

Each row decodes the same workload: ``clips`` distinct 1280×720 H.264 clips at 29.97 fps (one keyframe,
like Panda's), each decoded ``repeat`` times. "decord alone" opens the mp4 from bytes and fetches the same
16 PLLaVA frames at full size (one decoder thread), nothing else; ``decode_clip`` adds probing, resizing
(inside decord), center crop and CLIP normalisation. Paths run round-robin; each number is the median
of ``rounds`` rounds.
Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import date
from fractions import Fraction
from typing import Self

import decord
import psutil
import torch

from pipeline.decode import DecodePool
from pipeline.frames import DecodedClip, decode_clip, sample_frame_indices
from pipeline.shards import Sample
from pipeline.synthetic import encode_clip


def decord_alone(mp4: bytes) -> None:
    reader = decord.VideoReader(io.BytesIO(mp4), num_threads=1)
    reader.get_batch(sample_frame_indices(len(reader))).asnumpy()


def in_threads(fn: Callable[[bytes], object], workload: list[bytes], threads: int) -> None:
    chunks = [workload[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=lambda c=c: [fn(m) for m in c]) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def through_pool(pool: DecodePool, workload: list[bytes]) -> None:
    samples = (Sample(key=str(i), shard="bench", mp4=mp4) for i, mp4 in enumerate(workload))
    for _, result in pool.imap(samples):
        assert isinstance(result, DecodedClip), result


class PeakRSS:
    """Samples the RSS of this process and of its children (the decoders) every 20 ms."""

    def __init__(self) -> None:
        self.main_mib = 0.0
        self.child_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            self.main_mib = max(self.main_mib, me.memory_info().rss / 2**20)
            for child in me.children(recursive=True):
                try:
                    self.child_mib = max(self.child_mib, child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # normalisation on one core, like one decode worker

    start = time.perf_counter()
    clips = [encode_clip(1280, 720, args.frames, Fraction(30000, 1001), audio=True, pattern_seed=i)
             for i in range(args.clips)]
    workload = clips * args.repeat
    n = len(workload)
    print(f"encoded {args.clips} clips of 1280x720, {args.frames} frames in "
          f"{time.perf_counter() - start:.1f}s; {n} decodes per round, {args.rounds} rounds", flush=True)

    for mp4 in clips:  # warm up imports and caches
        decord_alone(mp4)
        decode_clip(mp4)

    pools = {(mode, workers): DecodePool(workers=workers, max_ahead=8, mode=mode)
             for mode in ("process", "thread") for workers in (1, 2)}
    for (_, workers), pool in pools.items():
        through_pool(pool, clips[:workers])  # start-up (process spawn) is not measured
    paths: dict[str, Callable[[], None]] = {
        "decord alone, 1 thread": lambda: [decord_alone(m) for m in workload],
        "decode_clip, 1 thread": lambda: [decode_clip(m) for m in workload],
        "decord alone, 2 threads": lambda: in_threads(decord_alone, workload, 2),
        "decode_clip, 2 threads": lambda: in_threads(decode_clip, workload, 2),
        **{f"DecodePool {mode}, {workers} worker(s)": (lambda pool=pool: through_pool(pool, workload))
           for (mode, workers), pool in pools.items()},
    }
    # Round-robin over the paths so that background load on a shared machine hits all of them alike.
    times: dict[str, list[float]] = {name: [] for name in paths}
    with PeakRSS() as peak:
        for round_ in range(args.rounds):
            for name, run in paths.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    for pool in pools.values():
        pool.close()
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    print()
    print(f"date {date.today()}  python {platform.python_version()}  {platform.platform()}  "
          f"cpus {len(os.sched_getaffinity(0))}  {platform.processor() or platform.machine()}  "
          f"decord {decord.__version__}  torch {torch.__version__}")
    print(f"command: python -m benchmarks.decode {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print()
    print("| path | clips/s |")
    print("|---|---|")
    for name, value in rate.items():
        print(f"| {name} | {value:.2f} |")
    print()
    ratio = rate["decode_clip, 1 thread"] / rate["decord alone, 1 thread"]
    print(f"decode_clip / decord alone (1 core): {ratio:.3f}")
    for mode in ("process", "thread"):
        scaling = rate[f"DecodePool {mode}, 2 worker(s)"] / rate[f"DecodePool {mode}, 1 worker(s)"]
        print(f"DecodePool {mode}: 2 workers / 1 worker = {scaling:.2f}x")
    print(f"peak RSS: consumer process {peak.main_mib:.0f} MiB, "
          f"largest decoder process {peak.child_mib:.0f} MiB")


if __name__ == "__main__":
    main()
