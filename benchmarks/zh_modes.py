"""Cost of the Chinese pass per zh mode vs the English pass, measured side by side in one process.

    python -m benchmarks.zh_modes [--clips 8] [--tokens 32] [--batch 4] [--rounds 3]

Same pre-decoded clips for every mode; captions forced to `--tokens` new tokens (ignore_eos) in both
languages so random weights cannot stop early (the `mt` model stops on its own: its tokens are counted).
Prints EN and ZH tokens/s and the ZH cost per clip as a ratio of the EN cost per clip.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch

    from model.tiny import build_tiny_checkpoint
    from model.tiny_mt import build_tiny_mt
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip
    from pipeline.manifest import manifest_from_dict
    from pipeline.shards import ShardReader
    from pipeline.synthetic import write_synthetic_shards

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="zh-modes-"))
    ckpt = build_tiny_checkpoint(root / "pllava", seed=0)
    mt = build_tiny_mt(root / "mt", seed=0)
    write_synthetic_shards(root / "shards", shards=1, clips_per_shard=args.clips, seed=1)
    with DecodePool(workers=1, max_ahead=8, mode="thread") as pool:
        items = [(s, c) for s, c in pool.imap(ShardReader(str(root / "shards/00000.tar")))
                 if isinstance(c, DecodedClip)]
    print(f"{len(items)} decoded clips, {args.tokens} forced tokens, batch {args.batch}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")

    captioners = {}
    for mode in ("translate", "direct", "mt"):
        m = manifest_from_dict({
            "shards": "x.tar", "output": str(root / "out"),
            "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
            "generation": {"max_new_tokens": args.tokens, "batch_size": args.batch},
            "zh": {"mode": mode, "max_new_tokens": args.tokens, "mt_model": str(mt)},
            "quality": {"repair_attempts": 0},  # ignore_eos: every caption is truncated; time the passes alone
        })
        captioners[mode] = Captioner.from_manifest(m, ignore_eos=True)
        captioners[mode].caption_batch(items[: args.batch])  # warm-up, not counted
    # Modes interleaved round by round, median per mode: a shared, noisy machine hits all modes alike.
    samples: dict[str, list[tuple]] = {mode: [] for mode in captioners}
    for _ in range(args.rounds):
        for mode, captioner in captioners.items():
            captioner.stats = type(captioner.stats)()
            t0 = time.perf_counter()
            for i in range(0, len(items), args.batch):
                captioner.caption_batch(items[i: i + args.batch])
            wall = time.perf_counter() - t0
            s = captioner.stats
            en_clip = (s.seconds_vision + s.seconds_en) / s.clips
            zh_clip = s.seconds_zh / s.clips
            samples[mode].append((s.tokens_en / s.seconds_en, s.tokens_zh / max(s.seconds_zh, 1e-9), en_clip,
                                  zh_clip, zh_clip / en_clip, s.clips / wall))
    rows = [(mode, *[statistics.median(col) for col in zip(*vals)]) for mode, vals in samples.items()]
    print(f"{'mode':<10}{'EN tok/s':>10}{'ZH tok/s':>10}{'EN s/clip':>11}{'ZH s/clip':>11}{'ZH/EN':>8}"
          f"{'clips/s':>9}")
    for mode, en_tps, zh_tps, en_clip, zh_clip, ratio, cps in rows:
        print(f"{mode:<10}{en_tps:>10.1f}{zh_tps:>10.1f}{en_clip:>11.3f}{zh_clip:>11.3f}{ratio:>8.2f}{cps:>9.2f}")


if __name__ == "__main__":
    main()
