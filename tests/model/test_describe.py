"""model/describe.py: the checkpoint's facts read once, without torch, and the prompts decided in one place."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.describe import (
    CLIP_MEAN,
    CLIP_STD,
    CheckpointError,
    ModelDescription,
    describe_checkpoint,
)
from model.prompts import CHATML, VICUNA
from pipeline.manifest import PromptSpec


def _copy_small_files(src: Path, dst: Path) -> Path:
    """config, tokenizer and preprocessor files only: a description reads no weights."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json" and "safetensors" not in f.name:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_released_defaults(tiny_dir):
    d = describe_checkpoint(tiny_dir)
    assert isinstance(d, ModelDescription)
    assert (d.num_frames, d.image_size, d.pooling_shape, d.num_visual_tokens) == (16, 336, (16, 12, 12), 2304)
    assert d.image_mean == CLIP_MEAN and d.image_std == CLIP_STD
    assert d.family == "vicuna" and d.template is VICUNA
    assert d.name == "tiny-pllava-vicuna-seed0" and d.identity is None
    assert describe_checkpoint(tiny_dir) == d  # frozen, and the same every time


def test_chatml_is_told_from_the_tokenizer_files(tiny_chatml_dir):
    d = describe_checkpoint(tiny_chatml_dir)
    assert d.family == "chatml" and d.template is CHATML


def test_the_description_is_what_the_loader_uses(loaded, tiny_dir):
    d = describe_checkpoint(tiny_dir)
    assert loaded.template is d.template and loaded.family == d.family and loaded.name == d.name
    assert (loaded.image_mean, loaded.image_std, loaded.image_size) == (d.image_mean, d.image_std, d.image_size)
    assert loaded.config.num_frames == d.num_frames


def test_prompts_defaults_and_custom_versions(tiny_dir):
    d = describe_checkpoint(tiny_dir)
    default = d.prompts(PromptSpec())
    assert default == d.prompts()
    assert default.version == VICUNA.prompt_version == "vicuna-v1/recaption-v1"
    assert (default.en, default.zh_direct, default.zh_translate) == (
        VICUNA.default_question_en, VICUNA.default_question_zh, VICUNA.default_translate_zh)
    custom = d.prompts(PromptSpec(en="What happens?"))
    assert custom.en == "What happens?" and custom.zh_direct == VICUNA.default_question_zh
    # The version formula of existing outputs, unchanged: the fingerprint of a custom-prompt job must not move.
    digest = hashlib.sha256(repr(["What happens?", None, None]).encode()).hexdigest()[:8]
    assert custom.version == f"vicuna-v1/recaption-v1+custom-{digest}"


def test_other_frames_and_normalisation(tiny_dir, tmp_path):
    ckpt = _copy_small_files(tiny_dir, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_frames": 8, "pooling_shape": [8, 12, 12]}))
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    pre.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1])
    (ckpt / "preprocessor_config.json").write_text(json.dumps(pre))
    d = describe_checkpoint(ckpt)
    assert (d.num_frames, d.pooling_shape, d.image_size) == (8, (8, 12, 12), 336)
    assert d.image_mean == (0.5, 0.5, 0.5) and d.image_std == (0.25, 0.5, 1.0)


def test_missing_preprocessor_means_clip_values(tiny_dir, tmp_path):
    ckpt = _copy_small_files(tiny_dir, tmp_path / "ckpt")
    (ckpt / "preprocessor_config.json").unlink()
    d = describe_checkpoint(ckpt)
    assert (d.image_mean, d.image_std, d.image_size) == (CLIP_MEAN, CLIP_STD, 336)


@pytest.mark.parametrize("change, message", [
    ({"image_mean": [0.5, 0.5]}, "image_mean must have 3 finite numbers"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std must be positive"),
    ({"crop_size": {"height": 224, "width": 224}}, "crop size 224 differs from the CLIP image size 336"),
    ({"crop_size": {"height": 336, "width": 224}}, "not square"),
])
def test_bad_preprocessor_is_refused(tiny_dir, tmp_path, change, message):
    ckpt = _copy_small_files(tiny_dir, tmp_path / "ckpt")
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**pre, **change}))
    with pytest.raises(CheckpointError, match=message):
        describe_checkpoint(ckpt)


def test_identity_is_attached_by_the_caller(tiny_dir):
    from pipeline.model_identity import model_identity

    d = describe_checkpoint(tiny_dir, identity=model_identity)
    assert d.identity == model_identity(tiny_dir)
    assert d == describe_checkpoint(tiny_dir)  # the identity does not take part in equality


def test_importing_does_not_pull_torch():
    code = ("import sys, model.describe, pipeline.frames, pipeline.dataset_card; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
