"""ShardCaptioner: a Ray actor that loads PLLaVA once and captions the shards the driver hands it.

The driver keeps SHARDS_IN_FLIGHT shards on each actor: they share one continuous-batching engine
(pipeline/scheduler.py), so the next shard's clips enter the engine while the last clips of the current one
are still generating. Each shard still commits and finalizes on its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import ray

from pipeline.settings import ActorSettings

SHARDS_IN_FLIGHT = 2


# process_shard for each shard in flight, plus progress() and stop() while they run
@ray.remote(max_concurrency=SHARDS_IN_FLIGHT + 2)
class ShardCaptioner:
    def __init__(self, settings: ActorSettings, file_metadata: dict[bytes, bytes]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.log = logging.getLogger("recaption.actor")
        self._lock = threading.Lock()
        self._current: dict[str, dict[str, Any]] = {}  # shard -> {"rows", "started"}
        self._stop = threading.Event()
        # A setup error (model cannot load, device missing) is kept and reported by ready(), so the driver
        # ends the job with that reason once instead of charging it to shard after shard.
        self.init_error: str | None = None
        try:
            from pipeline.captioning import Captioner
            from pipeline.decode import DecodePool
            from pipeline.scheduler import CaptionService
            from pipeline.writing import OutputStore

            self.file_metadata = file_metadata
            self.captioner = Captioner(settings.caption)
            self.service = CaptionService(self.captioner)
            self.log.info("engine: %s", self.service.engine_choice.describe())  # which, its version, why
            self._engine_seen = self.service.stats.snapshot()
            self.settings = settings.shard
            self.store = OutputStore(settings.output, settings.shard.storage)
            model = self.captioner.description  # frames sampled and sized as this checkpoint takes them
            d = settings.decode
            self.decode_pool = DecodePool(workers=d.workers, max_ahead=d.max_ahead, mode=d.mode,
                                          timeout_s=d.timeout_s, num_frames=model.num_frames,
                                          size=model.image_size)
        except Exception as e:
            self.init_error = f"{type(e).__name__}: {_one_line(e)}"
            self.log.error("ShardCaptioner could not start: %s", self.init_error)
            return
        self.log.info("ShardCaptioner ready on pid %d, device %s, model %s (alpha %s); engine %d slots x %d "
                      "tokens; peak memory %s", os.getpid(), self.captioner.device, self.captioner.model_name,
                      self.captioner.lora_alpha, self.service.num_slots, self.service.max_len, _peak_memory())

    def ready(self) -> dict[str, Any]:
        """{"error": reason} when the actor could not set up, else facts about it."""
        if self.init_error:
            return {"error": self.init_error}
        return {"error": None, "pid": os.getpid(), "device": str(self.captioner.device)}

    def stop(self) -> None:
        """Ask the running shard to commit what it has captioned and stop (Ctrl-C / SIGTERM on the driver)."""
        self._stop.set()

    def process_shard(self, url: str, shard: str, attempt: int, redo: tuple[str, ...] | None = None) -> dict[str, Any]:
        from jobs.metrics import record_shard_failure
        from pipeline.shard_runner import ShardInterrupted, run_shard
        from pipeline.stats import Stats
        from pipeline.writing import OutputStorageError

        if self.init_error:
            raise RuntimeError(f"actor could not start: {self.init_error}")
        with self._lock:
            self._current[shard] = {"rows": 0, "started": time.time()}
        seen = [Stats()]  # this attempt's counters already sent to the metrics

        def on_commit(rows: list[dict[str, Any]], outcome: Any) -> None:
            self._record_metrics(outcome.stats, seen)
            with self._lock:
                self._current[shard]["rows"] += len(rows)

        try:
            outcome = run_shard(url, shard, store=self.store, captioner=self.captioner,
                                decode_pool=self.decode_pool, attempt=attempt, file_metadata=self.file_metadata,
                                on_commit=on_commit, should_stop=self._stop.is_set, service=self.service,
                                settings=self.settings, redo=redo)
        except Exception as e:
            # a stop on request, or the output's storage refusing (the driver stops the job): no shard failure.
            # Raised as they are, the driver tells them apart by type (RayTaskError.cause).
            if not isinstance(e, (ShardInterrupted, OutputStorageError)):
                record_shard_failure()
            raise
        finally:
            with self._lock:
                self._current.pop(shard, None)
        self._record_metrics(outcome.stats, seen)
        return outcome.to_dict()  # the driver logs the shard's start and finish

    def _record_metrics(self, shard_stats: Any, seen: list[Any]) -> None:
        """The Ray metrics' increments: rows, tokens and decode wait from the shard's counters, model time from
        the engine's (shared by the shards in flight, so counted once per actor, not per shard)."""
        from jobs.metrics import record_stats

        delta = shard_stats.since(seen[0])
        seen[0] = shard_stats.snapshot()
        with self._lock:
            engine = self.service.stats.snapshot()
            delta.model_s = engine.model_s - self._engine_seen.model_s
            self._engine_seen = engine
        record_stats(delta)

    def estimate(self, picks: list[tuple[str, str, int]]) -> dict[str, Any]:
        """`recaption estimate`: caption the first clips of the picked shards through this actor's engine,
        untimed warm-up first; nothing is written. The measured rate and shares (pipeline/estimate.py)."""
        from pipeline.estimate import measure, read_picks

        if self.init_error:
            raise RuntimeError(f"actor could not start: {self.init_error}")
        samples = list(read_picks(picks, self.settings.storage))
        result = measure(self.service, self.decode_pool, samples)
        return {**result.summary(), "device": str(self.captioner.device), "slots": self.service.num_slots,
                "repairs": result.repairs, "peak_memory": _peak_memory()}

    def progress(self) -> dict[str, Any]:
        """The shards in hand and the rows committed for them so far."""
        with self._lock:
            return {"shards": sorted(self._current), "rows": sum(c["rows"] for c in self._current.values())}

    def pid(self) -> int:
        return os.getpid()


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:500]


def _peak_memory() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on the GPU"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
