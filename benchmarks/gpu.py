"""GPU throughput of a PLLaVA-7B-shaped model with random weights: batch sweep against a per-clip reference loop.

    python -m benchmarks.gpu [--batch-sizes 8,16,32] [--new-tokens 256] [--batches 2] [--baseline-clips 2]
                             [--decode-workers N]
    python -m benchmarks.gpu --tiny     # CPU, tiny dimensions, seconds: what CI runs (tests/benchmarks)

The model has the released 7B shapes: CLIP ViT-L/14-336 (1024 wide, 24 layers, 16 heads, MLP 4096),
projector 1024→4096→4096, AdaptiveAvgPool3d to 16×12×12 = 2304 visual tokens, Llama/Vicuna-7B (4096 wide,
32 layers, 32 heads, MLP 11008, vocab 32064), bf16, sdpa. It is built on the meta device and materialised
with ``to_empty`` on the GPU plus in-place random init, so nothing 7B-sized ever exists on the CPU and the
build takes seconds. The LoRA counts as merged (it costs nothing then); the reference loop wraps q/v in an
unmerged r=128 LoRA (W0·x + s·B(A·x)). The tokenizer is the tiny checkpoint's (tokens are forced anyway):
the prompts are the real Vicuna template, `<image>` included.

Clips are synthetic 1280×720 H.264 (29.97 fps) fed through the real decode path (``DecodePool`` processes →
``DecodedClip``). Per batch: ``encode_videos`` → English caption (``generate_captions``) → Chinese by the
``translate`` pass over the English text (``generate_text``), each exactly ``--new-tokens`` tokens
(``ignore_eos=True``: random weights would otherwise stop at random). Random token ids are mapped into the
tiny tokenizer's vocabulary before the English text is put in the translation prompt, so that prompt has
about the length a real caption gives.

Reported per row: clips/GPU-hour and generated tokens/s (steady state: from the first batch's start, so
the pool's fill time is reported apart), GPU busy % (nvidia-smi ``utilization.gpu`` every 200 ms, averaged
over the row), peak GPU memory, how long generation waited for decoded clips, and decoder CPU load (cores
busy). The baseline is the reference style in the same run: one clip at a time, decoded inline, LoRA
unmerged, results held in memory. Designed to finish in under 6 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from model.config import PllavaConfig
    from model.loading import LoadedPllava
    from model.pllava import PllavaModel
    from pipeline.frames import DecodedClip

# Heavy imports happen inside functions: spawned decoder processes re-import __main__ (see pipeline.py).

VISION_7B = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14, "projection_dim": 768}
# Differences from transformers 4.37's LlamaConfig defaults, which are Llama-7B's (as the released config).
TEXT_7B = {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0}
LORA_RANK_7B = 128
LORA_ALPHA = 4.0


def pllava_config(tiny_dir: Path, tiny: bool) -> PllavaConfig:
    """The tiny checkpoint's config (its `<image>` id, pooling, template fields), with 7B sizes unless tiny."""
    from model.config import PllavaConfig

    raw = json.loads((tiny_dir / "config.json").read_text())
    if not tiny:
        raw["text_config"] = {"model_type": "llama", **TEXT_7B}
        raw["vision_config"] = {"model_type": "clip_vision_model", **VISION_7B}
        raw["vocab_size"] = TEXT_7B["vocab_size"]
        raw["_name_or_path"] = "pllava-7b-shaped-random"
    return PllavaConfig.from_dict(raw, source="benchmarks.gpu")


def build_random_model(config: PllavaConfig, device: torch.device, dtype: torch.dtype) -> PllavaModel:
    """Skeleton on meta → `to_empty` on `device` → in-place init; no CPU copy of the weights, ever."""
    import torch

    from model.loading import materialize_buffers
    from model.pllava import PllavaModel

    with torch.device("meta"):
        model = PllavaModel(config, attn_implementation="sdpa")
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # LayerNorm / RMSNorm scales, CLIP's class embedding
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    materialize_buffers(model, device)  # rotary inv_freq and CLIP position ids are not parameters
    return model.eval().requires_grad_(False)


def build_loaded(tiny_dir: Path, tiny: bool, device: torch.device, dtype: torch.dtype) -> LoadedPllava:
    from model.loading import CLIP_MEAN, CLIP_STD, LoadedPllava, load_tokenizer
    from model.prompts import template_for

    config = pllava_config(tiny_dir, tiny)
    model = build_random_model(config, device, dtype)
    return LoadedPllava(model=model, tokenizer=load_tokenizer(tiny_dir, config), config=config,
                        family="vicuna", name=config.name_or_path or "tiny", lora_alpha=LORA_ALPHA,
                        lora_rank=LORA_RANK_7B, template=template_for("vicuna"), image_mean=CLIP_MEAN,
                        image_std=CLIP_STD, image_size=config.vision["image_size"])


class GpuBusy:
    """`nvidia-smi -lms 200` in a subprocess; `mean(t0, t1)` averages utilization.gpu samples in that span."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc: subprocess.Popen | None = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200", "-i", index],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                continue

    def mean(self, t0: float, t1: float) -> float | None:
        values = [v for t, v in self.samples if t0 <= t <= t1]
        return sum(values) / len(values) if values else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


@dataclass
class RowResult:
    name: str
    clips: int
    seconds: float  # steady state: from the first batch's start to the end
    fill_s: float  # waiting for the first batch
    tokens: int
    wait_s: float  # generation waiting for decoded clips after the first batch
    decoder_cpu_s: float | None
    busy: float | None
    peak_gib: float | None
    stage_s: dict[str, float]


def caption_forced(loaded: LoadedPllava, clips: list[DecodedClip], new_tokens: int,
                   stage_s: dict[str, float]) -> int:
    """EN visual pass, then the ZH translate pass, both forced to `new_tokens`; returns tokens generated."""
    import torch

    from model.generation import generate_captions, generate_text

    template = loaded.template
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    import numpy as np

    from pipeline.frames import normalize_frames

    frames = torch.from_numpy(np.stack([c.frames for c in clips]))  # uint8: a quarter of the bytes to copy
    if loaded.device.type == "cuda":
        frames = frames.pin_memory().to(loaded.device, non_blocking=True)
    pixels = normalize_frames(frames)  # (B, T, 3, 336, 336) on the device
    features = loaded.model.encode_videos(pixels)  # (B, 2304, D)
    sync()
    t1 = time.perf_counter()
    en = generate_captions(loaded, [template.format(template.default_question_en)] * len(clips), features,
                           max_new_tokens=new_tokens, ignore_eos=True)
    t2 = time.perf_counter()
    vocab = len(loaded.tokenizer)
    texts = [loaded.tokenizer.decode([t % vocab for t in g.token_ids], skip_special_tokens=True) for g in en]
    prompts = [template.format(template.default_translate_zh.format(caption=t), with_image=False) for t in texts]
    zh = generate_text(loaded, prompts, max_new_tokens=new_tokens, ignore_eos=True)
    t3 = time.perf_counter()
    for key, dt in (("vision", t1 - t0), ("en", t2 - t1), ("zh", t3 - t2)):
        stage_s[key] = stage_s.get(key, 0.0) + dt
    return sum(g.num_tokens for g in en) + sum(g.num_tokens for g in zh)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model dimensions, a few tokens (for CI)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,16,32; tiny 1,2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="per language (default 256; tiny 8)")
    parser.add_argument("--batches", type=int, default=None, help="batches per batch size (default 2; tiny 1)")
    parser.add_argument("--baseline-clips", type=int, default=2)
    parser.add_argument("--decode-workers", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="frames per synthetic clip (default 48)")
    args = parser.parse_args(argv)
    import torch

    cpus = len(os.sched_getaffinity(0))
    tiny = args.tiny
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if tiny else "8,16,32")).split(",")]
    new_tokens = args.new_tokens or (8 if tiny else 256)
    batches = args.batches or (1 if tiny else 2)
    workers = args.decode_workers or (1 if tiny else max(1, min(12, cpus - 2)))
    frames = args.frames or (16 if tiny else 48)
    if tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny to run on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        run(args, argv, Path(tmp), tiny, device, dtype, batch_sizes, new_tokens, batches, workers, frames)


def run(args, argv, tmp: Path, tiny: bool, device, dtype, batch_sizes: list[int], new_tokens: int,
        batches: int, workers: int, frames: int) -> None:
    import torch

    from benchmarks.common import (
        command_line,
        machine_line,
        markdown_table,
        random_lora_weights,
        unmerged_lora,
    )
    from model.tiny import build_tiny_checkpoint
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip, decode_clip
    from pipeline.shards import Sample
    from pipeline.synthetic import encode_clip

    t_start = time.perf_counter()
    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    tiny_dir = build_tiny_checkpoint(tmp / "tiny-pllava", seed=0)
    t0 = time.perf_counter()
    loaded = build_loaded(tiny_dir, tiny, device, dtype)
    sync()
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"built {params / 1e6:.1f}M random parameters on {device} ({dtype}) in {time.perf_counter() - t0:.1f}s",
          flush=True)

    t0 = time.perf_counter()
    distinct = [encode_clip(1280, 720, frames, Fraction(30000, 1001), pattern_seed=i) for i in range(4 if not tiny
                                                                                                   else 2)]
    print(f"encoded {len(distinct)} synthetic 1280x720 clips of {frames} frames in {time.perf_counter() - t0:.1f}s",
          flush=True)

    def samples(n: int, tag: str) -> list[Sample]:
        return [Sample(key=f"{tag}-{i}", shard="bench", mp4=distinct[i % len(distinct)]) for i in range(n)]

    warm = decode_clip(distinct[0])
    assert isinstance(warm, DecodedClip), warm
    caption_forced(loaded, [warm], 2, {})  # kernels, cuBLAS handles, allocator
    monitor = GpuBusy() if is_cuda else None
    results: list[RowResult] = []

    def finish_row(name: str, clips: int, t_first: float, fill_s: float, tokens: int, wait_s: float,
                   decoder_cpu_s: float | None, stage_s: dict[str, float]) -> None:
        sync()
        t_end = time.perf_counter()
        busy = monitor.mean(t_first, t_end) if monitor else None
        peak = torch.cuda.max_memory_allocated() / 2**30 if is_cuda else None
        row = RowResult(name, clips, t_end - t_first, fill_s, tokens, wait_s, decoder_cpu_s, busy, peak, stage_s)
        results.append(row)
        print(f"  {name:<44} {3600 * clips / row.seconds:9.0f} clips/GPU-h  {tokens / row.seconds:8.0f} tok/s",
              flush=True)

    # Reference style: one clip at a time, decoded inline, LoRA unmerged, results held.
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    lora = random_lora_weights(loaded.model, LORA_RANK_7B if not tiny else 8)
    held, stage_s, tokens = [], {}, 0
    with unmerged_lora(loaded.model, lora, LORA_ALPHA):
        t_first = time.perf_counter()
        for sample in samples(args.baseline_clips, "ref"):
            clip = decode_clip(sample.mp4)
            tokens += caption_forced(loaded, [clip], new_tokens, stage_s)
            held.append(sample.key)
    finish_row("reference: per-clip, unmerged LoRA, inline decode", len(held), t_first, 0.0, tokens, 0.0, None,
               stage_s)
    del lora

    from benchmarks.common import child_cpu_seconds

    for bs in batch_sizes:
        if is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with DecodePool(workers=workers, max_ahead=2 * bs, mode="process") as pool:
            list(pool.imap(samples(workers, "warm")))  # process start-up is not measured
            cpu0 = child_cpu_seconds(pool.worker_pids())
            t_begin = time.perf_counter()
            results_iter = pool.imap(samples(bs * batches, f"b{bs}"))
            batch: list[DecodedClip] = []
            stage_s, tokens, wait_s, done = {}, 0, 0.0, 0
            t_first = fill_s = None
            while True:
                t_wait = time.perf_counter()
                item = next(results_iter, None)
                if t_first is not None:
                    wait_s += time.perf_counter() - t_wait
                if item is not None:
                    assert isinstance(item[1], DecodedClip), item[1]
                    batch.append(item[1])
                if batch and (len(batch) == bs or item is None):
                    if t_first is None:
                        t_first = time.perf_counter()
                        fill_s = t_first - t_begin
                    tokens += caption_forced(loaded, batch, new_tokens, stage_s)
                    done += len(batch)
                    batch = []
                if item is None:
                    break
            cpu_s = child_cpu_seconds(pool.worker_pids()) - cpu0
            finish_row(f"batched, batch {bs}, {workers} decoders", done, t_first, fill_s, tokens, wait_s, cpu_s,
                       stage_s)
    if monitor:
        monitor.close()

    ref = results[0]
    ref_rate = ref.clips / ref.seconds
    table = []
    for r in results:
        rate = r.clips / r.seconds
        stages = "/".join(f"{r.stage_s.get(k, 0.0):.1f}" for k in ("vision", "en", "zh"))
        table.append([
            r.name, r.clips, f"{3600 * rate:.0f}", f"{r.tokens / r.seconds:.0f}", f"{rate / ref_rate:.2f}x",
            "n/a" if r.busy is None else f"{r.busy:.0f}%",
            "n/a" if r.peak_gib is None else f"{r.peak_gib:.1f}",
            f"{100 * r.wait_s / r.seconds:.1f}%" if r is not ref else "n/a (inline)",
            f"{r.fill_s:.1f}", "n/a" if r.decoder_cpu_s is None else f"{r.decoder_cpu_s / (r.seconds + r.fill_s):.2f}",
            f"{r.seconds:.1f}", stages,
        ])
    device_name = torch.cuda.get_device_name() if is_cuda else "CPU (--tiny: tiny dimensions, GPU fields n/a)"
    print()
    print(machine_line())
    print(f"device: {device_name}")
    print(f"command: {command_line('benchmarks.gpu', argv)}")
    print(f"model: {'tiny dims' if tiny else 'PLLaVA-7B shapes'}, {params / 1e6:.1f}M params, {dtype}, sdpa; "
          f"{new_tokens} forced new tokens EN + {new_tokens} ZH (translate) per clip; 1280x720 clips, "
          f"{frames} frames; {workers} decoder processes; total run {time.perf_counter() - t_start:.0f}s")
    print()
    print(markdown_table(["path", "clips", "clips/GPU-hour", "gen tok/s", "vs reference", "GPU busy",
                          "peak GPU GiB", "gen waits on decode", "fill s", "decoder cores busy", "steady s",
                          "vision/EN/ZH s"], table))


if __name__ == "__main__":
    main()
