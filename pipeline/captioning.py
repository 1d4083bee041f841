"""From decoded clips to caption rows: the English visual pass, the Chinese pass, quality guards.

Plain Python over model/: no Ray, no files. `Captioner.caption_batch` never raises for a bad batch;
it retries clip by clip and turns what still fails into `error` rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from model.describe import describe_checkpoint
from model.generation import Generation, generate_captions, generate_text
from model.loading import load_pllava
from pipeline.chinese import normalize_zh
from pipeline.frames import DecodedClip, normalize_frames
from pipeline.manifest import Manifest
from pipeline.prompt_fields import clip_fields, fill_fields, has_fields
from pipeline.quality import detect_flags
from pipeline.repair import LANGUAGE_HINT, Attempt, GenSettings, best, needs_repair, next_settings
from pipeline.rows import Failure, Row, Status, failure_row
from pipeline.settings import CaptionSettings
from pipeline.shards import Sample
from pipeline.stats import Stats

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


class Captioner:
    """One loaded PLLaVA (and optional translator) and the prompts of one job."""

    @classmethod
    def from_manifest(cls, m: Manifest, **kwargs: Any) -> Captioner:
        return cls(CaptionSettings.from_manifest(m), **kwargs)

    def __init__(self, settings: CaptionSettings, *, ignore_eos: bool = False):
        """`ignore_eos` forces every caption to max_new_tokens: for benchmarks with random weights only."""
        self.settings = m = settings
        self.ignore_eos = ignore_eos
        self.device = resolve_device(m.model.device)
        dtype = m.model.dtype if self.device != "cpu" else "float32"  # bf16/fp16 matmuls are slow on CPUs
        # The checkpoint's facts, decided once (model/describe.py): decode settings, mean/std, prompts. The
        # driver computes the same description for the fingerprint and the dataset card.
        self.description = describe_checkpoint(m.model.path)
        self.loaded = load_pllava(
            m.model.path,
            lora_alpha=m.model.lora_alpha,
            dtype=dtype,
            device=self.device,
            attn_implementation=m.model.attn_implementation,
            allow_pickle=m.model.allow_pickle,
            description=self.description,
        )
        template = self.description.template
        self.prompts = self.description.prompts(m.prompts)
        self.prompt_en = template.format(self.prompts.en, with_image=True)  # as written, before a clip's fields
        self.want_zh = "zh" in m.languages
        self.zh_mode = m.zh.mode
        self.prompt_zh_direct = template.format(self.prompts.zh_direct, with_image=True)
        self.zh_translate_question = self.prompts.zh_translate
        self.uses_fields = any(has_fields(t) for t in (self.prompts.en, self.prompts.zh_direct,
                                                       self.prompts.zh_translate))
        self.repair_attempts = m.quality.repair_attempts
        self.base_en = GenSettings(m.generation.max_new_tokens, m.generation.repetition_penalty)
        self.base_zh = GenSettings(m.zh.max_new_tokens, m.generation.repetition_penalty)
        self.translator = None
        if self.want_zh and self.zh_mode == "mt":
            from model.translation import load_translator

            self.translator = load_translator(m.zh.mt_model, dtype=dtype, device=self.device,
                                              source_prefix=m.zh.mt_source_prefix)
        self.scorer = None  # score.model: caption <-> clip similarity (model/clip_score.py)
        if m.score.model:
            from model.clip_score import ClipScorer

            self.scorer = ClipScorer(m.score.model, device=self.device, dtype=dtype, frames=m.score.frames,
                                     allow_pickle=m.score.allow_pickle)
        self.prompt_version = self.prompts.version
        self.model_name = self.loaded.name
        self.lora_alpha = self.loaded.lora_alpha
        self.stats = Stats()  # what the model side did, for logs and benchmarks
        self._echo_texts = [t for t in (template.system, self.prompts.en) if t]
        # Chinese echo: the instruction of the pass that wrote it (never the English caption itself, which a
        # faithful translation legitimately overlaps).
        instruction = self.zh_translate_question.replace("{caption}", "")
        self._echo_texts_zh = [t for t in (template.system, template.text_system, instruction,
                                           self.prompts.zh_direct) if t.strip()]

    # ---- prompts (pipeline/prompt_fields.py fills a clip's metadata into them)

    def prompt_en_for(self, sample: Sample, clip: Any, settings: GenSettings) -> str:
        """The English visual prompt for one clip: its metadata filled in, the language hint when repairing."""
        return self.description.template.format(self._question(self.prompts.en, "en", sample, clip, settings),
                                                with_image=True)

    def prompt_zh_direct_for(self, sample: Sample, clip: Any, settings: GenSettings) -> str:
        return self.description.template.format(
            self._question(self.prompts.zh_direct, "zh", sample, clip, settings), with_image=True)

    def translate_prompt(self, caption_en: str, sample: Sample | None = None, clip: Any = None,
                         settings: GenSettings | None = None) -> str:
        """The text-only prompt of the `translate` pass for one English caption."""
        question = self._question(self.zh_translate_question, "zh", sample, clip, settings)
        return self.description.template.format(question.replace("{caption}", caption_en), with_image=False)

    @staticmethod
    def _question(text: str, language: str, sample: Sample | None, clip: Any, settings: GenSettings | None) -> str:
        if sample is not None:
            text = fill_fields(text, clip_fields(sample, clip))
        if settings is not None and settings.language_hint:
            text = f"{text.rstrip()} {LANGUAGE_HINT[language]}"
        return text

    # ---- guards and rows

    def attempt(self, generated: Any, language: str, settings: GenSettings) -> Attempt:
        """One generation (a `Generation` or the translator's output) judged by the quality guards; Chinese
        text is OpenCC-normalised first."""
        text = generated.text
        if language == "zh":
            text = normalize_zh(text, self.settings.zh.variant)
        echo = self._echo_texts if language == "en" else self._echo_texts_zh
        flags = detect_flags(text, language=language, prompt_texts=echo,
                             hit_max_new_tokens=generated.hit_max_new_tokens)
        return Attempt(text, generated.num_tokens, generated.hit_max_new_tokens, tuple(flags), settings)

    def repair_due(self, attempts: list[Attempt], language: str) -> bool:
        """Whether `attempts` (one language of one clip) get another, repairing, attempt."""
        if language == "zh" and self.zh_mode == "mt":
            return False  # the seq2seq translator has none of the repair settings
        return needs_repair(attempts, self.repair_attempts)

    def build_row(self, sample: Sample, clip: DecodedClip, en: list[Attempt],
                  zh: list[Attempt] | None, score_image: torch.Tensor | None = None) -> dict[str, Any]:
        """The captioned row from each language's attempts: the best attempt's caption and flags, how many
        attempts were made, and the first attempt's flags; `clip_score` from the clip's frame embedding
        (`score_images`) when a score model is set."""
        s = self.stats
        row = Row.for_sample(sample, clip, self, status=Status.OK)
        chosen_en = best(en)
        row.caption_en, row.tokens_en = chosen_en.text, chosen_en.num_tokens
        row.clip_score = self.clip_score(sample, chosen_en.text, score_image)
        flags, first = set(chosen_en.flags), set(en[0].flags)
        s.tokens_en += chosen_en.num_tokens
        runs = [en]
        if zh is not None:
            chosen_zh = best(zh)
            row.caption_zh, row.tokens_zh = chosen_zh.text, chosen_zh.num_tokens
            s.tokens_zh += chosen_zh.num_tokens
            flags |= set(chosen_zh.flags)
            first |= set(zh[0].flags)
            runs.append(zh)
        for run in runs:  # the work the repairs cost, apart from the rows' own tokens
            s.repairs += len(run) - 1
            s.tokens_repair += sum(a.num_tokens for a in run) - best(run).num_tokens
        row.caption_flags = sorted(flags)
        row.first_flags = sorted(first)
        row.attempts = max(len(run) for run in runs)
        row.status = Status.FLAGGED if flags else Status.OK
        return row.to_dict()

    # ---- caption <-> clip score (score.model)

    def score_images(self, items: list[tuple[Sample, DecodedClip]]) -> list[torch.Tensor | None]:
        """Each clip's frame embedding for `clip_score`, batched with the visual encoding; Nones when no score
        model is set, or when scoring fails (the captions do not depend on it: their rows get a null score)."""
        if self.scorer is None or not items:
            return [None] * len(items)
        t0 = time.perf_counter()
        try:
            embeddings = list(self.scorer.embed_clips(torch.from_numpy(np.stack([clip.frames for _, clip in items]))))
        except Exception as e:  # noqa: BLE001 - a score is optional; the rows still get their captions
            log.warning("clip scoring of %d clips failed (%s: %s); their clip_score is null", len(items),
                        type(e).__name__, e)
            embeddings = [None] * len(items)
        self.stats.seconds_score += time.perf_counter() - t0
        return embeddings

    def clip_score(self, sample: Sample, caption_en: str, score_image: torch.Tensor | None) -> float | None:
        """Cosine of caption_en's CLIP text embedding (first 77 tokens) with the frame embedding; None without a
        score model or an English caption."""
        if self.scorer is None or score_image is None or not caption_en.strip():
            return None
        t0 = time.perf_counter()
        try:
            return round(self.scorer.score([caption_en], score_image[None])[0], 6)
        except Exception as e:  # noqa: BLE001 - as above
            log.warning("clip scoring failed for key %s (%s: %s); its clip_score is null", sample.key,
                        type(e).__name__, e)
            return None
        finally:
            self.stats.seconds_score += time.perf_counter() - t0

    # ---- the static batch path (the engine's fallback; benchmarks)

    def caption_batch(self, items: list[tuple[Sample, DecodedClip]]) -> list[dict[str, Any]]:
        if not items:
            return []
        try:
            return self._caption(items)
        except Exception as e:  # a bad batch must not kill the shard: isolate the culprit
            if len(items) == 1:
                sample, clip = items[0]
                log.warning("captioning failed for key %s: %s", sample.key, e)
                failure = Failure("caption", f"model error: {type(e).__name__}: {e}")
                return [failure_row(sample, failure, clip, ctx=self).to_dict()]
            log.warning("batch of %d failed (%s); retrying clip by clip", len(items), e)
            rows = []
            for item in items:
                rows.extend(self.caption_batch([item]))
            return rows

    def _caption(self, items: list[tuple[Sample, DecodedClip]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        features = self.encode(items)  # (B, N_vis, D)
        score_images = self.score_images(items)
        with torch.inference_mode():
            t1 = time.perf_counter()

            def english(idx: list[int], settings: GenSettings) -> list[Any]:
                prompts = [self.prompt_en_for(*items[i], settings) for i in idx]
                return generate_captions(self.loaded, prompts, features[idx], **self._decoding(settings))

            en = self._attempts_with_repairs(len(items), "en", self.base_en, english)
            t2 = time.perf_counter()
            zh = self._chinese(items, features, [best(a).text for a in en]) if self.want_zh else None
            t3 = time.perf_counter()
        s = self.stats
        s.clips += len(items)
        s.batches += 1
        s.seconds_vision += t1 - t0
        s.seconds_en += t2 - t1
        s.seconds_zh += t3 - t2
        return [self.build_row(sample, clip, en[i], zh[i] if zh is not None else None, score_images[i])
                for i, (sample, clip) in enumerate(items)]

    def _decoding(self, settings: GenSettings) -> dict[str, Any]:
        return {"max_new_tokens": settings.max_new_tokens, "repetition_penalty": settings.repetition_penalty,
                "min_new_tokens": settings.min_new_tokens, "ignore_eos": self.ignore_eos}

    def _attempts_with_repairs(self, n: int, language: str, base: GenSettings,
                               generate: Callable[[list[int], GenSettings], list[Any]],
                               todo: list[int] | None = None) -> list[list[Attempt]]:
        """First attempts for items `todo` (default all), then repairs while due: items sharing the next
        settings are generated as one batch."""
        runs: list[list[Attempt]] = [[] for _ in range(n)]
        groups = {base: list(range(n)) if todo is None else todo}
        while groups:
            for settings, idx in groups.items():
                for i, g in zip(idx, generate(idx, settings) if idx else []):
                    runs[i].append(self.attempt(g, language, settings))
            groups = {}
            for i, run in enumerate(runs):
                if run and self.repair_due(run, language):
                    groups.setdefault(next_settings(run, base.max_new_tokens), []).append(i)
        return runs

    def _chinese(self, items: list[tuple[Sample, DecodedClip]], features: torch.Tensor,
                 captions_en: list[str]) -> list[list[Attempt]]:
        if self.zh_mode == "direct":
            def direct(idx: list[int], settings: GenSettings) -> list[Any]:
                prompts = [self.prompt_zh_direct_for(*items[i], settings) for i in idx]
                return generate_captions(self.loaded, prompts, features[idx], **self._decoding(settings))

            return self._attempts_with_repairs(len(items), "zh", self.base_zh, direct)
        if self.zh_mode == "mt":
            out = self.translator.translate(captions_en, max_new_tokens=self.settings.zh.max_new_tokens,
                                            batch_size=len(captions_en))
            return [[self.attempt(t, "zh", self.base_zh)] for t in out]

        # translate: a text-only pass of the same LLM over the English caption (no visual tokens).
        def translate(idx: list[int], settings: GenSettings) -> list[Any]:
            prompts = [self.translate_prompt(captions_en[i], *items[i], settings) for i in idx]
            return generate_text(self.loaded, prompts, **self._decoding(settings))

        todo = [i for i, c in enumerate(captions_en) if c.strip()]
        runs = self._attempts_with_repairs(len(items), "zh", self.base_zh, translate, todo=todo)
        nothing = Generation(text="", token_ids=[], num_tokens=0, hit_max_new_tokens=False)
        return [run or [self.attempt(nothing, "zh", self.base_zh)] for run in runs]  # no English: no Chinese

    def encode(self, items: list[tuple[Sample, DecodedClip]]) -> torch.Tensor:
        """Visual features (B, N, D) of decoded clips: uint8 frames normalised on the model's device, CLIP,
        projector, pooling."""
        d = self.description
        frames = torch.from_numpy(np.stack([clip.frames for _, clip in items]))  # (B, T, S, S, 3) uint8
        if frames.shape[2:] != (d.image_size, d.image_size, 3) or not 1 <= frames.shape[1] <= d.num_frames:
            raise ValueError(f"decoded frames of shape {tuple(frames.shape[1:])}; the model takes up to "
                             f"{d.num_frames} frames of {d.image_size}x{d.image_size} (decode with the model "
                             "description's num_frames and image_size)")
        if self.device != "cpu":
            frames = frames.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.loaded.model.encode_videos(normalize_frames(frames, d.image_mean, d.image_std))
