"""Scenes of real handwritten digits, template captions, caption corruption and prompt sets.

A scene is a 16 x 16 grey canvas cut into four 8 x 8 slots (the quadrants), each empty or
holding one of scikit-learn's 1,797 real 8 x 8 digits. Prompts come in the GenEval kinds:

* ``single``   "a 5"                  - some slot holds a 5
* ``position`` "a 5 at the top left"  - the named slot holds a 5
* ``two``      "a 3 left of a 7" / "a 3 above a 7" - a row (column) holds 3 then 7
* ``counting`` "two 4s" / "three 4s"  - exactly that many slots hold a 4

Some (digit, slot), (digit, digit) and (digit, count) combinations are held out: the base
model and the preference data never see them; the evaluation prompts use only them
(``single`` has no combination, so it uses every digit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIDE = 16  # canvas side in pixels
CELL = 8  # slot side (= sklearn digit side)
BLANK = 10  # label of an empty slot
SLOTS = ("top left", "top right", "bottom left", "bottom right")
SLOT_OFFSETS = ((0, 0), (0, CELL), (CELL, 0), (CELL, CELL))  # (row, col) of each slot
ROWS = ((0, 1), (2, 3))  # slot indices (left, right) of each row
COLS = ((0, 2), (1, 3))  # slot indices (top, bottom) of each column
KINDS = ("single", "position", "two", "counting")
COUNT_WORDS = {2: "two", 3: "three"}
WORDS = ("a", "at", "the", "top", "bottom", "left", "right", "of", "above", "two", "three")


@dataclass(frozen=True)
class Prompt:
    """One caption: ``kind``; ``digits`` (one, or two for ``two``); ``where`` = slot index
    (position), relation ``"left"``/``"above"`` (two) or count 2/3 (counting)."""

    kind: str
    digits: tuple[int, ...]
    where: int | str | None = None

    def text(self) -> str:
        d = self.digits
        if self.kind == "single":
            return f"a {d[0]}"
        if self.kind == "position":
            return f"a {d[0]} at the {SLOTS[int(self.where)]}"
        if self.kind == "two":
            rel = "left of" if self.where == "left" else "above"
            return f"a {d[0]} {rel} a {d[1]}"
        return f"{COUNT_WORDS[int(self.where)]} {d[0]}s"

    def check(self, labels: list[int]) -> bool:
        """Is a scene whose slots read ``labels`` (4 labels, ``BLANK`` = empty) right?"""
        d = self.digits
        if self.kind == "single":
            return d[0] in labels
        if self.kind == "position":
            return labels[int(self.where)] == d[0]
        if self.kind == "two":
            lines = ROWS if self.where == "left" else COLS
            return any(labels[a] == d[0] and labels[b] == d[1] for a, b in lines)
        return sum(lab == d[0] for lab in labels) == int(self.where)

    def layout(self, rng: np.random.Generator) -> dict[int, int]:
        """A slot -> digit assignment that satisfies this prompt (random where it is free)."""
        d = self.digits
        if self.kind == "single":
            return {int(rng.integers(4)): d[0]}
        if self.kind == "position":
            return {int(self.where): d[0]}
        if self.kind == "two":
            lines = ROWS if self.where == "left" else COLS
            a, b = lines[int(rng.integers(2))]
            return {a: d[0], b: d[1]}
        slots = rng.choice(4, size=int(self.where), replace=False)
        return {int(s): d[0] for s in slots}


def held_out(p: Prompt) -> bool:
    """The fixed rule that reserves combinations for evaluation (``single``: never)."""
    d = p.digits
    if p.kind == "position":
        return (d[0] + int(p.where)) % 4 == 3
    if p.kind == "two":
        return (3 * d[0] + d[1]) % 5 == 0
    if p.kind == "counting":
        return (d[0] + int(p.where)) % 5 == 0
    return False


def all_prompts(kind: str) -> list[Prompt]:
    """Every prompt of one kind, in a fixed order."""
    if kind == "single":
        return [Prompt("single", (d,)) for d in range(10)]
    if kind == "position":
        return [Prompt("position", (d,), s) for d in range(10) for s in range(4)]
    if kind == "two":
        return [
            Prompt("two", (a, b), rel)
            for rel in ("left", "above")
            for a in range(10)
            for b in range(10)
            if a != b
        ]
    if kind == "counting":
        return [Prompt("counting", (d,), n) for d in range(10) for n in (2, 3)]
    raise ValueError(f"unknown prompt kind {kind!r}")


def train_pool() -> list[Prompt]:
    """Prompts the base model and the preference data may use (no held-out combination)."""
    return [p for k in KINDS for p in all_prompts(k) if not held_out(p)]


def eval_prompts(per_kind: int) -> list[Prompt]:
    """``per_kind`` evaluation prompts of each kind, cycling over its held-out combinations
    (over all digits for ``single``); the order is fixed, the noise comes from the seed."""
    out: list[Prompt] = []
    for kind in KINDS:
        pool = [p for p in all_prompts(kind) if kind == "single" or held_out(p)]
        out += [pool[i % len(pool)] for i in range(per_kind)]
    return out


def sample_train_prompts(n: int, rng: np.random.Generator) -> list[Prompt]:
    """``n`` prompts drawn from ``train_pool``, each kind equally likely."""
    pool = train_pool()
    by_kind = {k: [p for p in pool if p.kind == k] for k in KINDS}
    kinds = rng.integers(len(KINDS), size=n)
    return [by_kind[KINDS[k]][int(rng.integers(len(by_kind[KINDS[k]])))] for k in kinds]


def corrupt(p: Prompt, rng: np.random.Generator) -> Prompt:
    """A wrong caption for the scene of ``p``: another digit, or (half of the time) a wrong
    slot / swapped order / wrong count. Never equal to ``p``."""
    d = p.digits
    other = int((d[0] + 1 + rng.integers(9)) % 10)
    structural = bool(rng.integers(2))
    if p.kind == "single":
        return Prompt("single", (other,))
    if p.kind == "position":
        if structural:
            return Prompt("position", d, int((int(p.where) + 1 + rng.integers(3)) % 4))
        return Prompt("position", (other,), p.where)
    if p.kind == "two":
        if structural:
            return Prompt("two", (d[1], d[0]), p.where)
        new = (other, d[1]) if other != d[1] else (d[0], int((d[1] + 1) % 10))
        return Prompt("two", new if new != d else (d[1], d[0]), p.where)
    if structural:
        return Prompt("counting", d, 5 - int(p.where))
    return Prompt("counting", (other,), p.where)


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


def compose(layout: dict[int, int], x: np.ndarray, y: np.ndarray, rng) -> np.ndarray:
    """A 16 x 16 scene in [0, 1]: each slot of ``layout`` gets a random real image of its
    digit from ``(x, y)``; the other slots stay black."""
    canvas = np.zeros((SIDE, SIDE), np.float32)
    for slot, digit in layout.items():
        idx = np.flatnonzero(y == digit)
        r, c = SLOT_OFFSETS[slot]
        canvas[r : r + CELL, c : c + CELL] = x[idx[int(rng.integers(len(idx)))]]
    return canvas


def slots_of(images: np.ndarray) -> np.ndarray:
    """``(N, 16, 16)`` scenes -> ``(N, 4, 8, 8)`` slot crops in ``SLOTS`` order."""
    return np.stack([images[:, r : r + CELL, c : c + CELL] for r, c in SLOT_OFFSETS], axis=1)


def make_scenes(
    prompts: list[Prompt], x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One scene per prompt, ``(N, 16, 16)`` in [0, 1]."""
    return np.stack([compose(p.layout(rng), x, y, rng) for p in prompts])


def captions(
    prompts: list[Prompt], error_rate: float, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Training captions: each one is corrupted with probability ``error_rate``.
    Returns the texts and the boolean mask of corrupted ones."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"caption error rate must be in [0, 1], got {error_rate}")
    wrong = rng.random(len(prompts)) < error_rate
    texts = [corrupt(p, rng).text() if w else p.text() for p, w in zip(prompts, wrong, strict=True)]
    return texts, wrong
