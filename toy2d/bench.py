"""Toy sweep speed: this checkout's fine-tuning and sampling, alone or against another
checkout.

    python -m toy2d.bench [--seeds 3] [--steps 400] [--repeats 1] [--baseline DIR]
    python -m toy2d.bench --sweeps [--repeats 2] [--baseline DIR] [--ablation]

The workload is the 81-fine-tune one: dpo, dspo, ddspo x N {12,120,1200} x beta {200,400,800} x
seeds (81 fine-tunes for 3 seeds) as one stacked model, pair generation included, then 256
DDIM samples per class for every run (references from the cache, trained first if missing,
not timed). Without ``--baseline`` it is timed in this process, best of ``--repeats``. With
``--baseline DIR`` (another checkout, e.g. ``git worktree add DIR REV``) the same workload
runs from this checkout and from DIR, each in a fresh process, alternately: the script prints
both times, their ratio, and the largest difference of the parameters and samples between
the two, in float32 ulps of their magnitude, and whether they are bitwise equal.

FLOPs are counted, not estimated: every matrix product the path dispatches (``bmm``,
``baddbmm``, ``mm``, ``addmm``; ``matmul`` lowers to them) is logged by a
``TorchDispatchMode`` as ``2 b m k n``, on 1- and 2-step runs (extrapolated linearly to
``--steps``) and on the sampling call. Elementwise work is not counted. The "bmm floor" replays
the logged shapes of one step as plain ``torch.bmm`` calls on random data: its GFLOP/s is what
the matmuls alone reach, so ``FLOPs / floor rate`` is the time the sweep would take if
nothing but its matmuls ran.

With ``--sweeps`` it instead times the commands the toy's speed targets are set for, each in a fresh
process: the cold sweep of the 81-fine-tune workload (``--methods dpo,dspo,ddspo``: 3 references,
81 fine-tunes), the cold default sweep (135 fine-tunes) and, with ``--ablation``, the ablation
(cached references). ``--baseline DIR`` runs the same commands from DIR, alternating with this
checkout, prints the ratios and checks that both wrote the same ``results.csv``.

With ``--naive`` the same fine-tunes also run one at a time (M = 1), as before the batched
path (``--naive-subset K``: time K of them and extrapolate). ``--single-run`` also times
one ``toy2d.run`` in-process (cached reference).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .train import FinetuneConfig, Run, ToySetup, finetune, load_references, sample

aten = torch.ops.aten
SETUP = ToySetup()  # the toy's full size (tests swap in a tiny one)
N_EVAL = 256  # samples per class drawn from every fine-tuned model
_MATMULS = {aten.bmm: (0, 1), aten.mm: (0, 1), aten.baddbmm: (1, 2), aten.addmm: (1, 2)}


class MatmulLog(TorchDispatchMode):
    """Logs ``(b, m, k, n)`` of every matrix product dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        pos = _MATMULS.get(func.overloadpacket)
        if pos is not None:
            a, b = args[pos[0]], args[pos[1]]
            if a.dim() == 2:
                self.shapes.append((1, a.shape[0], a.shape[1], b.shape[1]))
            else:
                self.shapes.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2]))
        return func(*args, **(kwargs or {}))

    @property
    def flops(self) -> int:
        return sum(2 * b * m * k * n for b, m, k, n in self.shapes)


def workload(seeds: list[int]) -> list[Run]:
    return [
        Run(m, n, b, s)
        for s in seeds
        for m in ("dpo", "dspo", "ddspo")
        for n in (12, 120, 1200)
        for b in (200.0, 400.0, 800.0)
    ]


def count_flops(setup, ft, runs, refs) -> tuple[int, int, list]:
    """``(fine-tune FLOPs at ft.steps, sampling FLOPs, one step's matmul shapes)``."""
    logs = []
    for steps in (1, 2):
        with MatmulLog() as log:
            params, _ = finetune(setup, replace(ft, steps=steps), runs, refs)
        logs.append(log)
    per_step = logs[1].shapes[len(logs[0].shapes) :]
    total = logs[0].flops + (ft.steps - 1) * (logs[1].flops - logs[0].flops)
    with MatmulLog() as slog:
        sample(setup, params, [r.seed for r in runs], N_EVAL)
    return total, slog.flops, per_step


def bmm_rate(shapes: list[tuple[int, int, int, int]], repeats: int = 5) -> float:
    """GFLOP/s of plain float32 ``torch.bmm`` over these shapes (best of ``repeats``)."""
    ops = [(torch.randn(b, m, k), torch.randn(b, k, n)) for b, m, k, n in shapes]
    flops = sum(2 * b * m * k * n for b, m, k, n in shapes)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a, w in ops:
            torch.bmm(a, w)
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m toy2d.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (27 fine-tunes each)")
    p.add_argument(
        "--steps",
        type=int,
        default=FinetuneConfig().steps,
        help="Adam steps per fine-tune (default: the sweep's; fewer for a quick look)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time this many times (with --baseline: each checkout, alternately); best counts",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="with --baseline: skip comparing the two checkouts' results",
    )
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting and the bmm floor")
    p.add_argument(
        "--naive", action="store_true", help="also time the fine-tunes one at a time (M = 1)"
    )
    p.add_argument(
        "--naive-subset",
        type=int,
        default=0,
        help="with --naive: time only this many one-at-a-time fine-tunes and extrapolate "
        "(0: time every one)",
    )
    p.add_argument("--single-run", action="store_true", help="also time one toy2d.run in-process")
    p.add_argument(
        "--sweeps",
        action="store_true",
        help="time the cold sweeps in fresh processes instead (the speed targets; see above)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout to run the same workload (with --sweeps: the same sweeps) from, "
        "alternately with this one, each in a fresh process",
    )
    p.add_argument(
        "--ablation", action="store_true", help="with --sweeps: also time the ablation sweep"
    )
    args = p.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "toy2d" / "sweep.py").is_file():
        p.error(f"--baseline {args.baseline}: not a checkout (no toy2d/sweep.py)")
    if args.baseline is not None and (args.naive or args.single_run):
        p.error("--baseline times the workload of both checkouts: not with --naive/--single-run")
    return args


# (label, sweep flags, cold reference cache, target seconds) -- the toy's speed targets
SWEEPS = (
    (
        "81-fine-tune workload, cold (3 refs + 81 fine-tunes)",
        ["--methods", "dpo,dspo,ddspo"],
        True,
        20,
    ),
    ("default sweep, cold (3 refs + 135 fine-tunes)", [], True, 30),
    ("ablation, cached refs (432 fine-tunes)", ["--ablation"], False, 100),
)
_SUMMARY = re.compile(
    r"total ([\d.]+) s \(references ([\d.]+) s, fine-tuning ([\d.]+) s, "
    r"sampling\+metrics ([\d.]+) s\)"
)


def run_sweep_process(cwd: Path, flags: list[str], out: Path, cache: Path) -> list[float]:
    """``python -m toy2d.sweep FLAGS`` from ``cwd`` (its packages first on the path) with the
    reference cache ``cache``: ``[total, references, fine-tuning, sampling+metrics]`` as the
    sweep prints them."""
    env = {**os.environ, "MINDDSPO_CACHE": str(cache), "PYTHONPATH": str(cwd)}
    cmd = [sys.executable, "-m", "toy2d.sweep", *flags, "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    m = _SUMMARY.search(done.stdout)
    if done.returncode != 0 or m is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"sweep from {cwd} failed (rc {done.returncode}): {tail[0]}")
    return [float(v) for v in m.groups()]


def time_sweeps(repeats: int, baseline: Path | None, ablation: bool) -> int:
    """The cold sweeps of :data:`SWEEPS`, this checkout (and ``baseline``) alternately."""
    import tempfile

    here = Path(__file__).resolve().parent.parent
    sides = [("this", here)] + ([("baseline", baseline.resolve())] if baseline else [])
    work = Path(tempfile.mkdtemp(prefix="toy2d-bench-"))
    warm = work / "warm-cache"  # the ablation's cached references, trained once per side
    same = True
    for k, (label, flags, cold, target) in enumerate(SWEEPS):
        if "--ablation" in flags and not ablation:
            continue
        times: dict[str, list[list[float]]] = {name: [] for name, _ in sides}
        for r in range(max(1, repeats)):
            for name, root in sides[:: 1 if r % 2 == 0 else -1]:
                cache = Path(tempfile.mkdtemp(dir=work)) if cold else warm / name
                if not cold and not cache.exists():  # fill the cache, untimed
                    run_sweep_process(root, ["--n-pairs", "12", "--betas", "400", "--methods",
                                             "dpo"], work / f"fill-{name}", cache)  # fmt: skip
                out = work / f"sweep{k}-{name}-{len(times[name])}"
                times[name].append(run_sweep_process(root, flags, out, cache))
                csvs = sorted(work.glob(f"sweep{k}-*/results.csv"))
                same &= len({c.read_bytes() for c in csvs}) <= 1
        print(f"\n{label}  (target <= {target} s)")
        print(f"  {'checkout':10s} {'total s (each run)':28s} {'refs':>6s} {'fine-tune':>10s} "
              f"{'sampling':>9s}")  # fmt: skip
        best = {}
        for name, _ in sides:
            runs = times[name]
            i = min(range(len(runs)), key=lambda k: runs[k][0])
            best[name] = runs[i][0]
            each = ", ".join(f"{t[0]:.1f}" for t in runs)
            print(f"  {name:10s} {each:28s} {runs[i][1]:6.1f} {runs[i][2]:10.1f} {runs[i][3]:9.1f}")
        verdict = "met" if best["this"] <= target else "NOT met"
        ratio = f", baseline / this = {best['baseline'] / best['this']:.2f}x" if baseline else ""
        print(f"  best of {max(1, repeats)}: {best['this']:.1f} s -> target {verdict}{ratio}")
    print(f"\nresults.csv identical across runs and checkouts: {same}")
    print(f"(outputs under {work})")
    return 0 if same else 1


def time_here(setup, ft, runs, refs, repeats: int) -> float:
    """This checkout's fine-tunes + sampling in this process, best of ``repeats``."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        params, _ = finetune(setup, ft, runs, refs)
        sample(setup, params, [r.seed for r in runs], N_EVAL)
        times.append(time.perf_counter() - t0)
    print(f"fine-tunes + sampling: {min(times):7.1f} s  {_all(times)}")
    return min(times)


# One timed workload in a fresh process, run from a checkout (its packages first on the path):
# only the API every version of the toy has (ToySetup, FinetuneConfig, Run, finetune,
# load_references, sample). Prints the seconds; writes the parameters and samples.
_JOB = """
import json, sys, time, torch
from safetensors.torch import save_file
from toy2d.train import FinetuneConfig, Run, ToySetup, finetune, load_references, sample
from toy2d.data import ToyConfig
from toy2d.model import MLPConfig
from toy2d.train import RefConfig, ScheduleConfig
spec = json.loads(sys.argv[1])
if spec["threads"] > 0:
    torch.set_num_threads(spec["threads"])
parts = {"toy": ToyConfig, "mlp": MLPConfig, "schedule": ScheduleConfig, "ref": RefConfig}
setup = ToySetup(**{k: parts[k](**v) for k, v in spec["setup"].items()})
ft = FinetuneConfig(steps=spec["steps"])
runs = [Run(m, n, b, s) for m, n, b, s in spec["runs"]]
refs = load_references(setup, sorted({r.seed for r in runs}))
t0 = time.perf_counter()
params, _ = finetune(setup, ft, runs, refs)
x, _ = sample(setup, params, [r.seed for r in runs], spec["n_eval"])
seconds = time.perf_counter() - t0
save_file({k: v.contiguous() for k, v in {**params, "samples": x}.items()}, spec["out"])
print(json.dumps({"seconds": seconds}))
"""


def run_job_process(cwd: Path, runs: list[Run], steps: int, threads: int, out: Path) -> float:
    """:data:`_JOB` from checkout ``cwd``: the seconds it took; its results go to ``out``."""
    spec = {
        "setup": asdict(SETUP),
        "n_eval": N_EVAL,
        "runs": [[r.method, r.n_pairs, r.beta, r.seed] for r in runs],
        "steps": steps,
        "threads": threads,
        "out": str(out),
    }
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    cmd = [sys.executable, "-c", _JOB, json.dumps(spec)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"workload from {cwd} failed (rc {done.returncode}): {tail[0]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def time_against_baseline(
    runs: list[Run], steps: int, threads: int, repeats: int, baseline: Path, check: bool
) -> float:
    """The workload from this checkout and from ``baseline``, alternately, each in a fresh
    process; prints both (best of ``repeats``), the ratio and how far the results differ."""
    import tempfile

    from safetensors.torch import load_file

    here = Path(__file__).resolve().parent.parent
    sides = [("this", here), ("baseline", baseline.resolve())]
    work = Path(tempfile.mkdtemp(prefix="toy2d-bench-"))
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for r in range(max(1, repeats)):
        for name, root in sides[:: 1 if r % 2 == 0 else -1]:
            out = work / f"{name}-{len(times[name])}.safetensors"
            times[name].append(run_job_process(root, runs, steps, threads, out))
    best = {name: min(ts) for name, ts in times.items()}
    if check:
        print(compare_line(load_file(work / "baseline-0.safetensors"),
                           load_file(work / "this-0.safetensors")))  # fmt: skip
    print(f"this checkout    : {best['this']:7.1f} s  {_all(times['this'])}")
    print(f"baseline checkout: {best['baseline']:7.1f} s  {_all(times['baseline'])}")
    print(f"baseline / this  : {best['baseline'] / best['this']:7.2f}x")
    print(f"(outputs under {work})")
    return best["this"]


def compare_line(old: dict, new: dict) -> str:
    """One line: the largest |new - old| over the tensors (this checkout's results against
    the baseline's), in float32 ulps of each tensor's largest magnitude (the worst tensor
    named), and whether all are bitwise equal."""
    eps = torch.finfo(torch.float32).eps
    worst, name, bitwise = 0.0, "", True
    for k, a in old.items():
        b = new[k]
        bitwise &= torch.equal(a, b)
        diff = (b.double() - a.double()).abs().max().item()
        scale = a.abs().max().double().item()
        ulps = diff / (scale * eps) if scale > 0 else (0.0 if diff == 0 else float("inf"))
        if ulps > worst or not name:
            worst, name = ulps, k
    return (
        f"this vs baseline (parameters and samples): max difference {worst:.1f} float32 ulps "
        f"of the tensor's magnitude ({name}); bitwise equal: {'yes' if bitwise else 'no'}"
    )


def report_flops(setup, ft, runs, refs, seconds: float) -> None:
    """Matmul FLOPs of this checkout's path, their achieved rate and the bmm-only floor."""
    fine, samp, step_shapes = count_flops(setup, ft, runs, refs)
    rate = bmm_rate(step_shapes)
    print("matmul FLOPs counted by dispatch (fine-tune incl. pairs + sampling):")
    print(
        f"  {(fine + samp) / 1e9:7.1f} GFLOP -> {(fine + samp) / seconds / 1e9:6.1f} GFLOP/s achieved"
    )
    print(
        f"  bmm of one step's shapes alone: {rate:6.1f} GFLOP/s "
        f"-> matmul floor {(fine + samp) / rate / 1e9:.1f} s"
    )


def time_naive(setup, ft, runs, refs, subset: int, t_new: float) -> None:
    """The same fine-tunes one at a time (M = 1), measured or extrapolated from ``subset``."""
    todo = runs if subset <= 0 else runs[:: max(1, len(runs) // subset)]
    t0 = time.perf_counter()
    for r in todo:
        one, _ = finetune(setup, ft, [r], refs)
        sample(setup, one, [r.seed], N_EVAL)
    measured = time.perf_counter() - t0
    t_naive = measured * len(runs) / len(todo)
    note = (
        "measured"
        if len(todo) == len(runs)
        else f"EXTRAPOLATED from {len(todo)} of {len(runs)} fine-tunes ({measured:.1f} s)"
    )
    print(f"{len(runs)} fine-tunes + sampling, one-by-one: {t_naive:7.1f} s  ({note})")
    print(f"speed-up one-by-one / batched: {t_naive / t_new:.1f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweeps:
        return time_sweeps(args.repeats, args.baseline, args.ablation)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    setup, ft = SETUP, FinetuneConfig(steps=args.steps)
    seeds = list(range(args.seeds))
    runs = workload(seeds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(
        f"workload: {len(runs)} fine-tunes x {ft.steps} steps (+ pairs) + sampling {N_EVAL}/class"
    )
    t0 = time.perf_counter()
    refs = load_references(setup, seeds)
    print(f"references (cache or train, not counted below): {time.perf_counter() - t0:.1f} s")
    if args.baseline is not None:
        t_new = time_against_baseline(
            runs, ft.steps, args.threads, args.repeats, args.baseline, not args.no_check
        )
    else:
        t_new = time_here(setup, ft, runs, refs, args.repeats)
    if not args.no_flops:
        report_flops(setup, ft, runs, refs, t_new)
    if args.single_run:
        from .run import main as run_main

        t0 = time.perf_counter()
        run_main(["--method", "ddspo", "--out", "runs/bench_toy_run"])
        print(f"single toy2d.run (cached reference, in-process): {time.perf_counter() - t0:.1f} s")
    if args.naive:
        time_naive(setup, ft, runs, refs, args.naive_subset, t_new)
    return 0


def _all(ts: list[float]) -> str:
    return "" if len(ts) < 2 else "(runs: " + ", ".join(f"{t:.1f}" for t in ts) + ")"


if __name__ == "__main__":
    sys.exit(main())
