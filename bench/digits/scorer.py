"""DigitEval: an exact scorer for generated digit scenes.

A scikit-learn MLP (128-64 ReLU units) classifies each 8 x 8 slot of a scene into the ten
digits or ``BLANK``. It is trained on the train split of the real digits (plus copies
shifted by one pixel, and blank slots with faint noise) and measured on the untouched test
split. A prompt is satisfied when its rule (:meth:`scenes.Prompt.check`) holds for the
slot labels. Quality figures: the classifier's mean confidence on occupied slots and a
Frechet distance between the classifier's penultimate-layer features of the generated
slots and of real scenes drawn for the same prompts ("feature FID").
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import scenes


@dataclass
class Scorer:
    """The fitted classifier and its held-out accuracy on real digits."""

    clf: object
    test_accuracy: float

    def proba(self, slots: np.ndarray) -> np.ndarray:
        """``(N, 8, 8)`` crops in [0, 1] -> ``(N, 11)`` class probabilities."""
        return self.clf.predict_proba(slots.reshape(len(slots), -1))

    def features(self, slots: np.ndarray) -> np.ndarray:
        """Penultimate-layer (64-d ReLU) activations of ``(N, 8, 8)`` crops."""
        h = slots.reshape(len(slots), -1)
        for w, b in zip(self.clf.coefs_[:-1], self.clf.intercepts_[:-1], strict=True):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def read(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 16, 16)`` scenes -> slot labels ``(N, 4)`` and their probabilities."""
        crops = scenes.slots_of(images).reshape(-1, scenes.CELL, scenes.CELL)
        p = self.proba(crops)
        return p.argmax(1).reshape(-1, 4), p.max(1).reshape(-1, 4)


def _shifted(x: np.ndarray) -> list[np.ndarray]:
    out = []
    for axis in (1, 2):
        for step in (-1, 1):
            s = np.roll(x, step, axis=axis)
            edge = 0 if step == 1 else -1
            if axis == 1:
                s[:, edge, :] = 0
            else:
                s[:, :, edge] = 0
            out.append(s)
    return out


def train_scorer(digits: scenes.Digits, seed: int = 0, max_iter: int = 300) -> Scorer:
    """Fit DigitEval's classifier; its accuracy is measured on ``digits.test`` (+ blanks)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    xs = [digits.train_x, *_shifted(digits.train_x)]
    ys = [digits.train_y] * len(xs)
    n_blank = len(digits.train_x)
    xs.append(rng.uniform(0, 1, (n_blank, 8, 8)) * rng.uniform(0, 0.15, (n_blank, 1, 1)))
    ys.append(np.full(n_blank, scenes.BLANK))
    x = np.concatenate(xs).reshape(-1, 64)
    y = np.concatenate(ys)
    clf = MLPClassifier(
        hidden_layer_sizes=(128, 64), alpha=1e-3, max_iter=max_iter, random_state=seed, tol=1e-5
    )
    with warnings.catch_warnings():  # few epochs in smoke runs: not converged, on purpose
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    acc = float((clf.predict(digits.test_x.reshape(-1, 64)) == digits.test_y).mean())
    return Scorer(clf, acc)


def save_scorer(scorer: Scorer, path: Path) -> None:
    Path(path).write_bytes(pickle.dumps(scorer))


def load_scorer(path: Path) -> Scorer:
    return pickle.loads(Path(path).read_bytes())


def load_images(folder: Path, n: int) -> np.ndarray:
    """``folder/00000.png`` ... as ``(n, 16, 16)`` grey in [0, 1]; ValueError if missing."""
    from PIL import Image

    out = []
    for i in range(n):
        f = Path(folder) / f"{i:05d}.png"
        if not f.is_file():
            raise ValueError(f"{f}: image missing")
        a = np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0
        if a.shape != (scenes.SIDE, scenes.SIDE):
            raise ValueError(f"{f}: expected {scenes.SIDE}x{scenes.SIDE}, got {a.shape}")
        out.append(a)
    return np.stack(out)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # near-singular covariances on tiny smoke sets
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(c1 @ c2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def score_images(
    scorer: Scorer, prompts: list[scenes.Prompt], images: np.ndarray, reference: np.ndarray
) -> dict:
    """Per-prompt correctness, per-kind accuracy, confidence and feature FID."""
    labels, conf = scorer.read(images)
    correct = np.array(
        [p.check(list(map(int, lab))) for p, lab in zip(prompts, labels, strict=True)]
    )
    kinds = np.array([p.kind for p in prompts])
    occupied = labels != scenes.BLANK
    crops = scenes.slots_of(images).reshape(-1, scenes.CELL, scenes.CELL)
    ref = scenes.slots_of(reference).reshape(-1, scenes.CELL, scenes.CELL)
    return {
        "correct": correct.astype(int).tolist(),
        "per_kind": {
            k: float(correct[kinds == k].mean()) for k in scenes.KINDS if (kinds == k).any()
        },
        "overall": float(correct.mean()),
        "confidence": float(conf[occupied].mean()) if occupied.any() else 0.0,
        "fid": frechet(scorer.features(crops), scorer.features(ref)),
        "labels": labels.tolist(),
    }
