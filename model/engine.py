"""Continuous batching for caption generation over a KV cache allocated once.

`greedy_generate` (model/generation.py) decodes a static, left-padded batch: the batch lasts as long as its
longest caption, rows that stopped early keep their place, and its `DynamicCache` grows by `torch.cat` every
step (a full copy of the cache per step). `CaptionEngine` instead keeps `num_slots` rows of a KV cache of
`max_len` positions, allocated once; a request is prefilled alone into a free slot (no padding) and then
decodes in the shared step with every other occupied slot; a slot is freed when its request stops and is
refilled on the next step, so short captions do not wait for long ones and an English caption's Chinese
follow-up can join while other captions are mid-flight.

Decoding is the same as `greedy_generate` at batch 1: greedy argmax, the CTRL repetition penalty over the
prompt's text tokens (not the visual positions) and the generated tokens, per-request stop ids, and
max_new_tokens. Everything per step stays on the device; the host reads tokens back (one `.tolist()`) every
`sync_every` steps only. A slot whose request finished between two syncs keeps decoding discarded tokens
(counted as wasted slot-steps).

Why our own `Cache` subclass (`SlotCache`) and not transformers' `StaticCache`: a `StaticLayer` keeps one
`cumulative_length` for the whole batch and writes every row at the same positions
(`index_copy_(2, cache_position, ...)`), whereas here every row is at its own position (requests are admitted
at different times, with prompts of different lengths). `SlotLayer` writes row r's new key/value at
`pos[r]` with `scatter_` into the preallocated tensors, and the decode step passes an explicit 4-D additive
float mask (num_slots, 1, 1, max_len) built from `pos`: transformers' `create_causal_mask`
(masking_utils.py, `_preprocess_mask_arguments`) returns a 4-D mask as is, and both the sdpa and eager
attention functions take an additive float mask. Shapes of the decode step never change (num_slots rows,
max_len keys), so on CUDA it can be captured in a CUDA graph (`use_cuda_graphs`).

The compiled decode step (`use_cuda_graphs` on CUDA, or any device given a `compile_backend`) is compiled with
`fullgraph=True` and `dynamic=False`: a graph break or a second graph is an error, not a silent split of the
CUDA graph. If compiling or running the compiled step fails, the engine logs one warning and decodes eagerly
from then on (the step is redone eagerly: it only scatters the same keys/values at the same positions); a
compile failure never reaches the caller, so the service never falls back to captioning clip by clip.
tests/model/test_engine_compile.py compiles the decode step on the CPU (inductor) and checks zero graph
breaks, one compile as slots fill and empty, and the eager captions.

The prefill of one request uses the cache in "prefill" mode: it reports an empty past (exactly what a fresh
`DynamicCache` reports), so transformers builds the same causal mask as the batch-1 loop, and the layer copies
the prompt's keys/values into positions 0..L-1 of the slot while handing the fresh tensors to attention,
as `DynamicCache` does on its first update.

transformers 5.24 renamed the forward's cache keyword to `cache=` (up to 5.20: `past_key_values=`); an unknown
keyword disappears into **kwargs and the model silently builds its own throwaway cache. The engine passes the
keyword the installed Llama forward takes (`generation.cache_keyword`), refuses to start when it takes neither,
and every forward checks that each layer of our cache was written exactly once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin

from model.generation import Generation, cache_keyword, stop_token_ids
from model.loading import LoadedPllava

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    id: Hashable
    prompt_ids: list[int] | torch.Tensor  # one prompt, no padding; holds one <image> iff video_features is given
    video_features: torch.Tensor | None = None  # (N_vis, D) from encode_videos, or None for a text-only prompt
    max_new_tokens: int = 64
    stop_ids: Sequence[int] | None = None  # None: the engine's default (stop_token_ids(loaded))
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_new_tokens: int = 0  # the stop ids cannot be picked before this many tokens (repairing an empty caption)


def prompt_id_list(request: Request) -> list[int]:
    """The request's prompt as a list of ids (both engines take a list or a 1-D tensor); never empty."""
    ids = request.prompt_ids
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1:
            raise ValueError(f"request {request.id!r}: prompt_ids must be 1-D, got {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    if not ids:
        raise ValueError(f"request {request.id!r}: empty prompt")
    return ids


@dataclass
class Completion:
    """A finished request: its `Generation` (same fields and decoding as generation.py) and when it ran."""

    request: Request
    generation: Generation
    admitted_step: int  # engine step whose decode produced its first token
    finished_step: int  # engine step that produced its last token (stop token or max_new_tokens-th token)

    @property
    def id(self) -> Hashable:
        return self.request.id


@dataclass
class EngineStats:
    """Counters over the engine's life. A slot-step is one row of one decode step.

    useful_tokens: tokens a request needed, i.e. its kept tokens plus the stop token when it stopped on one:
    sum(num_tokens) + sum(not hit_max_new_tokens) over completions. Every slot-step is exactly one of useful,
    wasted (the slot's request had already finished but the host had not synced yet) or idle (no request)."""

    num_slots: int = 0
    steps: int = 0
    slot_steps: int = 0
    useful_tokens: int = 0
    wasted_slot_steps: int = 0
    idle_slot_steps: int = 0
    full_steps: int = 0  # steps with every slot occupied (host view): the steady state
    full_useful_tokens: int = 0
    prefills: int = 0
    prefill_tokens: int = 0
    syncs: int = 0
    completed: int = 0
    kv_bytes_prefill: int = 0  # bytes written into the cache by prefills
    kv_bytes_decode: int = 0  # bytes written into the cache by decode steps (num_slots new positions a step)

    @property
    def utilisation(self) -> float:
        return self.useful_tokens / self.slot_steps if self.slot_steps else 0.0

    @property
    def steady_utilisation(self) -> float:
        """useful / slot-steps over the steps where every slot held a request."""
        full = self.full_steps * self.num_slots
        return self.full_useful_tokens / full if full else 0.0

    @property
    def kv_bytes_per_decode_step(self) -> float:
        return self.kv_bytes_decode / self.steps if self.steps else 0.0


# ------------------------------------------------------------------------------------------------------ cache


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, (num_slots, kv_heads, max_len, head_dim), allocated once."""

    is_compileable = False  # prefill must see transformers' usual mask path; the decode mask is explicit 4-D
    is_sliding = False

    def __init__(self, owner: SlotCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values
        self.device = keys.device
        self.max_len = keys.shape[2]
        self.is_initialized = True
        self.writes = 0  # forwards that wrote this layer: the guard against a forward without our cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        if not torch.compiler.is_compiling():  # host counters stay out of a compiled (CUDA-graph) region
            self.writes += 1
            owner.bytes_written += 2 * key_states.numel() * key_states.element_size()
        if owner.mode == "prefill":
            # key_states (1, H, L, Dh): the slot's positions 0..L-1; attention gets the fresh tensors, as from
            # a DynamicCache's first update.
            slot, length = owner.prefill_slot, key_states.shape[2]
            self.keys[slot, :, :length].copy_(key_states[0])
            self.values[slot, :, :length].copy_(value_states[0])
            return key_states, value_states
        if owner.mode == "decode":
            # key_states (S, H, 1, Dh): row r goes to position pos[r]; attention sees all max_len positions,
            # the 4-D mask hides the ones past pos[r].
            index = owner.decode_index  # (S, H, 1, Dh)
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
            return self.keys, self.values
        raise RuntimeError(f"SlotCache used outside a prefill or decode step (mode {owner.mode!r})")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.owner.mode == "prefill":
            return query_length, 0  # an empty past, as a fresh DynamicCache
        return self.max_len, 0

    def get_seq_length(self) -> int:
        return 0 if self.owner.mode == "prefill" else self.max_len

    def get_max_length(self) -> int:
        return self.max_len


class SlotCache(Cache):
    """A KV cache of `num_slots` independent rows; each row is at its own position (see the module docstring).

    `mode` is set by the engine around each forward: "prefill" (one request into `prefill_slot`) or "decode"
    (every row writes at its own position, `decode_index` from `pos`)."""

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_slots, kv_heads, max_len, head_dim)
        layers = [
            SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                      torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.num_slots, self.kv_heads, self.max_len, self.head_dim = num_slots, kv_heads, max_len, head_dim
        self.mode: str | None = None
        self.prefill_slot = 0
        self.decode_index: torch.Tensor | None = None
        self.bytes_written = 0
        if device.type == "cuda":  # fixed addresses for CUDA graphs, as transformers' StaticLayer does
            for layer in layers:
                torch._dynamo.mark_static_address(layer.keys)
                torch._dynamo.mark_static_address(layer.values)

    @property
    def nbytes(self) -> int:
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers)

    def data_ptrs(self) -> list[int]:
        return [t.data_ptr() for layer in self.layers for t in (layer.keys, layer.values)]

    def writes(self) -> list[int]:
        return [layer.writes for layer in self.layers]


def check_cache_keyword(model: torch.nn.Module) -> str:
    """The cache keyword the installed Llama forward takes (`generation.cache_keyword`); raises when it takes
    neither, so decoding never runs without our cache. `model`: a PllavaModel or a LlamaForCausalLM."""
    return cache_keyword(model)


# ------------------------------------------------------------------------------------------------- sizing


def kv_bytes_per_slot(loaded: LoadedPllava, max_len: int) -> int:
    """2 (K, V) x layers x kv_heads x head_dim x max_len x dtype size."""
    cfg = loaded.model.language_model.config
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * max_len * loaded.dtype.itemsize


def slots_for_memory(loaded: LoadedPllava, max_len: int, free_bytes: int, cap: int | None = None,
                     margin_fraction: float = 0.1) -> int:
    """How many slots fit in `free_bytes` (e.g. torch.cuda.mem_get_info()[0] after loading the model).

    Per slot: its KV (`kv_bytes_per_slot`) plus its logits (float32) and repetition mask (bool) rows. Kept
    back for activations: `margin_fraction` of free memory plus a one-request prefill of max_len tokens
    (hidden states, MLP, and one layer's attention scores in case sdpa falls back to its math kernel).
    `cap`, when given, bounds the answer (e.g. a manifest's slot count). Raises when not even one slot fits."""
    cfg = loaded.model.language_model.config
    size = loaded.dtype.itemsize
    per_slot = kv_bytes_per_slot(loaded, max_len) + cfg.vocab_size * (4 + 1)
    prefill = max_len * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * size
    prefill += cfg.num_attention_heads * max_len * max_len * 4
    reserve = int(margin_fraction * free_bytes) + prefill
    slots = (free_bytes - reserve) // per_slot if free_bytes > reserve else 0
    if slots < 1:
        raise RuntimeError(
            f"not even one slot fits: {free_bytes / 2**30:.2f} GiB free, {reserve / 2**30:.2f} GiB kept for "
            f"activations, one slot of max_len {max_len} needs {per_slot / 2**30:.3f} GiB; lower max_len or "
            f"free memory"
        )
    return int(min(slots, cap)) if cap is not None else int(slots)


# ------------------------------------------------------------------------------------------------- engine


def _describe(error: BaseException) -> str:
    """`Type: ` and the first two lines of the message (a BackendCompilerFailed names the backend's own error on
    its second line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines[:2])}"


@dataclass
class _Running:
    request: Request
    slot: int
    admitted_step: int
    tokens: list[int] = field(default_factory=list)
    done: bool = False


class CaptionEngine:
    """Continuous batching over `num_slots` rows of a preallocated KV cache (see the module docstring).

    engine.submit(request); engine.step() -> completions of this step; engine.run_until_idle();
    engine.generate(requests) yields completions as they finish."""

    def __init__(self, loaded: LoadedPllava, num_slots: int, max_len: int, sync_every: int = 4,
                 use_cuda_graphs: bool = False, max_stop_ids: int = 8,
                 compile_backend: str | Callable | None = None):
        """use_cuda_graphs: compile the decode step; on CUDA with inductor's CUDA graphs (reduce-overhead), on
        other devices only when `compile_backend` is given. compile_backend: a `torch.compile` backend (a name or
        a callable) for the decode step instead of inductor with CUDA graphs: how the compiled path is tested
        without a GPU (see the module docstring)."""
        if num_slots < 1 or max_len < 2 or sync_every < 1:
            raise ValueError(f"need num_slots >= 1, max_len >= 2, sync_every >= 1; got {num_slots}, {max_len}, "
                             f"{sync_every}")
        model = loaded.model
        self.cache_keyword = check_cache_keyword(model)
        lm = model.language_model
        impl = lm.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"the decode step passes a 4-D float mask: needs sdpa or eager attention, not {impl}")
        self.loaded, self.model, self.lm = loaded, model, lm
        self.tokenizer = loaded.tokenizer
        self.num_slots, self.max_len, self.sync_every = num_slots, max_len, sync_every
        self.device, self.dtype = model.device, model.dtype
        cfg = lm.config
        kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = SlotCache(cfg.num_hidden_layers, num_slots, kv_heads, max_len, head_dim, self.dtype,
                               self.device)
        self.vocab_size = lm.get_output_embeddings().out_features
        self.default_stop_ids = stop_token_ids(loaded)
        self.max_stop_ids = max(max_stop_ids, len(self.default_stop_ids))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.image_id = loaded.config.image_token_index

        s, dev = num_slots, self.device
        self.logits = torch.zeros(s, self.vocab_size, dtype=torch.float32, device=dev)  # next-token logits
        self.seen = torch.zeros(s, self.vocab_size, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(s, dtype=torch.long, device=dev)  # where the next input token is written
        self.n_gen = torch.zeros(s, dtype=torch.long, device=dev)
        self.max_new = torch.ones(s, dtype=torch.long, device=dev)
        self.min_new = torch.zeros(s, dtype=torch.long, device=dev)
        self.active = torch.zeros(s, dtype=torch.bool, device=dev)
        self.penalty = torch.ones(s, dtype=torch.float32, device=dev)
        self.has_penalty = torch.zeros(s, dtype=torch.bool, device=dev)
        self.ignore_eos = torch.zeros(s, dtype=torch.bool, device=dev)
        self.stops = torch.full((s, self.max_stop_ids), -1, dtype=torch.long, device=dev)
        self._rows = torch.arange(s, device=dev)
        self._key_positions = torch.arange(max_len, device=dev)
        self._decode_bytes = num_slots * kv_bytes_per_slot(loaded, 1)  # one new position per row
        self._mask_min = torch.finfo(self.dtype).min

        self.waiting: deque[Request] = deque()
        self.slots: list[_Running | None] = [None] * s
        self._history: list[tuple[torch.Tensor, list[_Running | None]]] = []
        self.stats = EngineStats(num_slots=num_slots)

        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = bool(use_cuda_graphs and on_cuda and compile_backend is None)
        self._compiled_decode = None
        if use_cuda_graphs and (on_cuda or compile_backend is not None):
            # The decode forward has static shapes (num_slots rows, max_len keys, cache tensors at fixed
            # addresses), which is what reduce-overhead's CUDA graphs need; on the CPU, inductor compiles the
            # same graph (tests/model/test_engine_compile.py). Prefill stays eager (its length varies). The
            # per-forward cache guard counts on the host, which a compiled step does not do: the first decode
            # step runs eager and guarded (proving the keyword reaches our cache), later ones compiled.
            options = {"backend": compile_backend} if compile_backend is not None else {"mode": "reduce-overhead"}
            self._compiled_decode = torch.compile(self._decode_forward, fullgraph=True, dynamic=False, **options)
        self.compiled_steps = 0  # decode steps that ran compiled
        self.compile_error: str | None = None  # why the engine went back to eager decoding, once it did
        self._eager_decodes = 0

    # ---- public API

    def submit(self, request: Request) -> None:
        ids = self._prompt_list(request)
        if request.max_new_tokens < 1:
            raise ValueError(f"request {request.id!r}: max_new_tokens must be >= 1, got {request.max_new_tokens}")
        n_image = ids.count(self.image_id)
        if request.video_features is None and n_image:
            raise ValueError(f"request {request.id!r}: a text-only prompt must not contain <image>")
        if request.video_features is not None:
            if n_image != 1 or request.video_features.ndim != 2:
                raise ValueError(f"request {request.id!r}: needs one <image> token and features (N, D); got "
                                 f"{n_image} <image> and features of shape {tuple(request.video_features.shape)}")
        length = self._prefill_length(request, ids)
        if length + request.max_new_tokens > self.max_len:
            raise ValueError(f"request {request.id!r}: prompt {length} + max_new_tokens {request.max_new_tokens} "
                             f"> max_len {self.max_len}")
        stops = self._stop_ids(request)
        if len(stops) > self.max_stop_ids:
            raise ValueError(f"request {request.id!r}: {len(stops)} stop ids, the engine holds {self.max_stop_ids}")
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit waiting requests into free slots, then one decode step for all slots; every `sync_every`
        steps read the tokens back and return the requests that finished."""
        for slot in range(self.num_slots):
            if not self.waiting:
                break
            if self.slots[slot] is None:
                self._admit(self.waiting.popleft(), slot)
        if all(r is None for r in self.slots):
            return self._sync() if self._history else []
        self._history.append((self._decode_step(), list(self.slots)))
        self.stats.steps += 1
        if len(self._history) >= self.sync_every:
            return self._sync()
        return []

    def flush(self) -> list[Completion]:
        """Read back what has been decoded so far (a host sync), outside the sync_every rhythm."""
        with torch.inference_mode():
            return self._sync() if self._history else []

    def run_until_idle(self) -> list[Completion]:
        done: list[Completion] = []
        while self.busy:
            done.extend(self.step())
        return done + self.flush()

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        for request in requests:
            self.submit(request)
        while self.busy:
            yield from self.step()
        yield from self.flush()

    # ---- internals

    @staticmethod
    def _prompt_list(request: Request) -> list[int]:
        return prompt_id_list(request)

    @staticmethod
    def _prefill_length(request: Request, ids: list[int]) -> int:
        extra = request.video_features.shape[0] - 1 if request.video_features is not None else 0
        return len(ids) + extra

    def _stop_ids(self, request: Request) -> list[int]:
        if request.ignore_eos:
            return []
        return list(self.default_stop_ids if request.stop_ids is None else request.stop_ids)

    def _lm_forward(self, **inputs) -> torch.Tensor:
        return self.lm(**inputs, **{self.cache_keyword: self.cache}, use_cache=True).logits

    def _guarded(self, fn, *args, **kwargs) -> torch.Tensor:
        """Run a forward through our cache (eager) and check that it wrote every layer exactly once."""
        before = self.cache.writes()
        out = fn(*args, **kwargs)
        if self.cache.writes() != [w + 1 for w in before]:
            raise RuntimeError(
                f"the language model's forward did not write the engine's KV cache (layer writes {before} -> "
                f"{self.cache.writes()}): the cache keyword {self.cache_keyword!r} was not taken by transformers "
                f"{transformers.__version__}; decoding would run without it"
            )
        return out

    def _admit(self, request: Request, slot: int) -> None:
        ids = self._prompt_list(request)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        mask = torch.ones_like(input_ids)
        feats = request.video_features
        embeds, mask, position_ids = self.model.prepare_inputs(
            input_ids, mask, feats[None] if feats is not None else None
        )
        length = embeds.shape[1]
        cache = self.cache
        cache.mode, cache.prefill_slot = "prefill", slot
        bytes_before = cache.bytes_written
        try:
            logits = self._guarded(self._lm_forward, inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                   logits_to_keep=1)
        finally:
            cache.mode = None
        self.stats.kv_bytes_prefill += cache.bytes_written - bytes_before
        self.stats.prefills += 1
        self.stats.prefill_tokens += length

        self.logits[slot] = logits[0, -1].float()
        self.pos[slot] = length
        self.n_gen[slot] = 0
        self.max_new[slot] = request.max_new_tokens
        self.min_new[slot] = 0 if request.ignore_eos else request.min_new_tokens
        self.active[slot] = True
        penalty = request.repetition_penalty
        self.has_penalty[slot] = penalty is not None
        self.penalty[slot] = 1.0 if penalty is None else penalty
        self.ignore_eos[slot] = request.ignore_eos
        self.stops[slot] = -1
        stops = self._stop_ids(request)
        if stops:
            self.stops[slot, : len(stops)] = torch.tensor(stops, dtype=torch.long, device=self.device)
        self.seen[slot] = False
        if penalty is not None:
            text = input_ids[0][input_ids[0] != self.image_id]
            self.seen[slot, text] = True
        self.slots[slot] = _Running(request, slot, admitted_step=self.stats.steps)

    def _decode_forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(S,) tokens at (S,) positions -> (S, V) float32 logits. Static shapes: the CUDA-graph region."""
        cache = self.cache
        cache.decode_index = pos.view(-1, 1, 1, 1).expand(-1, cache.kv_heads, 1, cache.head_dim)
        visible = self._key_positions[None, :] <= pos[:, None]  # (S, max_len)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, self._mask_min)[:, None, None, :]  # (S, 1, 1, max_len) additive
        logits = self._lm_forward(inputs_embeds=self.model.embed_tokens(tokens[:, None]), attention_mask=mask,
                               position_ids=pos[:, None])
        return logits[:, -1].float()

    def _decode_step(self) -> torch.Tensor:
        """Pick every slot's next token from its logits, then one forward for all slots. Returns a (3, S)
        device tensor: token, valid (the slot's request was still generating), stopped on a stop id."""
        logits = self.logits
        penalised = torch.where(logits > 0, logits / self.penalty[:, None], logits * self.penalty[:, None])
        logits = torch.where(self.has_penalty[:, None] & self.seen, penalised, logits)
        # min_new_tokens: a slot's stop ids score -inf until it has generated that many (static shapes: every
        # slot, every step; padding entries of `stops` are -1 and left alone)
        suppress = (self.n_gen < self.min_new)[:, None] & (self.stops >= 0)  # (S, max_stop_ids)
        stop_cols = self.stops.clamp(min=0)
        logits = logits.scatter(1, stop_cols, torch.where(suppress, float("-inf"), logits.gather(1, stop_cols)))
        token = logits.argmax(-1)  # (S,)
        valid = self.active
        stop_hit = valid & ~self.ignore_eos & (token[:, None] == self.stops).any(-1)
        token = token.masked_fill(~valid, self.pad_id)
        self.seen[self._rows, token] |= valid
        self.n_gen += valid.long()
        still = valid & ~stop_hit & (self.n_gen < self.max_new)
        record = torch.stack([token, valid.long(), stop_hit.long()])

        cache = self.cache
        cache.mode = "decode"
        bytes_before = cache.bytes_written
        try:
            logits = self._compiled_step(token) if self._compiled_decode is not None and self._eager_decodes else None
            if logits is None:
                logits = self._guarded(self._decode_forward, token, self.pos)
                self._eager_decodes += 1
            # a CUDA graph's output is overwritten by its next replay, and admissions write rows of it
            self.logits = logits.clone() if self.cuda_graphs else logits
        finally:
            cache.mode = None
        self.stats.kv_bytes_decode += cache.bytes_written - bytes_before
        self.pos += still.long()
        self.active = still
        return record

    def _compiled_step(self, token: torch.Tensor) -> torch.Tensor | None:
        """The decode forward through the compiled step; None when it failed (then never again: one warning,
        eager decoding from here on). Redoing the step eagerly is safe: a decode forward only scatters each
        slot's new key/value at its `pos`, and the eager redo writes the same values at the same positions."""
        try:
            logits = self._compiled_decode(token, self.pos)
        except Exception as e:  # noqa: BLE001 - any compile or graph failure: eager decoding still gives the captions
            self._compiled_decode = None
            self.cuda_graphs = False
            self.compile_error = _describe(e)
            log.warning("compiling the decode step failed after %d compiled steps (%s); decoding eagerly from now "
                        "on", self.compiled_steps, self.compile_error)
            return None
        self.cache.bytes_written += self._decode_bytes  # the compiled step does not count on the host
        self.compiled_steps += 1
        return logits

    def _sync(self) -> list[Completion]:
        records = torch.stack([r for r, _ in self._history]).tolist()  # (k, 3, S): the one host sync
        occupants = [o for _, o in self._history]
        first_step = self.stats.steps - len(self._history)
        self._history = []
        self.stats.syncs += 1
        stats = self.stats
        finished: list[Completion] = []
        for i, ((tokens, valid, stopped), slots) in enumerate(zip(records, occupants)):
            step = first_step + i
            stats.slot_steps += self.num_slots
            full = all(r is not None for r in slots)
            stats.full_steps += full
            for slot, run in enumerate(slots):
                if run is None:
                    stats.idle_slot_steps += 1
                    continue
                if run.done:
                    if valid[slot]:
                        raise AssertionError(f"slot {slot}: device still decoding a request the host finished")
                    stats.wasted_slot_steps += 1
                    continue
                if not valid[slot]:
                    raise AssertionError(f"slot {slot}: device stopped a request the host has not finished")
                stats.useful_tokens += 1
                stats.full_useful_tokens += full
                if stopped[slot]:
                    finished.append(self._finish(run, step, stopped=True))
                else:
                    run.tokens.append(tokens[slot])
                    if len(run.tokens) == run.request.max_new_tokens:
                        finished.append(self._finish(run, step, stopped=False))
        return finished

    def _finish(self, run: _Running, step: int, stopped: bool) -> Completion:
        run.done = True
        self.slots[run.slot] = None  # reusable from the next step on
        self.stats.completed += 1
        ids = run.tokens
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        generation = Generation(text=text, token_ids=ids, num_tokens=len(ids), hit_max_new_tokens=not stopped)
        return Completion(run.request, generation, admitted_step=run.admitted_step, finished_step=step)
