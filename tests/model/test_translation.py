import hashlib
import sys

import pytest

from model.tiny_mt import build_tiny_mt, main
from model.translation import Translation, load_translator

TEXTS = [
    "A man walks.",
    "",
    "The video shows a red car driving down a busy street while a man in a blue jacket watches it.",
]


@pytest.fixture(scope="session")
def tiny_mt_dir(tmp_path_factory):
    return build_tiny_mt(tmp_path_factory.mktemp("tiny_mt"), seed=0)


@pytest.fixture(scope="session")
def translator(tiny_mt_dir):
    return load_translator(tiny_mt_dir)


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_builder_is_deterministic_per_seed(tiny_mt_dir, tmp_path):
    again = _digests(build_tiny_mt(tmp_path / "again", seed=0))
    assert again == _digests(tiny_mt_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(again)
    other = _digests(build_tiny_mt(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != again["model.safetensors"]
    assert other["tokenizer.json"] == again["tokenizer.json"]


def test_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tiny_mt", str(tmp_path / "cli"), "--seed", "3"])
    main()
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert str(tmp_path / "cli") in capsys.readouterr().out


def test_batch_equals_one_by_one(translator):
    batched = translator.translate(TEXTS, max_new_tokens=16, batch_size=3)
    single = [translator.translate([t], max_new_tokens=16, batch_size=1)[0] for t in TEXTS]
    assert batched == single
    assert batched[0].token_ids != batched[2].token_ids  # the inputs matter, so the check means something
    assert translator.translate(TEXTS, max_new_tokens=16, batch_size=2) == batched
    assert all(isinstance(t, Translation) for t in batched)


def test_blank_texts_skip_the_model(translator):
    out = translator.translate(["", "   ", "A man walks."], max_new_tokens=8, batch_size=4)
    assert out[0] == out[1] == Translation("", [], 0, False)
    assert out[2].num_tokens > 0
    assert translator.translate([], max_new_tokens=8, batch_size=4) == []


def test_token_counts_and_budget(translator):
    long_budget = 24
    out = translator.translate(TEXTS, max_new_tokens=long_budget, batch_size=3)
    # The tiny model stops by itself on some inputs and runs to the budget on others.
    ended = [t for t in out if t.num_tokens and not t.hit_max_new_tokens]
    assert ended and any(t.hit_max_new_tokens for t in out)
    for t in out:
        assert t.num_tokens == len(t.token_ids)
        assert t.num_tokens == long_budget if t.hit_max_new_tokens else t.num_tokens < long_budget

    source = TEXTS[out.index(ended[0])]
    n = ended[0].num_tokens  # EOS not counted: it came at step n + 1
    assert translator.translate([source], max_new_tokens=n + 1, batch_size=1)[0] == ended[0]
    # One step less cuts it off before EOS, and nothing forces an EOS into the last step.
    cut = translator.translate([source], max_new_tokens=n, batch_size=1)[0]
    assert cut == Translation(ended[0].text, ended[0].token_ids, n, hit_max_new_tokens=True)


def test_source_prefix_is_prepended(tiny_mt_dir, translator):
    prefixed = load_translator(tiny_mt_dir, source_prefix="The video: ")
    assert prefixed.translate(["A man walks."], max_new_tokens=12, batch_size=1) == translator.translate(
        ["The video: A man walks."], max_new_tokens=12, batch_size=1
    )


def test_refuses_bad_arguments(translator, tiny_mt_dir, tmp_path):
    with pytest.raises(ValueError, match="max_new_tokens"):
        translator.translate(["a"], max_new_tokens=10_000, batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        translator.translate(["a"], max_new_tokens=4, batch_size=0)
    with pytest.raises(ValueError, match="float32"):
        load_translator(tiny_mt_dir, dtype="float64")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_translator(tmp_path / "missing")


def test_only_safetensors_weights_are_loaded(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "marian"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_translator(tmp_path)
