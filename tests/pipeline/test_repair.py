"""The repair pass (pipeline/repair.py): a flagged caption is generated again with settings meant to fix its
flag, through the same engine as first attempts; the row keeps the best attempt, its attempt count and the
first attempt's flags, and is the same every time."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pipeline.captioning import Captioner
from pipeline.repair import (
    LANGUAGE_HINT,
    MIN_NEW_TOKENS_EMPTY,
    Attempt,
    GenSettings,
    best,
    needs_repair,
    repair_settings,
)
from pipeline.scheduler import CaptionService
from tests.pipeline.test_captioning import make_manifest
from tests.pipeline.test_scheduler import art  # noqa: F401  (fixture: tiny checkpoint, shards, decoded clips)

BASE = GenSettings(max_new_tokens=20, repetition_penalty=None)


def test_each_flag_gets_the_setting_meant_to_fix_it():
    assert repair_settings(["repetition"], BASE, 20).repetition_penalty == pytest.approx(1.3)
    assert repair_settings(["echo"], GenSettings(20, 1.2), 20).repetition_penalty == pytest.approx(1.5)
    assert repair_settings(["empty"], BASE, 20).min_new_tokens == MIN_NEW_TOKENS_EMPTY
    assert repair_settings(["truncated"], BASE, 20).max_new_tokens == 40
    assert repair_settings(["truncated"], repair_settings(["truncated"], BASE, 20), 20).max_new_tokens == 40
    assert repair_settings(["wrong_language"], BASE, 20).language_hint
    both = repair_settings(["repetition", "truncated"], BASE, 20)
    assert both.repetition_penalty == pytest.approx(1.3) and both.max_new_tokens == 40 and not both.language_hint
    # escalation: a second repetition repair raises the penalty again
    assert repair_settings(["repetition"], both, 20).repetition_penalty == pytest.approx(1.6)


def test_attempts_and_the_kept_one():
    a = Attempt("", 0, False, ("empty",), BASE)
    b = Attempt("x y", 2, True, ("truncated",), BASE)
    c = Attempt("a dog runs", 3, False, (), BASE)
    assert needs_repair([a], 1) and not needs_repair([a, b], 1) and needs_repair([a, b], 2)
    assert not needs_repair([c], 3) and not needs_repair([a], 0)
    assert best([a, b]) is a  # equal flags: the earliest
    assert best([a, b, c]) is c


@contextlib.contextmanager
def stops_at_once(captioner: Captioner):
    """Bias the loaded model's LM head towards eos: every first attempt is an empty caption."""
    lm = captioner.loaded.model.language_model
    original = lm.lm_head
    biased = torch.nn.Linear(original.in_features, original.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(original.weight)
        biased.bias.zero_()
        biased.bias[captioner.loaded.tokenizer.eos_token_id] = 1e4
    lm.lm_head = biased
    try:
        yield
    finally:
        lm.lm_head = original


@pytest.mark.parametrize("mode", ["translate", "direct"])
def test_an_empty_first_attempt_is_repaired_through_the_engine(art, tmp_path, mode):  # noqa: F811
    root, ckpt, mt, _, items = art
    m = make_manifest(root, ckpt, mt, tmp_path / "out", zh={"mode": mode}, generation={"max_new_tokens": 16})
    captioner = Captioner.from_manifest(m)
    with stops_at_once(captioner):
        service = CaptionService(captioner, num_slots=3, threaded=False)
        rows = {r["key"]: r for r in service.caption_all(items)}
        again = {r["key"]: r for r in CaptionService(captioner, num_slots=2, threaded=False).caption_all(items)}
        static = {s.key: captioner.caption_batch([(s, c)])[0] for s, c in items}
        off = Captioner.from_manifest(m.replace(quality=type(m.quality)(repair_attempts=0)))
    assert service.stats.fallbacks == 0  # the repairs ran in the engine, not a side loop
    cleared = [key for key, row in rows.items() if row["caption_en"]]
    assert len(cleared) >= 2  # the random model's next best token after eos is sometimes a special one: still empty
    for key, row in rows.items():
        assert row["first_flags"] == ["empty"] and row["attempts"] == 2
        if key in cleared:  # eos allowed from the 8th token on, which the biased head then picks
            assert row["tokens_en"] == MIN_NEW_TOKENS_EMPTY and "empty" not in row["caption_flags"]
        else:
            assert row["caption_flags"] == ["empty"] and row["tokens_en"] == 0  # the earliest of equals kept
        assert row == again[key] == static[key]  # deterministic: slots and the path make no difference
    # en + its repair for every clip; zh + its repair where there is a caption to translate (direct: always)
    zh_runs = len(items) if mode == "direct" else len(cleared)
    assert service.engine.stats.prefills == 2 * len(items) + 2 * zh_runs
    with stops_at_once(off):
        plain = CaptionService(off, num_slots=3, threaded=False).caption_all(items)
    assert all(r["caption_en"] == "" and r["caption_flags"] == ["empty"] and r["attempts"] == 1
               and r["first_flags"] == ["empty"] for r in plain)


def test_a_wrong_language_repair_restates_the_language(art, tmp_path):  # noqa: F811
    root, ckpt, mt, _, items = art
    captioner = Captioner.from_manifest(make_manifest(root, ckpt, mt, tmp_path / "out", zh={"mode": "direct"}))
    sample, clip = items[0]
    hinted = GenSettings(16, language_hint=True)
    assert LANGUAGE_HINT["en"] in captioner.prompt_en_for(sample, clip, hinted)
    assert LANGUAGE_HINT["en"] not in captioner.prompt_en_for(sample, clip, GenSettings(16))
    assert LANGUAGE_HINT["zh"] in captioner.prompt_zh_direct_for(sample, clip, hinted)
    assert LANGUAGE_HINT["zh"] in captioner.translate_prompt("A dog.", sample, clip, hinted)
