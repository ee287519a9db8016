"""One toy run: ``python -m toy2d.run --method ddspo [--n-pairs 12] [--beta 400] [--seed 0]``.

Loads (or trains and caches) the seed's reference, fine-tunes it with the chosen method,
samples, prints one line of metrics and writes ``DIR/metrics.json`` and ``DIR/scatter.png``.
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
)
from .train import (
    METHODS,
    CacheError,
    Run,
    ToySetup,
    cache_key,
    check_reference_cache,
    finetune,
    load_references,
    sample,
)

PROG = "python -m toy2d.run"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=METHODS, help="training method")
    p.add_argument("--n-pairs", type=int, default=12, help="preference pairs per class (N)")
    p.add_argument("--beta", type=float, default=400.0, help="beta (the logit scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, reference and run")
    p.add_argument(
        "--out", type=Path, default=None, help="default: runs/toy2d/<method>_N<n>_b<beta>_s<seed>"
    )
    add_training_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
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
        check_reference_cache(setup, [args.seed])  # a read-only cache fails before training
    except (UsageError, CacheError) as e:
        if stage is not None:
            stage.abort()
        fail(PROG, str(e))
    try:
        t0 = time.perf_counter()
        run = Run(args.method, args.n_pairs, args.beta, args.seed, strategy(args))
        refs = load_references(setup, [args.seed])
        t_ref = time.perf_counter() - t0
        log = None
        if args.method == "ref":
            params = refs[args.seed]
        else:
            params, log = finetune(setup, ft, [run], refs)
        x, labels = sample(setup, params, [args.seed], args.n_eval, args.sampler)
        from .metrics import compute_metrics
        from .plots import sample_caption, save_scatter

        m = compute_metrics(x[0], labels, setup.toy)
        elapsed = time.perf_counter() - t0
        record = {
            **m,
            "run": {**asdict(run), "sampler": args.sampler, "n_eval_per_class": args.n_eval},
            "finetune": asdict(ft) | {"lr_used": ft.lr_for(args.beta)},
            "setup": asdict(setup),
            "reference_cache_key": cache_key(setup, args.seed),
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
        with open(stage.path("metrics.json"), "w") as f:
            json.dump(record, f, indent=2)
        what = (
            "untuned reference"
            if args.method == "ref"
            else f"{args.method} fine-tune, N={args.n_pairs} pairs/class, β={args.beta:g}"
        )
        title = f"{what}, seed {args.seed}: class accuracy {m['class_accuracy']:.3f}"
        save_scatter(
            stage.path("scatter.png"),
            x[0].numpy(),
            labels.numpy(),
            setup.toy,
            title,
            caption=sample_caption(args.n_eval, args.sampler),
        )
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        stage.unlock()
    keys = ("class_accuracy", "sw", "overlap", "separation", "centre_shift", "radial_shift")
    line = " ".join(f"{k}={m[k]:.4f}" for k in keys)
    print(
        f"method={args.method} n_pairs={args.n_pairs} beta={args.beta:g} seed={args.seed} {line} time_s={elapsed:.1f} out={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
