"""One continuous-batching engine fed by every shard an actor holds: English and Chinese in one scheduler.

`CaptionService` owns an engine and a model thread. The engine is the native `model.engine.CaptionEngine` or
vLLM's (`model.vllm_engine.VllmEngine`), as `generation.engine` chooses (pipeline/engine_choice.py); both take
`submit(Request)`, `step()` -> finished `Completion`s, `flush()`, `busy`, `waiting`, so everything below
drives either the same way. Shard runners `open()` a `Ticket`,
`submit()` decoded clips to it and take finished rows from it as they complete (not in input order). On the
model thread each clip goes: CLIP (in batches of `generation.batch_size`) → its English request → as soon as
that finishes, its Chinese request (translate: text-only prompt over the English caption; direct: a second
visual request over the same features) into the same engine; `mt` captions are translated in small batches
by the seq2seq model as English captions complete. Because tickets share the engine, the next shard's clips
are admitted while the last clips of the current one are still generating: no drain at shard ends.

Captions are those of the batch-1 loop (the engine's tests prove token identity). A failure inside the
engine never takes a shard down: the clips in flight are captioned again one by one by the static path
(`Captioner.caption_batch`), which isolates a bad clip into an `error` row.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from model.engine import CaptionEngine, Request, slots_for_memory
from model.generation import Generation
from pipeline.captioning import Captioner
from pipeline.engine_choice import NATIVE, VLLM, EngineChoice, choose_engine, native_version, vllm_version
from pipeline.frames import DecodedClip
from pipeline.manifest import VllmSpec
from pipeline.prompt_fields import FIELDS
from pipeline.repair import Attempt, GenSettings, best, max_budget, next_settings
from pipeline.shards import Sample
from pipeline.stats import Stats

log = logging.getLogger(__name__)

CPU_SLOTS = 8  # on a CPU more slots only queue behind the same cores
MAX_CUDA_SLOTS = 128


class Ticket:
    """One shard's clips in the service: rows come back through `take()`; `cancel()` drops what is left."""

    def __init__(self, service: CaptionService, name: str):
        self.service, self.name = service, name
        self.outstanding = 0  # submitted, row not yet taken by the service's caller
        self.cancelled = False
        self._rows: deque[dict[str, Any]] = deque()

    def take(self) -> list[dict[str, Any]]:
        with self.service._cv:
            rows = list(self._rows)
            self._rows.clear()
            return rows

    def wait(self, timeout: float) -> None:
        """Until a row is ready or nothing is outstanding (or the timeout)."""
        with self.service._cv:
            self.service._cv.wait_for(lambda: self._rows or not self.outstanding or self.service._error,
                                      timeout=timeout)

    def cancel(self) -> None:
        with self.service._cv:
            self.cancelled = True
            self.service._cv.notify_all()


@dataclass(eq=False)  # identity: one object per clip in flight
class _Clip:
    ticket: Ticket
    sample: Sample
    clip: DecodedClip
    features: torch.Tensor | None = None  # kept while a request may still need them (repairs, direct mode)
    score_image: torch.Tensor | None = None  # frame embedding for clip_score (score.model)
    settings: Any = None  # GenSettings of the request in the engine
    en: list[Attempt] = field(default_factory=list)
    zh: list[Attempt] = field(default_factory=list)


# Tokens allowed for each metadata field a prompt names ({source_caption}, ...); a clip whose filled prompt is
# longer than the cache holds is captioned by the static path instead.
FIELD_TOKENS = 96


def token_budget(captioner: Captioner) -> int:
    """Cache length per slot: the longest prompt (visual tokens expanded, the repair pass's language hint, the
    metadata fields) plus the largest token budget an attempt may have (a repair of a truncated caption)."""
    loaded, c = captioner.loaded, captioner
    tok = loaded.tokenizer
    visual = math.prod(loaded.config.pooling_shape)
    repairing = c.repair_attempts > 0
    hint = GenSettings(1, language_hint=repairing)
    fields = FIELD_TOKENS * len(FIELDS) if c.uses_fields else 0
    en_new = max_budget(c.base_en.max_new_tokens) if repairing else c.base_en.max_new_tokens
    zh_new = max_budget(c.base_zh.max_new_tokens) if repairing else c.base_zh.max_new_tokens

    def length(prompt: str) -> int:
        return len(tok(prompt)["input_ids"]) + fields

    need = [length(c.prompt_en_for(None, None, hint)) - 1 + visual + en_new]
    if c.want_zh and c.zh_mode == "direct":
        need.append(length(c.prompt_zh_direct_for(None, None, hint)) - 1 + visual + zh_new)
    if c.want_zh and c.zh_mode == "translate":
        # the English caption re-tokenised can come out a little longer than its generated ids
        need.append(length(c.translate_prompt("", None, None, hint)) + int(en_new * 1.25) + 16 + zh_new)
    return max(need)


def choose_slots(captioner: Captioner, max_len: int) -> int:
    """`generation.slots` when set; on CUDA as many as fit in free memory (capped); on a CPU a few."""
    requested = captioner.settings.generation.slots
    if captioner.device == "cpu" or not torch.cuda.is_available():
        return requested or CPU_SLOTS
    free, _ = torch.cuda.mem_get_info(torch.device(captioner.device))
    return slots_for_memory(captioner.loaded, max_len, free, cap=requested or MAX_CUDA_SLOTS)


def vllm_settings(spec: VllmSpec, device: str) -> Any:
    """`generation.vllm` as model/vllm_engine.py takes it (model/ does not import pipeline/); a field left out
    (None) keeps VllmSettings' default."""
    from model.vllm_engine import VllmSettings

    fields = {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
    if not device.startswith("cuda"):
        fields["tensor_parallel_size"] = 1  # vLLM's CPU build: one process; the actor has no GPUs to split over
    return VllmSettings(**fields)


# vLLM engines started afresh after failed steps before an actor turns to the native engine for good: each
# start takes a minute, and an engine that keeps failing is a broken install or card, not a bad clip (the clips
# held at a failure are captioned one by one by the static path either way).
VLLM_RESTARTS = 2


class CaptionService:
    def __init__(self, captioner: Captioner, *, num_slots: int | None = None, threaded: bool = True,
                 engine: Any = None):
        """`engine`: one already built for this captioner's model, of the kind `generation.engine` chooses (tests
        share a vLLM engine, a minute to start, between services); by default the service builds it."""
        self.captioner = captioner
        m = captioner.settings
        self.max_len = token_budget(captioner)
        self.engine_choice: EngineChoice = choose_engine(m.generation.engine, captioner.device, vllm_version())
        if engine is not None and getattr(engine, "name", NATIVE) != self.engine_choice.kind:
            raise ValueError(f"an engine of kind {getattr(engine, 'name', NATIVE)!r} given to a service whose "
                             f"generation.engine chooses {self.engine_choice.kind!r}")
        self.num_slots = num_slots or self._slots()
        self.engine = engine if engine is not None else self._new_engine()
        self._cv = threading.Condition()
        self._inbox: deque[_Clip] = deque()  # submitted, not yet encoded
        self._mt: list[_Clip] = []  # English done, waiting for the seq2seq translator (zh.mode mt)
        self._request_ids = itertools.count()
        self._requests: dict[Any, _Clip] = {}  # engine request id -> clip
        self._error: BaseException | None = None
        self.stats = Stats()  # clips encoded, model/idle seconds, restarts, fallbacks (pipeline/stats.py)
        self.encode_batch = m.generation.batch_size
        # decoded clips waiting here are uint8 frames (~5 MB each): bound them
        self.max_queued = max(2 * self.num_slots, 2 * self.encode_batch)
        self.reading = threading.Lock()  # one shard reads and decodes at a time; the engine is shared
        self._closed = False
        self._thread: threading.Thread | None = None
        if threaded:
            # The thread holds the service only through a weak reference between iterations, so a service
            # (and its model) nobody uses any more is freed, and its thread ends.
            self._thread = threading.Thread(target=CaptionService._loop, args=(weakref.ref(self),),
                                            name="caption-engine", daemon=True)
            self._thread.start()

    def _slots(self) -> int:
        """Requests decoded together: vLLM's max_num_seqs, or the native engine's KV-cache slots."""
        c = self.captioner
        if self.engine_choice.kind == VLLM:
            return vllm_settings(c.settings.generation.vllm, c.device).max_num_seqs
        return choose_slots(c, self.max_len)

    def _new_engine(self) -> Any:
        """The engine `engine_choice` names. vLLM is imported only here: the project runs without it."""
        c, g = self.captioner, self.captioner.settings.generation
        if self.engine_choice.kind == VLLM:
            from model.vllm_engine import VllmEngine

            return VllmEngine(c.loaded, identity=self._model_identity(), max_len=self.max_len,
                              settings=vllm_settings(g.vllm, c.device))
        return CaptionEngine(c.loaded, self.num_slots, self.max_len, sync_every=g.sync_every,
                             use_cuda_graphs=g.cuda_graphs and c.device != "cpu")

    def _model_identity(self) -> str:
        """The checkpoint's content digest: the driver's (CaptionSettings.model_identity), else hashed here (a
        service built outside a job: tests, benchmarks; per-file hashes are cached, pipeline/model_identity.py)."""
        from pipeline.model_identity import model_identity

        m = self.captioner.settings
        return m.model_identity or model_identity(m.model.path).digest

    # ---- shard side

    def open(self, name: str) -> Ticket:
        return Ticket(self, name)

    def submit(self, ticket: Ticket, sample: Sample, clip: DecodedClip, timeout: float | None = None) -> bool:
        """Queue a decoded clip; False when the queue stayed full for `timeout` seconds (the caller checks its
        deadline and tries again). Raises if the model thread died."""
        with self._cv:
            if not self._cv.wait_for(lambda: len(self._inbox) < self.max_queued or self._error, timeout=timeout):
                return False
            if self._error is not None:
                raise RuntimeError(f"the captioning engine stopped: {self._error}") from self._error
            self._inbox.append(_Clip(ticket, sample, clip))
            ticket.outstanding += 1
            self._cv.notify_all()
            return True

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the captioning engine stopped: {self._error}") from self._error

    def caption_all(self, items: list[tuple[Sample, DecodedClip]]) -> list[dict[str, Any]]:
        """All items through the engine on the calling thread (a service made with threaded=False): for tests
        and benchmarks. Rows in completion order."""
        ticket = self.open("inline")
        for sample, clip in items:
            self._inbox.append(_Clip(ticket, sample, clip))
            ticket.outstanding += 1
        while ticket.outstanding:
            self._work()
        return ticket.take()

    # ---- model thread

    @staticmethod
    def _loop(ref: weakref.ReferenceType[CaptionService]) -> None:
        while (self := ref()) is not None and not self._closed:
            if not self._iterate():
                return
            del self

    def _iterate(self) -> bool:
        """Wait (up to 1 s) for work, then one round of it; False when the thread must end."""
        with self._cv:
            t = time.perf_counter()
            self._cv.wait_for(lambda: self._inbox or self._busy() or self._closed, timeout=1.0)
            self.stats.idle_s += time.perf_counter() - t
        t = time.perf_counter()
        try:
            self._work()
        except BaseException as e:  # never silently: the shards waiting on it raise with this
            log.exception("captioning engine thread failed")
            with self._cv:
                self._error = e
                self._cv.notify_all()
            return False
        finally:
            self.stats.model_s += time.perf_counter() - t
        return True

    def close(self) -> None:
        """End the model thread (clips still queued are not captioned)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _busy(self) -> bool:
        return self.engine.busy or bool(self._mt)

    def _work(self) -> None:
        """Encode what the engine can take soon, one engine step, hand out what finished."""
        self._drop_cancelled()
        if len(self.engine.waiting) < self.encode_batch:
            with self._cv:
                batch = [self._inbox.popleft() for _ in range(min(self.encode_batch, len(self._inbox)))]
                self._cv.notify_all()  # room in the queue
            if batch:
                self._start(batch)
        try:
            done = self.engine.step() if self.engine.busy else []
            if not self.engine.busy:
                done += self.engine.flush()
        except Exception as e:
            self._recover(e)
            return
        for completion in done:
            self._completed(completion)
        if self._mt and (len(self._mt) >= self.encode_batch or not (self.engine.busy or self._inbox)):
            self._translate_mt()

    def _start(self, batch: list[_Clip]) -> None:
        c = self.captioner
        try:
            features = c.encode([(x.sample, x.clip) for x in batch])
        except Exception as e:
            log.warning("visual encoding of %d clips failed (%s); captioning them one by one", len(batch), e)
            for x in batch:
                self._fallback(x)
            return
        self.stats.clips += len(batch)
        c.stats.clips += len(batch)
        for x, s in zip(batch, c.score_images([(x.sample, x.clip) for x in batch])):
            x.score_image = s
        for x, f in zip(batch, features):
            x.features = f  # until the English is final (repairs), or the Chinese too (direct mode)
            self._submit_en(x, c.base_en)

    def _ids(self, prompt: str) -> list[int]:
        return self.captioner.loaded.tokenizer(prompt)["input_ids"]

    def _submit_en(self, x: _Clip, settings: GenSettings) -> None:
        self._submit(x, "en", self._ids(self.captioner.prompt_en_for(x.sample, x.clip, settings)), x.features,
                     settings)

    def _submit_zh(self, x: _Clip, settings: GenSettings) -> None:
        c = self.captioner
        if c.zh_mode == "direct":
            ids, features = self._ids(c.prompt_zh_direct_for(x.sample, x.clip, settings)), x.features
        else:  # translate: text only, over the kept English caption
            ids, features = self._ids(c.translate_prompt(best(x.en).text, x.sample, x.clip, settings)), None
        self._submit(x, "zh", ids, features, settings)

    def _submit(self, x: _Clip, kind: str, ids: list[int], features: torch.Tensor | None,
                settings: GenSettings) -> None:
        c = self.captioner
        rid = (next(self._request_ids), kind)
        x.settings = settings
        request = Request(rid, ids, features, max_new_tokens=settings.max_new_tokens,
                          repetition_penalty=settings.repetition_penalty, min_new_tokens=settings.min_new_tokens,
                          ignore_eos=c.ignore_eos)
        try:
            self.engine.submit(request)
        except ValueError as e:  # longer than the cache holds (an unusual caption): the static path does it
            log.warning("key %s: %s; captioning it with the static path", x.sample.key, e)
            self._fallback(x)
            return
        self._requests[rid] = x

    def _completed(self, completion: Any) -> None:
        """An English or Chinese request finished: judge it, repair it when due, else go on to the next pass
        (or deliver the row)."""
        x = self._requests.pop(completion.id)
        c = self.captioner
        if x.ticket.cancelled:
            return self._deliver(x, None)
        language = completion.id[1]
        attempts = x.en if language == "en" else x.zh
        attempts.append(c.attempt(completion.generation, language, x.settings))
        if c.repair_due(attempts, language):
            settings = next_settings(attempts, (c.base_en if language == "en" else c.base_zh).max_new_tokens)
            return self._submit_en(x, settings) if language == "en" else self._submit_zh(x, settings)
        if language == "zh" or not c.want_zh:
            return self._deliver(x, c.build_row(x.sample, x.clip, x.en, x.zh if c.want_zh else None, x.score_image))
        if c.zh_mode == "mt":
            self._mt.append(x)
        elif c.zh_mode == "translate" and not best(x.en).text.strip():  # nothing to translate (as the static path)
            nothing = Generation(text="", token_ids=[], num_tokens=0, hit_max_new_tokens=False)
            self._deliver(x, c.build_row(x.sample, x.clip, x.en, [c.attempt(nothing, "zh", c.base_zh)], x.score_image))
        else:
            self._submit_zh(x, c.base_zh)
        return None

    def _translate_mt(self) -> None:
        c, m = self.captioner, self.captioner.settings
        batch, self._mt = self._mt, []
        live = [x for x in batch if not x.ticket.cancelled]
        for x in batch:
            if x.ticket.cancelled:
                self._deliver(x, None)
        if not live:
            return
        try:
            out = c.translator.translate([best(x.en).text for x in live], max_new_tokens=m.zh.max_new_tokens,
                                         batch_size=len(live))
        except Exception as e:
            log.warning("translating %d captions failed (%s); captioning them one by one", len(live), e)
            for x in live:
                self._fallback(x)
            return
        for x, t in zip(live, out):
            self._deliver(x, c.build_row(x.sample, x.clip, x.en, [c.attempt(t, "zh", c.base_zh)], x.score_image))

    def _recover(self, error: Exception) -> None:
        """The engine failed mid-step: a fresh engine (the failed one may still hold requests whose completions
        must never come back, or be dead), and the clips it held captioned one by one by the static path."""
        log.warning("captioning engine step failed (%s: %s); %d clips in flight go through the static path",
                    type(error).__name__, error, len(self._requests))
        held = list(dict.fromkeys(self._requests.values()))
        self._requests.clear()
        # vLLM's engine core is a process of its own holding most of the GPU's memory: end it first, and caption
        # the held clips before the next engine takes that memory again.
        if hasattr(self.engine, "close"):
            self.engine.close()
        for x in held:
            self._fallback(x)
        if self.engine_choice.kind == VLLM and self.stats.engine_restarts >= VLLM_RESTARTS:
            self.engine_choice = EngineChoice(NATIVE, native_version(), f"vLLM failed {VLLM_RESTARTS + 1} times "
                                              f"(last: {type(error).__name__}: {error})"[:300])
            log.warning("the native engine takes over for the rest of this actor: %s", self.engine_choice.reason)
            self.num_slots = self._slots()
        self.engine = self._new_engine()
        self.stats.engine_restarts += 1

    def _fallback(self, x: _Clip) -> None:
        self.stats.fallbacks += 1
        row = None if x.ticket.cancelled else self.captioner.caption_batch([(x.sample, x.clip)])[0]
        self._deliver(x, row)

    def _deliver(self, x: _Clip, row: dict[str, Any] | None) -> None:
        x.features = None
        with self._cv:
            x.ticket.outstanding -= 1
            if row is not None and not x.ticket.cancelled:
                x.ticket._rows.append(row)
            self._cv.notify_all()

    def _drop_cancelled(self) -> None:
        with self._cv:
            if not any(x.ticket.cancelled for x in self._inbox):
                return
            keep = deque()
            for x in self._inbox:
                if x.ticket.cancelled:
                    x.ticket.outstanding -= 1
                else:
                    keep.append(x)
            self._inbox = keep
            self._cv.notify_all()
