"""Prompt perturbation for label-free preference pairs (DDSPO paper Sec. 3.3, 4.4, App. G; SPEC §5).

``random_removal`` drops words at random (characters, in scripts written without spaces). The LLM rewrite is split into pure parts: the
paper's two instruction templates, a parser of the model's answer that never raises, and
a driver that takes any ``generate(text) -> text`` callable (a real causal LM lives in
``bench/``) and falls back to ``random_removal`` whenever the answer is unusable.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol


class _Rng(Protocol):  # random.Random and numpy.random.Generator both qualify
    def random(self) -> float: ...


#: Code point ranges of scripts written without spaces between words (Thai, Lao, Tibetan,
#: Myanmar, Khmer, Chinese, Japanese kana, their punctuation and fullwidth forms). Korean
#: separates words with spaces and is not among them.
UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3000, 0x312F),  # CJK symbols and punctuation, Hiragana, Katakana, Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    # halfwidth and fullwidth forms: the CJK punctuation and halfwidth katakana only (not
    # fullwidth Latin letters and digits, nor halfwidth Hangul)
    (0xFF01, 0xFF0F),  # fullwidth ! " # $ % & ' ( ) * + , - . /
    (0xFF1A, 0xFF20),  # fullwidth : ; < = > ? @
    (0xFF3B, 0xFF40),  # fullwidth [ \ ] ^ _ `
    (0xFF5B, 0xFF65),  # fullwidth { | } ~, white parentheses, halfwidth CJK punctuation
    (0xFF66, 0xFF9F),  # halfwidth katakana (with its voicing marks)
    (0x20000, 0x3FFFF),  # CJK Extensions B and later
)


#: halfwidth katakana's voicing marks: spacing characters that belong to the kana before
HALFWIDTH_VOICING = "\uff9e\uff9f"


def unspaced(ch: str) -> bool:
    """Is ``ch`` a character of a script written without spaces (:data:`UNSPACED_RANGES`)?"""
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in UNSPACED_RANGES)


def removal_units(word: str) -> list[str]:
    """A whitespace word as the units :func:`random_removal` drops: every character of a
    script written without spaces is one unit, together with the combining marks that follow
    it (Thai vowel and tone marks, kana voicing marks: a grapheme, approximately); every run
    of other characters is one unit. A word without such characters is one unit."""
    units: list[str] = []
    after_unspaced = False
    for ch in word:
        if units and (unicodedata.category(ch).startswith("M") or ch in HALFWIDTH_VOICING):
            units[-1] += ch  # a combining mark stays with its base character
            continue
        this = unspaced(ch)
        if this or after_unspaced or not units:
            units.append(ch)
        else:
            units[-1] += ch
        after_unspaced = this
    return units


def random_removal(prompt: str, rng: _Rng, low: float = 0.4, high: float = 0.7) -> str:
    """Drop a uniformly drawn fraction in ``[low, high]`` of the prompt's units, keeping order.

    The units are the whitespace words; inside a word, each character of a script written
    without spaces between words (Chinese, Japanese, Thai, ...: :data:`UNSPACED_RANGES`) is a
    unit of its own, with its combining marks (:func:`removal_units`), so such prompts are
    degraded character by character instead of kept whole as one "word". Units of one word
    that stay are joined without a space, words with one space. Text with no such characters
    is split into words exactly as ``prompt.split()`` and draws the same random numbers (the
    output is that of plain word removal, bit for bit).

    At least one unit always stays; an empty prompt stays empty. ``rng`` is a
    ``random.Random`` or ``numpy.random.Generator``.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    words = prompt.split()
    if not words:
        return ""
    units = [(w, u) for w, word in enumerate(words) for u in removal_units(word)]
    frac = low + (high - low) * float(rng.random())
    n_drop = min(int(round(frac * len(units))), len(units) - 1)
    keys = [float(rng.random()) for _ in units]
    drop = set(sorted(range(len(units)), key=keys.__getitem__)[:n_drop])
    out, last = [], None
    for i, (w, u) in enumerate(units):
        if i in drop:
            continue
        if last is not None and w != last:
            out.append(" ")
        out.append(u)
        last = w
    return "".join(out)


# The two instruction templates of the paper's Appendix G (Fig. E), as system messages.
ALIGNMENT_INSTRUCTION = """\
You are a helpful assistant trained to rewrite image generation prompts into *compositional negative prompts*.

Your task is to generate a list of **negative prompts** that intentionally remove or generalize important elements from the original prompt.

Instructions:
1. Identify the **important words** (nouns or adjectives) central to the image composition.
2. Generate negative prompts that remove or alter these important words.
3. Keep the structure and style of the original prompt where possible.
4. If the prompt is too vague (e.g., "a macaw"), return an empty list.

Format your response as:
Important words: [...]
Final output:
{"neg_prompts": ["..."]}

No extra explanations or notes."""

AESTHETIC_INSTRUCTION = """\
You are a helpful assistant trained to rewrite image generation prompts into two sets of outputs:

1. A list of **positive prompts** that enhance the aesthetic quality.
2. A list of **negative prompts** that degrade the aesthetic quality.

Instructions:
- Focus on aesthetic aspects like clarity, lighting, texture, resolution.
- Do NOT change the subject or meaning.
- For positive prompts, enhance descriptors.
- For negative prompts, reduce quality with terms like "blurry", "washed out", etc.

Format your response as:
Final output:
{
 "positive_prompts": ["..."],
 "neg_prompts": ["..."]
}

No extra explanations or notes."""

TASKS = {"alignment": ALIGNMENT_INSTRUCTION, "aesthetic": AESTHETIC_INSTRUCTION}


def llm_messages(prompt: str, task: str = "alignment") -> list[dict[str, str]]:
    """Chat messages (system instruction + user request) for ``tokenizer.apply_chat_template``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    user = f"Below is the new prompt to process.\nprompt: {prompt}"
    return [{"role": "system", "content": TASKS[task]}, {"role": "user", "content": user}]


def llama3_prompt(prompt: str, task: str = "alignment") -> str:
    """The paper's exact Llama-3 chat layout, for models without a chat template."""
    system, user = llm_messages(prompt, task)
    return (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n"
        f"{system['content']}\n\n{user['content']}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n"
    )


def _json_objects(text: str) -> list[object]:
    """Every JSON value that starts at a ``{`` in ``text`` and decodes, in order."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            i = text.find("{", i + 1)
            continue
        found.append(obj)
        i = text.find("{", end)
    return found


def parse_neg_prompts(text: object) -> list[str] | None:
    """The ``neg_prompts`` list of the last JSON object in ``text`` that has one.

    Returns the non-empty, stripped strings (possibly ``[]``), or ``None`` when no such
    object parses. Never raises, whatever ``text`` is.
    """
    if not isinstance(text, str):
        return None
    for obj in reversed(_json_objects(text)):
        if not isinstance(obj, dict) or not isinstance(obj.get("neg_prompts"), list):
            continue
        return [p.strip() for p in obj["neg_prompts"] if isinstance(p, str) and p.strip()]
    return None


class PerturbResult(NamedTuple):
    prompts: list[str]  # one degraded prompt per input
    fell_back: list[bool]  # True where random_removal replaced the LLM's answer
    num_fallbacks: int

    @property
    def fallback_rate(self) -> float:
        return self.num_fallbacks / max(len(self.prompts), 1)


def llm_perturb(
    prompts: Sequence[str],
    generate: Callable[[str], str],
    rng: _Rng,
    *,
    task: str = "alignment",
    build: Callable[[str, str], str] = llama3_prompt,
    low: float = 0.4,
    high: float = 0.7,
) -> PerturbResult:
    """Degrade each prompt with ``generate(build(prompt, task))``; pick one of its negatives
    at random; on an exception, an unparsable answer or an empty list, use ``random_removal``
    and count the fallback."""
    out, fell = [], []
    for p in prompts:
        try:
            negs = parse_neg_prompts(generate(build(p, task)))
        except Exception:  # a generator failure must never stop a 200K-prompt job
            negs = None
        if negs:
            out.append(negs[min(int(rng.random() * len(negs)), len(negs) - 1)])
            fell.append(False)
        else:
            out.append(random_removal(p, rng, low, high))
            fell.append(True)
    return PerturbResult(out, fell, sum(fell))
