"""Supply side: checkpoints are tensors, never code (pickle only by opt-in and tensors-only), no remote code,
no unsafe YAML, pickle or eval anywhere in the job's code."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.loading import CheckpointError, load_pllava

REPO = Path(__file__).resolve().parents[2]


def _pickle_checkpoint(tiny_dir: Path, out: Path) -> Path:
    """The tiny checkpoint with its tensors (released names) in one ``pytorch_model.bin`` instead of safetensors."""
    shutil.copytree(tiny_dir, out)
    state = {}
    for shard in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    torch.save(state, out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def pickle_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pickle_checkpoint(tiny_dir, tmp_path_factory.mktemp("pickle") / "ckpt")


def test_pickle_checkpoint_is_refused_without_the_flag(pickle_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        load_pllava(pickle_dir)


@torch.inference_mode()
def test_pickle_checkpoint_loads_with_the_flag_like_safetensors(pickle_dir: Path, loaded) -> None:
    from_pickle = load_pllava(pickle_dir, allow_pickle=True)
    assert from_pickle.lora_rank == loaded.lora_rank and from_pickle.lora_alpha == loaded.lora_alpha
    theirs = from_pickle.model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=name)


def test_sharded_pickle_checkpoint_with_index(pickle_dir: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "sharded"
    shutil.copytree(pickle_dir, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    (out / "pytorch_model.bin").unlink()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for filename, part in halves.items():
        torch.save({n: state[n] for n in part}, out / filename)
    weight_map = {n: f for f, part in halves.items() for n in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert load_pllava(out, allow_pickle=True).lora_rank == 8


def test_index_cannot_point_outside_the_checkpoint(pickle_dir: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "escape"
    shutil.copytree(pickle_dir, out)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "../pytorch_model.bin"}}))
    with pytest.raises(CheckpointError, match="bad shard file name"):
        load_pllava(out, allow_pickle=True)


class _Payload:
    """Unpickling this would call ``os.system`` (any callable works; this one leaves a file behind)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed_even_with_the_flag(pickle_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "evil"
    shutil.copytree(pickle_dir, out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    state["multi_modal_projector.linear_1.weight"] = _Payload(marker)  # type: ignore[assignment]
    torch.save(state, out / "pytorch_model.bin")
    for allow_pickle in (False, True):
        with pytest.raises(CheckpointError, match="pickle") as err:
            load_pllava(out, allow_pickle=allow_pickle)
        assert not marker.exists()
    assert "not a plain tensor file" in str(err.value) and "GLOBAL posix.system" in str(err.value)


def test_legacy_and_garbage_bin_files_are_clear_errors(pickle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "garbage"
    shutil.copytree(pickle_dir, out)
    (out / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="not a plain tensor file"):
        load_pllava(out, allow_pickle=True)


# ----------------------------------------------------------------------------------------------- code


def _python_files(*folders: str) -> list[Path]:
    files = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    assert files, folders
    return files


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_code_trusts_remote_code() -> None:
    folders = [p.name for p in REPO.iterdir() if p.is_dir() and p.name not in (".venv", "build", ".git")
               and not p.name.endswith(".egg-info") and not p.name.startswith(".")]
    bad = []
    for path in _python_files(*folders):
        for node, _ in _calls(path):
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"trust_remote_code must be the constant False: {bad}"


UNSAFE_CALLS = {"eval", "exec", "compile", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "pickle.load",
                "pickle.loads", "pickle.Unpickler", "marshal.loads", "np.load", "numpy.load"}


def test_no_unsafe_deserialisation_in_the_job_code() -> None:
    bad = []
    for path in _python_files("pipeline", "model", "jobs"):
        for node, name in _calls(path):
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            if name in UNSAFE_CALLS:
                bad.append(where)
            if name == "torch.load":
                weights_only = [kw.value for kw in node.keywords if kw.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                    bad.append(f"{where} without weights_only=True")
    assert not bad, f"unsafe deserialisation: {bad}"


def test_manifests_are_read_with_safe_load(tmp_path: Path) -> None:
    from pipeline.manifest import load_manifest

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'shards: !!python/object/apply:os.system ["touch {marker}"]\noutput: {tmp_path}/out\n')
    with pytest.raises(Exception) as err:  # noqa: PT011 - any refusal will do, as long as nothing ran
        load_manifest(evil)
    assert not marker.exists()
    assert "python/object" in str(err.value) or "constructor" in str(err.value)
