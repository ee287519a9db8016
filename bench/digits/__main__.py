"""``python -m bench.digits``: the digits text-to-image preference benchmark, end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.t2i.cli import opt, parse
from bench.t2i.outdir import OutputError, check_out_dir, run_lock

from . import experiment, report, scenes
from .util import StageError, write_json


@dataclass
class DigitsArgs:
    seeds: int = opt(3, "number of evaluation seeds (first-seed .. first-seed + N - 1)")
    first_seed: int = opt(0, "first evaluation seed")
    out: str = opt("runs/digits", "run directory", metavar="DIR")
    cache: str | None = opt(
        None, "cache of base models and scorer (default: OUT/cache)", metavar="DIR"
    )
    preset: str = opt("full", "full benchmark or smoke test", choices=("full", "smoke"))
    methods: str | None = opt(
        None, f"comma-separated subset of {','.join(experiment.METHODS)} (default: the preset's)"
    )
    publish: str | None = opt(
        None, "also copy table1.md, grid.png, results.json here", metavar="DIR"
    )
    threads: int = opt(1, "torch threads per process (1 is fastest on a busy CPU)")
    lr_scale: float | None = opt(
        None, "fine-tune lr = trainer default x this (default: the preset's rule, base lr / 1e-4)"
    )
    progress: bool = opt(True, "progress bars (--no-progress: none)")


DESCRIPTION = (
    "Table 1 on a laptop: train (once, cached) a tiny Stable Diffusion on scenes of real "
    "handwritten digits, build Rand-removal preference pairs, fine-tune with each method, "
    "sample held-out prompts and score them exactly with DigitEval. Resumable: rerun the same "
    "command to continue."
)


def parse_args(argv) -> DigitsArgs:
    return parse(DigitsArgs, argv, prog="python -m bench.digits", description=DESCRIPTION)


def check_args(a: DigitsArgs) -> experiment.RunConfig:
    """The run config; ValueError (one line) on bad input."""
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    if a.first_seed < 0:
        raise ValueError(f"--first-seed must be >= 0, got {a.first_seed}")
    if a.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {a.threads}")
    cfg = experiment.preset(a.preset)
    if a.methods is not None:
        names = [m.strip() for m in a.methods.split(",") if m.strip()]
        if not names:
            raise ValueError("--methods is empty")
        cfg = experiment.with_methods(cfg, names)
    if a.lr_scale is not None:
        if not a.lr_scale > 0:
            raise ValueError(f"--lr-scale must be > 0, got {a.lr_scale}")
        cfg = dataclasses.replace(cfg, lr_scale=a.lr_scale)
    experiment.check_out_config(cfg, Path(a.out))
    return cfg


def write_report(out: Path, cfg, seeds: list[int], info: dict, publish: Path | None) -> Path:
    """table1.md, grid.png and results.json under ``out`` (and ``publish``)."""
    models = ["real", "base", *cfg.methods]
    scores = report.load_scores(out, seeds)
    agg = report.aggregate(scores, models)
    prompts = scenes.eval_prompts(cfg.eval_per_kind)
    md = report.table_markdown(agg, len(scores), len(prompts))
    (out / "table1.md").write_text(md)
    images = out / f"seed-{seeds[0]}" / "samples" / "images"
    report.grid_figure(images, prompts, models[1:], out / "grid.png")
    write_json(
        out / "results.json",
        {
            "config": experiment.config_dict(cfg),
            "seeds": seeds,
            "scorer_test_accuracy": info["scorer"]["test_accuracy"],
            "base": {k: v for k, v in info["base"].items() if k != "pipeline"},
            "table": agg,
            "stages": {k: v for k, v in info.items() if k.startswith("seed-")},
            "per_seed": scores,
            "eval_prompts": [p.text() for p in prompts],
        },
    )
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("table1.md", "grid.png", "results.json"):
            shutil.copyfile(out / name, publish / name)
    return out / "table1.md"


def main(argv=None) -> int:
    with contextlib.ExitStack() as held:  # OUT's lock for the run (cache stages: Runner.stage)
        try:
            a = parse_args(argv)
            held.enter_context(run_lock(a.out))
            if a.cache:
                check_out_dir(a.cache, "--cache")
            cfg = check_args(a)
        except ValueError as e:  # UsageError included
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _run(a, cfg)


def _run(a: DigitsArgs, cfg: experiment.RunConfig) -> int:
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the project's commands
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    runner = experiment.Runner(cfg, out, Path(a.cache) if a.cache else out / "cache", a.progress)
    t0 = time.perf_counter()
    try:
        info = runner.run(seeds)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OutputError as e:  # a shared cache stage being written by another experiment
        print(f"error: {e}", file=sys.stderr)
        return 2
    publish = Path(a.publish) if a.publish else None
    table = write_report(out, cfg, seeds, info, publish)
    print(table.read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
