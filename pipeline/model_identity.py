"""What a model is, for an output's fingerprint: the content of the files the loader reads.

`model_identity(model.path)` hashes (sha256) every file that `model/loading.py` reads to build the model
and the tokenizer - the weights (`model.safetensors.index.json` and the shards it names, or
`model.safetensors`; `pytorch_model.bin[.index.json]` only when there are no safetensors), `config.json`,
and the small files that change captions when present (tokenizer, preprocessor, generation and adapter
configs) - and combines the per-file hashes into one digest.

The choice: the fingerprint carries the content digest only (`ModelIdentity.fingerprint_part`,
"sha256:<first 16 hex of the digest>"), never the folder name or where it is mounted. So:
  * a byte-identical copy of the checkpoint in another folder (another name, another mount, another node)
    continues an existing output;
  * other weights under a copied config.json, in a folder of the same name, are refused.
The readable name (the folder name, e.g. "pllava-7b") is kept for people: `ModelIdentity.name` and `.label`
("pllava-7b@<12 hex>") are what logs and `JobIdentity.model` show. The `model` column of the output is not
this: it comes from `LoadedPllava.name` (model/loading.py).

Hashing a 7B checkpoint (~15 GB) takes a while, so a file's sha256 is, in this order:
  1. read from Hugging Face's download metadata when valid: `huggingface-cli download --local-dir DIR`
     writes `DIR/.cache/huggingface/download/<file>.metadata` (commit hash, etag, timestamp); for LFS files
     the etag is the file's sha256. It is trusted only when the etag is 64 hex digits and the file was not
     modified after the metadata was written (huggingface_hub's own rule: st_mtime - 1 <= timestamp);
  2. read from a small per-user cache keyed by (real path, size, mtime_ns): `$RECAPTION_CACHE_DIR`, else
     `$XDG_CACHE_HOME/pllava-recaption`, else `~/.cache/pllava-recaption`; a corrupt or unwritable cache is
     ignored (logged at debug level), never an error;
  3. computed by streaming the file (1 MiB reads), then cached.

No torch or transformers here: the driver imports this and must start fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Read when present; each can change the captions (tokenization, image preprocessing, LoRA settings).
SMALL_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "generation_config.json",
    "adapter_config.json",
)

CACHE_ENV = "RECAPTION_CACHE_DIR"
CACHE_FILE = "file-sha256.json"
CACHE_VERSION = 1
CACHE_MAX_ENTRIES = 4096
READ_SIZE = 1 << 20
HF_METADATA_DIR = Path(".cache") / "huggingface" / "download"
HF_MTIME_SLACK_S = 1.0

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class ModelPathError(ValueError):
    """model.path does not hold a readable checkpoint; the one-line message names model.path and the path."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str  # readable: the folder name, e.g. "pllava-7b"
    digest: str  # sha256 hex over the sorted (file name, file sha256) pairs
    files: dict[str, str] = field(hash=False)  # file name relative to model.path -> sha256 hex

    @property
    def label(self) -> str:
        return f"{self.name}@{self.digest[:12]}"

    @property
    def fingerprint_part(self) -> str:
        """What the output's fingerprint records: content only, so a copy in another folder matches."""
        return f"sha256:{self.digest[:16]}"

    def __str__(self) -> str:
        return self.label


def model_identity(model_path: str | os.PathLike[str]) -> ModelIdentity:
    model_dir = Path(model_path)
    files = {name: _hash_member(model_dir, name) for name in _relative_names(checkpoint_files(model_dir), model_dir)}
    return ModelIdentity(name=model_dir.resolve().name, digest=combine(files), files=files)


def combine(files: dict[str, str]) -> str:
    h = hashlib.sha256(b"pllava-recaption model identity v1\n")
    for name, sha in sorted(files.items()):
        h.update(f"{name}\0{sha.lower()}\n".encode())
    return h.hexdigest()


def checkpoint_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The files of `model_dir` the loader reads, sorted by name. Raises ModelPathError."""
    model_dir = Path(model_dir)
    _check_dir(model_dir)
    if not _is_file(model_dir, CONFIG):
        raise ModelPathError(f"model.path {model_dir} has no {CONFIG} (not a model checkpoint directory?)")
    names = {CONFIG} | {n for n in SMALL_FILES if _is_file(model_dir, n)}
    if _is_file(model_dir, SAFETENSORS_INDEX):
        names |= {SAFETENSORS_INDEX, *_indexed_shards(model_dir, SAFETENSORS_INDEX, ".safetensors")}
    elif _is_file(model_dir, SAFETENSORS_SINGLE):
        names.add(SAFETENSORS_SINGLE)
    elif _is_file(model_dir, PICKLE_INDEX):
        names |= {PICKLE_INDEX, *_indexed_shards(model_dir, PICKLE_INDEX, ".bin")}
    elif _is_file(model_dir, PICKLE_SINGLE):
        names.add(PICKLE_SINGLE)
    else:
        raise ModelPathError(
            f"model.path {model_dir} has no weights files ({SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
            f"{PICKLE_INDEX} or {PICKLE_SINGLE})"
        )
    return [model_dir / n for n in sorted(names)]


def file_sha256(path: str | os.PathLike[str], local_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 hex of a file: Hugging Face download metadata of `local_dir` (default: the file's folder) when
    valid, else the user cache, else computed by streaming and cached. OSError when the file is unreadable."""
    path = Path(path)
    local_dir = Path(local_dir) if local_dir is not None else path.parent
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{path} is not a regular file")
    sha = _hf_metadata_sha256(path, local_dir, st)
    if sha is not None:
        return sha
    key = os.path.realpath(path)
    sha = _cache_lookup(key, st)
    if sha is not None:
        return sha
    if st.st_size >= 1 << 30:
        log.info("hashing %s (%.1f GB) once; the result is cached in %s", path, st.st_size / 1e9, cache_dir())
    sha = _stream_sha256(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        log.warning("%s changed while it was being hashed; its hash is not cached", path)
        return sha
    _cache_store(key, st, sha)
    return sha


def _stream_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_SIZE):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checks


def _check_dir(model_dir: Path) -> None:
    try:
        st = os.stat(model_dir)
    except FileNotFoundError:
        raise ModelPathError(f"model.path {model_dir} does not exist") from None
    except OSError as e:
        raise ModelPathError(f"model.path {model_dir} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ModelPathError(f"model.path {model_dir} is not a directory (expected a checkpoint folder)")


def _is_file(model_dir: Path, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(model_dir / name).st_mode)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ModelPathError(f"model.path {model_dir}: cannot read {name}: {e.strerror or e}") from None


def _indexed_shards(model_dir: Path, index_name: str, suffix: str) -> set[str]:
    """The shard files an index names, checked as the loader checks them."""
    try:
        raw = json.loads((model_dir / index_name).read_text(encoding="utf-8"))
        weight_map = raw["weight_map"]
        filenames = set(weight_map.values())
    except OSError as e:
        raise ModelPathError(f"model.path {model_dir}: cannot read {index_name}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelPathError(f"model.path {model_dir}: {index_name} is unreadable ({reason})") from None
    for filename in sorted(filenames, key=str):
        if not isinstance(filename, str) or Path(filename).name != filename or not filename.endswith(suffix):
            raise ModelPathError(f"model.path {model_dir}: {index_name} names a bad shard file {filename!r}")
        if not _is_file(model_dir, filename):
            raise ModelPathError(f"model.path {model_dir}: {filename}, listed in {index_name}, is missing")
    if not filenames:
        raise ModelPathError(f"model.path {model_dir}: {index_name} names no shard files")
    return filenames


def _relative_names(paths: list[Path], model_dir: Path) -> list[str]:
    return [p.relative_to(model_dir).as_posix() for p in paths]


def _hash_member(model_dir: Path, name: str) -> str:
    try:
        return file_sha256(model_dir / name, model_dir)
    except OSError as e:
        raise ModelPathError(f"model.path {model_dir}: cannot read {name}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------- Hugging Face metadata


def _hf_metadata_sha256(path: Path, local_dir: Path, st: os.stat_result) -> str | None:
    try:
        relative = path.relative_to(local_dir)
    except ValueError:
        return None
    meta = local_dir / HF_METADATA_DIR / f"{relative}.metadata"
    try:
        with open(meta, encoding="utf-8") as f:
            _commit, etag, timestamp = (f.readline().strip() for _ in range(3))
        ts = float(timestamp)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.debug("ignoring Hugging Face metadata %s: %s", meta, e)
        return None
    if not _SHA256.fullmatch(etag) or not math.isfinite(ts):
        return None  # not an LFS file (a git blob sha1), or not metadata we understand
    if st.st_mtime - HF_MTIME_SLACK_S > ts:
        log.debug("ignoring Hugging Face metadata %s: the file was modified after the download", meta)
        return None
    return etag.lower()


# ------------------------------------------------------------------------------------------ user cache


def cache_dir() -> Path | None:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "pllava-recaption"
    try:
        return Path.home() / ".cache" / "pllava-recaption"
    except RuntimeError:  # no home directory
        return None


def _read_cache(directory: Path) -> dict[str, dict]:
    try:
        raw = json.loads((directory / CACHE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.debug("ignoring hash cache %s: %s", directory / CACHE_FILE, e)
        return {}
    if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or not isinstance(raw.get("files"), dict):
        log.debug("ignoring hash cache %s: not a version %d cache", directory / CACHE_FILE, CACHE_VERSION)
        return {}
    return {k: v for k, v in raw["files"].items() if _valid_entry(v)}


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int
        and type(entry.get("mtime_ns")) is int
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


def _cache_lookup(key: str, st: os.stat_result) -> str | None:
    directory = cache_dir()
    if directory is None:
        return None
    entry = _read_cache(directory).get(key)
    if entry and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
        return entry["sha256"].lower()
    return None


def _cache_store(key: str, st: os.stat_result, sha: str) -> None:
    directory = cache_dir()
    if directory is None:
        return
    tmp = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        files = _read_cache(directory)  # re-read: another process may have added entries meanwhile
        files.pop(key, None)
        files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        while len(files) > CACHE_MAX_ENTRIES:
            files.pop(next(iter(files)))  # oldest first
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CACHE_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "files": files}, f, indent=0, sort_keys=True)
        os.replace(tmp, directory / CACHE_FILE)
        tmp = None
    except OSError as e:
        log.debug("cannot write hash cache in %s: %s", directory, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
