"""The job spec: a YAML manifest validated once, at the edge, into dataclasses.

Nothing below this module reads raw dicts. Every error names the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.storage.streams import safe_url

LANGUAGES = ("en", "zh")
ZH_MODES = ("translate", "direct", "mt")
ZH_VARIANTS = ("zh-Hans", "zh-Hant", "zh-TW", "zh-HK")
DTYPES = ("float32", "bfloat16", "float16")
MAX_REPAIR_ATTEMPTS = 5
MAX_SCORE_FRAMES = 16
DECODE_MODES = ("thread", "process")
# A key already in another shard of the output: keep the first row and give the later sample a `duplicate` row,
# or refuse, at preflight, a job whose shards repeat a key (pipeline/key_claims.py).
DUPLICATE_KEY_POLICIES = ("keep_first", "refuse")
# Which engine generates (pipeline/engine_choice.py): auto is vLLM when it is installed and the actor has a CUDA
# device, else the native engine (model/engine.py).
ENGINES = ("native", "vllm", "auto")
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: vLLM's FP8 KV cache


class ManifestError(ValueError):
    """A manifest that cannot run: the message names the file and the field."""


@dataclass(frozen=True)
class ModelSpec:
    path: str
    lora_alpha: float = 4.0
    dtype: str = "bfloat16"
    device: str = "auto"  # "auto": cuda when the actor holds a GPU, else cpu
    attn_implementation: str = "sdpa"
    # Pickle `.bin` weights are refused unless this is true; even then only plain tensors load
    # (torch.load(weights_only=True)). Not in the fingerprint: the weights are the same.
    allow_pickle: bool = False


@dataclass(frozen=True)
class PromptSpec:
    # None means the default wording of the model family's template (model/prompts.py).
    en: str | None = None
    zh_direct: str | None = None
    zh_translate: str | None = None


@dataclass(frozen=True)
class VllmSpec:
    """Settings of the vLLM engine (generation.engine vllm). None of them changes a caption (not fingerprinted)."""

    # Share of each GPU's memory vLLM takes (weights, KV cache, activations); the rest is the vision side's
    # (CLIP, projector, the clips' features in flight).
    gpu_memory_utilization: float = 0.8
    kv_cache_dtype: str = "auto"  # fp8: half the KV bytes read per decode step
    max_num_seqs: int | None = None  # sequences decoded together; None: model/vllm_engine.py's default (128)
    max_num_batched_tokens: int | None = None  # tokens per engine step (chunked prefill); None: vLLM's default
    enforce_eager: bool = False  # true: no CUDA graphs
    tensor_parallel_size: int | None = None  # None: the actor's GPUs (resources.num_gpus_per_actor)


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 400
    repetition_penalty: float | None = None
    batch_size: int = 8  # clips per CLIP encoding batch (and per batch of the static fallback path)
    # Continuous batching (pipeline/scheduler.py): KV-cache slots of the engine. None: on CUDA as many as fit
    # in free memory after the weights (at most 128), on a CPU 8. Neither changes captions (not fingerprinted).
    slots: int | None = None
    sync_every: int = 4  # decode steps between host synchronisations
    cuda_graphs: bool = True  # decode step under CUDA graphs on CUDA (false: eager); ignored on a CPU
    engine: str = "auto"  # native | vllm | auto (pipeline/engine_choice.py); not fingerprinted
    vllm: VllmSpec = field(default_factory=VllmSpec)


@dataclass(frozen=True)
class ZhSpec:
    mode: str = "translate"
    variant: str = "zh-Hans"
    max_new_tokens: int = 400
    mt_model: str | None = None  # local directory of a seq2seq en->zh model, for mode "mt"
    mt_source_prefix: str = ""  # e.g. ">>cmn_Hans<< " for opus-mt multi-target models


@dataclass(frozen=True)
class DecodeSpec:
    workers: int = 2
    max_ahead: int = 16
    mode: str = "process"
    timeout_s: float = 60.0


@dataclass(frozen=True)
class RetrySpec:
    """How hard the job retries below the shard level (the shard level is `max_attempts` and `shard_timeout_s`).
    All of it is gathered, with those two, in `pipeline.retry.RetryPolicy`."""

    stream_retries: int = 5  # reopen a remote shard stream this many times in a row without progress
    stream_backoff_s: float = 0.5  # first wait between reopenings, doubled each time (capped at 10 s)
    # The driver kills an actor whose shard runs past watchdog_factor x shard_timeout_s + watchdog_margin_s
    # (the actor stops a shard at shard_timeout_s between samples; this catches one stuck inside a read).
    watchdog_factor: float = 1.5
    watchdog_margin_s: float = 60.0
    # The driver stops (exit 3, nothing lost: rerun to resume) when no actor has been able to run for this long:
    # every node that held one is gone and Ray could place no replacement (no node with the free resources).
    no_actor_timeout_s: float = 900.0


@dataclass(frozen=True)
class QualitySpec:
    # Regenerate a caption the guards flag (empty, echo, repetition, truncated, wrong_language) up to this many
    # times, with settings meant to fix the flag (pipeline/repair.py); 0 turns repairs off. Not in the
    # fingerprint: a repair changes only flagged captions, and each row records its attempts.
    repair_attempts: int = 1


@dataclass(frozen=True)
class ScoreSpec:
    # A local CLIP checkpoint in the Hugging Face layout (e.g. a download of openai/clip-vit-large-patch14-336):
    # every captioned row gets `clip_score`, the cosine of caption_en and the clip's frames (model/clip_score.py).
    # None: no scoring. Not in the fingerprint: a score changes no caption.
    model: str | None = None
    frames: int = 4  # evenly spaced frames of the decoded ones whose mean embedding is scored
    allow_pickle: bool = False  # as model.allow_pickle, for a CLIP download with only pytorch_model.bin


@dataclass(frozen=True)
class ResourceSpec:
    actors: int | None = None  # None: one per GPU in the cluster (or a CPU count when there are none)
    num_gpus_per_actor: float = 1.0
    num_cpus_per_actor: float = 2.0


@dataclass(frozen=True)
class GcsStorageSpec:
    """gs:// shards and outputs (gcsfs). Left out: gcsfs's defaults (STORAGE_EMULATOR_HOST, the project of the
    Application Default Credentials)."""

    project: str | None = None
    endpoint_url: str | None = None  # e.g. an emulator, "http://127.0.0.1:9023"


@dataclass(frozen=True)
class AzureStorageSpec:
    """az:// / abfs:// shards and outputs (adlfs). Left out: AZURE_STORAGE_ACCOUNT_NAME, the connection string
    (AZURE_STORAGE_CONNECTION_STRING, Azurite's included), or the account in an abfs://container@ACCOUNT... URL."""

    account: str | None = None


@dataclass(frozen=True)
class HfStorageSpec:
    """hf:// shards (the Hugging Face Hub, read-only). Left out: HF_ENDPOINT, else huggingface.co."""

    endpoint_url: str | None = None


@dataclass(frozen=True)
class StorageSpec:
    """Where shards and outputs on object stores live, when not at each store's default. `endpoint_url` and
    `region` are S3's (AWS or an S3-compatible store); each field left out comes from the standard
    environment (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, STORAGE_EMULATOR_HOST, ...). No credentials
    here: a manifest is recorded in every output; keys come from each node's environment, config or role."""

    endpoint_url: str | None = None  # e.g. "http://minio.internal:9000"
    region: str | None = None
    gcs: GcsStorageSpec = field(default_factory=GcsStorageSpec)
    azure: AzureStorageSpec = field(default_factory=AzureStorageSpec)
    hf: HfStorageSpec = field(default_factory=HfStorageSpec)


@dataclass(frozen=True)
class Manifest:
    shards: list[str]
    output: str
    model: ModelSpec
    name: str = "recaption"
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    prompts: PromptSpec = field(default_factory=PromptSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    zh: ZhSpec = field(default_factory=ZhSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    retry: RetrySpec = field(default_factory=RetrySpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    chunk_size: int = 256
    max_attempts: int = 3
    duplicate_keys: str = "keep_first"
    # A shard running longer fails this attempt (committed chunks are kept; the retry resumes after them).
    shard_timeout_s: float = 7200.0
    source: str = "<dict>"  # where it was read from; not part of the spec itself

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as it is recorded (`_job.json`, every data file's metadata, the dataset card): shard
        URLs without their credentials (`safe_url`: a presigned signature, user:password@)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d["shards"] = [safe_url(s) for s in self.shards]
        _check_finite(d, self.source)  # a Manifest built or replaced in code skips _coerce; JSON has no nan
        return d


def _check_duplicate_keys(node: yaml.Node | None, prefix: str = "", seen_nodes: set[int] | None = None) -> None:
    """Refuse a key given twice in one mapping (plain YAML keeps the last one silently). Works on the composed
    node tree (`yaml.compose` builds nodes, never objects), so the data itself still comes from safe_load."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:  # an alias: checked where it was first seen
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<` merges may be overridden by explicit keys; complex keys fail elsewhere
            key, line = key_node.value, key_node.start_mark.line + 1
            name = f"{prefix}.{key}" if prefix else str(key)
            if key in first:
                raise _DuplicateKey(name, line, first[key])
            first[key] = line
            _check_duplicate_keys(value_node, name, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix}[{i}]", seen_nodes)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, name: str, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {name!r} (line {line}; first at line {first_line})")
        self.name, self.line, self.first_line = name, line, first_line


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not UTF-8 text") from None
    try:
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except _DuplicateKey as e:
        raise ManifestError(f"{path}: {e}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: e.g. an integer over Python's 4300-digit limit
        raise ManifestError(f"{path}: not valid YAML: {e}") from None
    return manifest_from_dict(raw, source=str(path))


def manifest_from_dict(raw: Any, *, source: str = "<dict>") -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: a manifest must be a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if isinstance(raw.get("shards"), str):
        raw["shards"] = split_shard_list(raw["shards"])
    m = _build(Manifest, raw, source, prefix="", skip={"source"})
    m = dataclasses.replace(m, source=source)
    _check_values(m, source)
    return m


def split_shard_list(text: str) -> list[str]:
    """A shard spec given as one string, the manifest's `shards:` and `--shards` alike: comma-separated
    paths, URLs or brace ranges (a YAML list keeps each item whole: the way to name a path with a comma)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _build(cls: type, raw: Any, source: str, prefix: str, skip: frozenset | set = frozenset()) -> Any:
    where = prefix.rstrip(".") or "manifest"
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: field '{where}' must be a mapping, got {_tname(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ManifestError(
            f"{source}: unknown field '{prefix}{unknown[0]}'"
            f" (allowed in {where}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{source}: missing required field '{prefix}{name}'")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], source, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, name)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, source, prefix=f"{name}.")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ManifestError(f"{source}: field '{name}' must be a list, got {_tname(value)}")
        return [_coerce(inner, v, source, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(f"{source}: field '{name}' must be true or false, got {_tname(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ManifestError(f"{source}: field '{name}' must be a number, got {_tname(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise ManifestError(
                f"{source}: field '{name}' must be a finite number, got an integer too large for a float"
            ) from None
        if not math.isfinite(number):
            raise ManifestError(f"{source}: field '{name}' must be a finite number, got {number}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{source}: field '{name}' must be an integer, got {_tname(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(f"{source}: field '{name}' must be a string, got {_tname(value)}")
        return value
    raise TypeError(f"unsupported manifest type {tp!r} for {name}")


def _check_finite(value: Any, source: str, name: str = "") -> None:
    """Every float in a (nested) dict or list is finite; else ManifestError naming the dotted field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(f"{source}: field '{name or 'manifest'}' must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, source, f"{name}.{k}" if name else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, source, f"{name}[{i}]")


def _tname(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _check_values(m: Manifest, source: str) -> None:
    def bad(name: str, msg: str) -> ManifestError:
        return ManifestError(f"{source}: field '{name}' {msg}")

    if not m.shards or any(not s.strip() for s in m.shards):
        raise bad("shards", "must name at least one shard (path, URL or brace range)")
    if not m.output.strip():
        raise bad("output", "must not be empty")
    problem = output_url_problem(m.output)
    if problem:
        raise bad("output", problem)
    if not m.model.path.strip():
        raise bad("model.path", "must not be empty")
    for name, value, allowed in [
        ("model.dtype", m.model.dtype, DTYPES),
        ("zh.mode", m.zh.mode, ZH_MODES),
        ("zh.variant", m.zh.variant, ZH_VARIANTS),
        ("decode.mode", m.decode.mode, DECODE_MODES),
        ("duplicate_keys", m.duplicate_keys, DUPLICATE_KEY_POLICIES),
        ("generation.engine", m.generation.engine, ENGINES),
        ("generation.vllm.kv_cache_dtype", m.generation.vllm.kv_cache_dtype, KV_CACHE_DTYPES),
    ]:
        if value not in allowed:
            raise bad(name, f"is {value!r}; allowed: {', '.join(allowed)}")
    if not m.languages or any(lang not in LANGUAGES for lang in m.languages) or "en" not in m.languages:
        raise bad("languages", f"is {m.languages!r}; allowed: [en] or [en, zh]")
    if len(set(m.languages)) != len(m.languages):
        raise bad("languages", "lists a language twice")
    if m.model.lora_alpha < 0:
        raise bad("model.lora_alpha", f"must be >= 0, got {m.model.lora_alpha}")
    positive = [
        ("generation.max_new_tokens", m.generation.max_new_tokens),
        ("generation.batch_size", m.generation.batch_size),
        ("generation.sync_every", m.generation.sync_every),
        ("zh.max_new_tokens", m.zh.max_new_tokens),
        ("decode.workers", m.decode.workers),
        ("decode.max_ahead", m.decode.max_ahead),
        ("decode.timeout_s", m.decode.timeout_s),
        ("chunk_size", m.chunk_size),
        ("shard_timeout_s", m.shard_timeout_s),
        ("max_attempts", m.max_attempts),
        ("retry.stream_backoff_s", m.retry.stream_backoff_s),
        ("retry.watchdog_factor", m.retry.watchdog_factor),
        ("retry.no_actor_timeout_s", m.retry.no_actor_timeout_s),
    ]
    if m.resources.actors is not None:
        positive.append(("resources.actors", m.resources.actors))
    if m.generation.slots is not None:
        positive.append(("generation.slots", m.generation.slots))
    for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
        if getattr(m.generation.vllm, name) is not None:
            positive.append((f"generation.vllm.{name}", getattr(m.generation.vllm, name)))
    for name, value in positive:
        if value <= 0:
            raise bad(name, f"must be > 0, got {value}")
    if not 0 <= m.quality.repair_attempts <= MAX_REPAIR_ATTEMPTS:
        raise bad("quality.repair_attempts", f"must be between 0 and {MAX_REPAIR_ATTEMPTS}, got "
                                             f"{m.quality.repair_attempts}")
    if not 1 <= m.score.frames <= MAX_SCORE_FRAMES:
        raise bad("score.frames", f"must be between 1 and {MAX_SCORE_FRAMES}, got {m.score.frames}")
    if m.score.model is not None and not m.score.model.strip():
        raise bad("score.model", "must not be empty (leave it out, or null, for no scoring)")
    if m.retry.stream_retries < 0 or m.retry.watchdog_margin_s < 0:
        raise bad("retry", "stream_retries and watchdog_margin_s must be >= 0")
    if m.resources.num_gpus_per_actor < 0 or m.resources.num_cpus_per_actor < 0:
        raise bad("resources", "num_gpus_per_actor and num_cpus_per_actor must be >= 0")
    if not 0 < m.generation.vllm.gpu_memory_utilization <= 1:
        raise bad("generation.vllm.gpu_memory_utilization",
                  f"must be a share of the GPU's memory, > 0 and <= 1, got {m.generation.vllm.gpu_memory_utilization}")
    tp, gpus = m.generation.vllm.tensor_parallel_size, m.resources.num_gpus_per_actor
    share = m.generation.vllm.gpu_memory_utilization
    if m.generation.engine == "vllm" and 0 < gpus < 1 and share > gpus:
        # each vLLM takes `share` of the whole card: actors sharing one would not all start
        raise bad("generation.vllm.gpu_memory_utilization",
                  f"is {share:g} but each actor gets {gpus:g} of a GPU (resources.num_gpus_per_actor); the actors "
                  f"sharing a card would not all start: set it below {gpus:g}, leaving the vision side its memory")
    if tp is not None and tp > max(1, math.floor(gpus)):
        raise bad("generation.vllm.tensor_parallel_size",
                  f"is {tp} but each actor gets {gpus:g} GPU(s) (resources.num_gpus_per_actor); set "
                  f"resources.num_gpus_per_actor: {tp}, or leave tensor_parallel_size out (default: the actor's GPUs)")
    if m.generation.repetition_penalty is not None and m.generation.repetition_penalty <= 0:
        raise bad("generation.repetition_penalty", "must be > 0 or null")
    if m.prompts.zh_translate is not None and "{caption}" not in m.prompts.zh_translate:
        raise bad("prompts.zh_translate", "must contain {caption}, where the English caption goes")
    if m.zh.mode == "mt" and "zh" in m.languages and not m.zh.mt_model:
        raise bad("zh.mt_model", "is required when zh.mode is 'mt'")
    if m.storage.endpoint_url is not None:
        problem = endpoint_url_problem(m.storage.endpoint_url)
        if problem:
            raise bad("storage.endpoint_url", problem)
    if m.storage.region is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", m.storage.region):
        raise bad("storage.region", f"is {m.storage.region!r}; expected a region name such as us-east-1")
    for name, url in (("storage.gcs.endpoint_url", m.storage.gcs.endpoint_url),
                      ("storage.hf.endpoint_url", m.storage.hf.endpoint_url)):
        problem = url and endpoint_url_problem(url)
        if problem:
            raise bad(name, problem)
    for name, value in (("storage.gcs.project", m.storage.gcs.project), ("storage.azure.account", m.storage.azure.account)):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise bad(name, f"is {value!r}; expected a name, not a key or a URL (credentials come from the environment)")


OUTPUT_SCHEMES = ("", "file", "s3", "gs", "gcs", "az", "abfs", "abfss")


def output_url_problem(url: str) -> str | None:
    """Why `url` cannot hold an output, or None: a local path, file:// or a writable object store."""
    scheme = urllib.parse.urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in OUTPUT_SCHEMES:
        return None
    if scheme == "hf":
        return ("is on the Hugging Face Hub, which the job reads shards from but does not write to; write the "
                "output to a local path or a bucket and upload the finished data/ folder")
    return f"has the scheme {scheme}://; an output is a local path, file://, s3://, gs://, az:// or abfs(s)://"


def endpoint_url_problem(url: str) -> str | None:
    """Why an S3 endpoint URL is unusable, or None: it must be http(s)://host[:port], with no user, password,
    path or query (credentials in a URL would end up in the recorded manifest and in logs)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must look like http(s)://host[:port]"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user or password; credentials come from the environment only"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be http(s)://host[:port], without a path or query"
    return None


def fingerprint(m: Manifest, model_identity: str, prompt_version: str) -> tuple[str, dict[str, Any]]:
    """Hash of everything that changes the captions; not shards, output, batch size or resources.

    Returns the hex digest and the dict it was computed from (so a mismatch can say what differs).
    ManifestError when a number is not finite (possible only for a Manifest built or replaced in code).
    """
    m.to_dict()  # checks that every number is finite, naming the field
    parts = {
        "model": model_identity,
        "lora_alpha": m.model.lora_alpha,
        "dtype": m.model.dtype,
        "prompt_version": prompt_version,
        "prompts": dataclasses.asdict(m.prompts),
        "languages": list(m.languages),
        "generation": {
            "max_new_tokens": m.generation.max_new_tokens,
            "repetition_penalty": m.generation.repetition_penalty,
            "greedy": True,
        },
        "zh": dataclasses.asdict(m.zh) if "zh" in m.languages else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]
    return digest, parts


def expand_home(path: str) -> str:
    """`~` and `~user` at the start of a local path expanded as a shell would (URLs are left alone)."""
    return path if "://" in path else os.path.expanduser(path)


def _absolute(path: str, base: Path) -> str:
    path = expand_home(path)
    if "://" in path or path.startswith("/"):
        return path
    return str((base / path).resolve()) if "{" not in path else str(base.resolve() / path)


def resolve_paths(m: Manifest, base: str | Path) -> Manifest:
    """Make local paths absolute (`~` expanded, relative ones against `base`), so actors (whose working
    directory differs) see the same files, and `~/out` is not a folder named `~`."""
    base = Path(base)
    model = dataclasses.replace(m.model, path=_absolute(m.model.path, base))
    zh = m.zh if not m.zh.mt_model else dataclasses.replace(m.zh, mt_model=_absolute(m.zh.mt_model, base))
    score = m.score if not m.score.model else dataclasses.replace(m.score, model=_absolute(m.score.model, base))
    return dataclasses.replace(
        m,
        shards=[_absolute(s, base) for s in m.shards],
        output=_absolute(m.output, base),
        model=model,
        zh=zh,
        score=score,
    )
