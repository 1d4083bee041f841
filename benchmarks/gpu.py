"""GPU throughput of a PLLaVA-7B-shaped model with random weights: batch sweep against a per-clip reference loop,
and the continuous-batching engine (model/engine.py) against today's static batches on a forced length mix.

    python -m benchmarks.gpu [--batch-sizes 8,16,32] [--new-tokens 256] [--batches 2] [--baseline-clips 2]
                             [--decode-workers N]
    python -m benchmarks.gpu --engine [--static-batch-sizes 8,16] [--slots 16,32,64] [--graphs both]
                             [--static-batches 2] [--clips-per-slot 2] [--max-minutes 7] [--json PATH]
    python -m benchmarks.gpu --engines [--engines-clips 96] [--native-slots N] [--max-num-seqs 128]
                             [--kv-dtypes auto,fp8] [--gpu-memory-utilization F] [--max-minutes 7] [--json PATH]
    python -m benchmarks.gpu --tiny     # CPU, tiny dimensions, all three sections: what CI runs (tests/benchmarks)

On the device machine (one H100/H200; its image has transformers 5.17, torch 2.11, and no decord, PyAV or
webdataset), the engine comparison is one command. Once, here, in the repository root, download what the image
lacks at the versions of the lock, constraints.txt (``/.whl/`` is in .gitignore; a call may carry 64 MiB):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $(grep -E '^(av|decord|webdataset|braceexpand)==' constraints.txt)

then there (carry ``.whl``), the one line:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --engine --json $OUT/gpu-engine.json 2>&1 | tee $OUT/gpu-engine.log

It prints the torch and transformers versions first and refuses to run under a transformers outside the range
pyproject.toml declares (the image's 5.17 is inside it; the cache keyword is read from the installed Llama
forward, ``model.generation.cache_keyword``); a torch outside the declared range gets a note.

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

``--engine`` (issue 13): the same model, clips and decode path, and benchmarks/engine.py's forced length
mix (seeded): clip i's English caption is exactly ``en_len[i]`` tokens, uniform in [--en-min, --en-max]
(60–300), its Chinese translation ``round(--zh-ratio × en_len[i])`` (1.2×), both ``ignore_eos``. Rows:

- ``static``: today's loop (generation.py) at each --static-batch-sizes: a batch is encoded, its English
  captions run until the longest is done, then its translation prompts (built from each caption cut to its
  length) until the longest Chinese is done; --static-batches batches per row;
- ``engine``: one ``CaptionEngine`` of each --slots count (KV cache of max_len ≈ 2.86k positions allocated
  once), eager and with ``use_cuda_graphs=True`` (decode step under ``torch.compile(mode="reduce-overhead")``;
  the build, warm-up and compile are timed apart, "warm-up s"); clips arrive from the decoder pool, are
  encoded --vision-batch at a time, and their English requests join the engine as they come; each clip's
  Chinese request joins the same engine as soon as its English caption is back. --clips-per-slot × slots
  clips per row. A slot count is skipped when ``slots_for_memory`` (free memory after the weights) says it
  does not fit.

Columns: clips/GPU-hour (clips with English and Chinese done, from the first batch/chunk on), useful tokens/s
(forced lengths only), ratio to the best static row of the run, slot utilisation (useful tokens / row-steps;
the engine's steady value is over steps with every slot busy), KV bytes copied (static: DynamicCache's
torch.cat) or written (engine) per decode step, GPU busy %, peak ``max_memory_allocated``, decode waits.
Time: rows run most important first (the largest static batch, the largest slot count eager then graphs,
the other static batch, then the smaller slot counts); --max-minutes (7, counted from the start) bounds the
whole run: a row that cannot start in the time left is skipped (a graphs row needs 150 s: it compiles
first), a static row starts no batch that would end past the limit, an engine row stops at the limit
(marked "cut": its clips in flight are lost), and what was skipped is printed. Budget, conservatively (7B
decode 25–40 ms per step eager, a 2.6k-token prefill 40–80 ms, a CUDA-graph compile 1–2 min per slot
count): about 40 s of set-up, static 8 / 16 about 40 s each (16 and 32 clips), engine rows 15–55 s each
(2 × slots clips) plus a compile per graphs row, about 9.5 min for all eight rows in the worst case, so
the limit may skip the 16-slot rows (run last); typically everything fits. The 64-slot rows need an H200
(max_len ≈ 2.86k: ≈ 1.5 GB of KV cache per slot, 96 GB for 64) and are skipped on an H100.

``--engines`` (issue 23): the native engine against vLLM (model/vllm_engine.py) on the same random weights (7B
shapes, bf16), the same clips through the same decode path and vision side, and the same seeded length mix
(--engines-clips clips, English 60–300 tokens, Chinese 1.2×, the translate pass in the same engine, all
``ignore_eos``). vLLM loads the language model as an actor gets it: exported once by
``model.vllm_engine.export_language_model`` (timed apart; every vLLM row uses the one export), fed our prompt
embeddings. Rows, most important first: native eager (as many slots as fit after the weights, at most 64: the
reference the others' English ids are compared with), vLLM with a bf16 KV cache (``kv_cache_dtype: auto``) and
with fp8, then native with CUDA graphs if 150 s are left. vLLM's ``gpu_memory_utilization`` defaults to what is
free after this process's model less 4 GiB for the vision side, at most 0.9 (the actor keeps the whole PLLaVA on
the card, its language model too). Columns: status (ok, cut at the limit, not installed, failed: why, skipped),
clips/GPU-hour and generated tokens/s (from the first clip handed to the engine), peak memory of the whole card
(nvidia-smi ``memory.used``: vLLM's engine core is another process; the row's start included), KV positions the
cache holds (native: slots × max_len; vLLM: blocks × block size after its profiling), GPU busy %, start seconds
(native: KV cache and warm-up; vLLM: process, weights, compile, CUDA graphs), steady seconds, seconds the engine
sat idle waiting for clips, and English ids equal to the native eager row's. Budget on one H100/H200
(estimates, none measured): set-up 40 s, native eager 40–60 s, the 13.5 GB export 30–60 s, each vLLM row a
60–120 s start and 20–40 s of mix, native graphs 150 s; --max-minutes 7 skips what cannot start in time (a vLLM
row needs 180 s left: its start is not cut) and cuts a row at the limit, so the command ends within 8 minutes.
vLLM must be installed on the machine (a vLLM-based image: its wheel is too large to carry); where it is not,
its rows say "not installed". ``--tiny`` runs this section on the CPU with vLLM's CPU build (a head_dim-32 tiny
model, float32 and fp8 KV, eager).
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
import traceback
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from packaging.specifiers import SpecifierSet

    from model.config import PllavaConfig
    from model.loading import LoadedPllava
    from model.pllava import PllavaModel
    from pipeline.frames import DecodedClip
    from pipeline.shards import Sample

# Heavy imports happen inside functions: spawned decoder processes re-import __main__ (see pipeline.py).

VISION_7B = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 336, "patch_size": 14, "projection_dim": 768}
# Differences from transformers 4.37's LlamaConfig defaults, which are Llama-7B's (as the released config).
TEXT_7B = {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 0}
LORA_RANK_7B = 128
LORA_ALPHA = 4.0
REPO = Path(__file__).resolve().parents[1]
# What the device machine's image lacks, carried at the locked versions (see the module docstring)
DEVICE_WHEELS = ("av", "decord", "webdataset", "braceexpand")


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
    """`nvidia-smi -lms 200` in a subprocess: `mean(t0, t1)` averages utilization.gpu samples in that span,
    `peak_gib(t0, t1)` is the most memory.used seen on the card (every process: vLLM's engine core too)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.memory: list[tuple[float, float]] = []  # (time, MiB used on the card)
        self.proc: subprocess.Popen | None = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.proc = subprocess.Popen(
            [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200",
             "-i", index], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                busy, used = (float(v) for v in line.split(","))
            except ValueError:
                continue
            t = time.perf_counter()
            self.samples.append((t, busy))
            self.memory.append((t, used))

    def mean(self, t0: float, t1: float) -> float | None:
        values = [v for t, v in self.samples if t0 <= t <= t1]
        return sum(values) / len(values) if values else None

    def peak_gib(self, t0: float, t1: float) -> float | None:
        values = [v for t, v in self.memory if t0 <= t <= t1]
        return max(values) / 1024 if values else None

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


def encode_clips(loaded: LoadedPllava, clips: list[DecodedClip]) -> torch.Tensor:
    """uint8 frames → the model's device → CLIP normalisation there → `encode_videos`: (B, N_vis, D)."""
    import numpy as np
    import torch

    from pipeline.frames import normalize_frames

    frames = torch.from_numpy(np.stack([c.frames for c in clips]))  # uint8: a quarter of the bytes to copy
    if loaded.device.type == "cuda":
        frames = frames.pin_memory().to(loaded.device, non_blocking=True)
    pixels = normalize_frames(frames)  # (B, T, 3, 336, 336) on the device
    return loaded.model.encode_videos(pixels)  # (B, 2304, D)


def caption_forced(loaded: LoadedPllava, clips: list[DecodedClip], new_tokens: int,
                   stage_s: dict[str, float]) -> int:
    """EN visual pass, then the ZH translate pass, both forced to `new_tokens`; returns tokens generated."""
    import torch

    from model.generation import generate_captions, generate_text

    template = loaded.template
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    features = encode_clips(loaded, clips)  # (B, 2304, D)
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


def locked_versions() -> dict[str, str]:
    """Distribution name (normalised) -> the version the lock, constraints.txt, pins."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[canonicalize_name(name)] = version.strip()
    return pins


def declared_range(dist: str) -> SpecifierSet:
    """The version range pyproject.toml declares for `dist` (read from the file: the benchmark runs from a
    checkout on the device machine, where the project is not installed)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        if canonicalize_name(req.name) == canonicalize_name(dist):
            return req.specifier
    raise KeyError(f"pyproject.toml declares no {dist}")


def device_wheels() -> list[str]:
    """`name==version` for each of DEVICE_WHEELS, at the lock's version."""
    locked = locked_versions()
    return [f"{name}=={locked[name]}" for name in DEVICE_WHEELS]


def check_versions() -> None:
    """Print torch/transformers; refuse a transformers outside the declared range (see the module docstring)."""
    import torch
    import transformers

    locked = locked_versions()
    transformers_range, torch_range = declared_range("transformers"), declared_range("torch")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (declared: torch {torch_range}, "
          f"transformers {transformers_range}; locked: torch {locked['torch']}, transformers "
          f"{locked['transformers']})", flush=True)
    if not transformers_range.contains(transformers.__version__, prereleases=True):
        raise SystemExit(
            f"benchmarks.gpu: refusing to run under transformers {transformers.__version__}: the project declares "
            f"transformers{transformers_range} (pyproject.toml), the versions its model code is tested on. Carry "
            f"the locked one: here, add `transformers=={locked['transformers']} "
            f"huggingface_hub=={locked['huggingface-hub']}` to the wheels you download into .whl (the command is in "
            f"benchmarks/gpu.py's docstring: {' '.join(device_wheels())}); there, install .whl into /tmp/site and "
            f"`export PYTHONPATH=/tmp/site` before the benchmark."
        )
    if not torch_range.contains(torch.__version__.split("+")[0], prereleases=True):
        print(f"note: torch {torch.__version__} is outside the declared {torch_range} (locked: {locked['torch']}); "
              f"numbers are for this torch", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="CPU, tiny model dimensions, a few tokens, both sections unless --engine (for CI)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,16,32; tiny 1,2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="per language (default 256; tiny 8)")
    parser.add_argument("--batches", type=int, default=None, help="batches per batch size (default 2; tiny 1)")
    parser.add_argument("--baseline-clips", type=int, default=2)
    parser.add_argument("--decode-workers", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="frames per synthetic clip (default 48)")
    engine = parser.add_argument_group("engine comparison (--engine; --tiny runs it too)")
    engine.add_argument("--engine", action="store_true",
                        help="run the engine-vs-static comparison on the forced length mix (and not the sweep)")
    engine.add_argument("--static-batch-sizes", default=None, help="today's loop (default 8,16; tiny 1,2)")
    engine.add_argument("--static-batches", type=int, default=None, help="batches per static row (default 2; tiny 1)")
    engine.add_argument("--slots", default=None, help="engine slot counts (default 16,32,64; tiny 2)")
    engine.add_argument("--graphs", choices=("both", "eager", "graphs"), default="both",
                        help="engine rows eager, with use_cuda_graphs=True, or both (default)")
    engine.add_argument("--clips-per-slot", type=int, default=2, help="clips per engine row = this x slots")
    engine.add_argument("--vision-batch", type=int, default=None, help="clips encoded together (default 8; tiny 2)")
    engine.add_argument("--sync-every", type=int, default=4)
    engine.add_argument("--en-min", type=int, default=None, help="English length range (default 60..300; tiny 4..12)")
    engine.add_argument("--en-max", type=int, default=None)
    engine.add_argument("--zh-ratio", type=float, default=1.2)
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument("--max-minutes", type=float, default=7.0,
                        help="whole-run time limit: rows that cannot start are skipped, a running one is cut")
    engine.add_argument("--json", type=Path, default=None, help="also write the engine comparison as JSON here")
    engines = parser.add_argument_group("native engine vs vLLM (--engines; --tiny runs it too)")
    engines.add_argument("--engines", action="store_true",
                         help="run the native engine and vLLM (bf16 and fp8 KV) on the length mix (and nothing else)")
    engines.add_argument("--engines-clips", type=int, default=None, help="clips per row (default 96; tiny 4)")
    engines.add_argument("--native-slots", type=int, default=None,
                         help="native engine slots (default: as many as fit after the weights, at most 64; tiny 2)")
    engines.add_argument("--max-num-seqs", type=int, default=None, help="vLLM's max_num_seqs (default 128; tiny 4)")
    engines.add_argument("--gpu-memory-utilization", type=float, default=None,
                         help="vLLM's share of the card (default: what is free after our model, less 4 GiB for the "
                              "vision side, at most 0.9)")
    engines.add_argument("--kv-dtypes", default="auto,fp8", help="vLLM rows, one per kv_cache_dtype (auto: bf16)")
    args = parser.parse_args(argv)
    args.t_launch = time.perf_counter()  # --max-minutes counts from here
    check_versions()
    import torch

    cpus = len(os.sched_getaffinity(0))
    tiny = args.tiny
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if tiny else "8,16,32")).split(",")]
    new_tokens = args.new_tokens or (8 if tiny else 256)
    batches = args.batches or (1 if tiny else 2)
    workers = args.decode_workers or (1 if tiny else max(1, min(12, cpus - 2)))
    frames = args.frames or (16 if tiny else 48)
    args.static_batch_sizes = [int(b) for b in (args.static_batch_sizes or ("1,2" if tiny else "8,16")).split(",")]
    args.slots = [int(s) for s in (args.slots or ("2" if tiny else "16,32,64")).split(",")]
    args.static_batches = args.static_batches or (1 if tiny else 2)
    args.vision_batch = args.vision_batch or (2 if tiny else 8)
    args.en_min = args.en_min or (4 if tiny else 60)
    args.en_max = args.en_max or (12 if tiny else 300)
    args.engines_clips = args.engines_clips or (4 if tiny else 96)
    args.max_num_seqs = args.max_num_seqs or (4 if tiny else 128)
    args.kv_dtypes = [k.strip() for k in args.kv_dtypes.split(",") if k.strip()]
    if args.engine or args.engines:
        sections = ({"engine"} if args.engine else set()) | ({"engines"} if args.engines else set())
    else:
        sections = {"sweep", "engine", "engines"} if tiny else {"sweep"}
    if tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # tiny matrices: a second thread only spins, badly on a loaded CI machine
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny to run on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        run(args, argv, Path(tmp), tiny, device, dtype, batch_sizes, new_tokens, batches, workers, frames, sections)


def make_samples(distinct: list[bytes], n: int, tag: str, start: int = 0) -> list[Sample]:
    from pipeline.shards import Sample

    return [Sample(key=f"{tag}-{i}", shard="bench", mp4=distinct[i % len(distinct)]) for i in range(start, start + n)]


def run(args, argv, tmp: Path, tiny: bool, device, dtype, batch_sizes: list[int], new_tokens: int,
        batches: int, workers: int, frames: int, sections: set[str]) -> None:
    import torch

    from model.tiny import build_tiny_checkpoint
    from pipeline.frames import DecodedClip, decode_clip
    from pipeline.synthetic import encode_clip

    t_start = time.perf_counter()
    deadline = args.t_launch + 60 * args.max_minutes
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
        return make_samples(distinct, n, tag)

    warm = decode_clip(distinct[0])
    assert isinstance(warm, DecodedClip), warm
    caption_forced(loaded, [warm], 2, {})  # kernels, cuBLAS handles, allocator
    monitor = GpuBusy() if is_cuda else None
    device_name = torch.cuda.get_device_name() if is_cuda else "CPU (--tiny: tiny dimensions, GPU fields n/a)"
    try:
        if "sweep" in sections:
            sweep_section(loaded, args, argv, tiny, is_cuda, samples, workers, monitor, batch_sizes, new_tokens,
                          batches, frames, params, dtype, device_name, t_start)
        if "engine" in sections:
            engine_section(loaded, args, argv, tiny, is_cuda, distinct, warm, workers, monitor, frames, params,
                           dtype, device_name, t_start, deadline)
        if "engines" in sections:
            engines_section(loaded, args, argv, tiny, is_cuda, distinct, workers, monitor, frames, dtype, device_name,
                            t_start, deadline, tmp, json_alone=sections == {"engines"})
    finally:
        if monitor:
            monitor.close()


def sweep_section(loaded, args, argv, tiny: bool, is_cuda: bool, samples, workers: int, monitor, batch_sizes,
                  new_tokens: int, batches: int, frames: int, params: int, dtype, device_name: str,
                  t_start: float) -> None:
    """The batch sweep against the per-clip reference loop (the module docstring's first part)."""
    import torch

    from benchmarks.common import (
        child_cpu_seconds,
        command_line,
        machine_line,
        markdown_table,
        random_lora_weights,
        unmerged_lora,
    )
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip, decode_clip

    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
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
    print(flush=True)


# ------------------------------------------------------------------------------------- engine comparison


@dataclass
class MixRow:
    """One row of the engine comparison; `seconds` from the first batch/chunk of decoded clips to the end."""

    name: str
    kind: str  # "static" or "engine"
    size: int  # batch size or slot count
    graphs: bool
    clips: int  # clips with English and Chinese done
    seconds: float
    fill_s: float
    warmup_s: float  # engine build + warm-up (with graphs: compile and capture); 0 for static
    useful_tokens: int
    row_steps: int
    steady_utilisation: float | None
    kv_bytes_per_step: float
    wait_s: float
    busy: float | None
    peak_gib: float | None
    mean_en: float
    mean_zh: float
    detail: str = ""
    cut: bool = False

    @property
    def clips_per_hour(self) -> float:
        return 3600 * self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def utilisation(self) -> float:
        return self.useful_tokens / self.row_steps if self.row_steps else 0.0


def translation_prompt(loaded: LoadedPllava, token_ids: list[int]) -> str:
    """The translate pass's prompt for a caption of these (random) token ids: ids mapped into the tiny
    tokenizer's vocabulary, the text cut to as many tokens as the caption had (random ids map to text that
    re-tokenises to ~3x as many), so the prompt is about as long as with a real caption of that length."""
    tok, template = loaded.tokenizer, loaded.template
    vocab = len(tok)
    text = tok.decode([t % vocab for t in token_ids], skip_special_tokens=True)
    ids = tok(text, add_special_tokens=False)["input_ids"][: len(token_ids)]
    caption = tok.decode(ids, skip_special_tokens=True)
    return template.format(template.default_translate_zh.format(caption=caption), with_image=False)


def engine_section(loaded, args, argv, tiny: bool, is_cuda: bool, distinct: list[bytes], warm_clip, workers: int,
                   monitor, frames: int, params: int, dtype, device_name: str, t_start: float,
                   deadline: float) -> None:
    """Today's static loop against CaptionEngine on the forced length mix (the module docstring's `--engine`)."""
    import gc
    import math
    import statistics

    import torch

    from benchmarks.common import child_cpu_seconds, command_line, machine_line, markdown_table
    from benchmarks.engine import draw_lengths, drive_engine, dynamic_cache_copy_bytes, en_request
    from model.engine import CaptionEngine, EngineStats, Request, kv_bytes_per_slot, slots_for_memory
    from model.generation import generate_captions, generate_text, tokenize_prompts
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip

    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    tok, template = loaded.tokenizer, loaded.template
    en_prompt = template.format(template.default_question_en)
    en_ids = tok([en_prompt])["input_ids"][0]
    num_visual = math.prod(loaded.config.pooling_shape)
    en_prompt_len = len(en_ids) - 1 + num_visual
    zh_template_len = len(tok([template.format(template.default_translate_zh.format(caption=""),
                                               with_image=False)])["input_ids"][0])
    static_sizes = sorted(set(args.static_batch_sizes))
    slot_counts = sorted(set(args.slots))
    modes = {"both": (False, True), "eager": (False,), "graphs": (True,)}[args.graphs]
    n_max = max([b * args.static_batches for b in static_sizes] + [s * args.clips_per_slot for s in slot_counts])
    lengths = draw_lengths(n_max, args.en_min, args.en_max, args.zh_ratio, args.seed)
    en_max, zh_max = max(e for e, _ in lengths), max(z for _, z in lengths)
    # a caption cut to its length re-tokenises to about as many tokens; 2x leaves room (as benchmarks/engine.py)
    max_len = max(en_prompt_len + en_max, zh_template_len + 2 * en_max + zh_max) + 8
    per_position = kv_bytes_per_slot(loaded, 1)  # one position of one row, all layers, K and V
    warm_features = None
    if is_cuda:
        with torch.inference_mode():
            warm_features = encode_clips(loaded, [warm_clip])[0]
    print(f"engine comparison: EN {args.en_min}-{args.en_max} tokens, ZH {args.zh_ratio}x (seed {args.seed}), EN "
          f"prompt {en_prompt_len} tokens ({num_visual} visual), max_len {max_len}, KV "
          f"{kv_bytes_per_slot(loaded, max_len) / 2**30:.3f} GiB per slot; static batches {static_sizes} x "
          f"{args.static_batches}, slots {slot_counts} x {args.clips_per_slot} clips per slot, "
          f"{'eager' if modes == (False,) else 'graphs' if modes == (True,) else 'eager and graphs'}; limit "
          f"{args.max_minutes} min ({max(0.0, deadline - time.perf_counter()):.0f}s left)", flush=True)

    rows: list[MixRow] = []
    skipped: list[str] = []

    def stop() -> bool:
        return time.perf_counter() > deadline

    def fresh_memory() -> None:
        gc.collect()
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def finish(row: MixRow, t_first: float | None) -> None:
        sync()
        if not row.clips:
            skipped.append(f"{row.name}: the time limit came before its first clip was done")
            print(f"  skipped {skipped[-1]}", flush=True)
            return
        t_end = time.perf_counter()
        if t_first is None:  # nothing ran (cut before the first batch)
            t_first = t_end
        row.seconds = t_end - t_first
        row.busy = monitor.mean(t_first, t_end) if monitor else None
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if is_cuda else None
        rows.append(row)
        print(f"  {row.name:<44} {row.clips:4d} clips {row.clips_per_hour:9.0f} clips/GPU-h "
              f"{row.useful_tokens / row.seconds if row.seconds else 0:8.0f} tok/s  utilisation "
              f"{row.utilisation:.3f}{'  (cut at the time limit)' if row.cut else ''}", flush=True)

    def static_row(bs: int) -> None:
        n = bs * args.static_batches
        fresh_memory()
        row = MixRow(f"static, batch {bs} (today's loop)", "static", bs, False, 0, 0.0, 0.0, 0.0, 0, 0, None, 0.0,
                     0.0, None, None, statistics.mean(e for e, _ in lengths[:n]),
                     statistics.mean(z for _, z in lengths[:n]))
        copy_bytes = forwards = 0
        with DecodePool(workers=workers, max_ahead=2 * bs, mode="process") as pool:
            list(pool.imap(make_samples(distinct, workers, "warm")))  # process start-up is not measured
            cpu0 = child_cpu_seconds(pool.worker_pids())
            t_begin = time.perf_counter()
            it = pool.imap(make_samples(distinct, n, f"s{bs}"))
            t_first = None
            batch_s = 0.0  # the last batch's duration: a batch that would end past the limit is not started
            for start in range(0, n, bs):
                if time.perf_counter() + batch_s > deadline:
                    row.cut = True
                    break
                t_wait = time.perf_counter()
                clips = [item[1] for _, item in zip(range(bs), it)]
                if t_first is None:
                    t_first = time.perf_counter()
                    row.fill_s = t_first - t_begin
                else:
                    row.wait_s += time.perf_counter() - t_wait
                assert all(isinstance(c, DecodedClip) for c in clips), clips
                lens = lengths[start: start + len(clips)]
                features = encode_clips(loaded, clips)
                steps = max(e for e, _ in lens)
                en = generate_captions(loaded, [en_prompt] * len(clips), features, max_new_tokens=steps,
                                       ignore_eos=True)
                ids, _ = tokenize_prompts(loaded, [en_prompt] * len(clips))
                c, f = dynamic_cache_copy_bytes(len(clips), ids.shape[1] - 1 + num_visual, steps, per_position)
                copy_bytes, forwards = copy_bytes + c, forwards + f
                row.row_steps += len(clips) * steps
                prompts = [translation_prompt(loaded, g.token_ids[:e]) for g, (e, _) in zip(en, lens)]
                steps = max(z for _, z in lens)
                generate_text(loaded, prompts, max_new_tokens=steps, ignore_eos=True)
                ids, _ = tokenize_prompts(loaded, prompts)
                c, f = dynamic_cache_copy_bytes(len(clips), ids.shape[1], steps, per_position)
                copy_bytes, forwards = copy_bytes + c, forwards + f
                row.row_steps += len(clips) * steps
                row.useful_tokens += sum(e + z for e, z in lens)
                row.clips += len(clips)
                sync()
                batch_s = time.perf_counter() - t_wait
            cpu_s = child_cpu_seconds(pool.worker_pids()) - cpu0
        row.kv_bytes_per_step = copy_bytes / forwards if forwards else 0.0
        row.detail = (f"{forwards} decode forwards, {row.useful_tokens} useful of {row.row_steps} row-steps, "
                      f"decoders {cpu_s:.1f} CPU s")
        finish(row, t_first)

    def engine_row(slots: int, graphs: bool) -> None:
        n = slots * args.clips_per_slot
        name = f"engine, {slots} slots, {'CUDA graphs' if graphs else 'eager'}"
        if graphs and not is_cuda:
            name += " (ignored on CPU)"
        fresh_memory()
        if is_cuda:
            free = torch.cuda.mem_get_info()[0]
            try:
                fit = slots_for_memory(loaded, max_len, free)
            except RuntimeError:
                fit = 0
            if fit < slots:
                skipped.append(f"{name}: slots_for_memory says {fit} slots of max_len {max_len} fit in "
                               f"{free / 2**30:.1f} GiB free")
                print(f"  skipped {skipped[-1]}", flush=True)
                return
        t0 = time.perf_counter()
        engine = CaptionEngine(loaded, num_slots=slots, max_len=max_len, sync_every=args.sync_every,
                               use_cuda_graphs=graphs)
        # warm-up (and, with graphs, compile + capture of the fixed-shape decode step): one visual request and
        # text-only ones in every slot, a few syncs long; then the counters start again
        warm_ids = tok([translation_prompt(loaded, list(range(16)))])["input_ids"][0]
        if is_cuda:  # the visual prefill's kernels (on the tiny CPU model, a second of nothing)
            engine.submit(Request("warm-en", en_ids, warm_features, max_new_tokens=2, ignore_eos=True))
        for k in range(slots):
            engine.submit(Request(("warm", k), warm_ids, None, max_new_tokens=3 * args.sync_every + k % 3,
                                  ignore_eos=True))
        engine.run_until_idle()
        sync()
        warmup_s = time.perf_counter() - t0
        engine.stats = EngineStats(num_slots=slots)
        if is_cuda:
            torch.cuda.reset_peak_memory_stats()
        row = MixRow(name, "engine", slots, graphs, 0, 0.0, 0.0, warmup_s, 0, 0, None, 0.0, 0.0, None, None,
                     statistics.mean(e for e, _ in lengths[:n]), statistics.mean(z for _, z in lengths[:n]))
        with DecodePool(workers=workers, max_ahead=max(2 * args.vision_batch, slots), mode="process") as pool:
            list(pool.imap(make_samples(distinct, workers, "warm")))
            cpu0 = child_cpu_seconds(pool.worker_pids())
            t_begin = time.perf_counter()
            it = pool.imap(make_samples(distinct, n, f"e{slots}{'g' if graphs else ''}"))
            state = {"next": 0, "t_first": None}

            def feed(eng: CaptionEngine) -> bool:
                """Keep --vision-batch English requests waiting: pull decoded clips, encode, submit."""
                if len(eng.waiting) >= args.vision_batch:
                    return True
                t_wait = time.perf_counter()
                clips = [item[1] for _, item in zip(range(args.vision_batch), it)]
                if state["t_first"] is None:
                    state["t_first"] = time.perf_counter()
                    row.fill_s = state["t_first"] - t_begin
                else:
                    row.wait_s += time.perf_counter() - t_wait
                if clips:
                    assert all(isinstance(c, DecodedClip) for c in clips), clips
                    with torch.inference_mode():
                        features = encode_clips(loaded, clips)
                    for k in range(len(clips)):
                        eng.submit(en_request(state["next"] + k, en_ids, features[k], lengths))
                    state["next"] += len(clips)
                return state["next"] < n

            def zh_ids(completion) -> list[int]:
                return tok([translation_prompt(loaded, completion.generation.token_ids)])["input_ids"][0]

            _, zh_done = drive_engine(engine, lengths, zh_ids, feed=feed, stop=stop)
            row.cut = len(zh_done) < n
            cpu_s = child_cpu_seconds(pool.worker_pids()) - cpu0
        s = engine.stats
        row.clips, row.useful_tokens, row.row_steps = len(zh_done), s.useful_tokens, s.slot_steps
        row.steady_utilisation = s.steady_utilisation if s.full_steps else None
        row.kv_bytes_per_step = s.kv_bytes_per_decode_step
        row.detail = (f"{s.steps} steps, {s.prefills} prefills ({s.prefill_tokens} tokens), {s.syncs} host syncs, "
                      f"useful {s.useful_tokens}, wasted {s.wasted_slot_steps}, idle {s.idle_slot_steps} slot-steps, "
                      f"{s.full_steps} full steps; KV cache {engine.cache.nbytes / 2**30:.2f} GiB; decoders "
                      f"{cpu_s:.1f} CPU s")
        finish(row, state["t_first"])
        del engine
        if graphs and is_cuda:
            torch._dynamo.reset()  # frees the captured graphs' memory pool before the next row

    # most important first: the largest static batch, the largest slot count (eager, graphs), then the rest
    plan: list[tuple[str, int, bool]] = [("static", static_sizes[-1], False)]
    for i, slots in enumerate(reversed(slot_counts)):
        plan += [("engine", slots, g) for g in modes]
        if i == 0:
            plan += [("static", b, False) for b in reversed(static_sizes[:-1])]
    # rough seconds a row needs to be worth starting (a graphs row compiles first); none on the tiny model
    need = {("static", False): 30.0, ("engine", False): 30.0, ("engine", True): 150.0}
    for kind, size, graphs in plan:
        left = deadline - time.perf_counter()
        label = (f"static, batch {size}" if kind == "static"
                 else f"engine, {size} slots, {'CUDA graphs' if graphs else 'eager'}")
        if left < (0.0 if tiny else need[(kind, graphs)]) or left <= 0:
            skipped.append(f"{label}: {max(0.0, left):.0f}s left of --max-minutes {args.max_minutes}")
            print(f"  skipped {skipped[-1]}", flush=True)
            continue
        failed = None
        try:
            static_row(size) if kind == "static" else engine_row(size, graphs)
        except Exception as err:  # noqa: BLE001 - one failing row (e.g. a graph capture) must not lose the others
            failed = f"{label}: failed: {type(err).__name__}: {str(err)[:300]}"
            traceback.print_exc()
        if failed:  # outside the except clause: its traceback (and the row's engine) is gone by now
            skipped.append(failed)
            print(f"  FAILED {failed}", flush=True)
            if is_cuda:
                torch._dynamo.reset()
            fresh_memory()

    order = {("static", False): 0, ("engine", False): 1, ("engine", True): 2}
    rows.sort(key=lambda r: (r.kind != "static", r.size, order[(r.kind, r.graphs)]))
    statics = [r for r in rows if r.kind == "static" and r.clips]
    best_static = max(statics, key=lambda r: r.clips_per_hour) if statics else None
    table = []
    for r in rows:
        ratio = (f"{r.clips_per_hour / best_static.clips_per_hour:.2f}x" if best_static and r.clips else "n/a")
        table.append([
            r.name + (" (cut)" if r.cut else ""), r.clips, f"{r.clips_per_hour:.0f}",
            f"{r.useful_tokens / r.seconds if r.seconds else 0:.0f}", ratio, f"{r.utilisation:.3f}",
            "-" if r.steady_utilisation is None else f"{r.steady_utilisation:.3f}",
            f"{r.kv_bytes_per_step / 2**20:.2f}", "n/a" if r.busy is None else f"{r.busy:.0f}%",
            "n/a" if r.peak_gib is None else f"{r.peak_gib:.1f}",
            f"{100 * r.wait_s / r.seconds:.1f}%" if r.seconds else "n/a", f"{r.fill_s:.1f}", f"{r.warmup_s:.1f}",
            f"{r.seconds:.1f}", f"{r.mean_en:.0f}/{r.mean_zh:.0f}",
        ])
    print()
    print(machine_line())
    print(f"device: {device_name}")
    print(f"command: {command_line('benchmarks.gpu', argv)}")
    print(f"model: {'tiny dims' if tiny else 'PLLaVA-7B shapes'}, {params / 1e6:.1f}M params, {dtype}, sdpa; forced "
          f"length mix EN {args.en_min}-{args.en_max} tokens, ZH {args.zh_ratio}x EN (translate, same engine), "
          f"seed {args.seed}; {num_visual} visual tokens, max_len {max_len}; 1280x720 clips, {frames} frames; "
          f"{workers} decoder processes; sync every {args.sync_every}; total run "
          f"{time.perf_counter() - t_start:.0f}s (limit {args.max_minutes} min)")
    print()
    print(markdown_table(["mix path", "clips", "clips/GPU-hour", "useful tok/s", "vs best static",
                          "utilisation", "utilisation (steady)", "KV MiB per decode step", "GPU busy",
                          "peak GPU GiB", "waits on decode", "fill s", "warm-up s", "steady s",
                          "mean EN/ZH tokens"], table))
    print()
    for r in rows:
        print(f"{r.name}: {r.detail}")
    engines = [r for r in rows if r.kind == "engine" and r.clips]
    engines = [r for r in engines if not r.cut] or engines  # a cut row lost its clips in flight
    if best_static and engines:
        best = max(engines, key=lambda r: r.clips_per_hour)
        print(f"ratio engine / today's loop: best engine row ({best.name}{', cut' if best.cut else ''}) / best "
              f"static row ({best_static.name}) = "
              f"{best.clips_per_hour / best_static.clips_per_hour:.2f}x clips/GPU-hour (target >= 3x); best "
              f"engine {best.clips_per_hour:.0f} clips/GPU-hour (target 10000)")
    else:
        print("ratio engine / today's loop: n/a (a static or an engine row is missing)")
    for line in skipped:
        print(f"skipped: {line}")
    if args.json:
        result = {
            "command": command_line("benchmarks.gpu", argv), "machine": machine_line(), "device": device_name,
            "max_len": max_len, "lengths": lengths, "visual_tokens": num_visual, "skipped": skipped,
            "rows": [{**{k: v for k, v in vars(r).items()}, "clips_per_hour": r.clips_per_hour,
                      "utilisation": r.utilisation} for r in rows],
        }
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"JSON: {args.json}")


# ---------------------------------------------------------------------------------- native engine vs vLLM

# The export's identity (model/vllm_engine.py keys its cache on it): random weights of a fixed seed and shape.
VLLM_IDENTITY = "benchmarks-gpu-random-pllava-seed0"
VISION_RESERVE_GIB = 4.0  # left to the vision side (CLIP over --vision-batch clips) when vLLM's share is derived


@dataclass
class EngineRow:
    """One engine on the length mix; `seconds` from the first decoded clip handed to it to the end."""

    name: str
    engine: str  # "native" or "vllm"
    kv: str  # the KV cache's dtype
    status: str = "ok"  # ok | cut (the time limit: clips in flight lost) | not installed | failed: ... | skipped: ...
    clips: int = 0  # clips with English and Chinese done
    seconds: float = 0.0
    start_s: float = 0.0  # build + warm-up: native KV cache (and compile); vLLM process, weights, compile, graphs
    tokens: int = 0  # generated, English and Chinese (forced lengths)
    wait_s: float = 0.0  # the engine idle, waiting for decoded clips, after the first
    busy: float | None = None
    peak_card_gib: float | None = None  # nvidia-smi memory.used, whole card, start included (vLLM's core too)
    kv_positions: int | None = None  # token positions the KV cache holds (native: slots x max_len)
    same_en: str = "-"  # clips whose English ids equal the native (eager) row's
    detail: str = ""
    en_ids: dict[int, list[int]] | None = None

    @property
    def clips_per_hour(self) -> float:
        return 3600 * self.clips / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def engines_section(loaded, args, argv, tiny: bool, is_cuda: bool, distinct: list[bytes], workers: int, monitor,
                    frames: int, dtype, device_name: str, t_start: float, deadline: float, tmp: Path,
                    json_alone: bool) -> None:
    """The native engine and vLLM on the same weights, clips, decode path and length mix (`--engines`)."""
    import gc
    import importlib.util
    import math

    import torch

    from benchmarks.common import command_line, machine_line, markdown_table
    from benchmarks.engine import draw_lengths, drive_engine, en_request
    from model.engine import CaptionEngine, EngineStats, Request, slots_for_memory
    from model.tiny import build_tiny_checkpoint
    from model.vllm_engine import VllmSettings, export_language_model
    from pipeline.decode import DecodePool
    from pipeline.frames import DecodedClip, decode_clip

    if tiny:  # vLLM's CPU attention takes head_dim 32 at least; the tiny checkpoint's is 16
        loaded = build_loaded(build_tiny_checkpoint(tmp / "tiny-pllava-hd32", seed=0, head_dim=32), True,
                              loaded.device, dtype)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache in the CPU build (its default: 4)
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    tok, template = loaded.tokenizer, loaded.template
    en_ids = tok([template.format(template.default_question_en)])["input_ids"][0]
    num_visual = math.prod(loaded.config.pooling_shape)
    zh_template_len = len(tok([template.format(template.default_translate_zh.format(caption=""),
                                               with_image=False)])["input_ids"][0])
    n = args.engines_clips
    lengths = draw_lengths(n, args.en_min, args.en_max, args.zh_ratio, args.seed)
    en_max, zh_max = max(e for e, _ in lengths), max(z for _, z in lengths)
    max_len = max(len(en_ids) - 1 + num_visual + en_max, zh_template_len + 2 * en_max + zh_max) + 8
    model_dtype = str(dtype).removeprefix("torch.")
    vllm_installed = importlib.util.find_spec("vllm") is not None
    with torch.inference_mode():
        warm_features = encode_clips(loaded, [decode_clip(distinct[0])])[0]

    def fresh_memory() -> None:
        gc.collect()
        if is_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def native_slots() -> int:
        if args.native_slots or not is_cuda:
            return args.native_slots or 2
        return slots_for_memory(loaded, max_len, torch.cuda.mem_get_info()[0], cap=64)

    def vllm_settings(kv: str) -> VllmSettings:
        utilisation = args.gpu_memory_utilization
        if utilisation is None and is_cuda:
            free, total = torch.cuda.mem_get_info()
            utilisation = round(min(0.9, (free - VISION_RESERVE_GIB * 2**30) / total), 3)
        extra = {"gpu_memory_utilization": utilisation} if utilisation is not None else {}
        # no compilation in the CPU build on a 2-core machine (minutes); on a GPU vLLM compiles and captures graphs
        return VllmSettings(kv_cache_dtype=kv, max_num_seqs=args.max_num_seqs, enforce_eager=not is_cuda,
                            tensor_parallel_size=1, **extra)

    def translation_ids(completion) -> list[int]:
        return tok([translation_prompt(loaded, completion.generation.token_ids)])["input_ids"][0]

    def measure(row: EngineRow, build) -> None:
        """Build and warm the engine, feed it the clips from the decoder pool, time the mix."""
        fresh_memory()
        t0 = time.perf_counter()
        engine = build()
        try:
            warm_text = tok([translation_prompt(loaded, list(range(16)))])["input_ids"][0]
            engine.submit(Request("warm-en", en_ids, warm_features, max_new_tokens=2, ignore_eos=True))
            for k in range(4):
                engine.submit(Request(("warm", k), warm_text, None, max_new_tokens=3 + k, ignore_eos=True))
            engine.run_until_idle()
            sync()
            row.start_s = time.perf_counter() - t0
            engine.stats = EngineStats(num_slots=engine.stats.num_slots)
            with DecodePool(workers=workers, max_ahead=max(2 * args.vision_batch, 16), mode="process") as pool:
                list(pool.imap(make_samples(distinct, workers, "warm")))
                it = pool.imap(make_samples(distinct, n, row.name))
                state = {"next": 0, "t_first": None}

                def feed(eng) -> bool:
                    """Keep --vision-batch English requests waiting: pull decoded clips, encode, submit."""
                    if len(eng.waiting) >= args.vision_batch:
                        return True
                    t_wait = time.perf_counter()
                    clips = [item[1] for _, item in zip(range(args.vision_batch), it)]
                    if state["t_first"] is None:
                        state["t_first"] = time.perf_counter()
                    elif not eng.busy:
                        row.wait_s += time.perf_counter() - t_wait
                    if clips:
                        assert all(isinstance(c, DecodedClip) for c in clips), clips
                        with torch.inference_mode():
                            features = encode_clips(loaded, clips)
                        for k in range(len(clips)):
                            eng.submit(en_request(state["next"] + k, en_ids, features[k], lengths))
                        state["next"] += len(clips)
                    return state["next"] < n

                en_out, zh_done = drive_engine(engine, lengths, translation_ids, feed=feed,
                                               stop=lambda: time.perf_counter() > deadline)
            sync()
            t_end = time.perf_counter()
            wrong = [i for i, ids in en_out.items() if len(ids) != lengths[i][0]]
            if wrong:
                raise AssertionError(f"English captions of clips {wrong[:5]} are not their forced lengths")
            row.status = "ok" if len(zh_done) == n else "cut"
            row.clips, row.tokens, row.en_ids = len(zh_done), engine.stats.useful_tokens, en_out
            row.seconds = t_end - (state["t_first"] or t_end)
            if monitor:
                row.busy = monitor.mean(state["t_first"] or t_end, t_end)
                row.peak_card_gib = monitor.peak_gib(t0, t_end)
            s = engine.stats
            row.detail = f"{s.steps} steps, {s.prefills} prefills ({s.prefill_tokens} tokens), {s.completed} requests"
            if getattr(engine, "compile_error", None):  # the native engine went back to eager: say so
                row.status += "; compile failed, ran eager"
                row.detail += f"; compile failed: {engine.compile_error}"
            if is_cuda:  # native: everything; vLLM: the vision side (its engine core is another process)
                row.detail += f"; torch allocator peak in this process {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        finally:
            if row.engine == "vllm":
                engine.close()  # ends vLLM's engine core and frees its memory
            elif is_cuda and getattr(engine, "_compiled_decode", None) is not None:
                torch._dynamo.reset()  # frees the captured graphs' memory pool
            del engine
            fresh_memory()

    def native_row(graphs: bool) -> EngineRow:
        slots = native_slots()
        row = EngineRow(f"native, {slots} slots, {'CUDA graphs' if graphs else 'eager'}", "native", model_dtype)
        row.kv_positions = slots * max_len
        measure(row, lambda: CaptionEngine(loaded, num_slots=slots, max_len=max_len, sync_every=args.sync_every,
                                           use_cuda_graphs=graphs))
        return row

    export_s: list[float] = []

    def vllm_row(kv: str) -> EngineRow:
        label = model_dtype if kv == "auto" else kv
        row = EngineRow(f"vLLM, max_num_seqs {args.max_num_seqs}, {label} KV", "vllm", label)
        if not vllm_installed:
            row.status = "not installed"
            return row
        from model.vllm_engine import VllmEngine

        cache_root = tmp / "vllm-cache"
        if not export_s:  # once, as an actor does: the merged language model as a plain HF checkpoint
            t0 = time.perf_counter()
            export_language_model(loaded, VLLM_IDENTITY, cache_root)
            export_s.append(time.perf_counter() - t0)
            print(f"exported the language model for vLLM in {export_s[0]:.1f}s", flush=True)
        settings = vllm_settings(kv)
        holder = {}

        def build():
            holder["engine"] = VllmEngine(loaded, identity=VLLM_IDENTITY, max_len=max_len, settings=settings,
                                          cache_root=cache_root)
            return holder["engine"]

        measure(row, build)
        cache = holder["engine"]._engine.vllm_config.cache_config  # filled in from the engine core at start
        if cache.num_gpu_blocks:
            row.kv_positions = cache.num_gpu_blocks * cache.block_size
        row.detail += f"; vLLM {holder['engine'].version}, {settings}"
        return row

    print(f"native engine vs vLLM: {n} clips, EN {args.en_min}-{args.en_max} tokens, ZH {args.zh_ratio}x (seed "
          f"{args.seed}), max_len {max_len}, {model_dtype}; vLLM {'installed' if vllm_installed else 'not installed'}"
          f"; limit {args.max_minutes} min ({max(0.0, deadline - time.perf_counter()):.0f}s left)", flush=True)
    # native eager first (the reference the others' English ids are compared with), then vLLM bf16 and fp8 KV,
    # then the native engine's CUDA graphs (a compile of 1-2 min) if time is left
    plan = [("native", False)] + [("vllm", kv) for kv in args.kv_dtypes] + ([("native", True)] if is_cuda else [])
    # seconds a row needs to be worth starting (GPU): a vLLM start (weights, compile, graph capture) is not cut
    need = {"native": 40.0, "vllm": 180.0, "graphs": 150.0}
    rows: list[EngineRow] = []
    for kind, option in plan:
        left = deadline - time.perf_counter()
        key = "graphs" if kind == "native" and option else kind
        # the name of a row that did not run (a row that ran names its slot count too)
        name, kv = ((f"native, {'CUDA graphs' if option else 'eager'}", model_dtype) if kind == "native" else
                    (f"vLLM, max_num_seqs {args.max_num_seqs}, {model_dtype if option == 'auto' else option} KV",
                     option))
        try:
            if (kind == "native" or vllm_installed) and (left <= 0 or (not tiny and left < need[key])):
                row = EngineRow(name, kind, kv, status=f"skipped: {max(0.0, left):.0f}s left of --max-minutes "
                                                       f"{args.max_minutes}")
            else:
                row = native_row(option) if kind == "native" else vllm_row(option)
        except Exception as err:  # noqa: BLE001 - one failing row (a start, a compile) must not lose the others
            traceback.print_exc()
            row = EngineRow(name, kind, kv, status=f"failed: {type(err).__name__}: {str(err).strip()[:200]}")
        rows.append(row)
        print(f"  {row.name:<40} {row.status:<14} {row.clips:4d} clips {row.clips_per_hour:9.0f} clips/GPU-h "
              f"{row.tokens_per_s:8.0f} tok/s", flush=True)

    reference = next((r for r in rows if r.engine == "native" and r.en_ids), None)
    for r in rows:
        if r.en_ids and reference is not None and r is not reference:
            both = set(r.en_ids) & set(reference.en_ids)
            r.same_en = f"{sum(r.en_ids[i] == reference.en_ids[i] for i in both)}/{len(both)}"
    table = []
    for r in rows:
        ran = r.status.split(";")[0] in ("ok", "cut")
        table.append([
            r.name, r.status, r.clips if ran else "-", f"{r.clips_per_hour:.0f}" if ran else "-",
            f"{r.tokens_per_s:.0f}" if ran else "-",
            "n/a" if r.peak_card_gib is None or not ran else f"{r.peak_card_gib:.1f}",
            "-" if r.kv_positions is None else r.kv_positions,
            "n/a" if r.busy is None else f"{r.busy:.0f}%", f"{r.start_s:.1f}" if ran else "-",
            f"{r.seconds:.1f}" if ran else "-", f"{r.wait_s:.1f}" if ran else "-", r.same_en,
        ])
    print()
    print(machine_line())
    print(f"device: {device_name}")
    print(f"command: {command_line('benchmarks.gpu', argv)}")
    print(f"model: {'tiny dims (head_dim 32)' if tiny else 'PLLaVA-7B shapes'}, {model_dtype}, the same random "
          f"weights for every row; forced length mix EN {args.en_min}-{args.en_max} tokens, ZH {args.zh_ratio}x EN "
          f"(translate, same engine), seed {args.seed}; {n} clips a row, {num_visual} visual tokens, max_len "
          f"{max_len}; 1280x720 clips, {frames} frames, {workers} decoder processes; vLLM export "
          f"{f'{export_s[0]:.1f}s (once)' if export_s else 'not made'}; total run "
          f"{time.perf_counter() - t_start:.0f}s (limit {args.max_minutes} min)")
    print()
    print(markdown_table(["engine", "status", "clips", "clips/GPU-hour", "generated tok/s", "peak GPU GiB (card)",
                          "KV positions", "GPU busy", "start s", "steady s", "waits on decode s",
                          "EN ids = native eager"], table))
    print()
    for r in rows:
        if r.detail:
            print(f"{r.name}: {r.detail}")
    if args.json:
        path = args.json if json_alone else args.json.with_name(f"{args.json.stem}-engines{args.json.suffix}")
        result = {"command": command_line("benchmarks.gpu", argv), "machine": machine_line(), "device": device_name,
                  "max_len": max_len, "lengths": lengths, "export_s": export_s[0] if export_s else None,
                  "rows": [{**{k: v for k, v in vars(r).items() if k != "en_ids"},
                            "clips_per_hour": r.clips_per_hour, "tokens_per_s": r.tokens_per_s} for r in rows]}
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"JSON: {path}")


if __name__ == "__main__":
    main()
