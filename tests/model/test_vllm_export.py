"""The language model exported for vLLM, and vLLM's settings: no vLLM needed (transformers writes the export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.vllm_engine import VllmSettings, _publish, export_key, export_language_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-cache")


def entries(exports: Path) -> list[str]:
    return sorted(p.name for p in exports.iterdir() if not p.name.endswith(".lock"))


def test_export_is_the_merged_language_model_as_a_plain_checkpoint(loaded, export_root):
    path = export_language_model(loaded, "tiny-vicuna-seed0", export_root)
    assert path.parent == export_root / "vllm"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "pllava-export.json"} <= names
    assert not [n for n in names if n.endswith(".bin")]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config  # nothing that would need remote code
    saved: dict[str, torch.Tensor] = {}
    for shard in path.glob("*.safetensors"):
        saved.update(load_file(shard))
    want = loaded.model.language_model.state_dict()
    assert set(saved) == set(want)
    for name, tensor in want.items():  # LoRA merged at the loaded alpha: the weights the native engine runs
        assert torch.equal(saved[name], tensor), name
    info = json.loads((path / "pllava-export.json").read_text())
    assert info["identity"] == "tiny-vicuna-seed0" and info["lora_alpha"] == loaded.lora_alpha == 4.0


def test_export_is_reused_and_keyed_by_identity_alpha_and_dtype(loaded, export_root):
    first = export_language_model(loaded, "tiny-vicuna-seed0", export_root)
    marker = first / "marker"
    marker.write_text("kept")
    again = export_language_model(loaded, "tiny-vicuna-seed0", export_root)
    assert again == first and marker.read_text() == "kept"  # not written again
    key = export_key("tiny-vicuna-seed0", 4.0, torch.float32)
    assert first.name == key
    assert len({key, export_key("tiny-vicuna-seed1", 4.0, torch.float32),
                export_key("tiny-vicuna-seed0", 8.0, torch.float32),
                export_key("tiny-vicuna-seed0", None, torch.float32),
                export_key("tiny-vicuna-seed0", 4.0, torch.bfloat16)}) == 5
    assert not [n for n in entries(export_root / "vllm") if ".tmp-" in n]


def test_default_root_is_the_recaption_cache_dir(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("RECAPTION_CACHE_DIR", str(tmp_path))
    path = export_language_model(loaded, "from-env")
    assert path.parent == tmp_path / "vllm"


def test_a_writer_that_loses_the_rename_discards_its_copy(tmp_path):
    final, tmp = tmp_path / "key", tmp_path / ".key.tmp-1"
    final.mkdir()
    (final / "config.json").write_text("winner")
    tmp.mkdir()
    (tmp / "config.json").write_text("loser")
    assert _publish(tmp, final) == final
    assert (final / "config.json").read_text() == "winner" and not tmp.exists()


def test_two_concurrent_exporters_make_one_directory(tiny_dir, tmp_path):
    """Two processes (as two actors of a node starting together) export the same model at once."""
    code = "; ".join([
        "from model.loading import load_pllava",
        "from model.vllm_engine import export_language_model",
        f"loaded = load_pllava({str(tiny_dir)!r})",
        f"print(export_language_model(loaded, 'raced', {str(tmp_path)!r}))",
    ])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert paths[0] == paths[1]
    assert entries(tmp_path / "vllm") == [Path(paths[0]).name]  # one export, no temporary copy left
    assert (Path(paths[0]) / "config.json").is_file()


def test_settings_refuse_bad_fields_naming_them():
    assert VllmSettings().kv_cache_dtype == "auto"
    for field, value in [("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5),
                         ("kv_cache_dtype", "fp16"), ("max_num_seqs", 0), ("max_num_seqs", True),
                         ("max_num_batched_tokens", 0), ("enforce_eager", "yes"), ("tensor_parallel_size", 0)]:
        with pytest.raises(ValueError, match=f"^generation.vllm.{field}: "):
            VllmSettings(**{field: value})

