"""From decoded clips to caption rows: the English visual pass, the Chinese pass, quality guards.

Plain Python over model/: no Ray, no files. `Captioner.caption_batch` never raises for a bad batch;
it retries clip by clip and turns what still fails into `error` rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from model.describe import describe_checkpoint
from model.generation import Generation, generate_captions, generate_text
from model.loading import load_pllava
from pipeline.chinese import normalize_zh
from pipeline.frames import DecodedClip, normalize_frames
from pipeline.manifest import Manifest
from pipeline.quality import detect_flags
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
        self.prompt_en = template.format(self.prompts.en, with_image=True)
        self.want_zh = "zh" in m.languages
        self.zh_mode = m.zh.mode
        self.prompt_zh_direct = template.format(self.prompts.zh_direct, with_image=True)
        self.zh_translate_question = self.prompts.zh_translate
        self.translator = None
        if self.want_zh and self.zh_mode == "mt":
            from model.translation import load_translator

            self.translator = load_translator(m.zh.mt_model, dtype=dtype, device=self.device,
                                              source_prefix=m.zh.mt_source_prefix)
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

    # ------------------------------------------------------------------------------------------
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
        m = self.settings
        t0 = time.perf_counter()
        features = self.encode(items)  # (B, N_vis, D)
        with torch.inference_mode():
            t1 = time.perf_counter()
            en = generate_captions(self.loaded, [self.prompt_en] * len(items), features,
                                   max_new_tokens=m.generation.max_new_tokens,
                                   repetition_penalty=m.generation.repetition_penalty,
                                   ignore_eos=self.ignore_eos)
            t2 = time.perf_counter()
            zh = self._chinese(features, [g.text for g in en]) if self.want_zh else None
            t3 = time.perf_counter()
        s = self.stats
        s.clips += len(items)
        s.batches += 1
        s.seconds_vision += t1 - t0
        s.seconds_en += t2 - t1
        s.seconds_zh += t3 - t2
        return [self.build_row(sample, clip, en[i], zh[i] if zh is not None else None)
                for i, (sample, clip) in enumerate(items)]

    def build_row(self, sample: Sample, clip: DecodedClip, g_en: Generation,
                  zh: tuple[str, int, bool] | None) -> dict[str, Any]:
        """The captioned row: English generation, Chinese (text, tokens, hit max_new_tokens), quality flags."""
        s = self.stats
        flags = set(detect_flags(g_en.text, language="en", prompt_texts=self._echo_texts,
                                 hit_max_new_tokens=g_en.hit_max_new_tokens))
        row = Row.for_sample(sample, clip, self, status=Status.OK)
        row.caption_en = g_en.text
        row.tokens_en = g_en.num_tokens
        s.tokens_en += g_en.num_tokens
        if zh is not None:
            text, n_tokens, hit_max = zh
            row.caption_zh = normalize_zh(text, self.settings.zh.variant)
            row.tokens_zh = n_tokens
            s.tokens_zh += n_tokens
            flags |= set(detect_flags(row.caption_zh, language="zh", prompt_texts=self._echo_texts_zh,
                                      hit_max_new_tokens=hit_max))
        row.caption_flags = sorted(flags)
        row.status = Status.FLAGGED if flags else Status.OK
        return row.to_dict()

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

    def translate_prompt(self, caption_en: str) -> str:
        """The text-only prompt of the `translate` pass for one English caption."""
        return self.description.template.format(self.zh_translate_question.replace("{caption}", caption_en),
                                           with_image=False)

    def _chinese(self, features: torch.Tensor, captions_en: list[str]) -> list[tuple[str, int, bool]]:
        m = self.settings
        if self.zh_mode == "direct":
            out = generate_captions(self.loaded, [self.prompt_zh_direct] * len(captions_en), features,
                                    max_new_tokens=m.zh.max_new_tokens,
                                    repetition_penalty=m.generation.repetition_penalty,
                                    ignore_eos=self.ignore_eos)
            return [(g.text, g.num_tokens, g.hit_max_new_tokens) for g in out]
        if self.zh_mode == "mt":
            out = self.translator.translate(captions_en, max_new_tokens=m.zh.max_new_tokens,
                                            batch_size=len(captions_en))
            return [(t.text, t.num_tokens, t.hit_max_new_tokens) for t in out]
        # translate: a text-only pass of the same LLM over the English caption (no visual tokens).
        prompts = [self.translate_prompt(c) for c in captions_en]
        results: list[tuple[str, int, bool]] = [("", 0, False)] * len(captions_en)
        todo = [i for i, c in enumerate(captions_en) if c.strip()]
        if todo:
            out = generate_text(self.loaded, [prompts[i] for i in todo], max_new_tokens=m.zh.max_new_tokens,
                                repetition_penalty=m.generation.repetition_penalty, ignore_eos=self.ignore_eos)
            for i, g in zip(todo, out):
                results[i] = (g.text, g.num_tokens, g.hit_max_new_tokens)
        return results
