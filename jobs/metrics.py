"""Ray metrics (exported by each node's metrics agent, e.g. to Prometheus and the Ray dashboard).

Created lazily inside the process that records them (actors, driver), as ray.util.metrics requires.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pipeline.stats import Stats


@lru_cache(maxsize=1)
def job_metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter

    return {
        "clips": Counter("recaption_clips", description="Clips written, by row status.", tag_keys=("status",)),
        "tokens": Counter("recaption_generated_tokens", description="Generated caption tokens, by language.",
                          tag_keys=("language",)),
        "shard_failures": Counter("recaption_shard_failures",
                                  description="Failed shard attempts (exceptions and actor deaths)."),
        "decode_wait": Counter("recaption_decode_wait_seconds",
                               description="Seconds the model side waited for decoded clips."),
        "model_time": Counter("recaption_model_seconds", description="Seconds spent in the model."),
    }


def record_stats(delta: Stats) -> None:
    """Counters added since the last call (`Stats.since`): rows by status, tokens, decode wait, model time."""
    m = job_metrics()
    for status, n in delta.rows.items():
        if n > 0:
            m["clips"].inc(n, tags={"status": status})
    for language, n in (("en", delta.tokens_en), ("zh", delta.tokens_zh)):
        if n > 0:
            m["tokens"].inc(n, tags={"language": language})
    if delta.wait_decode_s > 0:
        m["decode_wait"].inc(delta.wait_decode_s)
    if delta.model_s > 0:
        m["model_time"].inc(delta.model_s)


def record_shard_failure() -> None:
    job_metrics()["shard_failures"].inc(1)
