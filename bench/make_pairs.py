"""Build a label-free preference-pair dataset with prompt perturbation (DDSPO Sec. 3.3, 4.4).

The command over :func:`bench.t2i.pairs.build_pairs` (variants, seeding and resuming are
described there). Under ``torchrun`` rank r makes shards k with ``k % world == r``.

    python bench/make_pairs.py --tiny sd --out runs/pairs-tiny
    python bench/make_pairs.py --pretrained /models/sd15 --prompts prompts.txt --out data/sd15
    torchrun --nproc_per_node=8 bench/make_pairs.py --pretrained ... --out ...
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from bench.t2i.cli import (
    DeviceArgs,
    ModelArgs,
    OutputArgs,
    PredictionArgs,
    PromptArgs,
    UsageError,
    check_positive,
    opt,
    parse,
    run_command,
    torch_dtype,
)
from bench.t2i.dist import die_with_launcher
from bench.t2i.models import open_backbone
from bench.t2i.outdir import run_lock
from bench.t2i.pairs import PairConfig, build_pairs
from bench.t2i.prompts import cli_prompts
from bench.t2i.provenance import base_record


@dataclass
class MakePairsConfig(OutputArgs, DeviceArgs, PairConfig, PromptArgs, PredictionArgs, ModelArgs):
    llm: str | None = opt(None, "local causal LM directory for --perturb llm", metavar="DIR")
    llm_max_new_tokens: int = opt(256, "LLM answer length in tokens")

    def pair_config(self) -> PairConfig:
        return PairConfig(**{f.name: getattr(self, f.name) for f in fields(PairConfig)})


def parse_args(argv: Sequence[str] | None = None) -> MakePairsConfig:
    cfg = parse(
        MakePairsConfig,
        argv,
        prog="make_pairs.py",
        description="Build a label-free preference-pair dataset (x0_w, x0_l, c, c-) by prompt "
        "perturbation (DDSPO paper Sec. 3.3/4.4). Resumable; runs under torchrun.",
        one_of=[("pretrained", "tiny")],
    )
    check_positive(cfg, ("steps", "shard_size", "batch_size", "max_prompts", "resolution"))
    if cfg.perturb == "llm" and not cfg.llm:
        raise UsageError("--perturb llm needs --llm DIR (a local causal LM)")
    return cfg


def _device(cfg: MakePairsConfig, local_rank: int) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _run(cfg: MakePairsConfig) -> int:
    die_with_launcher()  # under torchrun: a rank never outlives its launcher
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    prompts = cli_prompts(cfg.prompts, tiny=bool(cfg.tiny), max_prompts=cfg.max_prompts)
    backbone = open_backbone(cfg.pretrained, cfg.tiny, prediction_type=cfg.prediction_type)
    base = base_record(backbone, cfg.pretrained, cfg.tiny)  # as loaded: before the dtype cast
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.distributed.barrier()  # no rank writes into OUT before rank 0 holds its lock
    try:
        backbone.for_inference(device, torch_dtype(cfg.dtype))
        llm = None
        if cfg.perturb == "llm":
            from bench.t2i.llm import LocalLM

            llm = LocalLM(cfg.llm, device=device, max_new_tokens=cfg.llm_max_new_tokens)
        out = build_pairs(
            backbone, prompts, cfg.out, cfg.pair_config(), llm=llm, rank=rank, world=world,
            progress=cfg.progress, prompts_file=cfg.prompts, base=base,
        )  # fmt: skip
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        n = json.loads((out / "info.json").read_text())["num_pairs"]
        print(f"wrote {n} pair{'s' * (n != 1)} from {len(prompts)} prompts to {out}")
    return 0


def _locked(cfg: MakePairsConfig) -> int:
    """:func:`_run` with OUT's lock, held by rank 0 for the whole run."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with run_lock(cfg.out) if rank0 else contextlib.nullcontext():
        return _run(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(lambda: _locked(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
