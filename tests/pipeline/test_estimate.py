"""pipeline/estimate.py: the sample spread over the shard list, the job's clip count (counted or
extrapolated, and saying which), the measurement through the real service, the projection."""

from __future__ import annotations

import http.server
import threading

import pytest

from pipeline.decode import DecodePool
from pipeline.estimate import count_clips, measure, pick_shards, project, read_picks, tar_keys
from pipeline.scheduler import CaptionService
from pipeline.shards import ShardReader


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from pipeline.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("estimate")
    planted = write_synthetic_shards(root, shards=3, clips_per_shard=4, failed=1, corrupt=1, seed=5)
    return root, planted


def test_the_sample_is_spread_over_the_shard_list():
    shards = [(f"{i:05d}", f"/s/{i:05d}.tar") for i in range(10)]
    picks = pick_shards(shards, 4)
    assert [p[0] for p in picks] == ["00000", "00003", "00006", "00009"] and sum(p[2] for p in picks) == 4
    picks = pick_shards(shards, 64)
    assert len(picks) == 10 and sum(p[2] for p in picks) == 64 and {p[2] for p in picks} == {6, 7}
    assert pick_shards(shards[:1], 5) == [("00000", "/s/00000.tar", 5)]
    assert pick_shards([], 5) == []


def test_clips_are_counted_locally_and_extrapolated_remotely(shard_dir):
    root, planted = shard_dir
    shards = [(name, str(root / f"{name}.tar")) for name in sorted(planted)]
    for name, path in shards:
        assert tar_keys(path) == len(planted[name]) == sum(1 for _ in ShardReader(path))
    local = count_clips(shards)
    assert local.keys == sum(len(v) for v in planted.values()) and local.how == "counted"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = [(name, f"http://127.0.0.1:{server.server_port}/{name}.tar") for name, _ in shards] * 10
        count = count_clips(remote)
    finally:
        server.shutdown()
    per_shard = len(planted[shards[0][0]])
    assert count.keys == per_shard * len(remote) and count.how.startswith("extrapolated from 2 of 30 shards")


def test_projection():
    p = project(2.0, 72_000, 1.0, 8, 2.5)
    assert p["actor_hours"] == pytest.approx(10.0) and p["gpu_hours"] == pytest.approx(10.0)
    assert p["wall_hours"] == pytest.approx(1.25) and p["cost"] == pytest.approx(25.0)
    cpu = project(2.0, 72_000, 0.0, 2, 2.5)
    assert cpu["gpu_hours"] == 0 and cpu["cost"] is None and cpu["wall_hours"] == pytest.approx(5.0)
    assert project(0.0, 10, 1.0, 1, 1.0)["gpu_hours"] is None


def test_measure_runs_the_real_path_and_writes_nothing(shard_dir, tmp_path):
    from pipeline.captioning import Captioner
    from tests.pipeline.test_captioning import make_manifest

    root, planted = shard_dir
    from model.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    m = make_manifest(root, ckpt, tmp_path, tmp_path / "out", shards=str(root / "00000.tar"))
    captioner = Captioner.from_manifest(m)
    service = CaptionService(captioner, num_slots=2)
    picks = pick_shards([(n, str(root / f"{n}.tar")) for n in sorted(planted)], 6)
    samples = list(read_picks(picks))
    assert len(samples) == 6 and {s.shard for s in samples} == set(planted)
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        result = measure(service, pool, samples, warmup=2)
    service.close()
    summary = result.summary()
    assert result.clips == 6 and sorted(r["key"] for r in result.rows) == sorted(s.key for s in samples)
    assert summary["clips_per_s"] > 0 and sum(summary["status_share"].values()) == pytest.approx(1.0)
    captioned = [r for r in result.rows if r["status"] in ("ok", "flagged")]
    assert captioned and summary["tokens_en_per_clip"] == pytest.approx(
        sum(r["tokens_en"] for r in captioned) / len(captioned))
    assert not (tmp_path / "out").exists()  # nothing written
