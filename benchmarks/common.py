"""Shared pieces of the throughput benchmarks: the reference-style unmerged LoRA, RSS and CPU sampling,
machine facts and markdown tables.

Nothing here is used by the job; it exists so that `benchmarks/pipeline.py` and `benchmarks/gpu.py` measure
their baselines the same way.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import date

import psutil
import torch
from torch import nn

from model.pllava import PllavaModel


class LoraLinear(nn.Module):
    """The reference's inference-time LoRA, unmerged: y = W0·x + s·B(A·x), s = alpha / r."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, lora_a.shape[0], bias=False, device=lora_a.device,
                                dtype=base.weight.dtype)
        self.lora_b = nn.Linear(lora_a.shape[0], base.out_features, bias=False, device=lora_b.device,
                                dtype=base.weight.dtype)
        with torch.no_grad():
            self.lora_a.weight.copy_(lora_a)
            self.lora_b.weight.copy_(lora_b)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


LORA_SITES = ("q_proj", "v_proj")


@contextmanager
def unmerged_lora(model: PllavaModel, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float):
    """Temporarily replaces q_proj/v_proj by LoraLinear(W0 = the current weight, A, B, alpha/r).

    `weights`: {"language_model.model.layers.{i}.self_attn.{q,v}_proj": (A (r, in), B (out, r))}.
    """
    replaced = []
    for i, layer in enumerate(model.language_model.model.layers):
        for name in LORA_SITES:
            a, b = weights[f"language_model.model.layers.{i}.self_attn.{name}"]
            base = getattr(layer.self_attn, name)
            setattr(layer.self_attn, name, LoraLinear(base, a, b, alpha / a.shape[0]))
            replaced.append((layer.self_attn, name, base))
    try:
        yield model
    finally:
        for attn, name, base in replaced:
            setattr(attn, name, base)


def random_lora_weights(model: PllavaModel, rank: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random A/B pairs of the released shapes (A (r, in), B (out, r)), on the model's device and dtype."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.language_model.model.layers):
        for name in LORA_SITES:
            base = getattr(layer.self_attn, name)
            a = torch.empty(rank, base.in_features, device=model.device, dtype=model.dtype)
            b = torch.empty(base.out_features, rank, device=model.device, dtype=model.dtype)
            a.normal_(0.0, base.in_features**-0.5, generator=gen)
            b.normal_(0.0, 0.02, generator=gen)
            out[f"language_model.model.layers.{i}.self_attn.{name}"] = (a, b)
    return out


class ProcessSampler:
    """Samples, every `interval_s`, the RSS of this process and of its children (decoder processes)
    and their CPU time, in a daemon thread. Peaks in MiB; CPU time in seconds."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.me = psutil.Process()
        self.peak_self_mib = 0.0
        self.peak_child_mib = 0.0  # the largest single child
        self.peak_total_mib = 0.0  # this process + all children at one instant
        self._child_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> ProcessSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def child_cpu_s(self) -> float:
        return sum(self._child_cpu.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        try:
            own = self.me.memory_info().rss / 2**20
            total = own
            for child in self.me.children(recursive=True):
                try:
                    rss = child.memory_info().rss / 2**20
                    times = child.cpu_times()
                except psutil.Error:
                    continue
                self.peak_child_mib = max(self.peak_child_mib, rss)
                total += rss
                self._child_cpu[child.pid] = times.user + times.system
            self.peak_self_mib = max(self.peak_self_mib, own)
            self.peak_total_mib = max(self.peak_total_mib, total)
        except psutil.Error:
            pass


def child_cpu_seconds(pids: Sequence[int]) -> float:
    """user+system CPU seconds used so far by the given processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def machine_line() -> str:
    return (f"date {date.today()}  python {platform.python_version()}  {platform.platform()}  "
            f"cpus {len(os.sched_getaffinity(0))}  torch {torch.__version__}")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return f"python -m {module} {' '.join(args)}".rstrip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
