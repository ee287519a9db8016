"""One toy run: ``python -m toy2d.run --method ddspo [--n-pairs 12] [--beta 400] [--seed 0]``.

Loads (or trains and caches) the seed's reference, fine-tunes it with the chosen method,
samples both, prints one line of metrics (the tuned model's and the reference's class
accuracy) and writes ``DIR/metrics.json`` and ``DIR/scatter.png``. Training a seed's
reference the first time takes most of a cold run; it says so on stderr, with a progress
bar (``--no-progress``: none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

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
    ToySetup,
    cache_key,
    cache_path,
    check_reference_cache,
    finetune,
    load_references,
    sample,
)

PROG = "python -m toy2d.run"
# a reference's training time on an idle 2-core machine (1,000 steps: 2.5 s, bench/RESULTS.md)
REF_SECONDS = 8


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=METHODS, help="training method")
    p.add_argument("--n-pairs", type=int, default=12, help="preference pairs per class (N)")
    p.add_argument("--beta", type=float, default=400.0, help="beta (the logit scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, reference and run")
    p.add_argument(
        "--out", type=Path, default=None, help="default: runs/toy2d/<method>_N<n>_b<beta>_s<seed>"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_training_args(p, threads=1)  # one small fine-tune: 1 thread is never much slower
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with torch_threads(args.threads):
        return _main(args, argv)


def _main(args, argv: list[str] | None) -> int:
    out, setup, ft, stage, missing = _prepare(args)
    try:
        t0 = time.perf_counter()
        run = Run(args.method, args.n_pairs, args.beta, args.seed, strategy(args))
        x, labels, t_ref, log = _train_and_sample(args, setup, ft, run, missing, t0)
        from .metrics import compute_metrics

        m = compute_metrics(x[-1], labels, setup.toy)
        ref_acc = compute_metrics(x[0], labels, setup.toy)["class_accuracy"]
        elapsed = time.perf_counter() - t0
        record = _record(args, setup, ft, run, m, ref_acc, log, elapsed, t_ref)
        with open(stage.path("metrics.json"), "w") as f:
            json.dump(record, f, indent=2)
        _save_scatter(args, setup, stage, x, labels, m)
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        stage.unlock()
    keys = ("class_accuracy", "sw", "overlap", "separation", "centre_shift", "radial_shift")
    line = " ".join(f"{k}={m[k]:.4f}" for k in keys)
    print(
        f"method={args.method} n_pairs={args.n_pairs} beta={args.beta:g} seed={args.seed} "
        f"{line} reference_class_accuracy={ref_acc:.4f} time_s={elapsed:.1f} out={out}"
    )
    return 0


def _prepare(args) -> tuple[Path, ToySetup, FinetuneConfig, Staging, list[int]]:
    """Check the flags and the reference cache (read-only), then lock the output folder:
    ``(out, setup, ft, stage, missing references)``; bad input exits 2 with one line."""
    stage = None
    try:
        if args.n_pairs <= 0:
            raise UsageError(f"--n-pairs must be > 0, got {args.n_pairs}")
        if args.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {args.seed}")
        if not (args.beta > 0 and math.isfinite(args.beta)):
            raise UsageError(f"--beta must be finite and > 0, got {args.beta}")
        check_training_args(args)
        out = args.out or Path(
            f"runs/toy2d/{args.method}_N{args.n_pairs}_b{args.beta:g}_s{args.seed}"
        )
        setup, ft = ToySetup(), finetune_config(args)
        stage = Staging(out)
        missing = check_reference_cache(setup, [args.seed])  # read-only: fails before training
    except (UsageError, CacheError) as e:
        if stage is not None:
            stage.abort()
        fail(PROG, str(e))
    return out, setup, ft, stage, missing


def _train_and_sample(args, setup: ToySetup, ft: FinetuneConfig, run: Run, missing, t0: float):
    """Load (or train) the seed's reference, fine-tune it unless ``--method ref``, and sample:
    ``(x, labels, reference seconds, training log or None)``; ``x[-1]`` is the run's samples,
    ``x[0]`` the reference's (the same noise); ``t0``: the run's start."""
    import torch
    from tqdm import tqdm

    tuned = args.method != "ref"
    steps = (setup.ref.steps if missing else 0) + (ft.steps if tuned else 0)
    if missing:
        _announce_reference_training(args, setup)
    bar = tqdm(total=steps, disable=args.no_progress or not steps, file=sys.stderr,
               unit="step", desc="reference" if missing else args.method)  # fmt: skip
    refs = load_references(setup, [args.seed], bar.update)
    t_ref = time.perf_counter() - t0
    log = None
    if tuned:
        bar.set_description(f"{args.method} fine-tune")
        params, log = finetune(setup, ft, [run], refs, bar.update)
        # the reference sampled beside it: same noise (the seed's), its own member
        params = {k: torch.cat([refs[args.seed][k], v]) for k, v in params.items()}
    else:
        params = refs[args.seed]
    bar.close()
    members = [args.seed] * (2 if tuned else 1)
    x, labels = sample(setup, params, members, args.n_eval, args.sampler)
    return x, labels, t_ref, log


def _announce_reference_training(args, setup: ToySetup) -> None:
    import torch

    hint = (
        "; --threads 1 if other processes share the cores"
        if args.threads == 0 and torch.get_num_threads() > 1
        else ""
    )
    print(
        f"{PROG}: training the reference model of seed {args.seed} ({setup.ref.steps} "
        f"steps, ~{REF_SECONDS} s on an idle machine, longer on a busy one{hint}), cached in "
        f"{cache_path(setup, args.seed)} for later runs",
        file=sys.stderr,
    )


def _record(args, setup, ft, run, m: dict, ref_acc: float, log, elapsed: float, t_ref: float):
    """The ``metrics.json`` record of one run."""
    record = {
        **m,
        "run": {**asdict(run), "sampler": args.sampler, "n_eval_per_class": args.n_eval},
        "finetune": asdict(ft) | {"lr_used": ft.lr_for(args.beta)},
        "setup": asdict(setup),
        "reference_cache_key": cache_key(setup, args.seed),
        "reference_class_accuracy": ref_acc,
        "time_s": {"total": elapsed, "reference_load_or_train": t_ref},
    }
    if log is not None:
        record["ref_update"] = {
            "copy_steps": log.copy_steps[0],
            "divergences": log.divergences[0],
            "freeze_step": log.freeze_step[0],
        }
        record["train"] = {
            "final_loss": log.final_loss[0],
            "final_implicit_acc": log.final_implicit_acc[0],
        }
    return record


def _save_scatter(args, setup: ToySetup, stage: Staging, x, labels, m: dict) -> None:
    from .plots import sample_caption, save_scatter

    what = (
        "untuned reference"
        if args.method == "ref"
        else f"{args.method} fine-tune, N={args.n_pairs} pairs/class, β={args.beta:g}"
    )
    title = f"{what}, seed {args.seed}: class accuracy {m['class_accuracy']:.3f}"
    save_scatter(
        stage.path("scatter.png"),
        x[-1].numpy(),
        labels.numpy(),
        setup.toy,
        title,
        caption=sample_caption(args.n_eval, args.sampler),
    )


if __name__ == "__main__":
    sys.exit(main())
