"""Aggregate DigitEval scores over seeds: the Table-1-shaped markdown, the grid figure and
``results.json`` with every number."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import scenes

LABELS = {
    "real": "Real scenes (scorer ceiling)",
    "base": "Base model",
    "sft": "SFT (winners)",
    "dpo": "D-DPO",
    "dspo": "DSPO",
    "dspo_cpp": "DSPO+CPP",
    "ddspo": "DDSPO",
}


def load_scores(out: Path, seeds: list[int]) -> dict[int, dict]:
    """``{seed: scores.json}`` for the seeds whose scores exist."""
    res = {}
    for s in seeds:
        f = Path(out) / f"seed-{s}" / "scores" / "scores.json"
        if f.is_file():
            res[s] = json.loads(f.read_text())
    return res


def win_rate(method: list[int], base: list[int]) -> tuple[int, int, float]:
    """(wins, losses, wins / (wins + losses)) of per-prompt correctness vs the base."""
    m, b = np.asarray(method, bool), np.asarray(base, bool)
    wins, losses = int((m & ~b).sum()), int((~m & b).sum())
    rate = wins / (wins + losses) if wins + losses else float("nan")
    return wins, losses, rate


def _stat(values: list[float]) -> dict:
    a = np.asarray(values, float)
    if np.isnan(a).all():
        return {"mean": float("nan"), "std": float("nan"), "values": a.tolist()}
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "values": a.tolist()}


def aggregate(scores: dict[int, dict], models: list[str]) -> dict:
    """Mean/std over seeds of every figure, per model."""
    agg: dict = {}
    for m in models:
        rows = [scores[s][m] for s in sorted(scores)]
        entry = {k: _stat([r["per_kind"][k] for r in rows]) for k in scenes.KINDS}
        entry["overall"] = _stat([r["overall"] for r in rows])
        entry["confidence"] = _stat([r["confidence"] for r in rows])
        entry["fid"] = _stat([r["fid"] for r in rows])
        if m not in ("real", "base"):
            wl = [
                win_rate(scores[s][m]["correct"], scores[s]["base"]["correct"])
                for s in sorted(scores)
            ]
            entry["win_rate"] = _stat([w[2] for w in wl])
            entry["wins"], entry["losses"] = sum(w[0] for w in wl), sum(w[1] for w in wl)
        agg[m] = entry
    return agg


def _pm(e: dict, scale: float = 100.0, digits: int = 1) -> str:
    if np.isnan(e["mean"]):
        return "n/a"
    return f"{e['mean'] * scale:.{digits}f} ± {e['std'] * scale:.{digits}f}"


def table_markdown(agg: dict, n_seeds: int, n_prompts: int) -> str:
    """Paper Table 1's shape: one row per method, alignment columns then quality columns."""
    head = (
        "| Method | Single | Two obj. | Counting | Position | **Overall** | Win rate vs base "
        "(W/L) | Confidence | Feature FID ↓ |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m, e in agg.items():
        win = "–" if "win_rate" not in e else f"{_pm(e['win_rate'])} ({e['wins']}/{e['losses']})"
        cells = [_pm(e[k]) for k in ("single", "two", "counting", "position")]
        lines.append(
            f"| {LABELS.get(m, m)} | {' | '.join(cells)} | **{_pm(e['overall'])}** | {win} "
            f"| {_pm(e['confidence'])} | {_pm(e['fid'], 1.0, 2)} |"
        )
    note = (
        f"\nDigitEval accuracy (%) on {n_prompts} held-out prompts, mean ± std over "
        f"{n_seeds} seed(s). Win rate: prompts the method gets right and the base wrong, "
        "over all prompts where they differ (same noise). Confidence: the scorer's mean "
        "top probability on occupied slots (%). Feature FID: Frechet distance of the "
        "scorer's penultimate features, generated slots vs real scenes of the same prompts.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def grid_figure(images_dir: Path, prompts: list[scenes.Prompt], models: list[str], out: Path):
    """Rows = two prompts of each category, columns = models (one seed's samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = []
    for kind in scenes.KINDS:
        idx = [i for i, p in enumerate(prompts) if p.kind == kind]
        rows += idx[:2]
    fig, axes = plt.subplots(len(rows), len(models), figsize=(1.3 * len(models), 1.3 * len(rows)))
    axes = np.atleast_2d(axes)
    for r, i in enumerate(rows):
        for c, m in enumerate(models):
            ax = axes[r, c]
            img = Image.open(Path(images_dir) / m / f"{i:05d}.png").convert("L")
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(LABELS.get(m, m).split(" (")[0], fontsize=8)
            if c == 0:
                ax.set_ylabel(prompts[i].text(), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
