"""The small settings objects the manifest is cut into: each part of the pipeline gets its own, never the
whole `Manifest`. No torch here: the driver builds them and hands them to the actors.

  CaptionSettings  the model, languages, prompts, generation and Chinese settings  -> pipeline/captioning.py
  ShardSettings    chunk size, storage, the retry policy                            -> pipeline/shard_runner.py
  ActorSettings    the two above, the decode pool and the output                    -> jobs/actor.py
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.manifest import (
    DecodeSpec,
    GenerationSpec,
    Manifest,
    ModelSpec,
    PromptSpec,
    QualitySpec,
    ScoreSpec,
    StorageSpec,
    ZhSpec,
)
from pipeline.retry import RetryPolicy


@dataclass(frozen=True)
class CaptionSettings:
    """What captioning needs of the job."""

    model: ModelSpec
    languages: tuple[str, ...]
    prompts: PromptSpec
    generation: GenerationSpec
    zh: ZhSpec
    quality: QualitySpec = QualitySpec()
    score: ScoreSpec = ScoreSpec()

    @classmethod
    def from_manifest(cls, m: Manifest) -> CaptionSettings:
        return cls(model=m.model, languages=tuple(m.languages), prompts=m.prompts, generation=m.generation, zh=m.zh,
                   quality=m.quality, score=m.score)


@dataclass(frozen=True)
class ShardSettings:
    """What the shard runner needs of the job."""

    chunk_size: int
    storage: StorageSpec
    policy: RetryPolicy

    @classmethod
    def from_manifest(cls, m: Manifest) -> ShardSettings:
        return cls(chunk_size=m.chunk_size, storage=m.storage, policy=RetryPolicy.from_manifest(m))


@dataclass(frozen=True)
class ActorSettings:
    """What one captioning actor needs: its captioner, its shards, its decode pool and the output."""

    caption: CaptionSettings
    shard: ShardSettings
    decode: DecodeSpec
    output: str

    @classmethod
    def from_manifest(cls, m: Manifest) -> ActorSettings:
        return cls(caption=CaptionSettings.from_manifest(m), shard=ShardSettings.from_manifest(m), decode=m.decode,
                   output=m.output)
