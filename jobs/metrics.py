"""Ray metrics (exported by each node's metrics agent, e.g. to Prometheus and the Ray dashboard).

Created lazily inside the process that records them (actors, driver), as ray.util.metrics requires.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


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


def record_rows(rows: list[dict[str, Any]]) -> None:
    m = job_metrics()
    for row in rows:
        m["clips"].inc(1, tags={"status": row["status"]})
        if row.get("tokens_en"):
            m["tokens"].inc(row["tokens_en"], tags={"language": "en"})
        if row.get("tokens_zh"):
            m["tokens"].inc(row["tokens_zh"], tags={"language": "zh"})


def record_times(decode_wait_s: float, model_s: float) -> None:
    m = job_metrics()
    if decode_wait_s > 0:
        m["decode_wait"].inc(decode_wait_s)
    if model_s > 0:
        m["model_time"].inc(model_s)


def record_shard_failure() -> None:
    job_metrics()["shard_failures"].inc(1)
