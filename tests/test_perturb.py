"""Prompt perturbation: random word removal, the LLM answer parser and its fallback (SPEC §5)."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minddspo.perturb import (
    TASKS,
    llama3_prompt,
    llm_messages,
    llm_perturb,
    parse_neg_prompts,
    random_removal,
    removal_units,
    unspaced,
)

PROPS = settings(max_examples=100, deadline=None)


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(any(w == x for x in it) for w in short)


def indexed_prompt(n: int) -> tuple[str, list[str]]:
    words = [f"w{i}" for i in range(n)]  # distinct words: order is checkable by index
    return " ".join(words), words


@PROPS
@given(n=st.integers(1, 60), seed=st.integers(0, 2**32 - 1))
def test_random_removal_keeps_order_and_removes_a_fraction_in_range(n, seed):
    prompt, words = indexed_prompt(n)
    out = random_removal(prompt, random.Random(seed)).split()
    assert 1 <= len(out)
    assert is_subsequence(out, words) and len(set(out)) == len(out)
    idx = [int(w[1:]) for w in out]
    assert idx == sorted(idx)
    removed = n - len(out)
    # a fraction in [0.4, 0.7] of n, rounded to a whole word, capped so one word stays
    assert min(0.4 * n - 0.5, n - 1) <= removed <= min(0.7 * n + 0.5, n - 1)


@settings(max_examples=50, deadline=None)
@given(text=st.text(), seed=st.integers(0, 2**32 - 1))
def test_random_removal_on_any_text(text, seed):
    out = random_removal(text, random.Random(seed))
    words = text.split()
    assert is_subsequence(
        list("".join(out.split())), list("".join(words))
    )  # characters kept in order
    assert len(out.split()) <= len(words)
    assert (out == "") == (not words)
    if not any(unspaced(c) for c in text):  # whitespace words only: as plain word removal
        assert out == word_removal(text, random.Random(seed))


def word_removal(prompt, rng, low=0.4, high=0.7):
    """Plain whitespace-word removal, the behaviour space-separated text must keep."""
    words = prompt.split()
    if not words:
        return ""
    frac = low + (high - low) * float(rng.random())
    n_drop = min(int(round(frac * len(words))), len(words) - 1)
    keys = [float(rng.random()) for _ in words]
    drop = set(sorted(range(len(words)), key=keys.__getitem__)[:n_drop])
    return " ".join(w for i, w in enumerate(words) if i not in drop)


@PROPS
@given(
    words=st.lists(st.text(st.characters(codec="latin-1"), min_size=1), min_size=1, max_size=30),
    seps=st.sampled_from([" ", "  ", "\t", " \n"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_space_separated_text_is_removed_by_words_bit_for_bit(words, seps, seed):
    text = seps.join(words)
    for rng in (lambda: random.Random(seed), lambda: np.random.default_rng(seed)):
        assert random_removal(text, rng()) == word_removal(text, rng())


CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
KANA = st.one_of(  # hiragana and katakana letters (no combining voicing marks)
    st.characters(min_codepoint=0x3041, max_codepoint=0x3096),
    st.characters(min_codepoint=0x30A1, max_codepoint=0x30FA),
)


@PROPS
@given(text=st.text(st.one_of(CJK, KANA), min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_unspaced_text_loses_characters(text, seed):
    out = random_removal(text, random.Random(seed))
    n = len(text)
    assert " " not in out and is_subsequence(list(out), list(text))
    removed = n - len(out)
    assert min(0.4 * n - 0.5, n - 1) <= removed <= min(0.7 * n + 0.5, n - 1)
    if n >= 2:
        assert out != text  # a prompt with two characters or more is always degraded


@pytest.mark.parametrize(
    ("prompt", "units"),
    [
        ("一只红色的猫坐在沙发上", list("一只红色的猫坐在沙发上")),  # Chinese
        ("赤いキューブと二匹の猫", list("赤いキューブと二匹の猫")),  # Japanese
        ("がぎ", ["が", "ぎ"]),
        ("か\u3099き", ["か\u3099", "き"]),  # a combining voicing mark stays with its kana
        ("แมวสีแดง", ["แ", "ม", "ว", "ส\u0e35", "แ", "ด", "ง"]),  # Thai: vowel mark kept
        ("3只猫", ["3", "只", "猫"]),
        ("猫cat猫", ["猫", "cat", "猫"]),
        ("photo", ["photo"]),
        ("\uff21\uff22\uff23", ["\uff21\uff22\uff23"]),  # fullwidth Latin: one word
        ("\uff11\uff12\u732b", ["\uff11\uff12", "\u732b"]),  # fullwidth digits, then a CJK
        ("\uffa1\uffa2", ["\uffa1\uffa2"]),  # halfwidth Hangul jamo: spaced (Korean)
        ("\uff76\uff9e\uff77", ["\uff76\uff9e", "\uff77"]),  # halfwidth katakana, voicing
        ("\u732b\uff01\u732b", ["\u732b", "\uff01", "\u732b"]),  # fullwidth !
        ("café", ["café"]),
    ],
)
def test_removal_units(prompt, units):
    assert removal_units(prompt) == units


def test_mixed_prompts_drop_english_words_whole_and_cjk_characters():
    prompt = "a photo of 一只红色的猫 on a sofa"
    words = {"a", "photo", "of", "on", "sofa"}
    outs = {random_removal(prompt, random.Random(s)) for s in range(200)}
    assert len(outs) > 50
    for out in outs:
        for token in out.split():
            assert token in words or all(unspaced(c) for c in token), out
            assert is_subsequence(list(token), list(prompt.replace(" ", "")))
    # 6 words and 6 characters: 12 units, of which round(12 * [0.4, 0.7]) are removed
    assert {12 - sum(len(removal_units(t)) for t in o.split()) for o in outs} == set(range(5, 9))


def test_unspaced_examples_are_degraded_reproducibly():
    for prompt in ("一只红色的猫坐在沙发上", "赤いキューブと二匹の猫", "แมวสีแดงนั่งบนโซฟา"):
        a = random_removal(prompt, random.Random(7))
        assert a == random_removal(prompt, random.Random(7)) and a != prompt
        assert not unicodedata.category(a[0]).startswith("M")  # no orphan combining mark
    assert random_removal("猫", random.Random(0)) == "猫"  # one character: nothing to remove


def test_random_removal_fraction_covers_the_range():
    _, words = indexed_prompt(100)
    rng = random.Random(0)
    fracs = [1 - len(random_removal(" ".join(words), rng).split()) / 100 for _ in range(400)]
    assert min(fracs) >= 0.4 and max(fracs) <= 0.7
    assert min(fracs) < 0.43 and max(fracs) > 0.67  # uniform over the whole range
    assert abs(np.mean(fracs) - 0.55) < 0.02


def test_random_removal_is_deterministic_and_accepts_numpy_generators():
    prompt, words = indexed_prompt(30)
    a = [random_removal(prompt, random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(7)
    assert len({random_removal(prompt, rng) for _ in range(20)}) > 1  # the state advances
    n1 = random_removal(prompt, np.random.default_rng(7))
    n2 = random_removal(prompt, np.random.default_rng(7))
    assert n1 == n2 and is_subsequence(n1.split(), words)


def test_random_removal_edges():
    rng = random.Random(0)
    assert random_removal("", rng) == ""
    assert random_removal("   ", rng) == ""
    assert random_removal("single", rng) == "single"
    assert random_removal("a  b\tc\nd", rng, low=0.0, high=0.0) == "a b c d"
    assert len(random_removal("a b c d e", rng, low=1.0, high=1.0).split()) == 1
    for low, high in [(0.5, 0.4), (-0.1, 0.5), (0.2, 1.1)]:
        with pytest.raises(ValueError):
            random_removal("a b", rng, low=low, high=high)


# ------------------------------------------------------------------ parser

PAPER_ALIGNMENT_ANSWER = """Important words: ["red", "bicycle", "beach"]
Final output:
{"neg_prompts": ["a bicycle on a beach", " a red bicycle ", "a red thing on a beach"]}"""

PAPER_AESTHETIC_ANSWER = """Final output:
{
 "positive_prompts": ["a sharp, well-lit photo of a cat"],
 "neg_prompts": ["a blurry, washed out photo of a cat", "a grainy photo of a cat"]
}"""


def test_parse_the_papers_formats():
    assert parse_neg_prompts(PAPER_ALIGNMENT_ANSWER) == [
        "a bicycle on a beach",
        "a red bicycle",
        "a red thing on a beach",
    ]
    assert parse_neg_prompts(PAPER_AESTHETIC_ANSWER) == [
        "a blurry, washed out photo of a cat",
        "a grainy photo of a cat",
    ]


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('{"neg_prompts": []}', []),
        ('{"neg_prompts": ["", "  ", 3, null, "ok"]}', ["ok"]),
        ('{"neg_prompts": "not a list"}', None),
        ('{"positive_prompts": ["x"]}', None),
        ('{"neg_prompts": ["a"]} then {"neg_prompts": ["b"]}', ["b"]),  # the last one wins
        ('{"neg_prompts": ["a"]} then {"other": 1}', ["a"]),
        ('{"neg_prompts": ["a", }', None),
        ("no json at all", None),
        ("", None),
        ("[1, 2, 3]", None),
        ('{"neg_prompts": ["a"]', None),
        ("{{{{", None),
    ],
)
def test_parse_edge_cases(text, expect):
    assert parse_neg_prompts(text) == expect


@settings(max_examples=150, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.text(alphabet='{}[]":,neg_prompts \\n0123"'),
        st.builds(
            lambda pre, obj, post: pre + json.dumps(obj) + post,
            st.text(),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
                max_leaves=10,
            ),
            st.text(),
        ),
    )
)
def test_parse_never_raises_on_text(text):
    out = parse_neg_prompts(text)
    assert out is None or (isinstance(out, list) and all(isinstance(p, str) and p for p in out))


@given(
    obj=st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.binary(),
        st.lists(st.text()),
        st.dictionaries(st.text(), st.text()),
        st.just(object()),
        st.just({"neg_prompts": ["x"]}),
    )
)
def test_parse_never_raises_on_non_strings(obj):
    assert parse_neg_prompts(obj) is None


# Strings without braces: the parser finds objects with a brace-free regex, so a negative
# prompt containing "{" or "}" is not found (it falls back to random_removal, counted).
no_braces = st.text(alphabet=st.characters(blacklist_characters="{}"))


@settings(max_examples=50, deadline=None)
@given(negs=st.lists(no_braces, max_size=5), prefix=st.text(alphabet="abc :[]\n", max_size=40))
def test_parse_round_trips_any_list_of_strings(negs, prefix):
    text = prefix + "Final output:\n" + json.dumps({"neg_prompts": negs})
    assert parse_neg_prompts(text) == [p.strip() for p in negs if p.strip()]


# ------------------------------------------------------------------ LLM driver


def test_llm_perturb_uses_the_answer_and_falls_back_on_bad_ones():
    prompts = ["a red bicycle on a beach", "ok prompt here", "boom goes this", "empty list case"]
    seen = []

    def generate(text: str) -> str:
        seen.append(text)
        if "bicycle" in text:
            return PAPER_ALIGNMENT_ANSWER
        if "boom" in text:
            raise RuntimeError("generator failed")
        if "empty" in text:
            return 'Important words: []\nFinal output:\n{"neg_prompts": []}'
        return "I cannot help with that."

    res = llm_perturb(prompts, generate, random.Random(0))
    assert seen == [llama3_prompt(p, "alignment") for p in prompts]
    assert res.fell_back == [False, True, True, True]
    assert res.num_fallbacks == 3 and res.fallback_rate == 0.75
    assert res.prompts[0] in parse_neg_prompts(PAPER_ALIGNMENT_ANSWER)
    for p, out in zip(prompts[1:], res.prompts[1:], strict=True):
        assert out and is_subsequence(out.split(), p.split()) and out != p  # random_removal


def test_llm_perturb_picks_among_all_negatives_and_passes_the_task():
    negs = [f"neg {i}" for i in range(4)]
    answer = json.dumps({"neg_prompts": negs})
    built = []

    def build(prompt, task):
        built.append((prompt, task))
        return prompt

    res = llm_perturb(
        ["p"] * 200, lambda _: answer, np.random.default_rng(0), task="aesthetic", build=build
    )
    assert set(res.prompts) == set(negs) and res.num_fallbacks == 0
    assert built == [("p", "aesthetic")] * 200
    assert llm_perturb([], lambda _: answer, random.Random(0)).fallback_rate == 0.0


def test_instruction_templates():
    """Each task's instruction is the system message and asks for the key the parser reads;
    the prompt goes into the user message only; the Llama-3 layout holds both, in order."""
    systems = {}
    for task in TASKS:
        system, user = llm_messages("a cat on a mat", task)
        assert system["role"] == "system" and user["role"] == "user"
        assert user["content"].endswith("prompt: a cat on a mat")
        assert "a cat on a mat" not in system["content"]
        assert '"neg_prompts"' in system["content"]  # parse_neg_prompts reads that key
        text = llama3_prompt("a cat on a mat", task)
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n")
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n")
        at = text.index(system["content"])
        assert text.index(user["content"], at) > at
        systems[task] = system["content"]
    assert len(set(systems.values())) == len(TASKS) >= 2  # the tasks ask different things
    assert llm_messages("x")[0]["content"] == systems["alignment"]  # the default task
    with pytest.raises(ValueError, match="task must be one of"):
        llm_messages("a cat", "style")
