"""Scenes of real handwritten digits, descriptive captions, caption corruption, prompt sets.

A scene is a 16 x 16 grey canvas cut into four 8 x 8 slots (the quadrants), each empty or
holding one of scikit-learn's 1,797 real 8 x 8 digits, drawn with an ink level on a
background level. A prompt has a *content* part in one of GenEval's four categories and a
*detail* part (ink, background) that the scene renders:

* ``single``   "a 5"                 - some slot holds a 5
* ``two``      "a 3 and a 7"         - some slot holds a 3 and another a 7
* ``counting`` "two 4s" / "three 4s" - exactly that many slots hold a 4
* ``position`` "a 3 left of a 7" / "a 3 above a 7" - a row (column) holds 3 then 7

followed by ", faint ink, dark grey background" (three ink and three background levels).
Rand-removal (40-70 % of the words) then removes detail as well as content, as it does from
long prompts, instead of turning "a 5" into "5" or "a".

Some content combinations are held out: the base model and the preference data never see
them; the evaluation and dev prompts use only them (``single`` has none, so it uses every
digit). Evaluation and dev prompts are disjoint texts (different content-detail products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 16  # canvas side in pixels
CELL = 8  # slot side (= sklearn digit side)
BLANK = 10  # label of an empty slot
SLOT_OFFSETS = ((0, 0), (0, CELL), (CELL, 0), (CELL, CELL))  # (row, col) of each slot
ROWS = ((0, 1), (2, 3))  # slot indices (left, right) of each row
COLS = ((0, 2), (1, 3))  # slot indices (top, bottom) of each column
KINDS = ("single", "two", "counting", "position")
COUNT_WORDS = {2: "two", 3: "three"}
INKS = {"bright": 1.0, "dim": 0.7, "faint": 0.45}  # ink level (fraction of the contrast)
BACKGROUNDS = {"black": 0.0, "dark grey": 0.2, "grey": 0.4}  # background level
DETAILS = tuple((i, b) for i in INKS for b in BACKGROUNDS)  # the nine detail products
WORDS = (
    "a", "and", "left", "of", "above", "two", "three", "ink", "background",
    *INKS, "black", "dark", "grey",
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    """One caption: ``kind``; ``digits`` (one, or two for ``two``/``position``); ``where`` =
    relation ``"left"``/``"above"`` (position) or count 2/3 (counting); ``ink`` and
    ``background`` (a key of :data:`INKS` / :data:`BACKGROUNDS`, or None: not named)."""

    kind: str
    digits: tuple[int, ...]
    where: int | str | None = None
    ink: str | None = None
    background: str | None = None

    def content(self) -> str:
        d = self.digits
        if self.kind == "single":
            return f"a {d[0]}"
        if self.kind == "two":
            return f"a {d[0]} and a {d[1]}"
        if self.kind == "position":
            rel = "left of" if self.where == "left" else "above"
            return f"a {d[0]} {rel} a {d[1]}"
        return f"{COUNT_WORDS[int(self.where)]} {d[0]}s"

    def text(self) -> str:
        parts = [self.content()]
        if self.ink is not None:
            parts.append(f"{self.ink} ink")
        if self.background is not None:
            parts.append(f"{self.background} background")
        return ", ".join(parts)

    def check(self, labels: list[int]) -> bool:
        """Is a scene whose slots read ``labels`` (4 labels, ``BLANK`` = empty) right?"""
        d = self.digits
        if self.kind == "single":
            return d[0] in labels
        if self.kind == "two":
            return d[0] in labels and d[1] in labels
        if self.kind == "position":
            lines = ROWS if self.where == "left" else COLS
            return any(labels[a] == d[0] and labels[b] == d[1] for a, b in lines)
        return sum(lab == d[0] for lab in labels) == int(self.where)

    def layout(self, rng: np.random.Generator) -> dict[int, int]:
        """A slot -> digit assignment that satisfies this prompt (random where it is free)."""
        d = self.digits
        if self.kind == "single":
            return {int(rng.integers(4)): d[0]}
        if self.kind == "two":
            a, b = rng.choice(4, size=2, replace=False)
            return {int(a): d[0], int(b): d[1]}
        if self.kind == "position":
            lines = ROWS if self.where == "left" else COLS
            a, b = lines[int(rng.integers(2))]
            return {a: d[0], b: d[1]}
        slots = rng.choice(4, size=int(self.where), replace=False)
        return {int(s): d[0] for s in slots}

    def with_details(self, ink: str | None, background: str | None) -> Prompt:
        return Prompt(self.kind, self.digits, self.where, ink, background)


def held_out(p: Prompt) -> bool:
    """The fixed rule that reserves content combinations for evaluation (``single``: none;
    ``two`` is symmetric: "a 3 and a 7" and "a 7 and a 3" are held out together)."""
    d = p.digits
    if p.kind == "two":
        return (d[0] + d[1]) % 5 == 0
    if p.kind == "position":
        return (3 * d[0] + d[1]) % 5 == 0
    if p.kind == "counting":
        return (d[0] + int(p.where)) % 2 == 0
    return False


def all_contents(kind: str) -> list[Prompt]:
    """Every content of one kind (no details), in a fixed order."""
    if kind == "single":
        return [Prompt("single", (d,)) for d in range(10)]
    if kind == "two":
        return [Prompt("two", (a, b)) for a in range(10) for b in range(10) if a != b]
    if kind == "position":
        return [
            Prompt("position", (a, b), rel)
            for rel in ("left", "above")
            for a in range(10)
            for b in range(10)
            if a != b
        ]
    if kind == "counting":
        return [Prompt("counting", (d,), n) for d in range(10) for n in (2, 3)]
    raise ValueError(f"unknown prompt kind {kind!r}")


def train_pool() -> list[Prompt]:
    """Contents the base model and the preference data may use (no held-out combination)."""
    return [p for k in KINDS for p in all_contents(k) if not held_out(p)]


def _held_out_products(kind: str) -> list[Prompt]:
    """Every held-out content of ``kind`` with every detail product, in a fixed shuffled
    order (the first part makes the evaluation prompts, the next the dev prompts)."""
    pool = [p for p in all_contents(kind) if kind == "single" or held_out(p)]
    full = [p.with_details(i, b) for p in pool for i, b in DETAILS]
    order = np.random.default_rng(1234 + KINDS.index(kind)).permutation(len(full))
    return [full[int(j)] for j in order]


def eval_prompts(per_kind: int, dev: bool = False) -> list[Prompt]:
    """``per_kind`` held-out prompts of each kind with full details; ``dev=True``: the next
    ``per_kind`` of the same fixed order (disjoint texts, for tuning)."""
    out: list[Prompt] = []
    for kind in KINDS:
        full = _held_out_products(kind)
        lo = per_kind if dev else 0
        if lo + per_kind > len(full):
            raise ValueError(f"{kind}: {len(full)} held-out prompts, {lo + per_kind} needed")
        out += full[lo : lo + per_kind]
    return out


def sample_train_prompts(n: int, rng: np.random.Generator, detail: float = 1.0) -> list[Prompt]:
    """``n`` prompts drawn from ``train_pool`` (each kind equally likely) with random details;
    each detail phrase is named with probability ``detail`` (else left out of the text)."""
    pool = train_pool()
    by_kind = {k: [p for p in pool if p.kind == k] for k in KINDS}
    kinds = rng.integers(len(KINDS), size=n)
    out = []
    for k in kinds:
        p = by_kind[KINDS[k]][int(rng.integers(len(by_kind[KINDS[k]])))]
        ink = list(INKS)[int(rng.integers(len(INKS)))]
        bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        named = rng.random(2) < detail
        out.append(p.with_details(ink if named[0] else None, bg if named[1] else None))
    return out


def corrupt(p: Prompt, rng: np.random.Generator) -> Prompt:
    """A caption with wrong content for the scene of ``p`` (details kept): another digit,
    or (half of the time) swapped order / wrong count. Never equal to ``p``."""
    d = p.digits
    other = int((d[0] + 1 + rng.integers(9)) % 10)
    structural = bool(rng.integers(2))
    if p.kind == "single":
        new = Prompt("single", (other,))
    elif structural and p.kind == "position":
        new = Prompt(p.kind, (d[1], d[0]), p.where)
    elif p.kind in ("two", "position"):
        spare = next(x for x in range(10) if x not in d)
        pair = (other, d[1]) if other != d[1] else (d[0], spare)
        new = Prompt(p.kind, pair, p.where)
    elif structural:
        new = Prompt("counting", d, 5 - int(p.where))
    else:
        new = Prompt("counting", (other,), p.where)
    return new.with_details(p.ink, p.background)


# ---------------------------------------------------------------------------- digits


@dataclass
class Digits:
    """The real digits as float images in [0, 1] (8 x 8), split once into train/test."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """scikit-learn's digits (shipped with the package, no download), a fixed stratified
    split. Scenes for training use only ``train``; ``test`` measures the scorer."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    return Digits(xtr, ytr.astype(int), xte, yte.astype(int))


def compose(
    layout: dict[int, int], x: np.ndarray, y: np.ndarray, rng, ink: float = 1.0, bg: float = 0.0
) -> np.ndarray:
    """A 16 x 16 scene in [0, 1]: each slot of ``layout`` gets a random real image of its
    digit from ``(x, y)`` at ink level ``ink``; background level ``bg`` everywhere."""
    canvas = np.zeros((SIDE, SIDE), np.float32)
    for slot, digit in layout.items():
        idx = np.flatnonzero(y == digit)
        r, c = SLOT_OFFSETS[slot]
        canvas[r : r + CELL, c : c + CELL] = x[idx[int(rng.integers(len(idx)))]]
    return (bg + (1.0 - bg) * ink * canvas).astype(np.float32)


def slots_of(images: np.ndarray) -> np.ndarray:
    """``(N, 16, 16)`` scenes -> ``(N, 4, 8, 8)`` slot crops in slot order."""
    return np.stack([images[:, r : r + CELL, c : c + CELL] for r, c in SLOT_OFFSETS], axis=1)


def make_scenes(
    prompts: list[Prompt], x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One scene per prompt, ``(N, 16, 16)`` in [0, 1]; a detail the prompt does not name
    is drawn at random (the scene always has some ink and some background)."""
    out = []
    for p in prompts:
        layout = p.layout(rng)
        ink = p.ink if p.ink is not None else list(INKS)[int(rng.integers(len(INKS)))]
        bg = p.background
        if bg is None:
            bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        out.append(compose(layout, x, y, rng, INKS[ink], BACKGROUNDS[bg]))
    return np.stack(out)


def captions(
    prompts: list[Prompt], error_rate: float, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Training captions: each one's content is corrupted with probability ``error_rate``.
    Returns the texts and the boolean mask of corrupted ones."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"caption error rate must be in [0, 1], got {error_rate}")
    wrong = rng.random(len(prompts)) < error_rate
    texts = [corrupt(p, rng).text() if w else p.text() for p, w in zip(prompts, wrong, strict=True)]
    return texts, wrong
