"""ShardCaptioner: a Ray actor that loads PLLaVA once and captions one shard at a time."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

import ray

from pipeline.manifest import Manifest


# max_concurrency=2: `progress()` answers while `process_shard` runs (the driver sends one shard at a time).
@ray.remote(max_concurrency=2)
class ShardCaptioner:
    def __init__(self, m: Manifest, file_metadata: dict[bytes, bytes]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.log = logging.getLogger("recaption.actor")
        self._lock = threading.Lock()
        self._current: dict[str, Any] = {}
        self._stop = threading.Event()
        # A setup error (model cannot load, device missing) is kept and reported by ready(), so the driver
        # ends the job with that reason once instead of charging it to shard after shard.
        self.init_error: str | None = None
        try:
            from pipeline.captioning import Captioner
            from pipeline.decode import DecodePool
            from pipeline.writing import OutputStore

            self.manifest = m
            self.file_metadata = file_metadata
            self.captioner = Captioner(m)
            self.store = OutputStore(m.output, m.storage)
            self.decode_pool = DecodePool(workers=m.decode.workers, max_ahead=m.decode.max_ahead,
                                          mode=m.decode.mode, timeout_s=m.decode.timeout_s)
        except Exception as e:
            self.init_error = f"{type(e).__name__}: {_one_line(e)}"
            self.log.error("ShardCaptioner could not start: %s", self.init_error)
            return
        self.log.info("ShardCaptioner ready on pid %d, device %s, model %s (alpha %s)", os.getpid(),
                      self.captioner.device, self.captioner.model_name, self.captioner.lora_alpha)

    def ready(self) -> dict[str, Any]:
        """{"error": reason} when the actor could not set up, else facts about it."""
        if self.init_error:
            return {"error": self.init_error}
        return {"error": None, "pid": os.getpid(), "device": str(self.captioner.device)}

    def stop(self) -> None:
        """Ask the running shard to commit what it has captioned and stop (Ctrl-C / SIGTERM on the driver)."""
        self._stop.set()

    def process_shard(self, url: str, shard: str, attempt: int) -> dict[str, Any]:
        from jobs.metrics import record_rows, record_shard_failure, record_times
        from pipeline.shard_runner import ShardInterrupted, run_shard

        if self.init_error:
            raise RuntimeError(f"actor could not start: {self.init_error}")
        with self._lock:
            self._current = {"shard": shard, "rows": 0, "started": time.time()}
        seen = {"wait": 0.0, "model": 0.0}

        def on_commit(rows: list[dict[str, Any]], outcome: Any) -> None:
            record_rows(rows)
            record_times(outcome.wait_decode_s - seen["wait"], outcome.model_s - seen["model"])
            seen["wait"], seen["model"] = outcome.wait_decode_s, outcome.model_s
            with self._lock:
                self._current["rows"] += len(rows)

        try:
            outcome = run_shard(url, shard, store=self.store, captioner=self.captioner,
                                decode_pool=self.decode_pool, attempt=attempt, file_metadata=self.file_metadata,
                                on_commit=on_commit, should_stop=self._stop.is_set)
        except Exception as e:
            if not isinstance(e, ShardInterrupted):
                record_shard_failure()
            raise
        finally:
            with self._lock:
                self._current = {}
        record_times(outcome.wait_decode_s - seen["wait"], outcome.model_s - seen["model"])
        return dataclasses.asdict(outcome)  # the driver logs the shard's start and finish

    def progress(self) -> dict[str, Any]:
        """The shard in hand and the rows committed for it so far (empty when idle)."""
        with self._lock:
            return dict(self._current)

    def pid(self) -> int:
        return os.getpid()


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:500]
