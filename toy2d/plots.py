"""Matplotlib drawing helpers (Agg backend): samples coloured by class over GT contours.

Every figure says what it shows: dots are samples coloured by the class they were generated
for (the class number sits beside its ground-truth mode), grey rings are the 1, 2 and 3
sigma circles of the ground-truth modes, and "acc" is :data:`ACC_DEF`.
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .data import ToyConfig, gt_means  # noqa: E402

CMAP = plt.get_cmap("tab10")
RING = "0.35"
# toy2d.metrics' class_accuracy, in words
ACC_DEF = (
    "acc = class accuracy: the share of samples whose nearest ground-truth mode centre is "
    "the class it was generated for (1 = every sample lands in its own mode)"
)


def _lim(cfg: ToyConfig) -> float:
    return cfg.radius * 1.9


def gt_contours(ax, cfg: ToyConfig) -> None:
    """Contours of the GT mixture density (1, 2 and 3 sigma of every mode)."""
    lim = _lim(cfg)
    g = np.linspace(-lim, lim, 200)
    xx, yy = np.meshgrid(g, g)
    mu = gt_means(cfg).numpy()
    d2 = np.min((xx[..., None] - mu[:, 0]) ** 2 + (yy[..., None] - mu[:, 1]) ** 2, axis=-1)
    r = np.sqrt(d2) / cfg.gt_std
    ax.contour(xx, yy, r, levels=[1, 2, 3], colors=RING, linewidths=0.6, alpha=0.8)


def mode_numbers(ax, cfg: ToyConfig, fontsize: float = 7) -> None:
    """The class number of every GT mode, just inside the ring, in the class colour."""
    for c, (mx, my) in enumerate(gt_means(cfg).numpy()):
        f = 1 - 5 * cfg.gt_std / cfg.radius
        ax.text(f * mx, f * my, str(c), color=CMAP(c % 10), fontsize=fontsize,
                fontweight="bold", ha="center", va="center")  # fmt: skip


def scatter(
    ax,
    x: np.ndarray,
    labels: np.ndarray,
    cfg: ToyConfig,
    title: str = "",
    ticks: bool = False,
    numbers: bool = True,
) -> None:
    x, labels = np.asarray(x), np.asarray(labels)
    lim = _lim(cfg)
    colors = CMAP(labels % 10)
    ax.scatter(x[:, 0], x[:, 1], c=colors, s=3.0, alpha=0.6, linewidths=0, rasterized=True)
    gt_contours(ax, cfg)
    if numbers:
        mode_numbers(ax, cfg)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if ticks:
        ax.set_xlabel("x₁", fontsize=8)
        ax.set_ylabel("x₂", fontsize=8)
        ax.tick_params(labelsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def legend_handles(cfg: ToyConfig) -> list:
    """One dot per class and one ring for the GT modes, for ``fig.legend``."""
    dots = [
        Line2D([], [], ls="", marker="o", ms=5, color=CMAP(c % 10), label=f"class {c}")
        for c in range(cfg.num_classes)
    ]
    ring = Line2D(
        [], [], ls="", marker="o", ms=9, mfc="none", mec=RING,
        label=f"GT mode:\ncircles at\n1σ, 2σ, 3σ\n(σ = {cfg.gt_std:g})",
    )  # fmt: skip
    return [*dots, ring]


def add_legend(fig, cfg: ToyConfig, **kw) -> None:
    fig.legend(
        handles=legend_handles(cfg),
        title="sample coloured by\nthe class it was\ngenerated for",
        title_fontsize=7,
        fontsize=7,
        frameon=False,
        **kw,
    )


def add_caption(fig, text: str, width: int | None = None) -> float:
    """Explanatory text along the bottom edge of ``fig``, wrapped to at most ``width``
    characters and never wider than the figure; returns the height fraction it takes."""
    fits = int(fig.get_figwidth() * 17)  # characters of 7 pt text per line of this figure
    text = textwrap.fill(text, min(width or fits, fits))
    fig.text(0.01, 0.01, text, fontsize=7, ha="left", va="bottom")
    return (text.count("\n") + 1) * 0.125 / fig.get_figheight() + 0.03


def sample_caption(n_per_class: int, sampler: str) -> str:
    return (
        f"Each dot is one generated sample ({n_per_class} per class, {sampler} sampler, "
        f"from the same initial noise for every method of a seed). {ACC_DEF}."
    )


def save_scatter(path, x, labels, cfg: ToyConfig, title: str, caption: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6.2, 5.4), dpi=110)
    scatter(ax, x, labels, cfg, ticks=True)
    ax.set_title(title, fontsize=9)
    add_legend(fig, cfg, loc="center right")
    bottom = add_caption(fig, caption) if caption else 0.0
    fig.subplots_adjust(left=0.1, right=0.76, top=0.93, bottom=bottom + 0.08)
    fig.savefig(path)
    plt.close(fig)
