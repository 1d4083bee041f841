"""The small settings objects the manifest is cut into: each part of the pipeline gets its own, never the
whole `Manifest`. No torch here: the driver builds them and hands them to the actors.

  CaptionSettings  the model, languages, prompts, generation and Chinese settings  -> pipeline/captioning.py
  ShardSettings    chunk size, storage, the retry policy                            -> pipeline/shard_runner.py
  ActorSettings    the two above, the decode pool and the output                    -> jobs/actor.py
"""

from __future__ import annotations

import dataclasses
import math
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
    # The checkpoint's content digest (pipeline/model_identity.py), computed once by the driver: the vLLM
    # engine keys its export of the merged language model by it. None: whoever needs it hashes the folder.
    model_identity: str | None = None

    @classmethod
    def from_manifest(cls, m: Manifest, model_identity: str | None = None) -> CaptionSettings:
        """`generation.vllm.tensor_parallel_size` left out becomes the actor's GPUs here (at least 1)."""
        vllm = m.generation.vllm
        if vllm.tensor_parallel_size is None:
            vllm = dataclasses.replace(vllm, tensor_parallel_size=max(1, math.floor(m.resources.num_gpus_per_actor)))
        return cls(model=m.model, languages=tuple(m.languages), prompts=m.prompts,
                   generation=dataclasses.replace(m.generation, vllm=vllm), zh=m.zh, quality=m.quality,
                   score=m.score, model_identity=model_identity)


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
    def from_manifest(cls, m: Manifest, model_identity: str | None = None) -> ActorSettings:
        return cls(caption=CaptionSettings.from_manifest(m, model_identity), shard=ShardSettings.from_manifest(m),
                   decode=m.decode, output=m.output)
