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
        from pipeline.captioning import Captioner
        from pipeline.decode import DecodePool
        from pipeline.writing import OutputStore

        self.manifest = m
        self.file_metadata = file_metadata
        self.captioner = Captioner(m)
        self.store = OutputStore(m.output, m.storage)
        self.decode_pool = DecodePool(workers=m.decode.workers, max_ahead=m.decode.max_ahead,
                                      mode=m.decode.mode, timeout_s=m.decode.timeout_s)
        self.log = logging.getLogger("recaption.actor")
        self._lock = threading.Lock()
        self._current: dict[str, Any] = {}
        self.log.info("ShardCaptioner ready on pid %d, device %s, model %s (alpha %s)", os.getpid(),
                      self.captioner.device, self.captioner.model_name, self.captioner.lora_alpha)

    def process_shard(self, url: str, shard: str, attempt: int) -> dict[str, Any]:
        from jobs.metrics import record_rows, record_shard_failure, record_times
        from pipeline.shard_runner import run_shard, summarize

        self.log.info("shard %s start (attempt %d): %s", shard, attempt, url)
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
                                on_commit=on_commit)
        except Exception:
            record_shard_failure()
            raise
        finally:
            with self._lock:
                self._current = {}
        record_times(outcome.wait_decode_s - seen["wait"], outcome.model_s - seen["model"])
        self.log.info("shard %s finish: %s", shard, summarize(outcome.counts))
        return dataclasses.asdict(outcome)

    def progress(self) -> dict[str, Any]:
        """The shard in hand and the rows committed for it so far (empty when idle)."""
        with self._lock:
            return dict(self._current)

    def pid(self) -> int:
        return os.getpid()
