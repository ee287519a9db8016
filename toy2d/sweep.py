"""The paper's toy grid: ``python -m toy2d.sweep [--seeds 3] [--methods dpo,dspo,ddspo]``.

All fine-tunes of a chunk of seeds (at most :data:`MAX_MEMBERS` runs) are one batched loop
(:func:`toy2d.train.finetune`); each seed is then sampled and measured; references for all
seeds train in one batched loop. Each seed is stored under ``OUT/cells/`` keyed by the whole
config once its chunk is done, so a killed or repeated sweep resumes the finished chunks
(``--no-resume`` recomputes); the default grid is one chunk of ~30 s.
Writes ``results.csv``, ``samples.npz``, ``config.json`` and, via
:mod:`toy2d.report`, ``table.md``, ``fig_grid.png`` and ``fig_panel.png``.
``--ablation`` runs each method x {frozen, periodic} reference x {uniform, geometric+lambda}
timesteps instead and writes ``ablation.md`` and ``fig_ablation.png``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from minddspo.methods import METHODS as LOSS_METHODS
from minddspo.methods import method_spec

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
from .train import (
    METHODS,
    CacheError,
    FinetuneConfig,
    Run,
    Strategy,
    ToySetup,
    check_reference_cache,
    finetune,
    load_references,
    missing_references,
)

PROG = "python -m toy2d.sweep"
# fine-tunes batched into one stacked model: the per-run cost falls up to ~150 (the
# per-step Python work is shared) and rises again beyond a few hundred (memory traffic)
MAX_MEMBERS = 160
PAPER_METHODS = LOSS_METHODS  # every loss of the method table; sft: a baseline row
ABLATION_METHODS = tuple(m for m in LOSS_METHODS if method_spec(m).preference)
CELL_FORMAT = 1
# the sources whose code decides a seed's numbers: editing one invalidates stored cells
CELL_SOURCES = ("toy2d/data.py", "toy2d/model.py", "toy2d/train.py", "toy2d/metrics.py")


def _list(kind, text: str, name: str) -> list:
    try:
        vals = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list, got {text!r}") from None
    if not vals:
        raise UsageError(f"--{name} is empty")
    return vals


def check_seeds(args: argparse.Namespace) -> None:
    """``--seeds`` > 0 and ``--seed-offset`` >= 0 (seeds name files: ``seed<s>-...``)."""
    if args.seeds <= 0:
        raise UsageError(f"--seeds must be > 0, got {args.seeds}")
    if args.seed_offset < 0:
        raise UsageError(f"--seed-offset must be >= 0, got {args.seed_offset}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds")
    p.add_argument("--seed-offset", type=int, default=0, help="first seed")
    p.add_argument("--out", type=Path, default=None, help="default: runs/sweep (runs/ablation)")
    p.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
    p.add_argument("--n-pairs", default="12,120,1200", help="grid of N (pairs per class)")
    p.add_argument("--betas", default="200,400,800", help="grid of beta")
    p.add_argument("--ablation", action="store_true", help="reference-update x timestep ablation")
    p.add_argument(
        "--panel",
        default=None,
        help="N,beta of the Fig. 1-style panel, a cell of the grid "
        "(default: 12,400 if in the grid, else the first N and the middle beta)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="recompute every seed, even those finished under OUT/cells by the same config",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_training_args(p)
    return p.parse_args(argv)


def ablation_strategies(base: Strategy) -> list[Strategy]:
    """{frozen, periodic} x {uniform, geometric + lambda}."""
    out = []
    for ts, tw in (("uniform", "none"), ("geometric", "lambda")):
        for ru in ("frozen", "periodic"):
            out.append(replace(base, ref_update=ru, timestep_sampler=ts, timestep_weight=tw))
    return out


def validate(args: argparse.Namespace) -> tuple[list[str], list[int], list[float]]:
    default = ABLATION_METHODS if args.ablation else PAPER_METHODS
    methods = list(default) if args.methods is None else _list(str, args.methods, "methods")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method {bad[0]!r} (choose from {', '.join(METHODS)})")
    ns, betas = _list(int, args.n_pairs, "n-pairs"), _list(float, args.betas, "betas")
    if any(n <= 0 for n in ns):
        raise UsageError(f"--n-pairs values must be > 0, got {args.n_pairs}")
    if any(not (b > 0 and math.isfinite(b)) for b in betas):
        raise UsageError(f"--betas values must be finite and > 0, got {args.betas}")
    check_seeds(args)
    check_training_args(args)
    return methods, ns, betas


def panel_cell(args: argparse.Namespace, ns: list[int], betas: list[float]) -> list[float]:
    """``[N, beta]`` of the panel figure; an explicit ``--panel`` must be a cell of the grid."""
    if args.panel is None:
        n = 12 if 12 in ns else ns[0]
        b = 400.0 if 400.0 in betas else betas[len(betas) // 2]
        return [float(n), b]
    if args.ablation:
        raise UsageError("--panel has no effect with --ablation (it draws no panel)")
    vals = _list(float, args.panel, "panel")
    if len(vals) != 2:
        raise UsageError(f"--panel must be N,beta, got {args.panel!r}")
    if vals[0] not in ns or vals[1] not in betas:
        raise UsageError(
            f"--panel {args.panel} is not a cell of the grid "
            f"(N in {ns}, beta in {[f'{b:g}' for b in betas]})"
        )
    return vals


# ------------------------------------------------------------------ finished seeds


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "minddspo").glob("*.py")) + [root / f for f in CELL_SOURCES]
    h = hashlib.sha256()
    for f in files + [Path(__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class CellStore:
    """Finished seeds of one sweep: ``ROOT/seed<s>-<key>.npz`` holds the seed's CSV rows and
    samples.

    ``key`` hashes everything that changes a seed's numbers (``spec``: setup, fine-tuning
    config, methods, grid, strategies, evaluation; and the source of the code that computes
    them), so a cell is reused only by an identical sweep. A cell is written whole after its
    seed finished (temporary name, then rename), and its stored spec is compared on load, so
    a partial or foreign file is never taken for a finished seed.
    """

    def __init__(self, root: Path, spec: dict, resume: bool = True):
        self.root, self.resume = Path(root), resume
        spec = {**spec, "format": CELL_FORMAT, "code": _code_digest()}
        self.spec = json.loads(json.dumps(spec, sort_keys=True))  # as it reads back from disk
        blob = json.dumps(self.spec, sort_keys=True).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:16]

    def path(self, seed: int) -> Path:
        return self.root / f"seed{seed}-{self.key}.npz"

    def has(self, seed: int) -> bool:
        return self.resume and self.path(seed).is_file()

    def load(self, seed: int) -> tuple[list[dict], dict[str, np.ndarray]] | None:
        """The stored ``(rows, samples)`` of ``seed``, or None (a damaged cell: one line)."""
        if not self.has(seed):
            return None
        p = self.path(seed)
        try:
            with np.load(p, allow_pickle=False) as z:
                head = json.loads(str(z["__cell__"]))
                samples = {k: z[k] for k in z.files if k != "__cell__"}
            rows = head["rows"]
            if head["spec"] != self.spec or head["seed"] != seed:
                raise ValueError("written by another config")
            if any(run_name(r) not in samples for r in rows):
                raise ValueError("samples missing")
        except Exception as e:  # truncated zip, foreign file, missing keys
            print(f"{PROG}: damaged cell {p} ({e}); recomputing seed {seed}", file=sys.stderr)
            return None
        return rows, samples

    def save(self, seed: int, rows: list[dict], samples: dict[str, np.ndarray]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(seed)
        tmp = p.with_name(f".{p.stem}.tmp{os.getpid()}")
        head = json.dumps({"spec": self.spec, "seed": seed, "rows": rows})
        with open(tmp, "wb") as f:
            np.savez(f, __cell__=np.array(head), **samples)
        os.replace(tmp, p)

    def prune(self) -> None:
        """Remove cells of other configs and temporary files of killed writers."""
        if not self.root.is_dir():
            return
        for f in self.root.iterdir():
            stale = f.name.startswith("seed") and not f.name.endswith(f"-{self.key}.npz")
            if stale or (f.name.startswith(".seed") and ".tmp" in f.name):
                f.unlink(missing_ok=True)


# ------------------------------------------------------------------------ the sweep


def run_sweep(
    setup: ToySetup,
    ft: FinetuneConfig,
    methods: list[str],
    ns: list[int],
    betas: list[float],
    seeds: list[int],
    strategies: list[Strategy],
    n_eval: int,
    sampler: str,
    progress: bool = True,
    beta_outs: list[float] | None = None,
    store: CellStore | None = None,
    max_members: int = MAX_MEMBERS,
) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """Train the seeds in chunks of whole seeds, each chunk's runs batched as one stacked
    model of at most ``max_members`` runs (one seed at least); return CSV rows, samples by
    run name and timings. A run's numbers do not depend on the chunking: bit for bit when
    ``ft.batch`` is a multiple of 32 (the default 128), to float rounding otherwise (see
    :class:`toy2d.train.LossGroup`).

    ``beta_outs`` (dspo/dspo_cpp only): a grid of outside betas, one run per value
    (None: ``ft.beta_out`` alone) -- the beta_out search uses it. ``store``: seeds it
    holds are loaded instead of trained, and each newly finished seed is saved to it."""
    from tqdm import tqdm

    from .metrics import gt_eval_set

    t0 = time.perf_counter()

    def runs_of(s: int) -> list[Run]:
        return sweep_runs(s, methods, ns, betas, strategies, beta_outs)

    done = {s: cell for s in seeds if store and (cell := store.load(s)) is not None}
    todo = [s for s in seeds if s not in done]
    bar = tqdm(total=0, desc="toy2d", disable=not progress, file=sys.stderr, unit="step")

    def tick(k: int) -> None:
        bar.update(k)

    refs = _todo_references(setup, todo, bar, tick)
    t_ref = time.perf_counter() - t0
    t_ft = t_eval = 0.0
    n_ft = 0
    gt = gt_eval_set(setup.toy, n_eval)
    for chunk in seed_chunks(todo, len(runs_of(todo[0])) if todo else 0, max_members):
        runs, ta = [r for s in chunk for r in runs_of(s)], time.perf_counter()
        params = log = None
        if runs:
            label = f"seed {chunk[0]}" if len(chunk) == 1 else f"seeds {chunk[0]}-{chunk[-1]}"
            _grow(bar, ft.steps, f"{label}: fine-tunes x{len(runs)}", tick)
            params, log = finetune(setup, ft, runs, refs, tick)
        tb = time.perf_counter()
        bar.set_description(f"{label if runs else 'seeds'}: sampling")
        evaluated = _evaluate_chunk(
            setup, ft, chunk, "ref" in methods, runs, refs, params, log, gt, n_eval, sampler
        )
        for s in chunk:  # each seed is stored on its own
            done[s] = evaluated[s]
            if store is not None:
                store.save(s, *done[s])
        t_ft, t_eval, n_ft = t_ft + tb - ta, t_eval + time.perf_counter() - tb, n_ft + len(runs)
    bar.close()
    rows, samples = _gather(seeds, done)
    times = {
        "references": t_ref,
        "finetune": t_ft,
        "sample_and_metrics": t_eval,
        "n_finetunes": n_ft,
        "n_resumed_seeds": len(seeds) - len(todo),
    }
    return rows, samples, times


def sweep_runs(
    seed: int,
    methods: list[str],
    ns: list[int],
    betas: list[float],
    strategies: list[Strategy],
    beta_outs: list[float] | None,
) -> list[Run]:
    """The fine-tunes of one seed, in the sweep's order (``ref`` is sampled, not trained);
    ``beta_outs`` gives one run per value to the score-matching methods only."""

    def outs(m: str) -> list[float | None]:
        return list(beta_outs) if beta_outs and method_spec(m).score_matching else [None]

    return [
        Run(m, n, b, seed, st, bo)
        for st in strategies
        for m in methods
        if m != "ref"
        for bo in outs(m)
        for n in ns
        for b in betas
    ]


def _todo_references(setup: ToySetup, todo: list[int], bar, tick) -> dict:
    """The references of the seeds still to train (training the missing ones first)."""
    if not todo:
        return {}
    if missing_references(setup, todo):
        _grow(bar, setup.ref.steps, "references", tick)
    return load_references(setup, todo, tick)


def _gather(
    seeds: list[int], done: dict[int, tuple[list[dict], dict[str, np.ndarray]]]
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """All seeds' rows (every ``ref`` row first, then the fine-tunes, each in seed order) and
    samples by run name."""
    rows = [r for s in seeds for r in done[s][0]]
    rows = [r for r in rows if r["method"] == "ref"] + [r for r in rows if r["method"] != "ref"]
    samples: dict[str, np.ndarray] = {}
    for s in seeds:
        samples.update(done[s][1])
    return rows, samples


def seed_chunks(seeds: list[int], per_seed: int, max_members: int) -> list[list[int]]:
    """Consecutive seeds grouped so that a group holds at most ``max_members`` runs (a seed
    with more runs than that is a group of its own)."""
    chunks: list[list[int]] = []
    for s in seeds:
        if chunks and (len(chunks[-1]) + 1) * per_seed <= max_members:
            chunks[-1].append(s)
        else:
            chunks.append([s])
    return chunks


def _evaluate_chunk(setup, ft, chunk, with_ref, runs, refs, params, log, gt, n_eval, sampler):
    """``{seed: (CSV rows, samples)}`` for a chunk of seeds: each seed's reference (if asked)
    and its fine-tuned runs, sampled in one batched call (every member from its own seed's
    noise, so the same samples as one call per seed) and measured seed by seed."""
    import torch

    from .metrics import compute_metrics_many
    from .train import sample

    members = [(s, None) for s in chunk if with_ref] + [(r.seed, r) for r in runs]
    if not members:
        return {s: ([], {}) for s in chunk}
    stacked = {
        k: torch.cat([refs[s][k] for s in chunk if with_ref] + ([params[k]] if runs else []))
        for k in refs[chunk[0]]
    }
    x, labels = sample(setup, stacked, [s for s, _ in members], n_eval, sampler)
    out = {}
    for s in chunk:
        idx = [i for i, (seed, _) in enumerate(members) if seed == s]
        mine = [i for i, r in enumerate(runs) if r.seed == s]
        metrics = compute_metrics_many(x[idx], labels, setup.toy, gt)
        out[s] = _seed_rows(
            ft, s, [members[i][1] for i in idx], x[idx], labels, metrics,
            [runs[i] for i in mine], None if log is None else log.select(mine),
        )  # fmt: skip
    return out


def _seed_rows(ft, seed, members, x, labels, metrics, runs, log):
    """CSV rows and samples (by run name) of one seed's members (None: the reference)."""
    from minddspo.methods import method_spec

    from .metrics import SUMMARY_KEYS

    rows, samples = [], {"labels": labels.numpy().astype(np.int8)}
    for i, r in enumerate(members):
        m = metrics[i]
        row = {
            "method": r.method if r else "ref",
            "strategy": r.strategy.label() if r else "-",
            "n_pairs": r.n_pairs if r else "",
            "beta": f"{r.beta:g}" if r else "",
            "beta_out": f"{r.loss_scales(ft.beta_out)[0]:g}"
            if r and method_spec(r.method).score_matching
            else "",
            "seed": seed,
            **{k: f"{m[k]:.6g}" for k in SUMMARY_KEYS},
        }
        if r is not None:
            j = runs.index(r)
            row["freeze_step"] = log.freeze_step[j] if log.freeze_step[j] is not None else ""
            row["n_copies"] = len(log.copy_steps[j])
            row["divergences"] = ";".join(f"{st}:{d:.4g}" for st, d in log.divergences[j])
            row["final_loss"] = f"{log.final_loss[j]:.6g}"
            row["implicit_acc"] = f"{log.final_implicit_acc[j]:.4g}"
        rows.append(row)
        samples[run_name(row)] = x[i].numpy().astype(np.float32)
    return rows, samples


def _grow(bar, steps: int, desc: str, tick):
    bar.total += steps
    bar.set_description(desc)
    bar.refresh()
    return tick


def run_name(row: dict) -> str:
    return f"{row['method']}|{row['strategy']}|{row['n_pairs']}|{row['beta']}|{row['seed']}"


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


@dataclass
class SweepPlan:
    """Everything a sweep run needs, validated before any work."""

    args: argparse.Namespace
    argv: list[str]
    setup: ToySetup
    ft: FinetuneConfig
    methods: list[str]
    ns: list[int]
    betas: list[float]
    strategies: list
    seeds: list[int]
    panel: object
    spec: dict
    out: Path


def plan(args: argparse.Namespace, argv: list[str]) -> SweepPlan:
    """Validate the flags and fix what runs (raises UsageError)."""
    methods, ns, betas = validate(args)
    panel = panel_cell(args, ns, betas)
    out = args.out or Path("runs/ablation" if args.ablation else "runs/sweep")
    setup, ft = ToySetup(), finetune_config(args)
    base = strategy(args)
    strategies = ablation_strategies(base) if args.ablation else [base]
    if not args.ablation and "ref" not in methods:
        methods = ["ref", *methods]  # the untuned reference is always reported
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    spec = {
        "setup": asdict(setup),
        "finetune": asdict(ft),
        "methods": methods,
        "n_pairs": ns,
        "betas": betas,
        "strategies": [asdict(s) for s in strategies],
        "sampler": args.sampler,
        "n_eval_per_class": args.n_eval,
    }
    return SweepPlan(args, argv, setup, ft, methods, ns, betas, strategies, seeds, panel, spec, out)


def write_outputs(
    pl: SweepPlan, stage: Staging, store: CellStore, rows, samples, times, t0
) -> None:
    """results.csv, samples.npz, the tables and figures, config.json, into the staging dir."""
    from .data import sample_train
    from .metrics import gt_eval_set
    from .report import render

    args, spec = pl.args, pl.spec
    write_csv(stage.path("results.csv"), rows)
    gx, gl = gt_eval_set(pl.setup.toy, args.n_eval)
    tx, tl = sample_train(pl.setup.toy, pl.seeds[0])
    np.savez_compressed(
        stage.path("samples.npz"), gt_x=gx.numpy(), gt_labels=gl.numpy(), train_x=tx.numpy(),
        train_labels=tl.numpy(), **samples,
    )  # fmt: skip
    config = {
        "command": " ".join(["python -m toy2d.sweep", *pl.argv]),
        **{k: spec[k] for k in ("methods", "n_pairs", "betas")},
        "seeds": pl.seeds,
        "ablation": args.ablation,
        "strategies": spec["strategies"],
        "panel": pl.panel,
        "sampler": args.sampler,
        "n_eval_per_class": args.n_eval,
        "setup": spec["setup"],
        "finetune": spec["finetune"],
        "cells": str(store.root),
    }
    render(stage.tmp, config)
    times["total"] = time.perf_counter() - t0
    config["time_s"] = times
    with open(stage.path("config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    with torch_threads(args.threads):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    stage = None
    try:
        pl = plan(args, argv)
        store = CellStore(pl.out / "cells", pl.spec, resume=not args.no_resume)
        stage = Staging(pl.out)
        check_reference_cache(pl.setup, [s for s in pl.seeds if not store.has(s)])
    except (UsageError, CacheError) as e:
        if stage is not None:
            stage.abort()
        fail(PROG, str(e))
    try:
        t0 = time.perf_counter()
        rows, samples, times = run_sweep(
            pl.setup, pl.ft, pl.methods, pl.ns, pl.betas, pl.seeds, pl.strategies, args.n_eval,
            args.sampler, progress=not args.no_progress, store=store,
        )  # fmt: skip
        write_outputs(pl, stage, store, rows, samples, times, t0)
        stage.commit()
        store.prune()
    except BaseException:
        stage.abort()
        raise
    finally:
        stage.unlock()
    resumed = times["n_resumed_seeds"]
    print(
        f"{times['n_finetunes']} fine-tunes, {len(pl.seeds)} seeds ({resumed} resumed from "
        f"{store.root}): total {times['total']:.1f} s "
        f"(references {times['references']:.1f} s, fine-tuning {times['finetune']:.1f} s, "
        f"sampling+metrics {times['sample_and_metrics']:.1f} s) -> {pl.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
