"""DigitEval: an exact scorer for generated digit scenes.

A scene is first brought to black background and full contrast: its background level is
the 25th percentile of its pixels (a scene has at most three digits, so most of its pixels
are background), subtracted and divided out. A scikit-learn MLP (128-64 ReLU units) then
classifies each 8 x 8 slot into the ten digits or ``BLANK``. It is trained on the train
split of the real digits at random ink levels (plus copies shifted by one pixel, and blank
slots with faint noise) and measured on the untouched test split, at full and at the
faintest ink. The scene's details are read too: its background level and its ink level
(the brightest normalised pixel), each to the nearest named level.

A prompt is satisfied when its rule (:meth:`scenes.Prompt.check`) holds for the
slot labels. Quality figures: the classifier's mean confidence on occupied slots and a
Frechet distance between the classifier's penultimate-layer features of the generated
slots and of real scenes drawn for the same prompts ("feature FID").

The fitted classifier is kept as its arrays (:data:`SCORER_FILE`, read with
``allow_pickle=False``) and its accuracy (:data:`SCORER_INFO`); :meth:`Scorer.proba` is
scikit-learn's forward pass in numpy, the same operations in the same order (bit-identical).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.t2i.errors import UsageError

from . import scenes

SCORER_FILE = "scorer.npz"  # weights and biases of each layer, and the class labels
SCORER_INFO = "scorer.json"  # the held-out accuracy and the layer count


@dataclass
class Scorer:
    """The fitted classifier's arrays and its held-out accuracy on real digits."""

    coefs: list[np.ndarray]  # (in, out) per layer: ReLU hidden layers, a softmax output
    intercepts: list[np.ndarray]
    classes: np.ndarray  # the label of each output column
    test_accuracy: float  # on the real test digits, the lower of full and faintest ink

    @classmethod
    def from_classifier(cls, clf, test_accuracy: float) -> Scorer:
        """From a fitted ``MLPClassifier`` with ReLU hidden layers and several classes."""
        if clf.activation != "relu" or clf.out_activation_ != "softmax":
            raise ValueError(f"{clf.activation}/{clf.out_activation_} layers: relu/softmax only")
        return cls(list(clf.coefs_), list(clf.intercepts_), clf.classes_, test_accuracy)

    def features(self, slots: np.ndarray) -> np.ndarray:
        """Penultimate-layer (64-d ReLU) activations of ``(N, 8, 8)`` crops."""
        h = slots.reshape(len(slots), -1)
        for w, b in zip(self.coefs[:-1], self.intercepts[:-1], strict=True):
            h = h @ w
            h += b
            np.maximum(h, 0, out=h)
        return h

    def proba(self, slots: np.ndarray) -> np.ndarray:
        """``(N, 8, 8)`` crops in [0, 1] -> ``(N, 11)`` class probabilities."""
        z = self.features(slots) @ self.coefs[-1]
        z += self.intercepts[-1]
        e = z - z.max(axis=1)[:, np.newaxis]  # softmax, in scikit-learn's order of operations
        np.exp(e, out=z)
        z /= z.sum(axis=1)[:, np.newaxis]
        return z

    def read(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 16, 16)`` scenes -> slot labels ``(N, 4)`` and their probabilities."""
        crops = scenes.slots_of(normalise(images)).reshape(-1, scenes.CELL, scenes.CELL)
        p = self.proba(crops)
        return self.classes[p.argmax(1)].reshape(-1, 4), p.max(1).reshape(-1, 4)


def background_level(images: np.ndarray) -> np.ndarray:
    """``(N, 16, 16)`` scenes -> their background level, the 25th percentile of each."""
    return np.percentile(images.reshape(len(images), -1), 25, axis=1).astype(np.float32)


def normalise(images: np.ndarray) -> np.ndarray:
    """Scenes on a black background at full contrast: ``(x - bg) / (1 - bg)``, clipped."""
    bg = background_level(images)[:, None, None]
    return np.clip((images - bg) / np.maximum(1.0 - bg, 1e-3), 0.0, 1.0).astype(np.float32)


def read_details(images: np.ndarray) -> tuple[list[str], list[str]]:
    """The nearest named ink and background level of each scene (see the module doc)."""
    bg = background_level(images)
    ink = normalise(images).reshape(len(images), -1).max(axis=1)
    names_i, levels_i = list(scenes.INKS), np.array(list(scenes.INKS.values()))
    names_b, levels_b = list(scenes.BACKGROUNDS), np.array(list(scenes.BACKGROUNDS.values()))
    inks = [names_i[int(np.abs(levels_i - v).argmin())] for v in ink]
    bgs = [names_b[int(np.abs(levels_b - v).argmin())] for v in bg]
    return inks, bgs


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
    """Fit DigitEval's classifier; its accuracy is measured on ``digits.test``."""
    clf = fit_classifier(digits, seed, max_iter)
    faint = min(scenes.INKS.values())
    acc = [
        float((clf.predict(ink * digits.test_x.reshape(-1, 64)) == digits.test_y).mean())
        for ink in (1.0, faint)
    ]
    return Scorer.from_classifier(clf, min(acc))


def fit_classifier(digits: scenes.Digits, seed: int = 0, max_iter: int = 300):
    """The fitted scikit-learn ``MLPClassifier`` behind :func:`train_scorer`."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    xs = [digits.train_x, *_shifted(digits.train_x)]
    lo = min(scenes.INKS.values()) - 0.1  # every ink level a scene names, and a margin
    xs = [x * rng.uniform(lo, 1.0, (len(x), 1, 1)).astype(np.float32) for x in xs]
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
    return clf


def save_scorer(scorer: Scorer, folder: Path) -> None:
    """:data:`SCORER_FILE` and :data:`SCORER_INFO` in ``folder``: arrays and JSON only."""
    arrays = {f"coef_{i}": w for i, w in enumerate(scorer.coefs)}
    arrays |= {f"intercept_{i}": b for i, b in enumerate(scorer.intercepts)}
    np.savez(Path(folder) / SCORER_FILE, classes=scorer.classes, **arrays)
    info = {"layers": len(scorer.coefs), "test_accuracy": scorer.test_accuracy}
    (Path(folder) / SCORER_INFO).write_text(json.dumps(info, indent=2) + "\n")


def load_scorer(folder: Path) -> Scorer:
    """What :func:`save_scorer` wrote (never unpickles); UsageError if it does not fit (the
    cache folder is the user's)."""
    f, info_file = Path(folder) / SCORER_FILE, Path(folder) / SCORER_INFO
    info = json.loads(info_file.read_text())
    n = info["layers"]
    with np.load(f, allow_pickle=False) as z:
        try:
            coefs = [z[f"coef_{i}"] for i in range(n)]
            intercepts = [z[f"intercept_{i}"] for i in range(n)]
            classes = z["classes"]
        except KeyError as e:
            raise UsageError(f"{f}: no array {e} ({n} layers in {info_file})") from None
    shapes = [(w.shape, b.shape) for w, b in zip(coefs, intercepts, strict=True)]
    fits = all(
        w.ndim == 2 and b.shape == w.shape[1:] for w, b in zip(coefs, intercepts, strict=True)
    )
    chained = all(a.shape[1] == b.shape[0] for a, b in zip(coefs, coefs[1:], strict=False))
    if not (fits and chained and coefs[-1].shape[1] == classes.shape[0]):
        raise UsageError(f"{f}: layer shapes {shapes} do not chain to {len(classes)} classes")
    return Scorer(coefs, intercepts, classes, float(info["test_accuracy"]))


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
    """Per-prompt correctness, per-kind accuracy, the share of named details the scenes
    show, blank scenes, confidence and feature FID."""
    labels, conf = scorer.read(images)
    inks, bgs = read_details(images)
    named = [(p.ink, i) for p, i in zip(prompts, inks, strict=True) if p.ink is not None]
    named += [(p.background, b) for p, b in zip(prompts, bgs, strict=True) if p.background]
    correct = np.array(
        [p.check(list(map(int, lab))) for p, lab in zip(prompts, labels, strict=True)]
    )
    kinds = np.array([p.kind for p in prompts])
    occupied = labels != scenes.BLANK
    crops = scenes.slots_of(normalise(images)).reshape(-1, scenes.CELL, scenes.CELL)
    ref = scenes.slots_of(normalise(reference)).reshape(-1, scenes.CELL, scenes.CELL)
    return {
        "correct": correct.astype(int).tolist(),
        "per_kind": {
            k: float(correct[kinds == k].mean()) for k in scenes.KINDS if (kinds == k).any()
        },
        "overall": float(correct.mean()),
        "details": float(np.mean([a == b for a, b in named])) if named else float("nan"),
        "blank": float((~occupied).all(axis=1).mean()),
        "confidence": float(conf[occupied].mean()) if occupied.any() else 0.0,
        "fid": frechet(scorer.features(crops), scorer.features(ref)),
        "labels": labels.tolist(),
    }
