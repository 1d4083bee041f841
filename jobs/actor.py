"""ShardCaptioner: a Ray actor that loads PLLaVA once and captions one shard at a time."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import ray

from pipeline.manifest import Manifest


@ray.remote
class ShardCaptioner:
    def __init__(self, m: Manifest, file_metadata: dict[bytes, bytes]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from pipeline.captioning import Captioner
        from pipeline.decode import DecodePool
        from pipeline.writing import OutputStore

        self.manifest = m
        self.file_metadata = file_metadata
        self.captioner = Captioner(m)
        self.store = OutputStore(m.output)
        self.decode_pool = DecodePool(workers=m.decode.workers, max_ahead=m.decode.max_ahead,
                                      mode=m.decode.mode, timeout_s=m.decode.timeout_s)
        self.log = logging.getLogger("recaption.actor")
        self.log.info("ShardCaptioner ready on pid %d, device %s, model %s (alpha %s)", os.getpid(),
                      self.captioner.device, self.captioner.model_name, self.captioner.lora_alpha)

    def process_shard(self, url: str, shard: str, attempt: int) -> dict[str, Any]:
        from pipeline.shard_runner import run_shard, summarize

        self.log.info("shard %s start (attempt %d): %s", shard, attempt, url)
        outcome = run_shard(url, shard, store=self.store, captioner=self.captioner,
                            decode_pool=self.decode_pool, attempt=attempt, file_metadata=self.file_metadata)
        self.log.info("shard %s finish: %s", shard, summarize(outcome.counts))
        return dataclasses.asdict(outcome)

    def pid(self) -> int:
        return os.getpid()
