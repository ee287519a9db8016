"""``python -m bench.digits``: the digits text-to-image preference benchmark, end to end."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.t2i.cli import opt, parse
from bench.t2i.errors import UsageError
from bench.t2i.outdir import check_out_dir, run_lock

from . import experiment, report, scenes
from .util import StageError, write_json

REPORT_FILES = ("table1.md", "grid.png", "accuracy.png", "results.json")


@dataclass
class DigitsArgs:
    seeds: int = opt(3, "number of evaluation seeds (first-seed .. first-seed + N - 1)")
    first_seed: int = opt(0, "first evaluation seed")
    out: str = opt("runs/digits", "run directory", metavar="DIR")
    cache: str | None = opt(
        None, "cache of base models and scorer (default: OUT/cache)", metavar="DIR"
    )
    preset: str = opt(
        "full",
        "full: the benchmark; smoke: the whole pipeline in seconds (tests)",
        choices=("full", "smoke"),
    )
    quick: bool = opt(
        False,
        "a fast look, not the benchmark: one evaluation seed, one dev seed, the guidance "
        "search and the grid cut to the full run's choices' neighbourhood (lr factor 1)",
    )
    methods: str | None = opt(
        None, f"comma-separated subset of {','.join(experiment.METHODS)} (default: the preset's)"
    )
    publish: str | None = opt(None, f"also copy {', '.join(REPORT_FILES)} here", metavar="DIR")
    threads: int = opt(1, "torch threads per process (1 is fastest on a busy CPU)")
    jobs: int = opt(1, "fine-tunes run at once (e.g. 2 on 2 cores with --threads 1)")
    train_base: bool = opt(
        False,
        "train the base model from scratch (cached in --cache) even when the repository "
        "ships the pipeline of this config (bench/digits/base)",
    )
    progress: bool = opt(True, "progress bars (--no-progress: none)")


DESCRIPTION = (
    "Table 1 on a laptop: train (once, cached) a tiny Stable Diffusion on scenes of real "
    "handwritten digits, pick its best guidance on dev prompts, build Rand-removal preference "
    "pairs and measure them, tune every method on the same dev grid, fine-tune at the chosen "
    "settings with controls, sample held-out prompts and score them exactly with DigitEval. "
    "Resumable: rerun the same command to continue."
)


def parse_args(argv) -> DigitsArgs:
    return parse(DigitsArgs, argv, prog="python -m bench.digits", description=DESCRIPTION)


def check_args(a: DigitsArgs) -> experiment.RunConfig:
    """The run config; UsageError (one line) on bad input."""
    if a.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {a.seeds}")
    if a.first_seed < 0:
        raise UsageError(f"--first-seed must be >= 0, got {a.first_seed}")
    if a.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {a.threads}")
    if a.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {a.jobs}")
    cfg = experiment.preset("quick" if a.quick else a.preset)
    if a.quick and a.preset != "full":
        raise UsageError("--quick is a cut of the full preset; drop --preset")
    if a.quick:
        a.seeds = 1
    if a.methods is not None:
        names = [m.strip() for m in a.methods.split(",") if m.strip()]
        if not names:
            raise UsageError("--methods is empty")
        cfg = experiment.with_methods(cfg, names)
    experiment.check_out_config(cfg, Path(a.out))
    return cfg


def write_report(out: Path, cfg, seeds: list[int], info: dict, publish: Path | None) -> Path:
    """table1.md, grid.png, accuracy.png and results.json under ``out`` (and ``publish``)."""
    names = [*cfg.methods, *cfg.controls]
    scores = report.load_scores(out, seeds)
    agg = report.aggregate(scores, ["real", "base", *names])
    prompts = scenes.eval_prompts(cfg.eval_per_kind)
    g = info["guidance"]["guidance"]
    sets, tuning = info["sets"], info["tuning"]
    md = "\n\n".join(
        [
            report.table_markdown(agg, len(scores), len(prompts), g),
            "### The pairs, before any training (DigitEval against the full prompt)\n\n"
            + report.quality_markdown(sets["quality"], "Rand-removal pairs")
            + (
                "\n"
                + report.quality_markdown(
                    sets["ranked"]["quality"],
                    f"DigitEval-ranked pairs (control; {sets['ranked']['pairs']} of "
                    f"{sets['ranked']['of']} prompts had exactly one right sample)",
                )
                if sets["ranked"]
                else ""
            ),
            "### The base's guidance (dev prompts, dev seeds)\n\n"
            + report.guidance_markdown(info["guidance"]["rows"], g),
            "### The tuning grid (dev prompts, dev seeds; the same size for every method)\n\n"
            + report.grid_markdown(tuning),
            "### Latents: encoded real scenes vs sampled winners\n\n"
            + report.latents_markdown(sets["latents"]),
        ]
    )
    (out / "table1.md").write_text(md)
    images = out / f"seed-{seeds[0]}" / "samples" / "images"
    report.grid_figure(images, prompts, ["base", *names], out / "grid.png")
    report.accuracy_figure(agg, out / "accuracy.png")
    write_json(
        out / "results.json",
        {
            "config": experiment.config_dict(cfg),
            "seeds": seeds,
            "helps_rule": report.HELPS,
            "control_valid": report.control_valid(agg),
            "scorer_test_accuracy": info["scorer"]["test_accuracy"],
            "base": {k: v for k, v in info["base"].items() if k != "pipeline"},
            "guidance": info["guidance"],
            "pairs": info["pairs"],
            "sets": sets,
            "tuning": tuning,
            "table": agg,
            "stages": {k: v for k, v in info.items() if k.startswith("seed-")},
            "per_seed": scores,
            "eval_prompts": [p.text() for p in prompts],
        },
    )
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES:
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
        except UsageError as e:  # OutputError included
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _run(a, cfg)


def _run(a: DigitsArgs, cfg: experiment.RunConfig) -> int:
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the project's commands
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    cache = Path(a.cache) if a.cache else out / "cache"
    runner = experiment.Runner(cfg, out, cache, a.progress, a.jobs, a.train_base, a.threads)
    t0 = time.perf_counter()
    try:
        info = runner.run(seeds)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except UsageError as e:  # a shipped base file that fails its checksum (ShippedBaseError),
        print(f"error: {e}", file=sys.stderr)  # a shared cache stage being written by
        return 2  # another experiment (OutputError)
    publish = Path(a.publish) if a.publish else None
    table = write_report(out, cfg, seeds, info, publish)
    print(table.read_text())
    print(f"done in {time.perf_counter() - t0:.0f} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
