"""Choose DSPO/DSPO+CPP's outside beta: ``python -m toy2d.beta_search [--out runs/beta_search]``.

DSPO's loss has two scales (SPEC §3): the cell's beta sits inside the sigmoid (the D-DPO
scale the sweep varies) and ``beta_out`` multiplies the preference term outside. This runs
``dspo`` and ``dspo_cpp`` for every ``beta_out`` in the grid over the sweep's 9 cells on
seeds the evaluation sweep never uses (100, 101, 102), and picks ONE value for both methods
by one rule fixed before the run: the highest class accuracy averaged over both methods,
all cells and all search seeds. Writes ``search.md`` (the table), ``search.csv`` and
``choice.json``; the chosen value is the default of ``--beta-out`` (``toy2d.train.BETA_OUT``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from minddspo.methods import SCORE_MATCHING_METHODS

from .cli import (
    Parser,
    Staging,
    UsageError,
    add_training_args,
    check_training_args,
    fail,
    finetune_config,
    strategy,
    torch_threads,
)
from .sweep import _list, check_seeds, run_sweep, write_csv
from .train import ToySetup

PROG = "python -m toy2d.beta_search"
GRID = "0.001,0.01,0.05,0.1,0.5"
# the methods with an outside beta (DSPO, DSPO+CPP)
METHODS = SCORE_MATCHING_METHODS


def parse(argv: list[str] | None):
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=GRID, help="comma list of outside betas to try")
    p.add_argument("--seeds", type=int, default=3, help="number of search seeds")
    p.add_argument("--seed-offset", type=int, default=100, help="first search seed (not 0-2)")
    p.add_argument("--n-pairs", default="12,120,1200", help="grid of N (pairs per class)")
    p.add_argument("--betas", default="200,400,800", help="grid of the cell's (logit) beta")
    p.add_argument("--out", type=Path, default=Path("runs/beta_search"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_training_args(p)
    return p.parse_args(argv)


def summarise(rows: list[dict], grid: list[float]) -> tuple[str, float, dict]:
    """Markdown table (rows: beta_out; columns: per-method accuracy and W2), the choice."""
    stats: dict = {}
    for bo in grid:
        for m in METHODS:
            sel = [r for r in rows if r["method"] == m and float(r["beta_out"]) == bo]
            acc = [float(r["class_accuracy"]) for r in sel]
            sw = [float(r["sw"]) for r in sel]
            # seed-level means (over the 9 cells) give the spread across seeds
            seeds = sorted({r["seed"] for r in sel})
            per_seed = [
                np.mean([float(r["class_accuracy"]) for r in sel if r["seed"] == s]) for s in seeds
            ]
            stats[(bo, m)] = (np.mean(acc), np.std(per_seed, ddof=1) if len(seeds) > 1 else 0.0)
            stats[(bo, m, "sw")] = np.mean(sw)
    score = {bo: np.mean([stats[(bo, m)][0] for m in METHODS]) for bo in grid}
    best = max(grid, key=lambda bo: score[bo])
    lines = [
        "| β_out | DSPO acc ↑ | DSPO W2 ↓ | DSPO+CPP acc ↑ | DSPO+CPP W2 ↓ | mean acc (rule) |",
        "|---|---|---|---|---|---|",
    ]
    for bo in grid:
        cells = []
        for m in METHODS:
            mu, sd = stats[(bo, m)]
            cells += [f"{mu:.3f} ± {sd:.3f}", f"{stats[(bo, m, 'sw')]:.3f}"]
        mark = f"**{score[bo]:.3f}**" if bo == best else f"{score[bo]:.3f}"
        lines.append(f"| {bo:g} | " + " | ".join(cells) + f" | {mark} |")
    per_method = {m: max(grid, key=lambda bo, m=m: stats[(bo, m)][0]) for m in METHODS}
    return "\n".join(lines) + "\n", best, {"score": score, "best_per_method": per_method}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with torch_threads(args.threads):
        return _main(args, argv)


def _main(args, argv: list[str] | None) -> int:
    try:
        grid = _list(float, args.grid, "grid")
        if any(not (0 < b < float("inf")) for b in grid):
            raise UsageError(f"--grid values must be finite and > 0, got {args.grid}")
        ns, betas = _list(int, args.n_pairs, "n-pairs"), _list(float, args.betas, "betas")
        check_seeds(args)
        check_training_args(args)
        stage = Staging(args.out)
    except UsageError as e:
        fail(PROG, str(e))
    try:
        t0 = time.perf_counter()
        seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
        rows, _, times = run_sweep(
            ToySetup(),
            finetune_config(args),
            list(METHODS),
            ns,
            betas,
            seeds,
            [strategy(args)],
            args.n_eval,
            args.sampler,
            progress=not args.no_progress,
            beta_outs=grid,
        )
        write_csv(stage.path("search.csv"), rows)
        table, best, extra = summarise(rows, grid)
        header = (
            f"Outside-β search for DSPO and DSPO+CPP: class accuracy mean ± std over seeds "
            f"{seeds} (each seed's mean over N ∈ {ns} × β_logit ∈ {[f'{b:g}' for b in betas]}); "
            f"W2 = sliced W2 to GT, mean. Rule: highest mean accuracy over both methods.\n\n"
        )
        stage.path("search.md").write_text(header + table + f"\nchosen β_out = {best:g}\n")
        choice = {
            "beta_out": best,
            "grid": grid,
            "seeds": seeds,
            **{k: {str(kk): vv for kk, vv in v.items()} for k, v in extra.items()},
            "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
            "time_s": time.perf_counter() - t0,
            "n_finetunes": times["n_finetunes"],
        }
        stage.path("choice.json").write_text(json.dumps(choice, indent=2) + "\n")
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        stage.unlock()
    print(header + table + f"\nchosen beta_out = {best:g} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
