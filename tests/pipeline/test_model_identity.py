"""The model identity is the content of the files the loader reads, not the folder's name or place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import model_identity as mi
from pipeline.manifest import manifest_from_dict
from pipeline.model_identity import ModelPathError, checkpoint_files, file_sha256, model_identity
from pipeline.progress import FingerprintMismatch, describe_job_model, ensure_job, job_identity
from pipeline.writing import OutputStore

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "pllava-7b")


@pytest.fixture(autouse=True)
def hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hash-cache"
    monkeypatch.setenv("RECAPTION_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files actually read and hashed (not taken from metadata or the cache)."""
    calls: list[Path] = []
    real = mi._stream_sha256

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(mi, "_stream_sha256", counting)
    return calls


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def manifest(model_path: Path, out: Path):
    return manifest_from_dict({"shards": "x.tar", "output": str(out), "model": {"path": str(model_path)}})


def identity(m):
    """The job identity as the driver computes it: from the checkpoint's one description."""
    return job_identity(m, describe_job_model(m))


def test_files_are_what_the_loader_reads(ckpt, tmp_path):
    names = [p.name for p in checkpoint_files(ckpt)]
    assert names == sorted(names)
    assert {"config.json", "model.safetensors.index.json", SHARD1, SHARD2, "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"} == set(names)

    single = tmp_path / "single"
    single.mkdir()
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        (single / name).write_text("{}")
    (single / "model.safetensors").write_bytes(b"w")
    (single / "model.safetensors-deprecated").write_bytes(b"old")  # the loader never reads it
    (single / "pytorch_model.bin").write_bytes(b"p")  # safetensors win, as in the loader
    assert [p.name for p in checkpoint_files(single)] == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]

    (single / "model.safetensors").unlink()
    assert [p.name for p in checkpoint_files(single)] == [
        "config.json", "generation_config.json", "pytorch_model.bin", "tokenizer.json"]


def test_copy_in_another_folder_has_the_same_identity(ckpt, tmp_path):
    other = copy(ckpt, tmp_path / "mnt" / "somewhere-else")
    a, b = model_identity(ckpt), model_identity(other)
    assert a.digest == b.digest and a.files == b.files and a.fingerprint_part == b.fingerprint_part
    assert (a.name, b.name) == ("pllava-7b", "somewhere-else")
    assert str(a) == a.label == f"pllava-7b@{a.digest[:12]}"
    assert a.fingerprint_part == f"sha256:{a.digest[:16]}"
    assert a.files[SHARD1] == sha(ckpt / SHARD1)
    ia, ib = (identity(manifest(path, tmp_path / "o")) for path in (ckpt, other))
    assert ia.fingerprint == ib.fingerprint and ia.parts["model"] == a.fingerprint_part
    assert ia.model == a.label  # readable, for logs


def test_other_weights_under_the_same_name_and_config_differ(ckpt, tmp_path):
    other = copy(ckpt, tmp_path / "x" / "pllava-7b")
    flip_last_byte(other / SHARD2)
    assert (other / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    a, b = model_identity(ckpt), model_identity(other)
    assert a.name == b.name and a.digest != b.digest
    assert {n for n in a.files if a.files[n] != b.files[n]} == {SHARD2}
    fp_a = identity(manifest(ckpt, tmp_path / "o")).fingerprint
    assert identity(manifest(other, tmp_path / "o")).fingerprint != fp_a


def test_a_changed_tokenizer_changes_the_identity(ckpt, tmp_path):
    other = copy(ckpt, tmp_path / "pllava-7b")
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 17
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert model_identity(other).digest != model_identity(ckpt).digest


def write_hf_metadata(local_dir: Path, filename: str, etag: str, timestamp: float) -> Path:
    meta = local_dir / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(f"{'c' * 40}\n{etag}\n{timestamp}\n")
    return meta


def test_hugging_face_metadata_is_used_when_valid(ckpt, tmp_path, hashed):
    other = copy(ckpt, tmp_path / "pllava-7b")
    planted = "ab" * 32  # well-formed, deliberately not the file's sha256: proves the file was not read
    write_hf_metadata(other, SHARD1, planted, time.time() + 5)
    assert file_sha256(other / SHARD1) == planted
    assert hashed == []
    ident = model_identity(other)
    assert ident.files[SHARD1] == planted
    assert other / SHARD1 not in hashed and other / SHARD2 in hashed
    # the .cache folder itself is not part of the checkpoint
    assert not any(name.startswith(".cache") for name in ident.files)


def test_hugging_face_metadata_is_ignored_when_the_file_is_newer_or_the_etag_no_sha256(ckpt, tmp_path, hashed):
    other = copy(ckpt, tmp_path / "pllava-7b")
    stamp = time.time() - 100
    write_hf_metadata(other, SHARD1, "ab" * 32, stamp)
    os.utime(other / SHARD1, (stamp + 5, stamp + 5))  # modified after the download
    assert file_sha256(other / SHARD1) == sha(ckpt / SHARD1)
    os.utime(other / SHARD1, (stamp + 0.5, stamp + 0.5))  # within huggingface_hub's 1 s slack: trusted
    assert file_sha256(other / SHARD1) == "ab" * 32
    write_hf_metadata(other, "config.json", "d" * 40, time.time() + 5)  # a git blob sha1 (non-LFS file)
    assert file_sha256(other / "config.json") == sha(other / "config.json")
    write_hf_metadata(other, SHARD2, "ab" * 32, float("nan"))
    assert file_sha256(other / SHARD2) == sha(other / SHARD2)
    (other / ".cache/huggingface/download" / f"{SHARD2}.metadata").write_text("garbage\n")
    assert file_sha256(other / SHARD2) == sha(other / SHARD2)
    assert hashed.count(other / SHARD1) == 1


def test_hash_cache_is_used_then_invalidated_by_mtime_or_size(tmp_path, hashed, hash_cache):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x" * 3_000_000)
    first = file_sha256(f)
    assert first == sha(f) and hashed == [f]
    assert (hash_cache / mi.CACHE_FILE).is_file()
    assert file_sha256(f) == first and hashed == [f]  # second call: from the cache, not read

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_sha256(f) == first and len(hashed) == 2  # mtime changed: read again

    st = f.stat()
    f.write_bytes(b"x" * 3_000_001)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    assert file_sha256(f) == sha(f) != first and len(hashed) == 3
    assert file_sha256(f) == sha(f) and len(hashed) == 3
    assert not list(hash_cache.glob("*.tmp"))  # written atomically, no temp files left


def test_identity_uses_the_cache_on_the_second_call(ckpt, hashed):
    first = model_identity(ckpt)
    n = len(hashed)
    assert n == len(checkpoint_files(ckpt))
    assert model_identity(ckpt) == first and len(hashed) == n


def test_corrupt_or_unwritable_cache_is_ignored(tmp_path, hashed, hash_cache, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    hash_cache.mkdir()
    (hash_cache / mi.CACHE_FILE).write_text("{not json")
    assert file_sha256(f) == sha(f)
    assert json.loads((hash_cache / mi.CACHE_FILE).read_text())["version"] == mi.CACHE_VERSION  # rewritten
    (hash_cache / mi.CACHE_FILE).write_text(json.dumps({"version": 1, "files": {str(f.resolve()): {
        "size": 3, "mtime_ns": f.stat().st_mtime_ns, "sha256": "not-a-sha"}}}))
    assert file_sha256(f) == sha(f)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RECAPTION_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert file_sha256(f) == sha(f)
    assert file_sha256(f) == sha(f)
    assert len(hashed) == 4


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RECAPTION_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mi.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RECAPTION_CACHE_DIR")
    assert mi.cache_dir() == tmp_path / "xdg" / "pllava-recaption"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mi.cache_dir() == tmp_path / "home" / ".cache" / "pllava-recaption"


def bad_dirs(ckpt: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing = tmp_path / "no" / "such"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    no_config = copy(ckpt, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (no_weights / "model.safetensors-deprecated").write_bytes(b"old")
    lost_shard = copy(ckpt, tmp_path / "lost-shard")
    (lost_shard / SHARD2).unlink()
    bad_index = copy(ckpt, tmp_path / "bad-index")
    (bad_index / "model.safetensors.index.json").write_text("{\n")
    return {
        "missing": (missing, "does not exist"),
        "file": (a_file, "is not a directory"),
        "no_config": (no_config, "has no config.json"),
        "no_weights": (no_weights, "has no weights files"),
        "lost_shard": (lost_shard, f"{SHARD2}, listed in model.safetensors.index.json, is missing"),
        "bad_index": (bad_index, "model.safetensors.index.json is unreadable"),
    }


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "no_weights", "lost_shard", "bad_index"])
def test_model_path_errors_name_model_path(ckpt, tmp_path, case):
    path, needle = bad_dirs(ckpt, tmp_path)[case]
    with pytest.raises(ModelPathError) as e:
        model_identity(path)
    msg = str(e.value)
    assert msg.startswith(f"model.path {path}") and needle in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_unreadable_file_names_model_path(ckpt, tmp_path, monkeypatch):
    other = copy(ckpt, tmp_path / "pllava-7b")

    def denied(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(mi, "_stream_sha256", denied)  # as root, chmod 000 would not stop the read
    with pytest.raises(ModelPathError) as e:
        model_identity(other)
    assert str(e.value) == f"model.path {other}: cannot read config.json: Permission denied"


def test_ensure_job_refuses_other_weights_and_accepts_a_copy(ckpt, tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    m = manifest(ckpt, tmp_path / "out")
    record = ensure_job(store, m, identity(m))

    copied = copy(ckpt, tmp_path / "elsewhere" / "renamed")
    m_copy = manifest(copied, tmp_path / "out")
    assert ensure_job(store, m_copy, identity(m_copy))["fingerprint"] == record["fingerprint"]

    changed = copy(ckpt, tmp_path / "x" / "pllava-7b")
    flip_last_byte(changed / SHARD1)
    m_changed = manifest(changed, tmp_path / "out")
    with pytest.raises(FingerprintMismatch) as e:
        ensure_job(store, m_changed, identity(m_changed))
    assert "the weights in model.path differ from the weights that wrote this output" in str(e.value)
    assert "lora_alpha" not in str(e.value)
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["fingerprint"] == record["fingerprint"]


def test_output_of_the_old_name_based_identity_is_explained(ckpt, tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    m = manifest(ckpt, tmp_path / "out")
    ident = identity(m)
    store.write_json(store.path("_job.json"), {"fingerprint": "0" * 16,
                                               "fingerprint_parts": {**ident.parts, "model": "pllava-7b@0123456789ab"}})
    with pytest.raises(FingerprintMismatch) as e:
        ensure_job(store, m, ident)
    assert "older version that identified the model by folder name" in str(e.value)


def test_output_of_the_old_identity_resumes_when_the_folder_still_matches_it(ckpt, tmp_path):
    from pipeline.progress import legacy_model_identity

    store = OutputStore(str(tmp_path / "out"))
    m = manifest(ckpt, tmp_path / "out")
    ident = identity(m)
    old = {"fingerprint": "0" * 16, "fingerprint_parts": {**ident.parts, "model": legacy_model_identity(str(ckpt))}}
    store.write_json(store.path("_job.json"), old)
    record = ensure_job(store, m, ident)
    assert record["fingerprint"] == ident.fingerprint and record["previous_fingerprints"] == ["0" * 16]
    assert ensure_job(store, m, ident)["fingerprint"] == ident.fingerprint  # from now on: the content identity
    # other settings differing: still refused
    store.write_json(store.path("_job.json"), {**old, "fingerprint_parts": {**old["fingerprint_parts"],
                                                                           "lora_alpha": 32.0}})
    with pytest.raises(FingerprintMismatch):
        ensure_job(store, m, ident)


def test_importing_does_not_pull_torch():
    code = ("import sys, pipeline.model_identity, pipeline.progress; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
