"""Build a label-free preference-pair dataset with prompt perturbation (DDSPO Sec. 3.3, 4.4).

For each prompt ``c`` a degraded prompt ``c-`` is made (random word removal or a local
LLM rewrite, :mod:`minddspo.perturb`), images are sampled with the backbone's own sampler
(batched classifier-free guidance), and their latents are stored in the format of
:mod:`bench.t2i.pairdata`. Variants (SPEC §5):

* ``paired``        x0_w from c, x0_l from c- (both from the *same* initial noise, so the
                    pair differs only through the prompt); loser prompt c-.
* ``not_paired``    x0_l is the winner image of another random prompt c_j; loser prompt c-
                    (the degraded *original* prompt).
* ``rand_positive`` x0_l is the winner image x0_+ of another random prompt c+ = c_j; loser
                    prompt c+.

Every image, degraded prompt and partner is a function of ``(seed, prompt index)`` only
(:func:`bench.t2i.backbones.prompt_generator`; the partner's winner is regenerated from its own
seed), so shards can be made in any order, on any rank, and skipped when already on disk:
a shard is written to a temporary name and renamed, and a rerun skips finished shards.
Under ``torchrun`` rank r makes shards k with ``k % world == r``; after a barrier rank 0
merges the shard headers into ``metadata.jsonl`` and ``info.json``.

    python bench/make_pairs.py --tiny sd --out runs/pairs-tiny
    python bench/make_pairs.py --pretrained /models/sd15 --prompts prompts.txt --out data/sd15
    torchrun --nproc_per_node=8 bench/make_pairs.py --pretrained ... --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench.t2i.backbones import BACKBONES, Backbone, prompt_generator
from bench.t2i.pairdata import (
    LATENT_DTYPES,
    VARIANTS,
    finalize,
    read_shard_header,
    shard_path,
    shard_skipped,
    write_shard,
)
from bench.t2i.prompts import cli_prompts
from minddspo.perturb import TASKS, random_removal

PERTURBS = ("random_removal", "llm")
# variants whose loser target uses the degraded prompt c-: a c- equal to c makes a void pair
DEGRADED_VARIANTS = ("paired", "not_paired")


def _stream(seed: int, index: int, stream: int) -> random.Random:
    """A ``random.Random`` for prompt ``index`` and purpose ``stream`` (1 perturb, 2 partner)."""
    state = np.random.SeedSequence([int(seed), int(index), stream]).generate_state(2, np.uint32)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def partner_index(seed: int, index: int, n: int) -> int:
    """The 'other random prompt' of ``index``: uniform over the other ``n - 1`` indices."""
    j = _stream(seed, index, 2).randrange(n - 1)
    return j + (j >= index)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_pairs(
    backbone: Backbone,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    variant: str = "paired",
    perturb: str = "random_removal",
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    shard_size: int = 64,
    batch_size: int = 8,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    resolution: int | None = None,
    task: str = "alignment",
    llm: Callable | None = None,
    latent_dtype: str = "float16",
    prompts_file: str | None = None,
) -> Path:
    """Generate the pair dataset for ``prompts`` into ``out_dir`` and return its path.

    ``llm`` (for ``perturb="llm"``) is a :class:`bench.t2i.llm.LocalLM` or any object with a
    ``perturb(prompts, rngs, task) -> PerturbResult`` method. ``batch_size`` counts pairs
    per sampler call (each call samples ``2 * batch_size`` images). Finished shards are
    skipped; a shard made with different settings or prompts is an error.
    """
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if perturb not in PERTURBS:
        raise ValueError(f"perturb must be one of {PERTURBS}, got {perturb!r}")
    if perturb == "llm" and llm is None:
        raise ValueError("perturb='llm' needs a local language model (--llm DIR)")
    if task not in TASKS:
        raise ValueError(f"task must be one of {tuple(TASKS)}, got {task!r}")
    if variant != "paired" and n < 2:
        raise ValueError(f"variant {variant!r} needs at least 2 prompts")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent dtype must be one of {tuple(LATENT_DTYPES)}")
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("world > 1 needs an initialised torch.distributed process group")
    steps = steps or backbone.default_steps
    guidance = backbone.default_guidance if guidance is None else float(guidance)
    resolution = resolution or backbone.default_resolution
    latent_shape = list(backbone.latent_shape(resolution))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(
        backbone=backbone.name,
        prediction_type=backbone.prediction_type,
        latent_shape=latent_shape,
        latent_dtype=latent_dtype,
        variant=variant,
        perturb=perturb,
        task=task,
        seed=seed,
        steps=steps,
        guidance=guidance,
        resolution=resolution,
        shard_size=shard_size,
        num_prompts=n,
    )
    num_shards = (n + shard_size - 1) // shard_size
    mine = [k for k in range(num_shards) if k % world == rank]
    todo = []
    for k in mine:
        path = shard_path(out, k)
        if path.is_file():
            _check_existing(path, params, prompts)
            continue
        todo.append(k)
    bar = None
    if progress and rank == 0 and todo:
        from tqdm import tqdm

        total = sum(min(shard_size, n - k * shard_size) for k in todo)
        bar = tqdm(total=total, desc=f"pairs ({variant})", unit="pair")
    fallbacks = 0
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        recs, xw, xl, fb, skipped = _make_shard(
            backbone, prompts, idx, variant, perturb, seed, steps, guidance, batch_size,
            resolution, task, llm, bar,
        )  # fmt: skip
        for r, rec in enumerate(recs):
            rec.update(shard=k, row=r)
        fallbacks += fb
        write_shard(out, k, xw, xl, recs, params, latent_dtype, skipped)
    if bar is not None:
        bar.close()
    _barrier()
    if rank == 0:
        info = dict(params, prompts_file=prompts_file)
        info["llm_fallbacks"] = _count_fallbacks(out, num_shards) if perturb == "llm" else 0
        skipped = sorted(i for k in range(num_shards) for i in shard_skipped(shard_path(out, k)))
        info["skipped_identical_neg"] = {"count": len(skipped), "indices": skipped}
        finalize(out, info, num_shards)
        if skipped:
            head = ", ".join(str(i) for i in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            print(
                f"skipped {len(skipped)} of {n} prompts whose degraded prompt equals the prompt "
                f"(one word or emoji only; index {head}); recorded in info.json",
                file=sys.stderr,
            )
        if perturb == "llm":
            print(
                f"llm perturbation: {info['llm_fallbacks']} of {n} prompts fell back to random_removal"
            )
    _barrier()
    return out


def _check_existing(path: Path, params: dict, prompts: list[str]) -> None:
    try:
        _, recs, old = read_shard_header(path)
    except Exception:
        raise ValueError(f"{path}: unreadable shard; delete it and rerun") from None
    if old != json.loads(json.dumps(params, sort_keys=True)):
        raise ValueError(f"{path}: made with different settings; use a fresh --out directory")
    if any(r["index"] >= len(prompts) or prompts[r["index"]] != r["prompt"] for r in recs):
        raise ValueError(f"{path}: made from different prompts; use a fresh --out directory")


def _count_fallbacks(out: Path, num_shards: int) -> int:
    return sum(
        bool(r.get("llm_fallback"))
        for k in range(num_shards)
        for r in read_shard_header(shard_path(out, k))[1]
    )


def _make_shard(
    backbone, prompts, idx, variant, perturb, seed, steps, guidance, batch_size, resolution,
    task, llm, bar,
):  # fmt: skip
    """Records and (x0_w, x0_l) latents for prompt indices ``idx``; also the fallback count."""
    n = len(prompts)
    rngs = [_stream(seed, i, 1) for i in idx]
    if perturb == "llm":
        res = llm.perturb([prompts[i] for i in idx], rngs, task)
        negs, fell = res.prompts, res.fell_back
    else:
        negs = [random_removal(prompts[i], rng) for i, rng in zip(idx, rngs, strict=True)]
        fell = [False] * len(idx)
    records, skipped = [], []
    for i, neg, fb in zip(idx, negs, fell, strict=True):
        if variant in DEGRADED_VARIANTS and neg.strip() == prompts[i].strip():
            skipped.append(i)  # c- == c (one word, emoji only): winner and loser would agree
            continue
        rec = dict(index=i, prompt=prompts[i], neg_prompt=neg, variant=variant, seed=seed)
        if variant != "paired":
            rec["partner"] = partner_index(seed, i, n)
        if variant == "rand_positive":
            rec["pos_prompt"] = prompts[rec["partner"]]
        if perturb == "llm":
            rec["llm_fallback"] = bool(fb)
        records.append(rec)
    empty = torch.empty(0, *backbone.latent_shape(resolution))
    xw, xl = [empty], [empty]
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        if variant == "paired":
            # loser from c- with the winner's own initial noise
            texts = [r["prompt"] for r in chunk] + [r["neg_prompt"] for r in chunk]
            seeds = [r["index"] for r in chunk] * 2
        else:
            # loser = the partner's winner image, regenerated from the partner's seed
            texts = [r["prompt"] for r in chunk] + [prompts[r["partner"]] for r in chunk]
            seeds = [r["index"] for r in chunk] + [r["partner"] for r in chunk]
        gens = [prompt_generator(seed, j) for j in seeds]
        lat = backbone.generate(
            texts, gens, steps=steps, guidance=guidance, resolution=resolution
        ).cpu()  # (2b, C, h, w)
        w, l_ = lat.chunk(2)
        xw.append(w)
        xl.append(l_)
        if bar is not None:
            bar.update(len(chunk))
    fallbacks = sum(f for i, f in zip(idx, fell, strict=True) if i not in skipped)
    return records, torch.cat(xw), torch.cat(xl), fallbacks, skipped


# ------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="make_pairs.py",
        description="Build a label-free preference-pair dataset (x0_w, x0_l, c, c-) by prompt "
        "perturbation (DDSPO paper Sec. 3.3/4.4). Resumable; runs under torchrun.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", metavar="DIR", help="local diffusers pipeline directory")
    src.add_argument("--tiny", choices=BACKBONES, help="tiny random backbone (tests, smoke runs)")
    p.add_argument("--prompts", metavar="FILE", help=".txt (one per line) or .jsonl ({\"prompt\": ...}); "
                   "default with --tiny: the built-in demo prompts")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument(
        "--variant", choices=VARIANTS, default="paired", help="pair construction (SPEC §5)"
    )
    p.add_argument("--perturb", choices=PERTURBS, default="random_removal", help="how c- is made")
    p.add_argument("--llm", metavar="DIR", help="local causal LM directory for --perturb llm")
    p.add_argument("--llm-max-new-tokens", type=int, default=256, help="LLM answer length")
    p.add_argument(
        "--task", choices=tuple(TASKS), default="alignment", help="LLM instruction template"
    )
    p.add_argument(
        "--steps", type=int, help="sampling steps (default: the backbone's paper setting)"
    )
    p.add_argument(
        "--guidance", type=float, help="CFG scale (default: the backbone's paper setting)"
    )
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument(
        "--seed", type=int, default=0, help="base seed; each prompt index derives its own"
    )
    p.add_argument("--shard-size", type=int, default=64, help="pairs per shard file")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per sampler call")
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument(
        "--prediction-type", choices=("epsilon", "v_prediction"), help="override (SD/SDXL)"
    )
    p.add_argument(
        "--latent-dtype", choices=tuple(LATENT_DTYPES), default="float16", help="storage dtype"
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="compute dtype of all networks")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        for name in ("steps", "shard_size", "batch_size", "max_prompts", "resolution"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if args.perturb == "llm" and not args.llm:
            raise ValueError("--perturb llm needs --llm DIR (a local causal LM)")
        prompts = cli_prompts(args.prompts, tiny=bool(args.tiny), max_prompts=args.max_prompts)
        from bench.t2i.backbones import load_backbone, tiny_backbone

        if args.tiny:
            backbone = tiny_backbone(args.tiny, prediction_type=args.prediction_type)
        else:
            backbone = load_backbone(args.pretrained, prediction_type=args.prediction_type)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    backbone.for_inference(device, getattr(torch, args.dtype))
    llm = None
    if args.perturb == "llm":
        from bench.t2i.llm import LocalLM

        try:
            llm = LocalLM(args.llm, device=device, max_new_tokens=args.llm_max_new_tokens)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        out = build_pairs(
            backbone,
            prompts,
            args.out,
            variant=args.variant,
            perturb=args.perturb,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            rank=rank,
            world=world,
            progress=not args.no_progress,
            resolution=args.resolution,
            task=args.task,
            llm=llm,
            latent_dtype=args.latent_dtype,
            prompts_file=args.prompts,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"wrote {len(prompts)} pairs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
