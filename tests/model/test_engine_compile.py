"""The engine's compiled decode step (its CUDA-graph path on a GPU), checked on the CPU.

On CUDA `use_cuda_graphs` compiles the decode step with inductor's reduce-overhead mode; here the same
`torch.compile(..., fullgraph=True, dynamic=False)` call runs with a CPU backend (`compile_backend`). One inductor
compile (about a minute on 2 cores) is the whole cost of this module: it proves the step traces as one graph with
no break, is not compiled again as slots fill and empty, and gives the eager captions. Compile failures are
forced with backends that raise: the engine must decode on, eagerly, with one warning.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model.engine import CaptionEngine
from tests.model.conftest import random_clips
from tests.model.test_engine import MAX_LEN, QUESTIONS, mixed_requests, reference

SLOTS = 3  # fewer than the 10 requests: slots fill, empty and are refilled; the last steps leave slots idle


@pytest.fixture(scope="module")
def mixed(loaded_small):
    """The engine tests' mix: visual and text-only prompts, 3 to 20 new tokens, some with a repetition penalty;
    with their batch-1 `greedy_generate` ids."""
    features = loaded_small.model.encode_videos(random_clips(len(QUESTIONS), frames=3, seed=31))
    requests = mixed_requests(loaded_small, features)
    return requests, {r.id: reference(loaded_small, r) for r in requests}


def ids_by_request(engine: CaptionEngine, requests) -> dict:
    return {c.id: c.generation.token_ids for c in engine.generate(requests)}


@pytest.mark.slow
def test_compiled_decode_is_one_graph_compiled_once_with_the_eager_captions(loaded_small, mixed):
    requests, expected = mixed
    eager = ids_by_request(CaptionEngine(loaded_small, SLOTS, MAX_LEN, sync_every=2), requests)
    assert eager == expected

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a second compile raises (and would show below)
        engine = CaptionEngine(loaded_small, SLOTS, MAX_LEN, sync_every=2, use_cuda_graphs=True,
                               compile_backend="inductor")
        done = {c.id: c for c in engine.generate(requests)}

    assert {rid: c.generation.token_ids for rid, c in done.items()} == expected
    assert engine.compile_error is None
    assert engine.compiled_steps == engine.stats.steps - 1  # the first decode step runs eager, guarded
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    # the compiled step really saw slots fill, empty and refill
    s = engine.stats
    assert s.full_steps > 0 and s.idle_slot_steps > 0
    assert len({c.admitted_step for c in done.values()}) > SLOTS
    torch._dynamo.reset()


def raising_backend(gm, example_inputs):
    raising_backend.calls += 1
    raise RuntimeError("no compiler for this device")


def test_a_failing_compile_decodes_eagerly_with_one_warning(loaded_small, mixed, caplog):
    requests, expected = mixed
    raising_backend.calls = 0
    torch._dynamo.reset()
    engine = CaptionEngine(loaded_small, SLOTS, MAX_LEN, use_cuda_graphs=True, compile_backend=raising_backend)
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        assert ids_by_request(engine, requests) == expected  # step() never raised
    warnings = [r for r in caplog.records if r.name == "model.engine"]
    assert len(warnings) == 1 and "decoding eagerly" in warnings[0].getMessage()
    assert "no compiler for this device" in engine.compile_error
    assert raising_backend.calls == 1 and engine.compiled_steps == 0
    torch._dynamo.reset()


def test_a_compiled_step_failing_mid_run_is_redone_eagerly(loaded_small, mixed, caplog):
    """The compiled graph runs (its keys/values are scattered into the cache), then fails: the engine redoes
    that step eagerly and every caption is still the batch-1 one."""
    requests, expected = mixed
    runs = {"n": 0}

    def fails_on_third_run(gm, example_inputs):
        def run(*args):
            out = gm.forward(*args)
            runs["n"] += 1
            if runs["n"] == 3:
                raise RuntimeError("CUDA graph replay failed")
            return out

        return run

    torch._dynamo.reset()
    engine = CaptionEngine(loaded_small, SLOTS, MAX_LEN, use_cuda_graphs=True, compile_backend=fails_on_third_run)
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        assert ids_by_request(engine, requests) == expected
    assert [r.getMessage() for r in caplog.records if r.name == "model.engine"] == [
        "compiling the decode step failed after 2 compiled steps (RuntimeError: CUDA graph replay failed); "
        "decoding eagerly from now on"
    ]
    assert engine.compiled_steps == 2 and runs["n"] == 3
    torch._dynamo.reset()

