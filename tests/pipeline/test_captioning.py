"""Captions end to end without Ray: synthetic shard → decode → tiny PLLaVA → Parquet, for each zh mode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.captioning import Captioner
from pipeline.chinese import normalize_zh
from pipeline.decode import DecodePool
from pipeline.manifest import manifest_from_dict
from pipeline.quality import FLAG_NAMES
from pipeline.shard_runner import ShardInterrupted, ShardSettings, run_shard
from pipeline.shards import ShardReader
from pipeline.writing import COLUMNS, OutputStore

MAX_NEW = 12


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    from model.tiny import build_tiny_checkpoint
    from model.tiny_mt import build_tiny_mt
    from pipeline.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("captioning")
    ckpt = build_tiny_checkpoint(root / "pllava", seed=0)
    mt = build_tiny_mt(root / "mt", seed=0)
    planted = write_synthetic_shards(root / "shards", shards=1, clips_per_shard=4, failed=1, corrupt=1, seed=3)
    return root, ckpt, mt, planted


def make_manifest(root, ckpt, mt, out, **over):
    spec = {
        "shards": str(root / "shards/00000.tar"),
        "output": str(out),
        "model": {"path": str(ckpt), "dtype": "float32", "device": "cpu"},
        "generation": {"max_new_tokens": MAX_NEW, "batch_size": 3},
        "zh": {"max_new_tokens": MAX_NEW, "mt_model": str(mt)},
        "chunk_size": 2,
    }
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    return manifest_from_dict(spec)


def run(m, captioner=None):
    captioner = captioner or Captioner.from_manifest(m)
    store = OutputStore(m.output)
    d = captioner.description  # as the actor builds its pool: the checkpoint's frame count and crop
    with DecodePool(workers=1, max_ahead=4, mode="thread", num_frames=d.num_frames, size=d.image_size) as pool:
        run_shard(m.shards[0], "00000", store=store, captioner=captioner, decode_pool=pool, attempt=1,
                  file_metadata={}, settings=ShardSettings.from_manifest(m))
    return pq.read_table(f"{m.output}/data/00000.parquet").to_pylist(), captioner


@pytest.mark.parametrize("mode, variant", [("translate", "zh-Hans"), ("direct", "zh-TW"), ("mt", "zh-HK")])
def test_every_zh_mode_writes_bilingual_rows(artefacts, tmp_path, mode, variant):
    root, ckpt, mt, planted = artefacts
    # the first attempts' budgets (the repair pass is tested on its own below)
    m = make_manifest(root, ckpt, mt, tmp_path / "out", zh={"mode": mode, "variant": variant},
                      quality={"repair_attempts": 0})
    rows, captioner = run(m)
    assert set(rows[0]) == set(COLUMNS)
    assert {r["key"]: r["status"] for r in rows if r["status"] not in ("ok", "flagged")} == {
        k: s for k, s in planted["00000"].items() if s != "ok"}
    captioned = [r for r in rows if r["status"] in ("ok", "flagged")]
    assert len(captioned) == sum(s == "ok" for s in planted["00000"].values())
    for r in captioned:
        assert isinstance(r["caption_en"], str) and isinstance(r["caption_zh"], str)
        assert normalize_zh(r["caption_zh"], variant) == r["caption_zh"]  # already in the requested variant
        assert 0 <= r["tokens_en"] <= MAX_NEW and 0 <= r["tokens_zh"] <= MAX_NEW
        assert set(r["caption_flags"]) <= set(FLAG_NAMES) and (r["status"] == "flagged") == bool(r["caption_flags"])
        assert ("truncated" in r["caption_flags"]) == (r["tokens_en"] == MAX_NEW or r["tokens_zh"] == MAX_NEW)
        assert r["prompt_version"] == captioner.prompt_version and r["lora_alpha"] == 4.0
        assert len(r["frame_indices"]) == 16 and r["width"] > 0 and r["fps"] > 0
    assert captioner.stats.tokens_en == sum(r["tokens_en"] for r in captioned)
    assert captioner.stats.tokens_zh == sum(r["tokens_zh"] for r in captioned)


def test_direct_mode_reuses_visual_features(artefacts, tmp_path):
    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out", zh={"mode": "direct"})
    captioner = Captioner.from_manifest(m)
    calls = []
    encode = captioner.loaded.model.encode_videos
    captioner.loaded.model.encode_videos = lambda pixels: calls.append(pixels.shape[0]) or encode(pixels)
    rows, _ = run(m, captioner)
    assert sum(calls) == sum(r["status"] in ("ok", "flagged") for r in rows)  # CLIP ran once per clip


def test_english_only(artefacts, tmp_path):
    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out", languages=["en"])
    rows, _ = run(m)
    captioned = [r for r in rows if r["status"] in ("ok", "flagged")]
    assert captioned and all(r["caption_zh"] is None and r["tokens_zh"] is None for r in captioned)
    assert all(r["caption_en"] is not None for r in captioned)


def test_a_bad_clip_becomes_an_error_row_and_the_batch_goes_on(artefacts, tmp_path):
    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    captioner = Captioner.from_manifest(m)
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        items = [(s, c) for s, c in pool.imap(ShardReader(m.shards[0])) if hasattr(c, "pixel_values")][:2]
    broken = dataclasses.replace(items[1][1], frames=np.zeros((16, 7, 7, 3), np.uint8))  # wrong size for CLIP
    rows = captioner.caption_batch([items[0], (items[1][0], broken)])
    assert [r["key"] for r in rows] == [items[0][0].key, items[1][0].key]
    assert rows[0]["status"] in ("ok", "flagged") and rows[0]["caption_en"] is not None
    assert rows[1]["status"] == "error" and rows[1]["error"].startswith("model error:")
    assert rows[1]["caption_en"] is None


def test_custom_prompts_change_the_prompt_version(artefacts, tmp_path):
    root, ckpt, mt, _ = artefacts
    default = Captioner.from_manifest(make_manifest(root, ckpt, mt, tmp_path / "a"))
    custom = Captioner.from_manifest(make_manifest(root, ckpt, mt, tmp_path / "b", prompts={"en": "What happens?"}))
    assert default.prompt_version != custom.prompt_version
    assert "What happens?" in custom.prompt_en


def test_truncated_shard_commits_what_was_read_and_is_never_done(artefacts, tmp_path):
    """A cut shard keeps the rows it read (committed chunks) but is not finalized: the attempt fails with the
    reason, so the clips past the cut are never silently lost; the repaired shard then finishes exactly once."""
    from pipeline.shard_runner import ShardIncomplete

    root, ckpt, mt, planted = artefacts
    data = (root / "shards/00000.tar").read_bytes()
    cut = tmp_path / "00000.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    m = m.replace(shards=[str(cut)])
    with pytest.raises(ShardIncomplete, match="incomplete: shard ends"):
        run(m)
    store = OutputStore(m.output)
    assert not store.is_finished("00000")
    committed = store.committed_keys("00000")
    assert 0 < len(committed) < len(planted["00000"]) and committed <= set(planted["00000"])
    import json

    state = json.loads((tmp_path / "out/_progress/00000.json").read_text())
    assert state["state"] == "running"  # the driver records the failed attempt; it is never "done"
    chunk_rows = [r for p in store.chunk_paths("00000") for r in pq.read_table(p).to_pylist()]
    # the key being read at the cut is not committed as an error: a complete copy may have all its members
    assert not [r for r in chunk_rows if r["error"] and "truncated" in r["error"]]
    cut.write_bytes(data)  # the download is repaired: the rerun resumes after the committed keys
    rows, _ = run(m)
    assert sorted(r["key"] for r in rows) == sorted(planted["00000"])
    for r in rows:  # every clip, the one at the cut included, ends with its planted kind of status
        expected = {"ok", "flagged"} if planted["00000"][r["key"]] == "ok" else {planted["00000"][r["key"]]}
        assert r["status"] in expected, r


def test_resume_skips_committed_keys(artefacts, tmp_path):
    root, ckpt, mt, planted = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    store = OutputStore(m.output)
    first_key = next(iter(ShardReader(m.shards[0]))).key
    marker = {c: None for c in COLUMNS}
    marker.update(key=first_key, shard="00000", status="error", error="committed by an earlier attempt", caption_flags=[])
    store.commit_chunk("00000", [marker], attempt=1)
    rows, _ = run(m)
    assert sorted(r["key"] for r in rows) == sorted(planted["00000"])
    kept = next(r for r in rows if r["key"] == first_key)
    assert kept["error"] == "committed by an earlier attempt"  # not recomputed


def test_shard_time_limit_keeps_committed_rows_and_fails_the_attempt(artefacts, tmp_path):
    from pipeline.shard_runner import ShardTimeout

    root, ckpt, mt, planted = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out", shard_timeout_s=1e-9)
    with pytest.raises(ShardTimeout, match="ran past its"):
        run(m)
    store = OutputStore(m.output)
    assert not store.is_finished("00000")  # this attempt failed; its committed chunks (if any) stay for resume
    rows, _ = run(make_manifest(root, ckpt, mt, tmp_path / "out"))
    assert sorted(r["key"] for r in rows) == sorted(planted["00000"])


def test_batched_normalisation_equals_per_clip_pixel_values(artefacts, tmp_path):
    """The uint8 batch normalised at once is bit-identical to stacking each clip's float pixels."""
    import torch

    from pipeline.frames import normalize_frames

    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        clips = [c for _, c in pool.imap(ShardReader(m.shards[0])) if hasattr(c, "frames")]
    batched = normalize_frames(torch.from_numpy(np.stack([c.frames for c in clips])))
    assert torch.equal(batched, torch.stack([c.pixel_values for c in clips]))


# ------------------------------------------------------------------ checkpoints that are not the released 16x336 CLIP

OTHER_MEAN, OTHER_STD = (0.5, 0.25, 0.75), (0.2, 0.4, 0.3)


@pytest.fixture(scope="module")
def other_checkpoints(artefacts):
    from model.tiny import build_tiny_checkpoint

    root = artefacts[0]
    eight = build_tiny_checkpoint(root / "pllava-8f", seed=0, num_frames=8, pooling_shape=(8, 12, 12))
    norm = build_tiny_checkpoint(root / "pllava-norm", seed=0, image_mean=OTHER_MEAN, image_std=OTHER_STD)
    return eight, norm


def _assert_captioned(rows, planted):
    """Every clip planted good is captioned (never `error`); the planted failures keep their status."""
    assert sorted(r["key"] for r in rows) == sorted(planted["00000"])
    for r in rows:
        if planted["00000"][r["key"]] == "ok":
            assert r["status"] in ("ok", "flagged") and r["caption_en"] is not None, r
        else:
            assert r["status"] == planted["00000"][r["key"]], r


def test_an_8_frame_checkpoint_samples_and_captions_8_frames(artefacts, other_checkpoints, tmp_path):
    root, _, mt, planted = artefacts
    eight, _ = other_checkpoints
    m = make_manifest(root, eight, mt, tmp_path / "out", languages=["en"])
    captioner = Captioner.from_manifest(m)
    assert (captioner.description.num_frames, captioner.description.pooling_shape) == (8, (8, 12, 12))
    shapes = []
    encode = captioner.loaded.model.encode_videos
    captioner.loaded.model.encode_videos = lambda pixels: shapes.append(tuple(pixels.shape[1:])) or encode(pixels)
    rows, _ = run(m, captioner)
    _assert_captioned(rows, planted)
    captioned = [r for r in rows if r["status"] in ("ok", "flagged")]
    assert captioned and all(len(r["frame_indices"]) == 8 for r in captioned)
    assert shapes and set(shapes) == {(8, 3, 336, 336)}


def test_16_frames_into_an_8_frame_model_are_refused_with_the_reason(artefacts, other_checkpoints, tmp_path):
    root, _, mt, _ = artefacts
    m = make_manifest(root, other_checkpoints[0], mt, tmp_path / "out", languages=["en"])
    captioner = Captioner.from_manifest(m)
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:  # the released 16 frames
        item = next((s, c) for s, c in pool.imap(ShardReader(m.shards[0])) if hasattr(c, "frames"))
    row = captioner.caption_batch([item])[0]
    assert row["status"] == "error" and "the model takes up to 8 frames of 336x336" in row["error"]


def test_the_checkpoints_mean_and_std_normalise_the_frames(artefacts, other_checkpoints, tmp_path):
    import torch

    from pipeline.frames import normalize_frames

    root, _, mt, planted = artefacts
    _, norm = other_checkpoints
    m = make_manifest(root, norm, mt, tmp_path / "out", languages=["en"])
    captioner = Captioner.from_manifest(m)
    assert captioner.description.image_mean == OTHER_MEAN and captioner.description.image_std == OTHER_STD
    fed = []
    encode = captioner.loaded.model.encode_videos
    captioner.loaded.model.encode_videos = lambda pixels: fed.append(pixels) or encode(pixels)
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        sample, clip = next((s, c) for s, c in pool.imap(ShardReader(m.shards[0])) if hasattr(c, "frames"))
    captioner.encode([(sample, clip)])
    # By hand: / 255, minus the checkpoint's mean, over its std, per RGB channel.
    x = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).double() / 255
    expected = (x - torch.tensor(OTHER_MEAN, dtype=torch.float64).view(3, 1, 1)) / torch.tensor(
        OTHER_STD, dtype=torch.float64).view(3, 1, 1)
    assert len(fed) == 1 and fed[0].shape == (1, 16, 3, 336, 336)
    assert torch.allclose(fed[0][0].double(), expected, atol=1e-5)
    with_clip_values = normalize_frames(torch.from_numpy(clip.frames))
    assert (fed[0][0] - with_clip_values).abs().max() > 0.1  # not the default CLIP normalisation
    rows, _ = run(m, captioner)
    _assert_captioned(rows, planted)


def test_the_data_file_has_the_row_modules_schema_and_the_record_its_failure_reasons(artefacts, tmp_path):
    """pipeline.rows owns the row: the job's data file has exactly rows.SCHEMA, and the shard's progress record
    holds the histogram of its failed rows' reasons (what `recaption status` shows without reading Parquet)."""
    import json
    from collections import Counter

    from pipeline import rows as row_module

    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    rows, _ = run(m)
    schema = pq.read_schema(f"{m.output}/data/00000.parquet")
    assert schema.remove_metadata() == row_module.SCHEMA
    assert [f.type for f in schema] == [f.type for f in row_module.SCHEMA] and schema.names == list(COLUMNS)
    state = json.loads((tmp_path / "out/_progress/00000.json").read_text())
    failures = Counter(row_module.row_failure(r).kind for r in rows if r["status"] in row_module.FAILED_STATUSES)
    assert {k.split(":")[0] for k in failures} == {"source", "decode"}  # the planted failed and corrupt clips
    assert state["error_reasons"] == dict(failures)


def test_one_stats_object_feeds_the_progress_record_and_continues_across_attempts(artefacts, tmp_path):
    """pipeline.stats: the shard's progress record holds its committed rows' counters (rows by status, flags,
    tokens, failure reasons) equal to what the data file holds, and an attempt that resumes after committed
    chunks continues them instead of starting from zero."""
    import json
    from collections import Counter

    from pipeline.stats import Stats

    root, ckpt, mt, _ = artefacts
    m = make_manifest(root, ckpt, mt, tmp_path / "out")
    rows, _ = run(m)
    state = json.loads((tmp_path / "out/_progress/00000.json").read_text())
    assert state["committed"] == dict(Counter(r["status"] for r in rows)) == state["rows"]
    assert state["tokens"] == {"en": sum(r["tokens_en"] or 0 for r in rows),
                               "zh": sum(r["tokens_zh"] or 0 for r in rows)} and state["tokens"]["en"] > 0
    assert state["flags"] == dict(Counter(f for r in rows for f in r["caption_flags"]))
    assert state["repaired"] == sum(1 for r in rows if (r["attempts"] or 0) > 1)
    assert state["input_flags"] == {} and state["members_skipped"] == {}
    continued = Stats.from_record(state).record_fields()
    assert continued.pop("members_skipped") == {}  # not read back: each attempt counts the whole tar
    assert continued == {k: state[k] for k in ("committed", "flags", "tokens", "error_reasons", "repaired",
                                               "input_flags")}

    # A second output: the first attempt stops after its first chunk; the rerun continues the counters.
    m2 = make_manifest(root, ckpt, mt, tmp_path / "out2")
    captioner = Captioner.from_manifest(m2)
    store = OutputStore(m2.output)
    commits = []

    def stop_after_first_chunk():
        return bool(commits)

    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        with pytest.raises(ShardInterrupted):
            run_shard(m2.shards[0], "00000", store=store, captioner=captioner, decode_pool=pool, attempt=1,
                      file_metadata={}, settings=ShardSettings.from_manifest(m2), should_stop=stop_after_first_chunk,
                      on_commit=lambda chunk, outcome: commits.append(len(chunk)))
        first = json.loads((tmp_path / "out2/_progress/00000.json").read_text())
        assert sum(first["committed"].values()) == sum(commits) < len(rows)
        outcome = run_shard(m2.shards[0], "00000", store=store, captioner=captioner, decode_pool=pool, attempt=2,
                            file_metadata={}, settings=ShardSettings.from_manifest(m2))
    assert outcome.stats.rows_new == len(rows) - sum(commits)  # this attempt's rows only
    again = json.loads((tmp_path / "out2/_progress/00000.json").read_text())
    rows2 = pq.read_table(f"{m2.output}/data/00000.parquet").to_pylist()
    assert again["committed"] == dict(Counter(r["status"] for r in rows2)) == again["rows"]
    assert again["tokens"]["en"] == sum(r["tokens_en"] or 0 for r in rows2)
    assert again["error_reasons"] == state["error_reasons"]  # the same planted failures, each counted once
