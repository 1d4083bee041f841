"""A clip's metadata in its prompts: {source_caption}, {duration_s}, {title}; a missing field is empty."""

from __future__ import annotations

import io
import json
import tarfile

from pipeline.prompt_fields import clip_fields, fill_fields, has_fields
from pipeline.shards import Sample, ShardReader


def test_fields_fill_per_clip_and_missing_ones_are_empty():
    s = Sample(key="k", shard="0", source_caption=" A man walks. ", clip_start_s=1.0, clip_end_s=4.5, title="Hike")
    values = clip_fields(s)
    assert values == {"source_caption": "A man walks.", "duration_s": "3.5", "title": "Hike"}
    text = "Was: {source_caption} ({duration_s} s, {title}). Keep {braces} and {caption}."
    assert fill_fields(text, values) == "Was: A man walks. (3.5 s, Hike). Keep {braces} and {caption}."
    bare = clip_fields(Sample(key="k", shard="0"))
    assert fill_fields(text, bare) == "Was:  ( s, ). Keep {braces} and {caption}."
    assert fill_fields("{source_caption}", {"source_caption": "x" * 5000}) == "x" * 500
    assert has_fields("{title}") and not has_fields("Describe {caption}") and not has_fields(None)


def test_the_title_is_read_from_the_source_json(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for key, meta in [("a", {"status": "failed_to_download", "title": "Top"}),
                          ("b", {"status": "failed_to_download", "yt_meta_dict": {"info": {"title": "Nested"}}}),
                          ("c", {"status": "failed_to_download", "title": 7})]:
            data = json.dumps(meta).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    titles = {s.key: s.title for s in ShardReader(str(path))}
    assert titles == {"a": "Top", "b": "Nested", "c": None}


def test_prompts_with_fields_reach_the_model_and_change_the_prompt_version(tmp_path):
    from model.tiny import build_tiny_checkpoint
    from pipeline.captioning import Captioner
    from pipeline.decode import DecodePool
    from pipeline.repair import GenSettings
    from pipeline.scheduler import CaptionService
    from pipeline.synthetic import write_synthetic_shards
    from tests.pipeline.test_captioning import make_manifest

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    write_synthetic_shards(tmp_path / "shards", shards=1, clips_per_shard=3, failed=0, corrupt=0, seed=2)
    m = make_manifest(tmp_path, ckpt, tmp_path, tmp_path / "out",
                      prompts={"en": "Earlier caption: {source_caption}. Length {duration_s} s. Describe it."})
    plain = Captioner.from_manifest(make_manifest(tmp_path, ckpt, tmp_path, tmp_path / "o2"))
    captioner = Captioner.from_manifest(m)
    assert captioner.prompt_version != plain.prompt_version and captioner.uses_fields
    with DecodePool(workers=1, max_ahead=4, mode="thread") as pool:
        items = [(s, c) for s, c in pool.imap(ShardReader(str(tmp_path / "shards/00000.tar")))]
    sample, clip = items[0]
    prompt = captioner.prompt_en_for(sample, clip, GenSettings(8))
    assert f"Earlier caption: {sample.source_caption}." in prompt and sample.source_caption
    assert f"Length {sample.clip_end_s - sample.clip_start_s:.1f} s." in prompt
    rows = CaptionService(captioner, num_slots=2, threaded=False).caption_all(items)
    assert sorted(r["key"] for r in rows) == sorted(s.key for s, _ in items)
    assert all(r["status"] in ("ok", "flagged") and r["prompt_version"] == captioner.prompt_version for r in rows)
