"""Live progress for the driver: a tqdm bar in a terminal, periodic summary lines in logs.

Under `ray job submit` (no terminal) the bar is off and a summary line is logged every `log_every_s`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("recaption")


class ProgressReporter:
    def __init__(self, total_shards: int, *, interactive: bool | None = None, log_every_s: float = 60.0):
        self.total = total_shards
        self.done = 0
        self.failed = 0
        self.clips_finished = 0  # rows of shards finished in this run
        self.clips_in_flight = 0  # rows committed so far by shards still running
        self.t0 = time.time()
        self.log_every_s = log_every_s
        self._last_log = self.t0
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        self._redirect = None
        if self.interactive:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total_shards, unit="shard", dynamic_ncols=True, file=sys.stderr)
            # log lines go above the bar (tqdm.write), never glued to it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        log.log(level, msg, *args)

    @property
    def clips(self) -> int:
        return self.clips_finished + self.clips_in_flight

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.t0, 1e-9)
        finished = self.done + self.failed
        eta = (elapsed / finished) * (self.total - finished) if finished else None
        return {"shards_done": self.done, "shards_failed": self.failed, "shards_total": self.total,
                "clips": self.clips, "clips_per_s": self.clips / elapsed, "elapsed_s": elapsed, "eta_s": eta}

    def shard_finished(self, rows: int) -> None:
        self.done += 1
        self.clips_finished += rows
        self.clips_in_flight = 0  # stale now (it counted this shard's rows); the next poll refreshes it
        self._refresh(advance=1)

    def shard_failed(self) -> None:
        self.failed += 1
        self.clips_in_flight = 0
        self._refresh(advance=1)

    def in_flight(self, rows: int) -> None:
        self.clips_in_flight = rows
        self._refresh(advance=0)

    def _refresh(self, advance: int) -> None:
        s = self.snapshot()
        if self.bar is not None:
            self.bar.update(advance)
            self.bar.set_postfix(clips=s["clips"], clips_s=f"{s['clips_per_s']:.2f}", failed=self.failed,
                                 refresh=True)
        now = time.time()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("summary: %s", format_snapshot(s))

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_snapshot(s: dict[str, Any]) -> str:
    eta = "unknown" if s["eta_s"] is None else f"{s['eta_s']:.0f}s"
    return (f"shards {s['shards_done']} done / {s['shards_failed']} failed / {s['shards_total']} total; "
            f"{s['clips']} clips in {s['elapsed_s']:.0f}s ({s['clips_per_s']:.2f} clips/s); ETA {eta}")
