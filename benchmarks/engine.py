"""Continuous batching (model/engine.py) against today's static batches (model/generation.py), CPU, tiny model.

    python -m benchmarks.engine [--clips 32] [--rounds 1] [--batch-size 8] [--slots 8] [--sync-every 4]
                                [--en-min 60] [--en-max 300] [--zh-ratio 1.2] [--model-threads 1]
                                [--pooling 16,12,12] [--json PATH] [--quick]

The tiny random PLLaVA never stops on its own, so a realistic length mix is forced here (and only here):
clip i's English caption is ``en_len[i]`` tokens, drawn uniformly from [--en-min, --en-max], and its Chinese
translation ``round(--zh-ratio * en_len[i])`` tokens, both with ``ignore_eos`` and per-request max_new_tokens.
Visual features are computed once, outside the timings. Paths, same clips, same lengths:

- ``static``: today's captioning: batches of --batch-size clips, ``greedy_generate`` on the English prompts
  (the batch runs until its longest caption is done), then the batch's text-only translation prompts built from
  those captions (again until the longest). Forced lengths: a batch runs max(lengths) steps, each row keeps its
  own length, the rest of its steps are waste;
- ``engine``: one ``CaptionEngine`` of --slots slots; every English request submitted up front, each clip's
  Chinese request submitted as soon as its English caption comes back, into the same engine.

Reported: clips/s (EN + ZH done) of both and their ratio; slot utilisation (useful tokens / row-steps),
overall and, for the engine, in the steady state (steps with every slot busy); KV bytes written/copied per
decode step (static: DynamicCache's torch.cat copies the whole cache every step, computed from the shapes;
engine: measured by the cache, one new position per slot); identical English captions between the paths.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def draw_lengths(n: int, en_min: int, en_max: int, zh_ratio: float, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        en = rng.randint(en_min, en_max)
        out.append((en, max(1, round(zh_ratio * en))))
    return out


def dynamic_cache_copy_bytes(batch: int, prompt_len: int, steps: int, per_position: int) -> tuple[int, int]:
    """(bytes, decode forwards) for one static greedy_generate call of `steps` tokens: decode forward t
    (t = 1..steps-1) concatenates K and V of every layer into new tensors of prompt_len + t positions.
    `per_position`: bytes of one position of one row over all layers, K and V."""
    forwards = steps - 1
    positions = sum(prompt_len + t for t in range(1, steps))
    return batch * positions * per_position, forwards


def en_request(i: int, prompt_ids, features, lengths: list[tuple[int, int]]):
    """Clip i's English request: its forced length, ``ignore_eos``; id ("en", i)."""
    from model.engine import Request

    return Request(("en", i), prompt_ids, features, max_new_tokens=lengths[i][0], ignore_eos=True)


def zh_request(i: int, prompt_ids, lengths: list[tuple[int, int]]):
    """Clip i's Chinese (translate) request, text only: its forced length, ``ignore_eos``; id ("zh", i)."""
    from model.engine import Request

    return Request(("zh", i), prompt_ids, None, max_new_tokens=lengths[i][1], ignore_eos=True)


def drive_engine(engine, lengths: list[tuple[int, int]], zh_prompt_ids: Callable, *,
                 feed: Callable | None = None, stop: Callable | None = None) -> tuple[dict[int, list[int]], list[int]]:
    """Step `engine` until it is idle: every English completion ("en", i) is followed at once by clip i's
    Chinese request (prompt ids from ``zh_prompt_ids(completion)``) into the same engine.

    ``feed(engine) -> bool``, called before every step, may submit more English requests (clips arriving
    from a decoder); it returns whether more are to come. ``stop() -> bool`` ends the loop early (a time
    limit). Returns ({clip: English token ids}, [clips whose Chinese request finished])."""
    en_out: dict[int, list[int]] = {}
    zh_done: list[int] = []
    more = feed is not None
    while True:
        if stop is not None and stop():
            break
        if more:
            more = feed(engine)
        if not engine.busy:
            if more:
                continue
            break
        done = engine.step()
        if not engine.busy:
            done += engine.flush()
        for c in done:
            lang, i = c.id
            if lang == "en":
                en_out[i] = c.generation.token_ids
                engine.submit(zh_request(i, zh_prompt_ids(c), lengths))
            else:
                zh_done.append(i)
    return en_out, zh_done


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="static batches (today's batch_size)")
    parser.add_argument("--slots", type=int, default=8, help="engine slots")
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--en-min", type=int, default=60)
    parser.add_argument("--en-max", type=int, default=300)
    parser.add_argument("--zh-ratio", type=float, default=1.2)
    parser.add_argument("--model-threads", type=int, default=1)
    parser.add_argument("--pooling", default="16,12,12", help="visual pooling shape T,h,w (16,12,12: 2304 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="4 clips, lengths 4..12, small pooling, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips, args.en_min, args.en_max, args.rounds, args.pooling = 4, 4, 12, 1, "4,6,6"
        args.batch_size, args.slots = min(args.batch_size, 2), min(args.slots, 2)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        return run(args, Path(tmp), argv)


def run(args: argparse.Namespace, work: Path, argv: list[str] | None) -> dict:
    import dataclasses

    import torch

    from benchmarks.common import command_line, machine_line, markdown_table
    from model.engine import CaptionEngine, Request, kv_bytes_per_slot
    from model.generation import greedy_generate, tokenize_prompts
    from model.loading import load_pllava
    from model.pllava import PllavaModel
    from model.tiny import build_tiny_checkpoint

    torch.set_num_threads(args.model_threads)
    t_setup = time.perf_counter()
    loaded = load_pllava(build_tiny_checkpoint(work / "tiny-pllava", seed=0))
    pooling = tuple(int(x) for x in args.pooling.split(","))
    if pooling != tuple(loaded.config.pooling_shape):
        config = dataclasses.replace(loaded.config, pooling_shape=pooling)
        model = PllavaModel(config)
        model.load_state_dict(loaded.model.state_dict())
        loaded = dataclasses.replace(loaded, model=model.eval().requires_grad_(False), config=config)
    tok, template = loaded.tokenizer, loaded.template
    n = args.clips
    lengths = draw_lengths(n, args.en_min, args.en_max, args.zh_ratio, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        feats = torch.cat([
            loaded.model.encode_videos(torch.randn(min(8, n - i), 2, 3, 336, 336, generator=gen))
            for i in range(0, n, 8)
        ])  # (n, N, D)
    en_prompt = template.format()
    en_ids = tok([en_prompt])["input_ids"][0]
    num_visual = feats.shape[1]

    def zh_prompt(caption: str) -> str:
        return template.format(template.default_translate_zh.format(caption=caption), with_image=False)

    per_position = kv_bytes_per_slot(loaded, 1)  # one position of one row, all layers, K and V
    zh_template_len = len(tok([zh_prompt("")])["input_ids"][0])
    en_max = max(e for e, _ in lengths)
    zh_max = max(z for _, z in lengths)
    # a caption of en tokens re-tokenises to about as many tokens; 2x leaves room
    max_len = max(len(en_ids) - 1 + num_visual + en_max, zh_template_len + 2 * en_max + zh_max) + 8
    print(f"setup {time.perf_counter() - t_setup:.1f}s: {n} clips, {num_visual} visual tokens, EN prompt "
          f"{len(en_ids) - 1 + num_visual} tokens, EN {args.en_min}-{args.en_max} tokens (mean "
          f"{statistics.mean(e for e, _ in lengths):.0f}), ZH {args.zh_ratio}x, batch {args.batch_size}, "
          f"{args.slots} slots, max_len {max_len}, {args.model_threads} thread(s)", flush=True)

    def static_path() -> dict:
        en_out: dict[int, list[int]] = {}
        row_steps = useful = copy_bytes = forwards = 0
        b = args.batch_size
        for start in range(0, n, b):
            idx = list(range(start, min(start + b, n)))
            ids, mask = tokenize_prompts(loaded, [en_prompt] * len(idx))
            steps = max(lengths[i][0] for i in idx)
            gens = greedy_generate(loaded, ids, mask, feats[idx], max_new_tokens=steps, ignore_eos=True)
            captions = []
            for i, g in zip(idx, gens):
                kept = g.token_ids[: lengths[i][0]]
                en_out[i] = kept
                captions.append(tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip())
            row_steps += len(idx) * steps
            useful += sum(lengths[i][0] for i in idx)
            c, f = dynamic_cache_copy_bytes(len(idx), ids.shape[1] - 1 + num_visual, steps, per_position)
            copy_bytes, forwards = copy_bytes + c, forwards + f

            zh_ids, zh_mask = tokenize_prompts(loaded, [zh_prompt(c) for c in captions])
            steps = max(lengths[i][1] for i in idx)
            greedy_generate(loaded, zh_ids, zh_mask, None, max_new_tokens=steps, ignore_eos=True)
            row_steps += len(idx) * steps
            useful += sum(lengths[i][1] for i in idx)
            c, f = dynamic_cache_copy_bytes(len(idx), zh_ids.shape[1], steps, per_position)
            copy_bytes, forwards = copy_bytes + c, forwards + f
        return {"en": en_out, "utilisation": useful / row_steps, "row_steps": row_steps, "useful": useful,
                "kv_bytes_per_decode_step": copy_bytes / forwards, "decode_forwards": forwards}

    def engine_path() -> dict:
        engine = CaptionEngine(loaded, num_slots=args.slots, max_len=max_len, sync_every=args.sync_every)
        for i in range(n):
            engine.submit(en_request(i, en_ids, feats[i], lengths))
        en_out, zh_done = drive_engine(engine, lengths,
                                       lambda c: tok([zh_prompt(c.generation.text)])["input_ids"][0])
        assert len(zh_done) == n and len(en_out) == n
        s = engine.stats
        return {"en": en_out, "utilisation": s.utilisation, "steady_utilisation": s.steady_utilisation,
                "row_steps": s.slot_steps, "useful": s.useful_tokens, "wasted": s.wasted_slot_steps,
                "idle": s.idle_slot_steps, "steps": s.steps, "prefills": s.prefills, "syncs": s.syncs,
                "kv_bytes_per_decode_step": s.kv_bytes_per_decode_step, "cache_bytes": engine.cache.nbytes}

    # warm-up: a couple of short calls through both code paths
    with torch.inference_mode():
        ids, mask = tokenize_prompts(loaded, [en_prompt])
        greedy_generate(loaded, ids, mask, feats[:1], max_new_tokens=2, ignore_eos=True)
    list(CaptionEngine(loaded, 1, max_len).generate([Request("w", en_ids, feats[0], 2, ignore_eos=True)]))

    times: dict[str, list[float]] = {"static": [], "engine": []}
    info: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, fn in (("static", static_path), ("engine", engine_path)):
            start = time.perf_counter()
            info[name] = fn()
            seconds = time.perf_counter() - start
            times[name].append(seconds)
            print(f"  round {r + 1}/{args.rounds} {name:<7} {seconds:7.1f}s  {n / seconds:6.3f} clips/s", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n / v for k, v in med.items()}
    st, en = info["static"], info["engine"]
    same = sum(st["en"][i] == en["en"][i] for i in range(n))
    rows = [
        [f"static, batch {args.batch_size} (EN then ZH per batch)", f"{rate['static']:.3f}", "1.00x",
         f"{st['utilisation']:.3f}", "-", f"{st['kv_bytes_per_decode_step'] / 2**10:.1f}"],
        [f"engine, {args.slots} slots, sync every {args.sync_every}", f"{rate['engine']:.3f}",
         f"{rate['engine'] / rate['static']:.2f}x", f"{en['utilisation']:.3f}", f"{en['steady_utilisation']:.3f}",
         f"{en['kv_bytes_per_decode_step'] / 2**10:.1f}"],
    ]
    print()
    print(machine_line())
    print(f"command: {command_line('benchmarks.engine', argv)}")
    print(f"{n} clips, EN {args.en_min}-{args.en_max} tokens, ZH {args.zh_ratio}x EN, {num_visual} visual tokens, "
          f"median of {args.rounds} round(s)")
    print()
    print(markdown_table(["path", "clips/s", "vs static", "utilisation (overall)", "utilisation (steady)",
                          "KV KiB copied/written per decode step"], rows))
    print()
    print(f"engine: {en['steps']} steps, {en['prefills']} prefills, {en['syncs']} host syncs, useful "
          f"{en['useful']}, wasted {en['wasted']} (finished, awaiting sync), idle {en['idle']} slot-steps; "
          f"KV cache {en['cache_bytes'] / 2**20:.1f} MiB allocated once")
    print(f"static: {st['decode_forwards']} decode forwards, {st['useful']} useful of {st['row_steps']} row-steps")
    print(f"identical English captions, engine vs static: {same}/{n}")
    result = {
        "command": command_line("benchmarks.engine", argv), "machine": machine_line(), "clips": n,
        "lengths": lengths, "visual_tokens": num_visual, "batch_size": args.batch_size, "slots": args.slots,
        "sync_every": args.sync_every, "max_len": max_len, "seconds": times,
        "clips_per_s": rate, "speedup": rate["engine"] / rate["static"],
        "utilisation": {"static": st["utilisation"], "engine": en["utilisation"],
                        "engine_steady": en["steady_utilisation"]},
        "kv_bytes_per_decode_step": {"static": st["kv_bytes_per_decode_step"],
                                     "engine": en["kv_bytes_per_decode_step"]},
        "engine": {k: v for k, v in en.items() if k != "en"},
        "identical_en_captions": same,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"JSON: {args.json}")
    return result


if __name__ == "__main__":
    main()
