"""DD-CPP, the data-driven contrastive policy pair (DDSPO paper Sec. 3.2; official
``ddspo/train_lora_target.py``): fine-tune a *winning* model on the preferred samples and a
*losing* model on the dispreferred samples of a pair dataset, with the plain diffusion loss.

The winning model regresses x0_w with the prompt c, the losing model x0_l with the same
prompt c, as the official code trains it (and as DDSPO then evaluates it: f_lose(x_t^l, c);
``train_t2i.py --sft-branch loser_neg`` trains on the loser's prompt c- instead). Two forms:

* ``--joint`` (the default), the official form: ONE run of ``bench/train_t2i.py --method sft
  --sft-branch pair`` into OUT: two LoRA adapters on one frozen base, one optimizer over
  both, the loss ``mse_w + mse_l``, one gradient clip over both adapters' joint norm, one
  ``t`` per pair and separate noise for its two sides. OUT holds the run (config.json,
  metrics.jsonl with each side's loss, checkpoints/ with both adapters); ``--resume`` goes to
  that run.
* ``--no-joint``: two runs of ``train_t2i.py --method sft``, one after the other, into
  OUT/winner (``--sft-branch winner``) and OUT/loser (``--sft-branch loser``), each clipped
  on its own norm; with the same ``--seed`` both sides see the same ``t`` and the same noise
  (add ``--independent-noise`` for the joint form's draws). ``--lora 0`` (two full
  fine-tunes) needs this form.

Both write OUT/winner/final and OUT/loser/final and print the flags for the DDSPO run that
uses the pair as its targets::

    python bench/train_policy_pair.py --pretrained SD15_DIR --data PAIRS_DIR --out runs/pair
    python bench/train_t2i.py --pretrained SD15_DIR --data PAIRS_DIR --method ddspo \\
        --winner-policy runs/pair/winner/final --loser-policy runs/pair/loser/final ...

Defaults are the official DD-CPP pair recipe (``scripts/train_ddspo_lora_target.sh`` and
``train_lora_target.py``): LoRA rank 4 (alpha = rank) with peft's default initialisation
(Kaiming-uniform A, B = 0; ``--lora-init``), lr 1e-4, 300 steps of 2048 pairs
(``--pairs-per-step``; ``--batch-size`` pairs per rank per micro-step, the gradient
accumulation follows; with ``--tiny`` one micro-step per step unless set). Every other flag (``--tiny``, ``--pretrained``, ``--data``,
``--seed``, ``--dtype``, ...) is passed unchanged to both runs; ``--method``/
``--sft-branch`` are this command's.

In both forms the two adapters start from the same draw (the official draws them one after
the other). AdamW is per-parameter, so given the same draws (``--no-joint
--independent-noise``) the two forms take the same steps whenever no clip is active. With
``--tiny`` and no ``--data`` the run builds its demo pairs into ``OUT/data`` (``--no-joint``:
the winner run into ``OUT/winner/data``, which the loser run reads).

Each run is its own ``train_t2i.py`` process (``--nproc N``: under ``torch.distributed.run``
with N ranks). Exit code: the first failing run's (see ``train_t2i.py --help``); 2 for bad
input here.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.t2i.cli import UsageError, check_at_least, opt, parse_known
from bench.t2i.outdir import check_out_dir

TRAINER = Path(__file__).resolve().with_name("train_t2i.py")
#: the official DD-CPP pair recipe (KU-MIIL/DDSPO scripts/train_ddspo_lora_target.sh:
#: --lora_rank 4 --lora_alpha 4.0 --lora_lr 1e-4 --max_train_steps 300)
PAIR_LORA_RANK = 4
PAIR_LR = 1e-4
PAIR_STEPS = 300
PAIR_PAIRS_PER_STEP = 2048  # --train_batch_size 1 --gradient_accumulation_steps 2048
OWN = ("--method", "--sft-branch", "--winner-policy", "--loser-policy")


@dataclass
class PolicyPairConfig:
    out: str = opt(
        "runs/policy_pair",
        "the run (--joint) or the runs OUT/winner and OUT/loser; the pair: OUT/winner/final, "
        "OUT/loser/final",
        metavar="DIR",
    )
    lora: int = opt(
        PAIR_LORA_RANK,
        "LoRA rank (the official DD-CPP pair's --lora_rank; 0 = full fine-tunes, --no-joint only)",
    )
    lora_init: str = opt(
        "kaiming",
        "LoRA initialisation: kaiming (peft's default, the official pair's) | gaussian",
        choices=("kaiming", "gaussian"),
    )
    lr: float = opt(PAIR_LR, "learning rate (official)")
    max_steps: int = opt(PAIR_STEPS, "optimizer steps per model (official)")
    pairs_per_step: int | None = opt(
        None,
        f"pairs per optimizer step over all ranks; unset: {PAIR_PAIRS_PER_STEP} (official: 1 x "
        f"{PAIR_PAIRS_PER_STEP} accumulated), with --tiny: --batch-size x --nproc (one "
        "micro-step, a cheap smoke run); --grad-accum = this / (--batch-size x --nproc), which "
        "must divide it",
    )
    batch_size: int = opt(8, "pairs per rank per micro-step (memory; only pairs per step count)")
    nproc: int = opt(1, "ranks per run (> 1: torch.distributed.run)")
    joint: bool = opt(
        True,
        "train both LoRA adapters in one run, as the official pair: one optimizer, loss "
        "mse_w + mse_l, one gradient clip over both, separate noise per side (default); "
        "--no-joint: two train_t2i.py runs, one per side, each clipped on its own",
    )


DESCRIPTION = (
    "Fine-tune DD-CPP's winning and losing models (sft on the winners, sft on the losers) "
    "for ddspo's --winner-policy/--loser-policy. Unknown flags go to the train_t2i.py run "
    "(to both runs with --no-joint)."
)


def subprocess_runner(nproc: int) -> Callable[[list[str]], int]:
    """Run ``train_t2i.py ARGS`` in a new process (``nproc`` > 1: under torchrun)."""
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]

    def run(args: list[str]) -> int:
        return subprocess.call([*launch, str(TRAINER), *args])

    return run


def plan(argv: Sequence[str] | None) -> tuple[PolicyPairConfig, list[tuple[str, list[str]]]]:
    """The ``train_t2i.py`` argument lists: ``[("winner and loser", args)]`` (``--joint``)
    or ``[("winner", args), ("loser", args)]``."""
    ns, rest = parse_known(
        PolicyPairConfig, argv, prog="train_policy_pair.py", description=DESCRIPTION
    )
    for flag in rest:
        if flag.split("=")[0] in OWN:
            raise UsageError(f"{flag.split('=')[0]} is set by this command")
        if flag.split("=")[0] == "--grad-accum":
            raise UsageError("--grad-accum is set by this command (from --pairs-per-step)")
        if flag.split("=")[0] == "--resume" and not ns.joint:
            raise UsageError("--resume applies to the one-run form only (drop --no-joint)")
    check_at_least(ns, ("lora",), 0)
    if ns.joint and not ns.lora:
        raise UsageError(
            "--lora 0 (two full fine-tunes) needs --no-joint: the one-run form trains two "
            "LoRA adapters"
        )
    check_at_least(ns, ("max_steps", "nproc", "batch_size", "pairs_per_step"), 1)
    per_micro = ns.batch_size * ns.nproc
    tiny = any(a == "--tiny" or a.startswith("--tiny=") for a in rest)
    if ns.pairs_per_step is None:
        ns.pairs_per_step = per_micro if tiny else PAIR_PAIRS_PER_STEP
    if ns.pairs_per_step % per_micro:
        raise UsageError(
            f"--pairs-per-step {ns.pairs_per_step} is not a multiple of --batch-size x "
            f"--nproc = {per_micro}"
        )
    out = check_out_dir(ns.out)  # one line here, not one per fine-tune
    common = ["--method", "sft", "--lora", str(ns.lora), "--lora-init", ns.lora_init]
    common += ["--lr", repr(ns.lr), "--max-steps", str(ns.max_steps)]
    common += ["--batch-size", str(ns.batch_size)]
    common += ["--grad-accum", str(ns.pairs_per_step // per_micro), *rest]
    if ns.joint:
        return ns, [("winner and loser", [*common, "--sft-branch", "pair", "--out", str(out)])]
    has_data = any(a == "--data" or a.startswith("--data=") for a in rest)
    runs = []
    for side in ("winner", "loser"):
        extra = []
        if side == "loser" and not has_data and tiny:  # the winner run's demo pairs
            extra = ["--data", str(out / "winner" / "data")]
        runs.append((side, [*common, *extra, "--sft-branch", side, "--out", str(out / side)]))
    return ns, runs


def main(argv: Sequence[str] | None = None, run: Callable[[list[str]], int] | None = None) -> int:
    """CLI entry; ``run`` (default: a ``train_t2i.py`` process) trains one model."""
    try:
        ns, runs = plan(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = run or subprocess_runner(ns.nproc)
    for side, args in runs:
        what = "models in one run" if side == "winner and loser" else "model"
        print(f"== {side} {what}: train_t2i.py {shlex.join(args)}", flush=True)
        rc = run(args)
        if rc != 0:
            if rc != 2 and len(runs) > 1:  # 2: the run's own one line said it all
                print(f"error: the {side} fine-tune failed (exit code {rc})", file=sys.stderr)
            return rc
    out = Path(ns.out)
    print("policy pair ready; train DDSPO on it with:")
    print(f"--winner-policy {out / 'winner' / 'final'} --loser-policy {out / 'loser' / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
