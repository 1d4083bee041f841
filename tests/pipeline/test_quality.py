import pytest

from pipeline.quality import (
    FLAG_NAMES,
    REPETITION_MIN_SPAN,
    detect_flags,
    has_repetition,
    is_echo,
    is_empty,
    is_wrong_language,
    tokens,
)

SYSTEM = (
    "You are Pllava, a large vision-language assistant. You are able to understand the video content that "
    "the user provides, and assist the user with a variety of tasks using natural language. Follow the "
    "instructions carefully and explain your answers in detail based on the provided video."
)
QUESTION = "Please describe the video in detail, including the people, objects, actions and the setting."
PROMPTS = [SYSTEM, QUESTION]

DENSE_EN = (
    "The video shows a man in a blue jacket walking along the edge of a busy street in the city. The man "
    "carries a brown bag over his shoulder, and the sun is low in the sky behind the tall buildings. "
    "Cars and buses pass by on the road, and the camera follows the man as he stops at the corner, "
    "looks at the traffic light, and then crosses the street. On the other side, the man greets a woman "
    "in a red coat, and the two of them walk together past a cafe with tables outside. The scene ends "
    "with the two people entering the cafe while the camera stays on the street."
)
DENSE_ZH = (
    "视频中，一名穿着蓝色夹克的男子沿着城市繁忙的街道行走。他肩上背着一个棕色的包，太阳低垂在高楼后面。"
    "汽车和公交车在路上驶过，镜头跟随男子在路口停下，看了看红绿灯，然后穿过马路。在马路对面，"
    "他与一位穿红色外套的女子打招呼，两人一起走过一家外面摆着桌子的咖啡馆。最后，两人走进了咖啡馆。"
)


def test_tokens_split_words_and_ideographs():
    assert tokens("A red car, 一辆Nike汽车!") == ["a", "red", "car", "一", "辆", "nike", "汽", "车"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "...", " 。，", "\u200b\u200b"])
def test_empty(text):
    assert is_empty(text)
    assert detect_flags(text, language="en", prompt_texts=PROMPTS, hit_max_new_tokens=False) == ["empty"]


@pytest.mark.parametrize("text", ["A cat.", "猫", "42"])
def test_short_captions_are_not_empty(text):
    assert not is_empty(text)


# -- echo ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        QUESTION,
        "Sure! " + QUESTION + " The video shows a dog.",
        "You are Pllava, a large vision-language assistant. The video shows a dog.",
        "The video shows a dog. Follow the instructions carefully and explain your answers in detail.",
        "USER: describe the video ASSISTANT: a dog",
        "  Assistant: The video shows a dog running on grass.",
        "The video shows a dog running on grass. USER: What is the dog doing?",
        "The video shows a dog.\nuser: and then?",
        "<|im_start|>assistant\nThe video shows a dog.",
        "<image>\nThe video shows a dog.",
    ],
)
def test_echo(text):
    assert is_echo(text, PROMPTS)


def test_echo_of_a_short_prompt_repeated_whole():
    assert is_echo("Describe this video clip. A dog runs.", ["Describe this video clip."])


@pytest.mark.parametrize(
    "text",
    [
        DENSE_EN,
        DENSE_ZH,
        # quotes a few words of the question: ordinary overlap
        "The video, described in detail, shows the people and objects of a kitchen.",
        "In detail, the setting is a park; the people are walking.",
        # seven consecutive prompt tokens, one short of ECHO_MIN_RUN
        "A vision-language assistant. You are able to see a dog.",
        # role words used as words, not as tags
        "A user types on a laptop while the system reboots; an assistant brings coffee.",
        "The screen reads 'user name' and 'system settings'.",
    ],
)
def test_not_echo(text):
    assert not is_echo(text, PROMPTS)


def test_short_prompt_as_an_ordinary_phrase_is_not_echo():
    assert not is_echo("Describe it to me: a dog runs.", ["Describe it."])


def test_no_prompt_texts_only_checks_markup():
    assert not is_echo(QUESTION, [])
    assert is_echo("ASSISTANT: a dog", [])


# -- repetition --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "The man walks. " + "and then " * 8,
        "the " * 12,
        "A dog runs on the grass, " * 3 + "and the owner watches.",
        DENSE_EN + " " + "The man walks to the corner and looks at the light. " * 3,
        # a long passage repeated until max_new_tokens cut the second copy
        DENSE_EN + " " + DENSE_EN[: len(DENSE_EN) * 2 // 3],
        "一个男人一个男人一个男人",
        "视频中有一只狗在草地上奔跑。" + "狗在草地上奔跑，" * 4,
        DENSE_ZH + DENSE_ZH[:90],
        "哈" * 20,
    ],
)
def test_repetition(text):
    assert has_repetition(text)


@pytest.mark.parametrize(
    "text",
    [
        DENSE_EN,  # "the" 20+ times, "the man" and "the street" several times, never back to back
        DENSE_ZH,
        "a red car, a red truck",
        "A red car, a red truck, a red bus and a red bike wait at the light.",
        "He jumps and jumps and jumps and jumps, then lands.",
        "very very very good",
        "She says: go, go, go, go, go!",
        "他慢慢地走，哈哈哈地笑，一步一步一步往前走。",
        "A man walks. A man walks.",  # short: under REPETITION_MIN_SPAN
        "Frames 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 show a countdown.",
    ],
)
def test_not_repetition(text):
    assert not has_repetition(text)


def test_repetition_span_floor():
    assert not has_repetition("ha " * (REPETITION_MIN_SPAN - 1))
    assert has_repetition("ha " * REPETITION_MIN_SPAN)


# -- wrong language ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "language"),
    [
        (DENSE_EN, "zh"),
        ("12345", "zh"),  # no Chinese at all
        (
            "视频中一个男人. The man walks along the busy street and carries a brown bag over his shoulder.",
            "zh",
        ),
        ("ビデオでは男性が歩いています。", "zh"),  # Japanese: kana are letters, not ideographs
        (DENSE_ZH, "en"),
        ("视频中一只狗在跑。A dog.", "en"),
    ],
)
def test_wrong_language(text, language):
    assert is_wrong_language(text, language)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        (DENSE_ZH, "zh"),
        ("一位穿着Nike运动鞋的男子在跑步。", "zh"),  # English brand name in a Chinese caption
        ("视频展示了iPhone 15 Pro Max的开箱过程。", "zh"),
        ("视频中，一块写着“Welcome to Grand Canyon”的牌子立在路边，游客们在牌子前拍照留念。", "zh"),
        (DENSE_EN, "en"),
        ("A shop sign reads 福 above the door, and a man sweeps the street in front of it.", "en"),
        ("The video shows 2 people and 3 cars.", "en"),
        ("   ", "zh"),  # empty is flagged as empty, not as a language
    ],
)
def test_not_wrong_language(text, language):
    assert not is_wrong_language(text, language)


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="en, zh"):
        is_wrong_language("a dog", "fr")


# -- detect_flags ------------------------------------------------------------------------------------


def test_clean_captions_have_no_flags():
    assert detect_flags(DENSE_EN, language="en", prompt_texts=PROMPTS, hit_max_new_tokens=False) == []
    assert detect_flags(DENSE_ZH, language="zh", prompt_texts=PROMPTS, hit_max_new_tokens=False) == []


def test_truncated_comes_from_the_generator():
    assert detect_flags(DENSE_EN, language="en", prompt_texts=PROMPTS, hit_max_new_tokens=True) == [
        "truncated"
    ]


def test_flags_are_sorted_and_combined():
    looping_echo = "USER: " + "the dog runs " * 10
    flags = detect_flags(looping_echo, language="zh", prompt_texts=PROMPTS, hit_max_new_tokens=True)
    assert flags == ["echo", "repetition", "truncated", "wrong_language"]
    assert set(flags) <= set(FLAG_NAMES)
    assert list(FLAG_NAMES) == sorted(FLAG_NAMES)
