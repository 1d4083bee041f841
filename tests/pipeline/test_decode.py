"""DecodePool: input order, bounded read-ahead, failures that never stop the stream."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline.decode import DecodePool
from pipeline.frames import DecodedClip, DecodeFailure, decode_clip
from pipeline.shards import Sample, ShardReader


@pytest.fixture(scope="module")
def samples(shards_dir: Path) -> list[Sample]:
    return [s for shard in ("00000", "00001") for s in ShardReader(str(shards_dir / f"{shard}.tar"))]


def _status(result: DecodedClip | DecodeFailure | None) -> str:
    return {DecodedClip: "ok", DecodeFailure: "decode_error", type(None): "source_failed"}[type(result)]


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_results_in_input_order_and_match_planted(mode: str, samples: list[Sample], planted: dict) -> None:
    with DecodePool(workers=2, max_ahead=3, mode=mode) as pool:
        out = list(pool.imap(samples))
    assert [s.key for s, _ in out] == [s.key for s in samples]
    for sample, result in out:
        assert _status(result) == planted[sample.shard][sample.key], sample.key
        if isinstance(result, DecodedClip):
            direct = decode_clip(sample.mp4)
            assert torch.equal(result.pixel_values, direct.pixel_values), "results belong to their sample"
            assert result.frame_indices == direct.frame_indices


def test_read_ahead_is_bounded(samples: list[Sample]) -> None:
    pulled = 0

    def source():
        nonlocal pulled
        for sample in samples * 2:
            pulled += 1
            yield sample

    yielded = 0
    with DecodePool(workers=2, max_ahead=4) as pool:
        for _ in pool.imap(source()):
            yielded += 1
            assert pulled - yielded <= 4 - 1, "at most max_ahead samples between input and output"
            time.sleep(0.01)
    assert yielded == pulled == 2 * len(samples)


def test_runs_ahead_of_a_slow_consumer(samples: list[Sample]) -> None:
    clips = [s for s in samples if s.mp4 and s.source_status == "success"][:6]
    with DecodePool(workers=2, max_ahead=6) as pool:
        stream = pool.imap(clips)
        next(stream)
        time.sleep(4.0)  # the pool decodes the rest meanwhile
        start = time.monotonic()
        rest = list(stream)
    assert len(rest) == 5 and time.monotonic() - start < 2.0


def test_a_hung_decoder_times_out_and_the_stream_goes_on(samples: list[Sample]) -> None:
    clips = [s for s in samples if s.mp4][:3]
    with DecodePool(workers=1, timeout_s=2.0) as pool:
        os.kill(pool.worker_pids()[0], signal.SIGSTOP)  # the decoder stops answering
        start = time.monotonic()
        out = list(pool.imap(clips))
        assert pool.restarts == 1
    assert time.monotonic() - start < 20
    assert isinstance(out[0][1], DecodeFailure) and "longer than 2s" in out[0][1].reason
    assert [_status(r) for _, r in out[1:]] == [_status(decode_clip(s.mp4)) for s in clips[1:]]


def test_a_crashed_decoder_is_a_failure_for_its_clip_only(samples: list[Sample]) -> None:
    clips = [s for s in samples if s.mp4 and s.source_status == "success"][:4]
    with DecodePool(workers=1) as pool:
        stream = pool.imap(clips)
        first = next(stream)
        os.kill(pool.worker_pids()[0], signal.SIGSEGV)  # as if decord segfaulted on the next clip
        out = [first, *stream]
        assert pool.restarts == 1
    assert [s.key for s, _ in out] == [s.key for s in clips]
    crashed = [r for _, r in out if isinstance(r, DecodeFailure) and "crashed" in r.reason]
    assert len(crashed) == 1 and "exit code -11" in crashed[0].reason


def test_samples_without_mp4_give_none_and_close_is_final(samples: list[Sample]) -> None:
    no_video = [s for s in samples if s.mp4 is None]
    assert no_video
    pool = DecodePool(workers=1, mode="thread")
    assert [r for _, r in pool.imap(no_video)] == [None] * len(no_video)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError):
        next(pool.imap(no_video))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DecodePool(workers=0)
    with pytest.raises(ValueError):
        DecodePool(mode="fork")  # type: ignore[arg-type]
