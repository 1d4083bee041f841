"""The continuous-batching service gives exactly the captions of the batch-1 loop, in every zh mode, with
captions of mixed lengths and clips admitted while others generate; shards share one engine without a drain;
a failing engine or a cancelled shard never loses or mixes rows."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch._dynamo

from model.engine import CaptionEngine
from pipeline.captioning import Captioner
from pipeline.decode import DecodePool
from pipeline.frames import decode_clip
from pipeline.scheduler import CaptionService
from pipeline.shard_runner import ShardSettings, run_shard
from pipeline.shards import ShardReader
from pipeline.writing import OutputStore
from tests.pipeline.test_captioning import make_manifest

COMPARED = ("caption_en", "caption_zh", "tokens_en", "tokens_zh", "caption_flags", "status", "frame_indices",
            "attempts", "first_flags")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint
    from model.tiny_mt import build_tiny_mt
    from pipeline.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("scheduler")
    ckpt = build_tiny_checkpoint(root / "pllava", seed=0)
    mt = build_tiny_mt(root / "mt", seed=0)
    planted = write_synthetic_shards(root / "shards", shards=3, clips_per_shard=6, failed=1, corrupt=0, seed=3)
    items = [(s, decode_clip(s.mp4)) for s in ShardReader(str(root / "shards/00000.tar")) if s.mp4]
    return root, ckpt, mt, planted, items


def eos_prone(captioner: Captioner, factor: float = 2.5) -> None:
    """Scale the EOS row of the LM head so the random model stops at varied steps (mixed caption lengths)."""
    head = captioner.loaded.model.language_model.get_output_embeddings().weight
    eos = captioner.loaded.tokenizer.eos_token_id
    with torch.no_grad():
        head[eos] *= factor


@pytest.mark.parametrize("mode", ["translate", "direct", "mt"])
def test_engine_rows_equal_the_batch_1_loop(art, tmp_path, mode):
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out", zh={"mode": mode, "max_new_tokens": 24},
                      generation={"max_new_tokens": 24, "batch_size": 2})
    captioner = Captioner.from_manifest(m)
    eos_prone(captioner)
    reference = {s.key: captioner.caption_batch([(s, c)])[0] for s, c in items}  # one clip at a time
    lengths = [r["tokens_en"] for r in reference.values()] + [r["tokens_zh"] for r in reference.values()]
    assert len(set(lengths)) >= 3 and min(lengths) < 24, f"captions should stop at different steps: {lengths}"
    for slots in (2, 5):  # fewer slots than clips: admitted while others generate
        service = CaptionService(captioner, num_slots=slots, threaded=False)
        rows = service.caption_all(items)
        assert sorted(r["key"] for r in rows) == sorted(reference)
        for row in rows:
            ref = reference[row["key"]]
            assert {k: row[k] for k in COMPARED} == {k: ref[k] for k in COMPARED}, (mode, slots, row["key"])
        assert service.stats.fallbacks == 0 and service.engine.stats.prefills >= len(items)


def test_shards_share_the_engine_and_commit_on_their_own(art, tmp_path):
    """Three shards run at once on one service (as an actor with shards in flight does): each finalizes its own
    rows exactly once, and the engine works on two shards' clips at the same moments (no drain)."""
    root, ckpt, mt, planted, _ = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out", generation={"max_new_tokens": 16, "batch_size": 2},
                      zh={"max_new_tokens": 16})
    captioner = Captioner.from_manifest(m)
    service = CaptionService(captioner, num_slots=4)
    store = OutputStore(m.output)
    mixed_steps = []
    original = service._completed

    def spy(completion):  # which shards' requests are in the engine when one finishes
        shards = {x.ticket.name for x in service._requests.values()}
        if len(shards) > 1:
            mixed_steps.append(shards)
        return original(completion)

    service._completed = spy
    errors = []

    def one(name):
        try:
            with DecodePool(workers=1, max_ahead=2, mode="thread") as pool:
                run_shard(str(root / f"shards/{name}.tar"), name, store=store, captioner=captioner,
                          decode_pool=pool, attempt=1, file_metadata={}, service=service,
                          settings=ShardSettings.from_manifest(m))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(f"{i:05d}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    import pyarrow.parquet as pq

    for name in ("00000", "00001", "00002"):
        keys = pq.read_table(tmp_path / f"out/data/{name}.parquet").column("key").to_pylist()
        assert sorted(keys) == sorted(planted[name]), name
    assert mixed_steps, "the engine never held two shards' clips at once: shards drained one by one"


def test_an_engine_failure_falls_back_clip_by_clip(art, tmp_path, monkeypatch):
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    captioner = Captioner.from_manifest(m)
    reference = {s.key: captioner.caption_batch([(s, c)])[0] for s, c in items}
    service = CaptionService(captioner, num_slots=2, threaded=False)
    calls = {"n": 0}
    step = service.engine.step

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step()

    monkeypatch.setattr(service.engine, "step", failing_step)
    rows = service.caption_all(items)
    assert sorted(r["key"] for r in rows) == sorted(reference)
    assert service.stats.engine_restarts == 1 and service.stats.fallbacks >= 1
    for row in rows:
        assert row["caption_en"] == reference[row["key"]]["caption_en"]


def test_a_failing_decode_compile_costs_one_warning_not_the_static_path(art, tmp_path, caplog):
    """A compile of the engine's decode step that fails at run time (as on a GPU whose compiler breaks): the
    engine decodes eagerly, the clips are not captioned one by one by the static path, the rows are the same."""
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    captioner = Captioner.from_manifest(m)
    eager = {r["key"]: r for r in CaptionService(captioner, num_slots=2, threaded=False).caption_all(items)}

    def broken_compiler(gm, example_inputs):
        raise RuntimeError("inductor: no working C++/Triton compiler")

    service = CaptionService(captioner, num_slots=2, threaded=False)
    torch._dynamo.reset()
    service.engine = CaptionEngine(captioner.loaded, service.num_slots, service.max_len, use_cuda_graphs=True,
                                   compile_backend=broken_compiler)
    with caplog.at_level(logging.WARNING):
        rows = service.caption_all(items)
    torch._dynamo.reset()
    assert sorted(r["key"] for r in rows) == sorted(eager)
    for row in rows:
        assert {k: row[k] for k in COMPARED} == {k: eager[row["key"]][k] for k in COMPARED}, row["key"]
    assert service.stats.engine_restarts == 0 and service.stats.fallbacks == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "decoding eagerly" in warnings[0] and "no working" in warnings[0]


def test_a_cancelled_ticket_gets_no_rows_and_frees_the_queue(art, tmp_path):
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    service = CaptionService(Captioner.from_manifest(m), num_slots=2)
    ticket = service.open("a")
    other = service.open("b")
    for s, c in items:
        assert service.submit(ticket, s, c, timeout=60)
    ticket.cancel()
    s, c = items[0]
    assert service.submit(other, s, c, timeout=60)
    while other.outstanding or ticket.outstanding:
        other.wait(timeout=1)
        service.raise_if_failed()
    assert ticket.take() == [] and [r["key"] for r in other.take()] == [s.key]


def test_a_service_nobody_holds_is_freed_and_its_thread_ends(art, tmp_path):
    import gc
    import weakref

    root, ckpt, mt, _, _ = art
    service = CaptionService(Captioner.from_manifest(make_manifest(root, ckpt, mt, tmp_path / "out")), num_slots=2)
    thread, ref = service._thread, weakref.ref(service)
    assert thread.is_alive()
    del service
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive() and ref() is None, "the model thread kept the service (and its model) alive"
