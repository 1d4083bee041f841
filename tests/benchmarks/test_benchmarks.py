"""The throughput benchmarks run end to end in their quick modes and print a sane table.

No timing is asserted: the numbers depend on the machine; only the shape and the invariants are checked.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import random_lora_weights, unmerged_lora
from model.loading import load_pllava

ROOT = Path(__file__).resolve().parents[2]


def run_module(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(output: str, header_start: str) -> list[list[str]]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_gpu_benchmark_tiny_mode_runs_on_cpu():
    out = run_module("benchmarks.gpu", "--tiny", timeout=900)  # with vLLM: two engine starts (a minute each)
    rows = table_rows(out, "| path | clips | clips/GPU-hour")
    assert [r[0] for r in rows] == [
        "reference: per-clip, unmerged LoRA, inline decode",
        "batched, batch 1, 1 decoders",
        "batched, batch 2, 1 decoders",
    ]
    for row in rows:
        assert int(row[1]) >= 1
        assert float(row[2]) > 0 and float(row[3]) > 0  # clips/hour, tokens/s
        assert row[5] == "n/a" and row[6] == "n/a"  # no GPU: busy % and memory are not made up
    assert rows[0][4] == "1.00x"
    assert "device: CPU (--tiny" in out
    assert f"transformers {importlib.metadata.version('transformers')} (declared: " in out

    # --tiny runs the engine comparison too: today's static loop and the engine, eager and "graphs"
    engine_rows = table_rows(out, "| mix path | clips | clips/GPU-hour")
    assert [r[0] for r in engine_rows] == [
        "static, batch 1 (today's loop)",
        "static, batch 2 (today's loop)",
        "engine, 2 slots, eager",
        "engine, 2 slots, CUDA graphs (ignored on CPU)",
    ]
    for row in engine_rows:
        assert int(row[1]) >= 1
        assert float(row[2]) > 0 and float(row[3]) > 0  # clips/hour, useful tokens/s
        assert row[4].endswith("x") and float(row[4][:-1]) > 0  # ratio to the best static row
        assert 0 < float(row[5]) <= 1  # slot utilisation
        assert row[8] == "n/a" and row[9] == "n/a"  # no GPU: busy % and memory are not made up
    assert "1.00x" in [r[4] for r in engine_rows if r[0].startswith("static")]
    for row in engine_rows[2:]:
        assert 0 < float(row[6]) <= 1  # steady utilisation: the 2 slots were full for most steps
    assert "ratio engine / today's loop: best engine row" in out
    assert "skipped:" not in out

    # --tiny runs native vs vLLM too (head_dim 32, float32): vLLM's rows only where vLLM is installed, else said so
    vs_rows = table_rows(out, "| engine | status | clips")
    assert [r[0] for r in vs_rows] == [
        "native, 2 slots, eager",
        "vLLM, max_num_seqs 4, float32 KV",
        "vLLM, max_num_seqs 4, fp8 KV",
    ]
    native, vllm_auto, vllm_fp8 = vs_rows
    if importlib.util.find_spec("vllm") is None:
        for row in (vllm_auto, vllm_fp8):
            assert row[1] == "not installed" and row[2:6] == ["-", "-", "-", "n/a"]  # nothing made up
        assert "vLLM export not made" in out
    else:
        assert vllm_auto[1] == vllm_fp8[1] == "ok"
        assert vllm_auto[11] == "4/4"  # same weights at float32: vLLM's greedy English ids are the native ones
        assert re.fullmatch(r"[0-4]/4", vllm_fp8[11])  # an fp8 cache may change some
        assert int(vllm_auto[6]) > 0 and int(vllm_fp8[6]) > int(vllm_auto[6])  # fp8: more positions, same bytes
    for row in [native] + ([vllm_auto, vllm_fp8] if vllm_auto[1] == "ok" else []):
        assert row[1] == "ok" and int(row[2]) == 4
        assert float(row[3]) > 0 and float(row[4]) > 0  # clips/hour, generated tokens/s
        assert row[5] == "n/a" and row[7] == "n/a"  # no GPU: memory and busy % are not made up
    assert int(native[6]) == 2 * int(out.split("max_len ")[-1].split(";")[0])  # 2 slots x max_len positions


def test_gpu_benchmark_time_limit_skips_rows_and_says_so():
    out = run_module("benchmarks.gpu", "--tiny", "--engine", "--engines", "--max-minutes", "0")
    assert "| mix path |" in out and "| path | clips |" not in out  # --engine(s): the comparisons only
    skipped = [line for line in out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 4 and all("--max-minutes 0" in line for line in skipped)
    assert "ratio engine / today's loop: n/a" in out

    rows = table_rows(out, "| engine | status | clips")  # native vs vLLM: every row says why it did not run
    assert [r[0] for r in rows] == ["native, eager", "vLLM, max_num_seqs 4, float32 KV", "vLLM, max_num_seqs 4, fp8 KV"]
    vllm_status = "skipped: 0s left" if importlib.util.find_spec("vllm") else "not installed"
    for row, status in zip(rows, ["skipped: 0s left", vllm_status, vllm_status]):
        assert row[1].startswith(status) and row[2:5] == ["-", "-", "-"], row  # nothing measured, nothing made up


def test_gpu_benchmark_takes_the_declared_transformers_range_only(monkeypatch):
    import transformers

    from benchmarks.gpu import check_versions, declared_range, device_wheels, locked_versions

    declared = declared_range("transformers")
    assert locked_versions()["transformers"] in declared  # the lock lies inside the declared range
    assert all(wheel.split("==")[1] == locked_versions()[wheel.split("==")[0]] for wheel in device_wheels())
    check_versions()  # the installed one
    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # the device image's: inside the range
    check_versions()
    for outside in ("5.15.0", "5.99.0"):
        monkeypatch.setattr(transformers, "__version__", outside)
        with pytest.raises(SystemExit, match=rf"transformers {outside}: .*transformers{re.escape(str(declared))} "
                                             rf".*transformers==.*huggingface_hub==.*\.whl"):
            check_versions()


def test_pipeline_benchmark_quick_mode():
    out = run_module("benchmarks.pipeline", "--quick")
    rows = table_rows(out, "| path | clips/s")
    assert len(rows) == 6
    assert rows[0][0].startswith("reference") and rows[0][2] == "1.00x"
    for row in rows:
        assert float(row[1]) > 0
        assert float(row[6]) > 0  # peak RSS of the actor (model process + decoders)
    assert "overhead ratio, job path / model alone" in out
    # Same batches, same weights: the job path must give exactly the model-alone captions.
    assert "job path vs model alone 4/4" in out


def test_unmerged_lora_matches_the_merged_weights_and_is_undone(tiny_dir):
    merged = load_pllava(tiny_dir, lora_alpha=4.0)
    base = load_pllava(tiny_dir, lora_alpha=0.0)
    from model.loading import read_safetensors, split_lora

    _, lora = split_lora(read_safetensors(tiny_dir, dtype=torch.float32))
    x = torch.randn(3, 64)
    q_merged = merged.model.language_model.model.layers[0].self_attn.q_proj
    original = base.model.language_model.model.layers[0].self_attn.q_proj
    with unmerged_lora(base.model, lora, 4.0):
        q_lora = base.model.language_model.model.layers[0].self_attn.q_proj
        assert q_lora is not original
        torch.testing.assert_close(q_lora(x), q_merged(x), rtol=1e-4, atol=1e-5)
    assert base.model.language_model.model.layers[0].self_attn.q_proj is original


def test_random_lora_weights_have_the_released_shapes(tiny_dir):
    model = load_pllava(tiny_dir).model
    weights = random_lora_weights(model, rank=8)
    a, b = weights["language_model.model.layers.1.self_attn.v_proj"]
    assert a.shape == (8, 64) and b.shape == (64, 8)
    assert len(weights) == 2 * len(model.language_model.model.layers)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench"), seed=0)


def test_boundaries_benchmark_small_run():
    out = run_module("benchmarks.boundaries", "--shards", "2", "--clips-per-shard", "2", "--en-min", "4",
                     "--en-max", "8", "--slots", "2")
    rows = table_rows(out, "| mode | seconds")
    assert [r[0] for r in rows] == ["drain", "overlap"] and rows[0][3] == "1.00x"
    for row in rows:
        assert float(row[2]) > 0 and 0 < float(row[4]) <= 1
