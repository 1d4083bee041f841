from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.chinese import OPENCC_CONFIGS, normalize_zh

VARIANTS = list(OPENCC_CONFIGS)

SIMPLIFIED = "这是一个视频，一辆红色的汽车在路上行驶。"
TRADITIONAL = "這是一個視頻，一輛紅色的汽車在路上行駛。"


@pytest.mark.parametrize(
    ("text", "variant", "expected"),
    [
        (TRADITIONAL, "zh-Hans", SIMPLIFIED),
        (SIMPLIFIED, "zh-Hant", TRADITIONAL),
        # zh-TW converts phrases to Taiwanese usage, not only characters.
        ("这是一个视频", "zh-TW", "這是一個影片"),
        ("他在电脑上安装软件", "zh-TW", "他在電腦上安裝軟體"),
        ("这是一个视频", "zh-HK", "這是一個視頻"),
        # Variants convert between each other through the target: Taiwanese text to Simplified.
        ("這是一個影片", "zh-Hans", "这是一个影片"),
    ],
)
def test_known_conversions(text, variant, expected):
    assert normalize_zh(text, variant) == expected


def test_default_variant_is_simplified():
    assert normalize_zh(TRADITIONAL) == SIMPLIFIED


@pytest.mark.parametrize(
    ("text", "variant"),
    [
        (SIMPLIFIED, "zh-Hans"),
        (TRADITIONAL, "zh-Hant"),
        ("這是一個影片，他在電腦上安裝軟體。", "zh-TW"),
        ("這是一個視頻", "zh-HK"),
    ],
)
def test_already_normalised_text_is_unchanged(text, variant):
    assert normalize_zh(text, variant) == text


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_chinese_text_passes_through(variant):
    text = "A man in a Nike T-shirt, 3.5 m/s!\n  (HDR) "
    assert normalize_zh(text, variant) == text
    assert normalize_zh("", variant) == ""


def test_mixed_text_keeps_latin_parts():
    assert normalize_zh("一個穿Nike運動鞋的人", "zh-Hans") == "一个穿Nike运动鞋的人"


def test_unknown_variant_names_the_allowed_values():
    with pytest.raises(ValueError, match="zh-CN") as err:
        normalize_zh("视频", "zh-CN")
    for variant in VARIANTS:
        assert variant in str(err.value)


@pytest.mark.parametrize("variant", VARIANTS)
def test_characters_outside_opencc_closure_are_idempotent(variant):
    # OpenCC maps these in two steps (t2s: 薴→苧→苎; s2tw: 幺→么→麼); one pass alone is not idempotent.
    text = "薴苧苎幺么"
    once = normalize_zh(text, variant)
    assert normalize_zh(once, variant) == once


def test_threads_share_converters_safely():
    texts = [TRADITIONAL * (i % 5 + 1) for i in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda t: normalize_zh(t, "zh-Hans"), texts))
    assert results == [SIMPLIFIED * (i % 5 + 1) for i in range(64)]


mixed_text = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK unified ideographs
        st.characters(min_codepoint=0x3400, max_codepoint=0x4DBF),  # extension A
        st.characters(min_codepoint=0x3000, max_codepoint=0x303F),  # CJK punctuation
        st.sampled_from(list(SIMPLIFIED + TRADITIONAL + "软件视频影片軟體么幺薴苎")),
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # printable ASCII
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(text=mixed_text, variant=st.sampled_from(VARIANTS))
def test_normalisation_is_idempotent(text, variant):
    once = normalize_zh(text, variant)
    assert normalize_zh(once, variant) == once
