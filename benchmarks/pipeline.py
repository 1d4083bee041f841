"""Pipeline overhead on the CPU with the tiny model: the job path against the model alone and against a
reference-style per-clip loop, all measured side by side in one process.

    python -m benchmarks.pipeline [--clips 16] [--batch-size 8] [--max-new-tokens 32] [--rounds 2]
                                  [--model-threads 1] [--profile] [--quick]

One synthetic Panda-70M shard (``--clips`` good clips, plus one failed source video and one corrupt mp4;
the first two good clips are 1920x1080 and 720x1280, the rest small) and the tiny random PLLaVA, English
then Chinese (``translate`` mode), greedy, ``--max-new-tokens`` each. Paths, every one over the same clips:

- ``reference``: the PLLaVA scripts' way: read the shard, decode each clip inline, caption it alone
  (batch 1) with the LoRA *unmerged* (W0·x + s·B(A·x) on q/v), hold every row, write one Parquet at the end;
- ``per-clip, merged``: the same loop with our merged weights (what merging alone gains);
- ``job path``: ``run_shard`` exactly as the actor runs it (ShardReader → DecodePool ahead → Captioner in
  batches → chunk commits → finalize), at batch 1 and at ``--batch-size``, with 1 and 2 decoder processes;
- ``model alone``: ``Captioner.caption_batch`` on frames decoded beforehand, same batches, no I/O.

The model gets ``--model-threads`` torch threads (default 1) so a decoder process has the other core, as on a
GPU node where the model's arithmetic is off the CPU. Rows are clips/s, the median over ``--rounds`` rounds
(paths interleaved within a round so drift hits them alike). ``--profile`` adds a cProfile of one job-path
run (the model's process; decoding happens in other processes and shows as waiting).
Results go in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.captioning import Captioner
    from pipeline.frames import DecodedClip
    from pipeline.shards import Sample

# The heavy imports (torch, transformers, the model) happen inside the functions: the decoder processes are
# spawned, and spawn re-imports the __main__ module in each of them, which would give every decoder the RSS
# and start-up time of the model process instead of the actor's real decoders.

LORA_ALPHA = 4.0


def reference_loop(captioner: Captioner, url: str, out_path: Path) -> list[dict]:
    """Per clip: decode inline, caption alone, keep the row; one Parquet write at the very end."""
    import pyarrow.parquet as pq

    from pipeline.frames import decode_clip
    from pipeline.rows import failure_row, sample_failure
    from pipeline.shards import ShardReader
    from pipeline.writing import rows_to_table

    rows: list[dict] = []
    for sample in ShardReader(url):
        clip = decode_clip(sample.mp4) if sample.mp4 is not None else None
        failure = sample_failure(sample, clip)
        if failure is not None:
            rows.append(failure_row(sample, failure, ctx=captioner).to_dict())
            continue
        rows.extend(captioner.caption_batch([(sample, clip)]))
    pq.write_table(rows_to_table(rows), out_path)
    return rows


def model_alone(captioner: Captioner, items: list[tuple[Sample, DecodedClip]], batch_size: int) -> list[dict]:
    rows: list[dict] = []
    for i in range(0, len(items), batch_size):
        rows.extend(captioner.caption_batch(items[i:i + batch_size]))
    return rows


def captions(rows: list[dict]) -> dict[str, tuple[str | None, str | None]]:
    return {r["key"]: (r["caption_en"], r["caption_zh"]) for r in rows if r["caption_en"] is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile one job-path run")
    parser.add_argument("--quick", action="store_true", help="tiny workload for tests: 4 clips, 4 tokens, 1 round")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    import torch

    if args.quick:
        args.clips, args.max_new_tokens, args.rounds, args.batch_size = 4, 4, 1, min(args.batch_size, 4)
    torch.set_num_threads(args.model_threads)

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = args.workdir or Path(tmp)
        run(args, work, argv)


def run(args: argparse.Namespace, work: Path, argv: list[str] | None) -> None:
    import pyarrow.parquet as pq
    import torch

    from benchmarks.common import ProcessSampler, command_line, machine_line, markdown_table, unmerged_lora
    from model.loading import read_safetensors, split_lora
    from model.tiny import build_tiny_checkpoint
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip, decode_clip
    from pipeline.manifest import manifest_from_dict
    from pipeline.shard_runner import ShardSettings, run_shard
    from pipeline.shards import ShardReader
    from pipeline.stats import Stats
    from pipeline.synthetic import write_synthetic_shards
    from pipeline.writing import OutputStore

    t_setup = time.perf_counter()
    model_dir = build_tiny_checkpoint(work / "tiny-pllava", seed=0)
    write_synthetic_shards(work / "shards", shards=1, clips_per_shard=args.clips, failed=1, corrupt=1, seed=3)
    url = str(work / "shards" / "00000.tar")
    raw = {
        "shards": url,
        "output": str(work / "unused"),
        "model": {"path": str(model_dir), "lora_alpha": LORA_ALPHA, "dtype": "float32", "device": "cpu"},
        "languages": ["en", "zh"],
        "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
        "zh": {"mode": "translate", "max_new_tokens": args.max_new_tokens},
        "chunk_size": 256,
        "quality": {"repair_attempts": 0},  # the paths compared as they were measured before the repair pass
    }
    manifest = manifest_from_dict(raw, source="benchmarks.pipeline")
    batched = Captioner.from_manifest(manifest)
    single = Captioner.from_manifest(manifest.replace(generation=dataclasses.replace(manifest.generation, batch_size=1)))
    # The reference: W0 loaded as is (alpha 0 merges nothing), the LoRA applied beside it at run time.
    reference = copy.copy(single)
    reference.loaded = Captioner.from_manifest(manifest.replace(
        model=dataclasses.replace(manifest.model, lora_alpha=0.0))).loaded
    reference.stats = Stats()
    _, lora = split_lora(read_safetensors(model_dir, dtype=torch.float32))

    items = []
    for sample in ShardReader(url):
        clip = decode_clip(sample.mp4) if sample.mp4 is not None else None
        if isinstance(clip, DecodedClip):
            items.append((sample, clip))
    n = len(items)
    print(f"setup {time.perf_counter() - t_setup:.1f}s: {n} decodable clips, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens per language, {args.model_threads} model thread(s)", flush=True)

    pools = {w: DecodePool(workers=w, max_ahead=16, mode="process") for w in (1, 2)}
    model_alone(batched, items[: args.batch_size], args.batch_size)  # warm-up
    for pool in pools.values():
        list(pool.imap(s for s, _ in items[:2]))

    results: dict[str, list[float]] = {}
    extra: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[dict]] = {}

    def measure(name: str, fn: Callable[[], tuple[list[dict], dict[str, float]]]) -> None:
        with ProcessSampler() as sampler:
            start = time.perf_counter()
            rows, info = fn()
            seconds = time.perf_counter() - start
        results.setdefault(name, []).append(seconds)
        info = {**info, "rss_self": sampler.peak_self_mib, "rss_child": sampler.peak_child_mib,
                "rss_total": sampler.peak_total_mib}
        prev = extra.setdefault(name, {})
        for k, v in info.items():
            prev[k] = max(prev.get(k, 0.0), v) if k.startswith("rss") else prev.get(k, 0.0) + v
        outputs[name] = rows
        print(f"  {name:<44} {n / seconds:6.2f} clips/s", flush=True)

    def job_path(captioner: Captioner, workers: int, tag: str) -> Callable[[], tuple[list[dict], dict]]:
        def fn() -> tuple[list[dict], dict[str, float]]:
            store = OutputStore(str(work / f"out-{tag}-{time.monotonic_ns()}"))
            outcome = run_shard(url, "00000", store=store, captioner=captioner, decode_pool=pools[workers],
                                attempt=1, file_metadata={}, settings=ShardSettings.from_manifest(manifest))
            table = pq.read_table(store.data_path("00000"))
            return table.to_pylist(), {"wait_s": outcome.stats.wait_decode_s, "model_s": outcome.stats.model_s}
        return fn

    def reference_path() -> tuple[list[dict], dict[str, float]]:
        with unmerged_lora(reference.loaded.model, lora, LORA_ALPHA):
            return reference_loop(reference, url, work / "reference.parquet"), {}

    b = args.batch_size
    paths: list[tuple[str, Callable[[], tuple[list[dict], dict]]]] = [
        ("reference: per-clip, unmerged LoRA, inline decode", reference_path),
        ("per-clip, merged LoRA, inline decode",
         lambda: (reference_loop(single, url, work / "per-clip.parquet"), {})),
        ("job path, batch 1, 1 decoder", job_path(single, 1, "b1")),
        (f"job path, batch {b}, 1 decoder", job_path(batched, 1, "bB1")),
        (f"job path, batch {b}, 2 decoders", job_path(batched, 2, "bB2")),
        (f"model alone, batch {b}, pre-decoded", lambda: (model_alone(batched, items, b), {})),
    ]
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for name, fn in paths:
            measure(name, fn)

    profile_rows = []
    if args.profile:
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        job_path(batched, 1, "profile")()
        profiler.disable()
        wall = time.perf_counter() - start
        stats = pstats.Stats(profiler)
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]  # by own time
        for (filename, line, func), (_, ncalls, tottime, _, _) in top:
            where = f"{Path(filename).name}:{line}" if line else filename
            profile_rows.append([f"`{func}` ({where})", ncalls, f"{tottime:.2f}", f"{100 * tottime / wall:.0f}%"])
    for pool in pools.values():
        pool.close()

    median = {name: statistics.median(times) for name, times in results.items()}
    rate = {name: n / s for name, s in median.items()}
    names = [name for name, _ in paths]
    ref_name, merged_name, job1_name, jobb_name, jobb2_name, alone_name = names
    reference_rate = rate[ref_name]
    rows = []
    for name in names:
        info = extra[name]
        rounds = len(results[name])
        wait = f"{100 * info['wait_s'] / (median[name] * rounds):.1f}%" if "wait_s" in info else "n/a"
        rows.append([name, f"{rate[name]:.2f}", f"{rate[name] / reference_rate:.2f}x", wait,
                     f"{info['rss_self']:.0f}", f"{info['rss_child']:.0f}" if info["rss_child"] else "-",
                     f"{info['rss_total']:.0f}"])

    same_ref = captions(outputs[ref_name])
    same_job = captions(outputs[jobb_name])
    same_alone = captions(outputs[alone_name])
    agree_ref = sum(same_ref.get(k) == v for k, v in same_job.items())
    agree_alone = sum(same_alone.get(k) == v for k, v in same_job.items())

    print()
    print(machine_line())
    print(f"command: {command_line('benchmarks.pipeline', argv)}")
    print(f"{n} clips (+1 failed source, +1 corrupt mp4), {args.max_new_tokens} new tokens EN + ZH (translate), "
          f"{args.model_threads} model thread(s), median of {args.rounds} round(s)")
    print()
    print(markdown_table(["path", "clips/s", "vs reference", "waiting for decode", "peak RSS main MiB",
                          "peak RSS decoder MiB", "peak RSS actor MiB"], rows))
    print()
    print(f"overhead ratio, job path / model alone (batch {b}, 1 decoder): "
          f"{median[jobb_name] / median[alone_name]:.3f}  (target <= 1.10)")
    print(f"overhead ratio with 2 decoders: {median[jobb2_name] / median[alone_name]:.3f}")
    print(f"batched job path vs reference per-clip loop: {rate[jobb_name] / reference_rate:.2f}x "
          f"(merging the LoRA alone: {rate[merged_name] / reference_rate:.2f}x; decoding ahead at batch 1: "
          f"{rate[job1_name] / rate[merged_name]:.2f}x; batching: {rate[jobb_name] / rate[job1_name]:.2f}x)")
    print(f"identical captions (EN, ZH): job path vs model alone {agree_alone}/{len(same_job)}, "
          f"job path vs reference {agree_ref}/{len(same_job)}")
    if profile_rows:
        print()
        print("cProfile of one job-path run (model process, by own time):")
        print()
        print(markdown_table(["function", "calls", "own s", "of wall"], profile_rows))


if __name__ == "__main__":
    main()
