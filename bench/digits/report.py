"""The benchmark's report: Table 1's shape with paired statistics, the pair-quality table,
the guidance search, the tuning grid, the controls, the latent statistics, two figures and
``results.json`` with every number.

What "helps" means is fixed here, before any run (:data:`HELPS`, :func:`helps`).
"""

from __future__ import annotations

import json
import math
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
    "dpo_ranked": "Control: D-DPO on DigitEval-ranked pairs",
    "sft_real": "Control: SFT on real scenes",
}
HELPS = (
    "a method *helps* when, against the base at the base's own best guidance, (1) the pooled "
    "paired sign test over all evaluation seeds and prompts gives p < 0.05 with more wins "
    "than losses, (2) its accuracy is higher on at least two thirds of the seeds, (3) its "
    "feature FID is at most 1.25 x the base's and (4) its blank share at most the base's + 5 "
    "points"
)


def load_scores(out: Path, seeds: list[int]) -> dict[int, dict]:
    """``{seed: scores.json}`` for the seeds whose scores exist."""
    res = {}
    for s in seeds:
        f = Path(out) / f"seed-{s}" / "samples" / "scores.json"
        if f.is_file():
            res[s] = json.loads(f.read_text())
    return res


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value of ``wins`` vs ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(scores: dict[int, dict], a: str, b: str) -> dict:
    """Per-prompt correctness of ``a`` vs ``b`` (same prompts and noise), pooled over seeds:
    wins, losses, the sign test's p and the seeds on which ``a`` is more accurate."""
    wins = losses = better = 0
    for s in sorted(scores):
        x = np.asarray(scores[s][a]["correct"], bool)
        y = np.asarray(scores[s][b]["correct"], bool)
        wins, losses = wins + int((x & ~y).sum()), losses + int((~x & y).sum())
        better += int(x.mean() > y.mean())
    return {"wins": wins, "losses": losses, "p": sign_test(wins, losses), "seeds_better": better}


def helps(entry: dict, base: dict, n_seeds: int) -> bool:
    """:data:`HELPS` for one aggregated row against the base's."""
    vs = entry["vs_base"]
    return (
        vs["p"] < 0.05
        and vs["wins"] > vs["losses"]
        and vs["seeds_better"] * 3 >= 2 * n_seeds
        and entry["fid"]["mean"] <= 1.25 * base["fid"]["mean"]
        and entry["blank"]["mean"] <= base["blank"]["mean"] + 0.05
    )


def _stat(values: list[float]) -> dict:
    a = np.asarray(values, float)
    if np.isnan(a).all():
        return {"mean": float("nan"), "std": float("nan"), "values": a.tolist()}
    return {"mean": float(np.nanmean(a)), "std": float(np.nanstd(a)), "values": a.tolist()}


def aggregate(scores: dict[int, dict], models: list[str]) -> dict:
    """Mean/std over seeds of every figure per model, and the paired tests against the base
    and against D-DPO (when it ran)."""
    agg: dict = {}
    for m in models:
        rows = [scores[s][m] for s in sorted(scores)]
        entry = {k: _stat([r["per_kind"][k] for r in rows]) for k in scenes.KINDS}
        for k in ("overall", "details", "blank", "confidence", "fid"):
            entry[k] = _stat([r[k] for r in rows])
        if m not in ("real", "base"):
            entry["vs_base"] = paired(scores, m, "base")
            if m != "dpo" and "dpo" in models:
                entry["vs_dpo"] = paired(scores, m, "dpo")
        agg[m] = entry
    for e in agg.values():
        if "vs_base" in e:
            e["helps"] = helps(e, agg["base"], len(scores))
    return agg


def control_valid(agg: dict) -> bool | None:
    """The positive control beats the base on every evaluation seed (None: not run)."""
    if "dpo_ranked" not in agg:
        return None
    ctl, base = agg["dpo_ranked"]["overall"]["values"], agg["base"]["overall"]["values"]
    return all(c > b for c, b in zip(ctl, base, strict=True))


def _pm(e: dict, scale: float = 100.0, digits: int = 1) -> str:
    if np.isnan(e["mean"]):
        return "n/a"
    return f"{e['mean'] * scale:.{digits}f} ± {e['std'] * scale:.{digits}f}"


def _p(v: float) -> str:
    return f"{v:.2g}" if v >= 1e-4 else "<1e-4"


def _vs(e: dict, key: str) -> str:
    if key not in e:
        return "–"
    v = e[key]
    return f"{v['wins']}/{v['losses']}, p {_p(v['p'])}"


def table_markdown(agg: dict, n_seeds: int, n_prompts: int, guidance: float) -> str:
    """Paper Table 1's shape: one row per model, accuracy per category, then the paired tests
    and the quality columns."""
    head = (
        "| Model | Single | Two obj. | Counting | Position | **Overall** | Details | Blank "
        "| W/L vs base, p | W/L vs D-DPO, p | Helps? | Feature FID ↓ |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m, e in agg.items():
        cells = [_pm(e[k]) for k in scenes.KINDS]
        verdict = "–" if "helps" not in e else ("**yes**" if e["helps"] else "no")
        lines.append(
            f"| {LABELS.get(m, m)} | {' | '.join(cells)} | **{_pm(e['overall'])}** "
            f"| {_pm(e['details'])} | {_pm(e['blank'])} | {_vs(e, 'vs_base')} "
            f"| {_vs(e, 'vs_dpo')} | {verdict} | {_pm(e['fid'], 1.0, 2)} |"
        )
    valid = control_valid(agg)
    flag = {
        None: "",
        True: "Positive control: D-DPO on DigitEval-ranked pairs beats the base on every "
        "seed (the run is valid).\n",
        False: "**INVALID RUN: the positive control (D-DPO on DigitEval-ranked pairs) does "
        "not beat the base on every seed; do not publish these numbers.**\n",
    }[valid]
    note = (
        f"\nDigitEval accuracy (%) on {n_prompts} held-out prompts, mean ± std over "
        f"{n_seeds} seed(s), guidance {guidance:g} (the base's best on the dev prompts). "
        "Details: share of the named ink and background levels the image shows. Blank: "
        "images with no digit. W/L: prompts a model gets right and the other wrong (W) and "
        "the reverse (L), same prompts and noise, pooled over seeds; p: two-sided exact sign "
        f"test. Helps? — {HELPS}. Feature FID: Frechet distance of DigitEval's penultimate "
        "features, generated slots vs real scenes of the same prompts.\n\n"
    )
    return head + "\n".join(lines) + "\n" + note + flag


def quality_markdown(quality: dict, title: str) -> str:
    """The pair-quality table of one pair set (per category and all)."""
    head = (
        f"**{title}**\n\n| Category | Pairs | Winner right | Loser right | W right, L wrong "
        "| L right, W wrong | **Margin (points)** | Winner blank | Loser blank |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for k in (*scenes.KINDS, "all"):
        if k not in quality:
            continue
        r = quality[k]
        pct = [
            f"{100 * r[x]:.1f}"
            for x in ("winner_right", "loser_right", "winner_right_loser_wrong",
                      "loser_right_winner_wrong")
        ]  # fmt: skip
        low = " (below 15: weak)" if r["margin"] < 15 else ""
        lines.append(
            f"| {k} | {r['n']} | {' | '.join(pct)} | **{r['margin']:.1f}**{low} "
            f"| {100 * r['winner_blank']:.1f} | {100 * r['loser_blank']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def guidance_markdown(rows: list[dict], chosen: float) -> str:
    head = "| Guidance | Dev accuracy | Blank | Details | FID |\n|---|---|---|---|---|\n"
    lines = [
        f"| {r['guidance']:g}{' (chosen)' if r['guidance'] == chosen else ''} "
        f"| {100 * r['overall']:.1f} | {100 * r['blank']:.1f} | {100 * r['details']:.1f} "
        f"| {r['fid']:.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def grid_markdown(tuning: dict) -> str:
    head = "| Method | Setting | lr | Dev accuracy | Blank | Chosen |\n|---|---|---|---|---|---|\n"
    lines = []
    for m, rows in tuning["grid"].items():
        pick = tuning["chosen"][m]
        for r in rows:
            mark = "**yes**" if r["name"] == pick["name"] else ""
            if mark and not pick["qualified"]:
                mark += " (no setting met the blank rule)"
            lines.append(
                f"| {LABELS.get(m, m)} | {r['name']} | {r['lr']:.3g} | {100 * r['overall']:.1f} "
                f"| {100 * r['blank']:.1f} | {mark} |"
            )
    return head + "\n".join(lines) + "\n"


def latents_markdown(stats: dict) -> str:
    head = "| Latents | Mean per channel | Std per channel | Max abs |\n|---|---|---|---|\n"
    lines = []
    for name in ("encoded", "sampled"):
        s = stats[name]
        mean = ", ".join(f"{v:+.2f}" for v in s["mean"])
        std = ", ".join(f"{v:.2f}" for v in s["std"])
        lines.append(f"| {name} | {mean} | {std} | {s['abs_max']:.2f} |")
    tail = (
        f"\nfloat16 storage would move a sampled latent by at most "
        f"{stats['fp16_max_error_over_std']:.1e} of its std (the sets are stored in float32).\n"
    )
    rows = stats.get("by_setting") or []
    if rows:
        tail += (
            "\nFresh samples of the first pair prompts, same noise, by sampler setting:\n\n"
            "| Guidance | Steps | Std per channel | Max abs | Right | Blank |\n"
            "|---|---|---|---|---|---|\n"
        )
        tail += (
            "\n".join(
                f"| {r['guidance']:g} | {r['steps']} | {', '.join(f'{v:.2f}' for v in r['std'])} "
                f"| {r['abs_max']:.2f} | {100 * r['right']:.1f} | {100 * r['blank']:.1f} |"
                for r in rows
            )
            + "\n"
        )
    return head + "\n".join(lines) + "\n" + tail


def accuracy_figure(agg: dict, out: Path) -> None:
    """Overall accuracy per model: bars = mean over seeds, dots = the seeds, the base's mean
    as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in agg if m != "real"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(models), 3.4))
    for i, m in enumerate(models):
        e = agg[m]["overall"]
        color = "grey" if m == "base" else ("tab:green" if m in LABELS and "Control" in
                                            LABELS[m] else "tab:blue")  # fmt: skip
        ax.bar(i, 100 * e["mean"], color=color, alpha=0.6)
        ax.scatter([i] * len(e["values"]), [100 * v for v in e["values"]], color="k", s=10)
    ax.axhline(100 * agg["base"]["overall"]["mean"], color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([LABELS.get(m, m).replace("Control: ", "").split(" (")[0]
                        for m in models], rotation=30, ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("DigitEval accuracy (%)")
    ax.set_title("Held-out prompts; bars: mean over seeds, dots: seeds", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


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
                ax.set_title(LABELS.get(m, m).replace("Control: ", "").split(" (")[0],
                             fontsize=6)  # fmt: skip
            if c == 0:
                ax.set_ylabel(prompts[i].text(), fontsize=5, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
