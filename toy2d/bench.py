"""Batched vs one-model-at-a-time toy sweep, timed side by side in one process.

    python -m toy2d.bench [--seeds 3] [--naive-subset 0]    (or: python bench/bench_toy.py ...)

1. the single-run path (``toy2d.run`` with a cached reference, timed in-process);
2. the default sweep (dpo, dspo, ddspo x N {12,120,1200} x beta {200,400,800} x seeds),
   batched: every fine-tune is a member of one stacked model (``toy2d.train.finetune``);
3. the same fine-tunes one at a time (``finetune([run])`` in a plain loop, M = 1).

Both paths share the references (cached first, not timed) and run the same code, so the
ratio isolates the batching. With ``--naive-subset K > 0`` only K naive fine-tunes are
timed and the full naive time is *extrapolated* (the output says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .train import (
    FinetuneConfig,
    Run,
    ToySetup,
    finetune,
    load_references,
    sample,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--naive-subset", type=int, default=0, help="0: time every naive fine-tune")
    args = p.parse_args(argv)
    setup, ft = ToySetup(), FinetuneConfig()
    seeds = list(range(args.seeds))
    runs = [
        Run(m, n, b, s)
        for s in seeds
        for m in ("dpo", "dspo", "ddspo")
        for n in (12, 120, 1200)
        for b in (200.0, 400.0, 800.0)
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    refs = load_references(setup, seeds)
    print(f"references (cache or train, not counted below): {time.perf_counter() - t0:.1f} s")

    from .run import main as run_main

    t0 = time.perf_counter()
    run_main(["--method", "ddspo", "--out", "runs/bench_toy_run"])
    t_run = time.perf_counter() - t0

    t0 = time.perf_counter()
    params, _ = finetune(setup, ft, runs, refs)
    sample(setup, params, [r.seed for r in runs], 256)
    t_batched = time.perf_counter() - t0

    todo = runs if args.naive_subset <= 0 else runs[:: max(1, len(runs) // args.naive_subset)]
    t0 = time.perf_counter()
    for r in todo:
        one, _ = finetune(setup, ft, [r], refs)
        sample(setup, one, [r.seed], 256)
    t_naive_measured = time.perf_counter() - t0
    t_naive = t_naive_measured * len(runs) / len(todo)
    note = (
        "measured"
        if len(todo) == len(runs)
        else (f"EXTRAPOLATED from {len(todo)} of {len(runs)} fine-tunes ({t_naive_measured:.1f} s)")
    )
    print(f"single toy2d.run (cached reference, in-process): {t_run:.1f} s")
    print(f"{len(runs)} fine-tunes + sampling, batched   : {t_batched:7.1f} s")
    print(f"{len(runs)} fine-tunes + sampling, one-by-one: {t_naive:7.1f} s  ({note})")
    print(f"speed-up naive / batched: {t_naive / t_batched:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
