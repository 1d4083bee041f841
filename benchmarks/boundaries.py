"""Slot utilisation across shard boundaries: a 3-shard run through the real shard runner, CPU, tiny model.

    python -m benchmarks.boundaries [--shards 3] [--clips-per-shard 6] [--slots 4] [--en-min 20] [--en-max 100]
                                    [--zh-ratio 1.2] [--json PATH]

Real synthetic shards → real decode (`DecodePool`, thread mode) → `run_shard` → Parquet, with one
`CaptionService` (one engine) shared by the shards, as in an actor. A length mix is forced here only (the tiny
random model never stops on its own): clip i's English caption is drawn from [--en-min, --en-max] tokens and its
Chinese translation is ``--zh-ratio`` × that, with ``ignore_eos``. Two ways to run the same shards:

- ``drain``: one shard at a time on the engine — the next shard starts once the previous one has finished
  (what an actor did before: its engine empties at every shard end);
- ``overlap``: shards in flight two at a time (the actor's SHARDS_IN_FLIGHT): the next shard's clips enter the
  engine while the last clips of the current one are still generating.

Reported per mode: wall seconds, clips/s and the ratio; slot utilisation (useful tokens ÷ slot-steps, from the
engine's counters: the waste inside the steps that ran); and engine busy (share of the wall time the model
thread was working): at a drain the engine has no step to run at all while the next shard is read and decoded,
which slot-steps cannot show and busy time does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path


def _service_with_lengths(captioner, slots: int, lengths: dict[str, tuple[int, int]]):
    from pipeline.scheduler import CaptionService

    class ForcedLengths(CaptionService):
        """Benchmark only: each clip's English/Chinese request gets its drawn length (ignore_eos is on)."""

        def _submit(self, x, kind, ids, features, settings):
            en, zh = lengths[x.sample.key]
            settings = dataclasses.replace(settings, max_new_tokens=en if kind == "en" else zh)
            return super()._submit(x, kind, ids, features, settings)

    return ForcedLengths(captioner, num_slots=slots)


def run(mode: str, args, root: Path, ckpt: Path, names: list[str], lengths) -> dict:
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.manifest import manifest_from_dict
    from pipeline.shard_runner import ShardSettings, run_shard
    from pipeline.writing import OutputStore

    longest = max(max(en, zh) for en, zh in lengths.values())
    m = manifest_from_dict({
        "shards": [str(root / f"shards/{n}.tar") for n in names], "output": str(root / f"out-{mode}"),
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": longest, "batch_size": 2}, "zh": {"max_new_tokens": longest},
        "chunk_size": 4, "quality": {"repair_attempts": 0},  # drawn lengths, no repairs: the schedule alone
    })
    captioner = Captioner.from_manifest(m, ignore_eos=True)
    service = _service_with_lengths(captioner, args.slots, lengths)
    store = OutputStore(m.output)
    in_flight = threading.Semaphore(2 if mode == "overlap" else 1)
    errors: list[BaseException] = []

    def one(name: str) -> None:
        try:
            with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
                run_shard(str(root / f"shards/{name}.tar"), name, store=store, captioner=captioner,
                          decode_pool=pool, attempt=1, file_metadata={}, service=service,
                          settings=ShardSettings.from_manifest(m))
        except BaseException as e:  # noqa: BLE001 - reported
            errors.append(e)
        finally:
            in_flight.release()

    t0 = time.perf_counter()
    threads = []
    for name in names:  # the driver hands out the next shard when a place frees up
        in_flight.acquire()
        t = threading.Thread(target=one, args=(name,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    s = service.engine.stats
    clips = service.stats.clips
    return {"mode": mode, "seconds": seconds, "clips": clips, "clips_per_s": clips / seconds,
            "utilisation": s.utilisation, "slot_steps": s.slot_steps, "idle_slot_steps": s.idle_slot_steps,
            "engine_busy": service.stats.model_s / seconds,
            "useful_tokens": s.useful_tokens}


def main(argv: list[str] | None = None) -> None:
    import random

    import torch

    from benchmarks.common import command_line, machine_line, markdown_table
    from model.tiny import build_tiny_checkpoint
    from pipeline.shards import ShardReader
    from pipeline.synthetic import write_synthetic_shards

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=3, help="shards in the run (default %(default)s)")
    p.add_argument("--clips-per-shard", type=int, default=6, help="(default %(default)s)")
    p.add_argument("--slots", type=int, default=4, help="engine slots (default %(default)s)")
    p.add_argument("--en-min", type=int, default=20, help="shortest English caption, tokens (default %(default)s)")
    p.add_argument("--en-max", type=int, default=100, help="longest English caption, tokens (default %(default)s)")
    p.add_argument("--zh-ratio", type=float, default=1.2, help="Chinese length / English (default %(default)s)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "pllava", seed=0)
        planted = write_synthetic_shards(root / "shards", shards=args.shards, clips_per_shard=args.clips_per_shard,
                                         failed=0, corrupt=0, seed=5)
        names = sorted(planted)
        rng = random.Random(0)
        keys = [s.key for n in names for s in ShardReader(str(root / f"shards/{n}.tar"))]
        lengths = {}
        for key in keys:
            en = rng.randint(args.en_min, args.en_max)
            lengths[key] = (en, max(1, round(args.zh_ratio * en)))
        results = [run(mode, args, root, ckpt, names, lengths) for mode in ("drain", "overlap")]
    base = results[0]["clips_per_s"]
    rows = [[r["mode"], f"{r['seconds']:.1f}", f"{r['clips_per_s']:.3f}", f"{r['clips_per_s'] / base:.2f}x",
             f"{r['utilisation']:.3f}", f"{r['idle_slot_steps']}/{r['slot_steps']}", f"{r['engine_busy']:.0%}"]
            for r in results]
    print(machine_line())
    print(command_line("benchmarks.boundaries", argv))
    print(markdown_table(["mode", "seconds", "clips/s", "vs drain", "utilisation", "idle slot-steps",
                                                     "engine busy"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
