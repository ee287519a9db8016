"""A toy sweep folder's tables and figures: the README's table, verdicts and plots.

:func:`render` reads ``results.csv``, ``samples.npz`` and ``config.json`` written by
:mod:`toy2d.sweep` and writes ``table.md``, ``fig_grid.png`` and ``fig_panel.png`` (or, for an
``--ablation`` sweep, ``ablation.md`` and ``fig_ablation.png``). ``python -m
paper_figures.toy_figures DIR`` is the command over it.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .cli import UsageError
from .data import ToyConfig
from .plots import ACC_DEF, add_caption, add_legend, plt, scatter

SWEEP_FILES = ("results.csv", "samples.npz", "config.json")
CONFIG_KEYS = ("methods", "n_pairs", "betas", "seeds", "setup")
RINGS = "Grey rings: 1σ, 2σ, 3σ circles of the ground-truth modes; the number beside a mode is its class."

NAMES = {
    "ref": "reference",
    "sft": "SFT",
    "dpo": "D-DPO",
    "dspo": "DSPO",
    "dspo_cpp": "DSPO+CPP",
    "ddspo": "DDSPO",
}
METRICS = {  # key: (label, higher is better)
    "class_accuracy": ("class accuracy", True),
    "sw": ("sliced W2 to GT", False),
    "overlap": ("neighbour overlap (Bhattacharyya)", False),
    "centre_shift": ("centre shift |mean - mu|", False),
    "radial_shift": ("radial shift (signed)", None),
}


VERDICT_KEYS = (("class_accuracy", 1), ("sw", -1), ("overlap", -1))  # (metric, +1: higher wins)


def load_rows(d: Path) -> list[dict]:
    with open(d / "results.csv") as f:
        return list(csv.DictReader(f))


def _ms(v: list[float], digits: int = 3) -> str:
    a = np.asarray(v, dtype=float)
    if len(a) == 0:
        return "-"
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.{digits}f} ± {sd:.{digits}f}"


def _cells(config: dict) -> list[tuple[str, str]]:
    return [(str(n), f"{b:g}") for n in config["n_pairs"] for b in config["betas"]]


def _by(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def sweep_table(rows: list[dict], config: dict) -> str:
    cells = _cells(config)
    methods = config["methods"]
    g = _by(rows, "method", "n_pairs", "beta")
    ref = [r for r in rows if r["method"] == "ref"]
    lines = [f"Mean ± std over seeds {config['seeds']} ({len(config['seeds'])} seeds).\n"]
    for key, (label, better) in METRICS.items():
        arrow = (
            "" if better is None else (" (higher is better)" if better else " (lower is better)")
        )
        lines.append(f"**{label}**{arrow}\n")
        lines.append("| method | " + " | ".join(f"N={n}, β={b}" for n, b in cells) + " |")
        lines.append("|---" * (len(cells) + 1) + "|")
        for m in methods:
            if m == "ref":
                v = _ms([float(r[key]) for r in ref])
                lines.append(
                    f"| {NAMES[m]} (same model in every column) | "
                    + " | ".join([v] * len(cells))
                    + " |"
                )
            else:
                vals = [_ms([float(r[key]) for r in g[(m, n, b)]]) for n, b in cells]
                lines.append(f"| {NAMES[m]} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines)


def verdicts(rows: list[dict], config: dict, target: str = "ddspo") -> str:
    """Cell by cell: does ``target`` beat each other tuned method? (paired by seed)."""
    others = [m for m in config["methods"] if m not in ("ref", target)]
    if target not in config["methods"] or not others:
        return ""
    g = _by(rows, "method", "n_pairs", "beta", "seed")
    seeds = [str(s) for s in config["seeds"]]
    head = (
        "| cell | "
        + " | ".join(f"{k} vs {NAMES[o]}" for o in others for k in ("acc", "SW", "overlap"))
        + " |"
    )
    lines = [
        f"**Does {NAMES[target]} beat the baselines?** Each entry: mean difference "
        f"({NAMES[target]} − baseline) and the number of seeds where {NAMES[target]} is better "
        "(higher accuracy / lower SW / lower overlap).\n",
        head,
        "|---" * (len(VERDICT_KEYS) * len(others) + 1) + "|",
    ]
    totals = defaultdict(lambda: [0, 0])
    for n, b in _cells(config):
        entries = []
        for o in others:
            for key, sign in VERDICT_KEYS:
                diffs = []
                for s in seeds:
                    a, c = g.get((target, n, b, s)), g.get((o, n, b, s))
                    if a and c:
                        diffs.append(float(a[0][key]) - float(c[0][key]))
                wins = sum(sign * d > 0 for d in diffs)
                totals[o, key][0] += wins
                totals[o, key][1] += len(diffs)
                entries.append(f"{np.mean(diffs):+.3f} ({wins}/{len(diffs)})" if diffs else "-")
        lines.append(f"| N={n}, β={b} | " + " | ".join(entries) + " |")
    tot = [f"{totals[o, k][0]}/{totals[o, k][1]}" for o in others for k, _ in VERDICT_KEYS]
    lines.append("| **seeds won, all cells** | " + " | ".join(tot) + " |")
    return "\n".join(lines) + "\n"


def _samples(d: Path):
    return np.load(d / "samples.npz")


def _dots(config: dict) -> str:
    n = config.get("n_eval_per_class", "?")
    return (
        f"Each dot: one sample generated by the model ({n} per class, "
        f"{config.get('sampler', 'ddim')} sampler), coloured by the class it was generated for."
    )


def _ref_acc(rows: list[dict], seed: str) -> str:
    ref = [r for r in rows if r["method"] == "ref" and r["seed"] == seed]
    return f"untuned reference: acc {float(ref[0]['class_accuracy']):.2f}" if ref else "-"


def fig_grid(d: Path, rows: list[dict], config: dict, npz) -> Path:
    cells, toy = _cells(config), ToyConfig(**config["setup"]["toy"])
    methods = [m for m in config["methods"] if m != "ref"]
    seed = str(config["seeds"][0])
    strat = next((r["strategy"] for r in rows if r["method"] != "ref"), "-")
    fig, axes = plt.subplots(
        len(methods),
        len(cells),
        figsize=(1.6 * len(cells) + 1.6, 1.7 * len(methods) + 1.0),
        dpi=80,
        squeeze=False,
    )
    for i, m in enumerate(methods):
        for j, (n, b) in enumerate(cells):
            key = f"{m}|{strat}|{n}|{b}|{seed}"
            ax = axes[i, j]
            row = next(
                r
                for r in rows
                if r["method"] == m and r["n_pairs"] == n and r["beta"] == b and r["seed"] == seed
            )
            acc = f"acc {float(row['class_accuracy']):.2f}"
            scatter(ax, npz[key], npz["labels"], toy, f"N={n}, β={b}\n{acc}" if i == 0 else acc)
            if j == 0:
                ax.set_ylabel(NAMES[m], fontsize=9)
    fig.suptitle(
        f"Samples of every fine-tuned model, seed {seed} (Fig. A style): rows = method, "
        "columns = N preference pairs per class and β",
        fontsize=10,
    )
    add_legend(fig, toy, loc="center right")
    fig.tight_layout(rect=(0, 0.1, 0.86, 1))
    add_caption(
        fig,
        f"{_dots(config)} {RINGS} {ACC_DEF} ({_ref_acc(rows, seed)}).",
        width=60 + 25 * len(cells),
    )
    p = d / "fig_grid.png"
    fig.savefig(p)
    plt.close(fig)
    return p


def fig_panel(d: Path, rows: list[dict], config: dict, npz) -> Path:
    toy = ToyConfig(**config["setup"]["toy"])
    n, b = str(int(config["panel"][0])), f"{config['panel'][1]:g}"
    seed = str(config["seeds"][0])
    strat = next((r["strategy"] for r in rows if r["method"] != "ref"), "-")
    panels = [
        ("(a) ground truth", npz["gt_x"], npz["gt_labels"]),
        ("(b) noisy training set", npz["train_x"], npz["train_labels"]),
    ]
    order = ["ref"] + [m for m in NAMES if m != "ref"]  # reference, SFT, then the paper's order
    for m in order:
        if m not in config["methods"]:
            continue
        key = f"ref|-|||{seed}" if m == "ref" else f"{m}|{strat}|{n}|{b}|{seed}"
        if key not in npz:
            continue
        row = next(
            r
            for r in rows
            if r["method"] == m
            and r["seed"] == seed
            and (m == "ref" or (r["n_pairs"] == n and r["beta"] == b))
        )
        panels.append(
            (
                f"({chr(97 + len(panels))}) {NAMES[m]}  acc {float(row['class_accuracy']):.2f}",
                npz[key],
                npz["labels"],
            )
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels) + 1.6, 3.4), dpi=100)
    for ax, (title, x, lab) in zip(np.atleast_1d(axes), panels, strict=True):
        scatter(ax, x, lab, toy, title)
    fig.suptitle(
        f"Fig. 1 style: the data, the reference and each method fine-tuned on N={n} "
        f"preference pairs per class with β={b}, seed {seed}",
        fontsize=9,
    )
    add_legend(fig, toy, loc="center right")
    fig.tight_layout(rect=(0, 0.16, 1 - 1.6 / (2.4 * len(panels) + 1.6), 1))
    add_caption(
        fig,
        f"(a) ground-truth samples. (b) the reference's noisy training set, coloured by its "
        f"label ({toy.flip_frac:.0%} of the labels moved to a neighbouring class). "
        f"(c) onwards: {_dots(config)} {RINGS} {ACC_DEF}.",
        width=40 * len(panels),
    )
    p = d / "fig_panel.png"
    fig.savefig(p)
    plt.close(fig)
    return p


def ablation_table(rows: list[dict], config: dict) -> str:
    methods = [m for m in config["methods"] if m != "ref"]
    strats = list(dict.fromkeys(r["strategy"] for r in rows if r["method"] != "ref"))
    g = _by(rows, "method", "strategy")
    gn = _by(rows, "method", "strategy", "n_pairs")
    lines = [
        f"Mean ± std over the {len(config['n_pairs'])}×{len(config['betas'])} grid "
        f"(N ∈ {config['n_pairs']}, β ∈ {[f'{b:g}' for b in config['betas']]}) and seeds {config['seeds']}.\n",
        "| method | strategy (reference / timesteps) | class accuracy ↑ | sliced W2 ↓ | "
        + " | ".join(f"acc N={n}" for n in config["n_pairs"])
        + " | "
        + " | ".join(f"SW N={n}" for n in config["n_pairs"])
        + " | freezes (median step) |",
        "|---" * (5 + 2 * len(config["n_pairs"])) + "|",
    ]
    for m in methods:
        for s in strats:
            rs = g[(m, s)]
            acc = _ms([float(r["class_accuracy"]) for r in rs])
            sw = _ms([float(r["sw"]) for r in rs])
            accn = [
                _ms([float(r["class_accuracy"]) for r in gn[(m, s, str(n))]])
                for n in config["n_pairs"]
            ]
            swn = [_ms([float(r["sw"]) for r in gn[(m, s, str(n))]]) for n in config["n_pairs"]]
            fz = [int(r["freeze_step"]) for r in rs if r.get("freeze_step")]
            frz = f"{len(fz)}/{len(rs)} ({int(np.median(fz))})" if fz else f"0/{len(rs)}"
            lines.append(
                f"| {NAMES[m]} | {s} | {acc} | {sw} | " + " | ".join(accn + swn) + f" | {frz} |"
            )
    return "\n".join(lines) + "\n"


def fig_ablation(d: Path, rows: list[dict], config: dict) -> Path:
    methods = [m for m in config["methods"] if m != "ref"]
    strats = list(dict.fromkeys(r["strategy"] for r in rows if r["method"] != "ref"))
    g = _by(rows, "method", "strategy")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    w = 0.8 / len(strats)
    for k, (key, label) in enumerate(
        (("class_accuracy", "class accuracy ↑"), ("sw", "sliced W2 to GT ↓"))
    ):
        ax = axes[k]
        for j, s in enumerate(strats):
            mu = [np.mean([float(r[key]) for r in g[(m, s)]]) for m in methods]
            sd = [
                np.std([float(r[key]) for r in g[(m, s)]], ddof=1) if len(g[(m, s)]) > 1 else 0
                for m in methods
            ]
            ax.bar(
                np.arange(len(methods)) + (j - (len(strats) - 1) / 2) * w,
                mu,
                w,
                yerr=sd,
                label=s,
                capsize=2,
            )
        ax.set_xticks(np.arange(len(methods)), [NAMES[m] for m in methods])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("method", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    ref = [r for r in rows if r["method"] == "ref"]
    if ref:
        for k, key in enumerate(("class_accuracy", "sw")):
            axes[k].axhline(
                np.mean([float(r[key]) for r in ref]), color="k", ls="--", lw=0.8, label="reference"
            )
    axes[0].legend(fontsize=7, title="reference update / timesteps", title_fontsize=7)
    fig.suptitle(
        "Reference update x timestep strategy: class accuracy and distance to the ground truth "
        "of each fine-tuned method",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    st = config["strategies"][-1] if config.get("strategies") else {}
    add_caption(
        fig,
        f"Bars: mean over the {len(config['n_pairs'])}×{len(config['betas'])} grid of N and β "
        f"and {len(config['seeds'])} seed(s); error bars: std"
        + ("; dashed line: the untuned reference" if ref else "")
        + ". frozen = the reference stays the initial model; periodic = the policy is "
        f"copied into the reference every τ = {st.get('ref_tau', '?')} steps until their "
        f"divergence exceeds δ = {st.get('ref_delta', '?')}. uniform = t ~ U{{0..T-1}}; "
        "geometric+lambda = t skewed to the noisy end, weighted by λ(t). "
        f"{ACC_DEF}. Sliced W2: sliced 2-Wasserstein distance to ground-truth samples of the "
        "same class, mean over classes.",
        width=170,
    )
    p = d / "fig_ablation.png"
    fig.savefig(p)
    plt.close(fig)
    return p


def render(d: Path, config: dict | None = None) -> list[Path]:
    d = Path(d)
    if config is None:
        with open(d / "config.json") as f:
            config = json.load(f)
    rows, npz = load_rows(d), _samples(d)
    if config.get("ablation"):
        (d / "ablation.md").write_text(ablation_table(rows, config))
        return [d / "ablation.md", fig_ablation(d, rows, config)]
    (d / "table.md").write_text(sweep_table(rows, config) + "\n" + verdicts(rows, config))
    return [d / "table.md", fig_grid(d, rows, config, npz), fig_panel(d, rows, config, npz)]


def check_sweep_dir(d: Path) -> dict:
    """The folder's config; :class:`UsageError` unless ``d`` is a finished sweep folder."""
    if not d.exists():
        raise UsageError(f"{d}: no such folder")
    if not d.is_dir():
        raise UsageError(f"{d}: not a folder")
    missing = [f for f in SWEEP_FILES if not (d / f).is_file()]
    if missing:
        raise UsageError(
            f"{d} is not a finished toy2d.sweep folder (no {', '.join(missing)}); "
            f"make one with python -m toy2d.sweep --out {d}"
        )
    try:
        config = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise UsageError(f"{d / 'config.json'}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        raise UsageError(f"{d / 'config.json'}: not a toy2d.sweep config")
    return config
