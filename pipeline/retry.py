"""The job's retry policy, in one place: what is retried, how often, and when a shard is given up.

| level | what | from the manifest |
|---|---|---|
| shard | a failed attempt (actor death, error, incomplete stream) is requeued, then marked `failed` | `max_attempts` |
| shard | an attempt running past its limit stops between samples, committed rows kept | `shard_timeout_s` |
| shard | the driver kills an actor whose shard is stuck past the watchdog (inside a read) | `retry.watchdog_*` |
| job | the driver stops when no actor could run for a while (every node lost, none placed again) | `retry.no_actor_timeout_s` |
| stream | a remote shard stream is reopened at the byte reached, with backoff | `retry.stream_*` |
| clip | a crashed or timed-out decoder is replaced; that clip becomes a `decode_error` row | `decode.timeout_s` |
| clip | an engine failure re-captions its clips one by one; a failing clip becomes an `error` row | (always) |
| storage | a local commit whose folder a concurrent finalizer removed is written again | `STORAGE_RETRIES` |
| storage | a full, read-only or refusing output (`OutputStorageError`) is never retried: the job stops, exit 4 | (always) |
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.manifest import Manifest

STORAGE_RETRIES = 3  # pipeline/writing.py: local commit / finalize re-reads under a concurrent finalizer


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    shard_timeout_s: float = 7200.0
    watchdog_factor: float = 1.5
    watchdog_margin_s: float = 60.0
    no_actor_timeout_s: float = 900.0
    stream_retries: int = 5
    stream_backoff_s: float = 0.5
    decode_timeout_s: float = 60.0
    storage_retries: int = STORAGE_RETRIES

    @classmethod
    def from_manifest(cls, m: Manifest) -> RetryPolicy:
        return cls(max_attempts=m.max_attempts, shard_timeout_s=m.shard_timeout_s,
                   watchdog_factor=m.retry.watchdog_factor, watchdog_margin_s=m.retry.watchdog_margin_s,
                   no_actor_timeout_s=m.retry.no_actor_timeout_s,
                   stream_retries=m.retry.stream_retries, stream_backoff_s=m.retry.stream_backoff_s,
                   decode_timeout_s=m.decode.timeout_s)

    @property
    def watchdog_s(self) -> float:
        """How long the driver lets one shard attempt run before it kills the actor."""
        return self.watchdog_factor * self.shard_timeout_s + self.watchdog_margin_s

    def is_final(self, attempt: int) -> bool:
        """Whether a shard that failed on `attempt` is given up (marked failed) rather than requeued."""
        return attempt >= self.max_attempts
