"""vLLM as the caption engine: the same duck-typed interface as `model.engine.CaptionEngine`.

    engine = VllmEngine(loaded, identity=..., max_len=..., settings=VllmSettings(...), cache_root=None)
    engine.submit(Request(...)); engine.busy; engine.step() -> completions as they finish; engine.flush();
    len(engine.waiting); engine.stats (an `EngineStats`: steps, prefills, completions, useful tokens);
    engine.close(); engine.name ("vllm") and engine.version (vLLM's) for the run's record

`pipeline/scheduler.py` drives either engine. vLLM runs the LANGUAGE MODEL ONLY, through its step-wise
`LLMEngine` (add requests, step, read finished outputs: never one blocking `generate` per batch). Our code
keeps the vision side: a request with `video_features` goes in as the prompt embeddings the native engine
prefills (`PllavaModel.prepare_inputs`: the `<image>` token replaced by the visual tokens, shape (L, hidden));
a text-only request (the Chinese translation, a repair without video) goes in as token ids.

Decoding is the native engine's: greedy; the request's stop ids (default `stop_token_ids(loaded)`) and nothing
else (vLLM starts without a tokenizer, so it knows no eos of its own, and with `generation_config="vllm"` it
reads no defaults from the checkpoint); `max_new_tokens`; `min_new_tokens` as vLLM's `min_tokens` (which
masks exactly those stop ids); `ignore_eos`; and the repetition penalty over the prompt's text tokens and the
generated ones, by `model.vllm_penalty.PromptTextPenalty` (vLLM's own penalty sees no prompt ids for an
embeddings prompt). Token ids come back without the stop token and are decoded by our tokenizer, as the native
engine does. `waiting` holds requests not yet handed to vLLM: at most `max_num_seqs` are in vLLM at a time,
so the scheduler's backpressure (`len(engine.waiting)`) works as with the native engine's slots.

The language model (LoRA merged at the loaded α) is exported once as a plain Hugging Face checkpoint
(`save_pretrained`: safetensors, config.json, tokenizer files) into `{cache_root}/vllm/{key}`, the key made
of the caller's content identity of the model (model/ cannot compute the pipeline's), α and dtype;
`cache_root` defaults to `$RECAPTION_CACHE_DIR`, else `~/.cache/pllava-recaption`. It is written into a
temporary directory and renamed into place, under an exclusive lock per key, so actors of one node starting
together export it once and later runs reuse it; a writer that finds the directory there at rename time (a
filesystem without working locks) discards its copy and uses the one there. Never `trust_remote_code`.

Processes: vLLM's engine core runs in a child process; this module asks for `spawn` (unless
`VLLM_WORKER_MULTIPROC_METHOD` is set) because forking a process with threads (a Ray actor, the scheduler's
model thread) is unsafe. A spawned child re-imports the parent's `__main__`, so a script that creates an
engine needs the `if __name__ == "__main__":` guard (pytest's and Ray's worker entry points have it); the
`model` package must be importable in the child (it inherits `sys.path`). `close()` ends the child and frees
its memory. On a GPU the vision side and vLLM share the card: vLLM takes `gpu_memory_utilization` of it. With
`tensor_parallel_size` N > 1, vLLM's workers are processes on the N GPUs this process sees (a Ray actor must
reserve N GPUs), not Ray tasks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import uuid
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import transformers

from model.engine import Completion, EngineStats, Request, prompt_id_list
from model.generation import Generation, stop_token_ids
from model.loading import LoadedPllava

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when what an export holds changes: old exports are then not reused
KV_CACHE_DTYPES = ("auto", "fp8")


# -------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class VllmSettings:
    """vLLM's knobs (manifest `generation.vllm`). Checked on construction: a bad field raises ValueError naming
    it. gpu_memory_utilization: the share of the card vLLM may take (weights + KV); the rest stays for the
    vision side. max_num_batched_tokens None: vLLM's default. tensor_parallel_size: GPUs per engine."""

    gpu_memory_utilization: float = 0.8
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"generation.vllm.{name}: {want}, got {getattr(self, name)!r}")

        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise bad("gpu_memory_utilization", "a number in (0, 1]")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"one of {', '.join(KV_CACHE_DTYPES)}")
        for name in ("max_num_seqs", "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "an integer >= 1")
        n = self.max_num_batched_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise bad("max_num_batched_tokens", "an integer >= 1 or null")
        if not isinstance(self.enforce_eager, bool):
            raise bad("enforce_eager", "true or false")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# ---------------------------------------------------------------------------------------------------- export


def default_cache_root() -> Path:
    return Path(os.environ.get("RECAPTION_CACHE_DIR") or Path.home() / ".cache" / "pllava-recaption")


def export_key(identity: str, lora_alpha: float | None, dtype: torch.dtype) -> str:
    """Directory name of an export: a readable prefix of the identity and a hash of everything it depends on."""
    content = json.dumps([EXPORT_FORMAT, identity, lora_alpha, str(dtype).removeprefix("torch.")])
    digest = hashlib.sha256(content.encode()).hexdigest()[:20]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", identity).strip("-.")[:48] or "model"
    return f"{slug}-{digest}"


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished export into place. When another writer got there first, its copy wins: ours goes."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_export(loaded: LoadedPllava, identity: str, tmp: Path) -> None:
    tmp.mkdir(parents=True)
    lm = loaded.model.language_model
    lm.save_pretrained(str(tmp))  # safetensors: transformers 5 writes nothing else
    loaded.tokenizer.save_pretrained(str(tmp))
    if list(tmp.glob("*.bin")) or not list(tmp.glob("*.safetensors")):
        raise RuntimeError(f"{tmp}: save_pretrained did not write safetensors only")
    info = {"identity": identity, "lora_alpha": loaded.lora_alpha, "dtype": str(loaded.dtype),
            "format": EXPORT_FORMAT, "transformers": transformers.__version__}
    (tmp / "pllava-export.json").write_text(json.dumps(info, indent=2) + "\n")


def export_language_model(loaded: LoadedPllava, identity: str, cache_root: str | Path | None = None) -> Path:
    """The merged language model as a plain HF checkpoint under `{cache_root}/vllm/`: written once, reused."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    exports = root / "vllm"
    exports.mkdir(parents=True, exist_ok=True)
    key = export_key(identity, loaded.lora_alpha, loaded.dtype)
    final = exports / key
    if (final / "config.json").is_file():
        return final
    with open(exports / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            if (final / "config.json").is_file():  # another actor wrote it while we waited
                return final
            for stale in exports.glob(f".{key}.tmp-*"):  # left by a writer that died (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = exports / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                _write_export(loaded, identity, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("exported the language model for vLLM to %s", final)
            return _publish(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- engine


@dataclass
class _InFlight:
    request: Request
    admitted_step: int
    stops: frozenset[int]


class VllmEngine:
    """The language model in vLLM, the vision side ours (see the module docstring)."""

    name = "vllm"

    def __init__(self, loaded: LoadedPllava, *, identity: str, max_len: int, settings: VllmSettings,
                 cache_root: str | Path | None = None):
        import vllm
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # imported here first: the penalty must import in this process too, as it must in vLLM's core
        from model.vllm_penalty import QUALIFIED_NAME

        if max_len < 2:
            raise ValueError(f"need max_len >= 2, got {max_len}")
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.max_len, self.settings = max_len, settings
        self.version = vllm.__version__
        self.default_stop_ids = stop_token_ids(loaded)
        self.image_id = loaded.config.image_token_index
        self.hidden_size = loaded.config.hidden_size
        self.export_dir = export_language_model(loaded, identity, cache_root)
        dtype = str(loaded.dtype).removeprefix("torch.")
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = EngineArgs(
            model=str(self.export_dir),
            tokenizer=str(self.export_dir),
            skip_tokenizer_init=True,  # we decode; vLLM then has no eos of its own beside our stop ids
            trust_remote_code=False,
            load_format="safetensors",
            generation_config="vllm",  # no sampling defaults from the checkpoint's generation_config.json
            dtype=dtype,
            max_model_len=max_len,
            enable_prompt_embeds=True,
            logits_processors=[QUALIFIED_NAME],
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_dtype=settings.kv_cache_dtype,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            # tensor parallel: worker processes on the GPUs this process holds (a Ray actor reserves them), never
            # vLLM's Ray backend, which would ask the cluster for more GPUs from inside the actor
            distributed_executor_backend="mp" if settings.tensor_parallel_size > 1 else None,
            seed=0,
            disable_log_stats=True,
        )
        log.info("starting vLLM %s (language model %s, %s, max_len %d, %s)", self.version, self.export_dir.name,
                 dtype, max_len, settings)
        self._engine = LLMEngine.from_engine_args(args)
        self.waiting: deque[Request] = deque()
        self._running: dict[str, _InFlight] = {}
        self._ids = itertools.count()
        self.stats = EngineStats(num_slots=settings.max_num_seqs)
        self._closed = False

    # ---- public API (CaptionEngine's)

    def submit(self, request: Request) -> None:
        """Checks the request as CaptionEngine.submit does (ValueError: the caller captions it another way)."""
        ids = self._prompt_list(request)
        if request.max_new_tokens < 1:
            raise ValueError(f"request {request.id!r}: max_new_tokens must be >= 1, got {request.max_new_tokens}")
        n_image = ids.count(self.image_id)
        feats = request.video_features
        if feats is None and n_image:
            raise ValueError(f"request {request.id!r}: a text-only prompt must not contain <image>")
        if feats is not None and (n_image != 1 or feats.ndim != 2 or feats.shape[1] != self.hidden_size):
            raise ValueError(f"request {request.id!r}: needs one <image> token and features (N, {self.hidden_size}); "
                             f"got {n_image} <image> and features of shape {tuple(feats.shape)}")
        length = len(ids) + (feats.shape[0] - 1 if feats is not None else 0)
        if length + request.max_new_tokens > self.max_len:
            raise ValueError(f"request {request.id!r}: prompt {length} + max_new_tokens {request.max_new_tokens} "
                             f"> max_len {self.max_len}")
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self._running)

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Hand waiting requests to vLLM (up to max_num_seqs in it), one vLLM step, the requests it finished."""
        while self.waiting and len(self._running) < self.settings.max_num_seqs:
            self._add(self.waiting.popleft())
        if not self._running:
            return []
        outputs = self._engine.step()
        self.stats.steps += 1
        return [self._finish(out) for out in outputs if out.finished]

    def flush(self) -> list[Completion]:
        """Nothing to read back: step() returns every request in the step vLLM finished it."""
        return []

    def run_until_idle(self) -> list[Completion]:
        done: list[Completion] = []
        while self.busy:
            done.extend(self.step())
        return done

    def close(self) -> None:
        """End vLLM's engine core (its process and memory); requests still in it are dropped."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # a core that died already has nothing left to end
            self._engine.engine_core.shutdown()

    # ---- internals

    @staticmethod
    def _prompt_list(request: Request) -> list[int]:
        return prompt_id_list(request)

    def _sampling_params(self, request: Request, ids: list[int]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from model.vllm_penalty import EXTRA_ARG

        stops = [] if request.ignore_eos else list(
            self.default_stop_ids if request.stop_ids is None else request.stop_ids)
        extra = None
        if request.repetition_penalty is not None:
            text_ids = sorted(set(ids) - {self.image_id})  # not the visual positions, as the native engine
            extra = {EXTRA_ARG: [float(request.repetition_penalty), text_ids]}
        return SamplingParams(
            temperature=0.0,
            max_tokens=request.max_new_tokens,
            min_tokens=0 if request.ignore_eos else min(request.min_new_tokens, request.max_new_tokens),
            stop_token_ids=stops,
            ignore_eos=request.ignore_eos,
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args=extra,
        )

    def _add(self, request: Request) -> None:
        ids = self._prompt_list(request)
        params = self._sampling_params(request, ids)
        feats = request.video_features
        if feats is None:
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            length = len(ids)
        else:
            input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
            embeds, _, _ = self.model.prepare_inputs(input_ids, torch.ones_like(input_ids), feats[None])
            prompt = {"prompt_embeds": embeds[0].to("cpu")}  # (L, hidden); vLLM ships it to its core on the CPU
            length = embeds.shape[1]
        rid = str(next(self._ids))
        self._engine.add_request(rid, prompt, params)
        self._running[rid] = _InFlight(request, self.stats.steps, frozenset(params.stop_token_ids or ()))
        self.stats.prefills += 1
        self.stats.prefill_tokens += length

    def _finish(self, output: Any) -> Completion:
        run = self._running.pop(output.request_id)
        result = output.outputs[0]
        ids = list(result.token_ids)
        stopped = result.finish_reason == "stop"
        if stopped and ids and ids[-1] in run.stops:
            ids = ids[:-1]  # the native engine's token ids end before the stop token
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        generation = Generation(text=text, token_ids=ids, num_tokens=len(ids), hit_max_new_tokens=not stopped)
        self.stats.completed += 1
        self.stats.useful_tokens += len(ids) + stopped
        return Completion(run.request, generation, admitted_step=run.admitted_step, finished_step=self.stats.steps - 1)
