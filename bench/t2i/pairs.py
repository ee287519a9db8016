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
(:func:`bench.t2i.backbones.prompt_generator`; the partner's winner is regenerated from its
own seed), so shards can be made in any order, on any rank, and skipped when already on
disk: a shard is written to a temporary name and renamed, and a rerun skips finished
shards. With ``world > 1`` rank r makes shards k with ``k % world == r``; after a barrier
rank 0 merges the shard headers into ``metadata.jsonl`` and ``info.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.t2i.backbones import Backbone, prompt_generator
from bench.t2i.cli import SamplingArgs, opt
from bench.t2i.errors import UsageError
from bench.t2i.pairdata import (
    VARIANTS,
    finalize,
    read_shard_header,
    shard_path,
    shard_skipped,
    write_shard,
)
from minddspo.perturb import TASKS, random_removal

PERTURBS = ("random_removal", "llm")
# variants whose loser target uses the degraded prompt c-: a c- equal to c makes a void pair
DEGRADED_VARIANTS = ("paired", "not_paired")


#: the flag vocabulary of the latent storage dtype -> its name in the dataset's files
LATENT_STORAGE = {"fp16": "float16", "fp32": "float32"}


def latent_dtype_name(value: str) -> str:
    """Canonical ``fp16``/``fp32`` of a latent storage dtype (``float16``/``float32`` accepted)."""
    name = {v: k for k, v in LATENT_STORAGE.items()}.get(value, value)
    if name not in LATENT_STORAGE:
        raise UsageError(f"latent dtype must be one of fp16, fp32, got {value!r}")
    return name


def storage_dtype(value: str) -> str:
    """The dataset files' name (``float16``/``float32``) of a latent storage dtype."""
    return LATENT_STORAGE[latent_dtype_name(value)]


@dataclass
class PairConfig(SamplingArgs):
    """Everything that shapes a pair dataset (its ``info.json`` records these)."""

    variant: str = opt("paired", "pair construction (SPEC §5)", choices=VARIANTS)
    perturb: str = opt("random_removal", "how c- is made", choices=PERTURBS)
    task: str = opt("alignment", "LLM instruction template", choices=tuple(TASKS))
    shard_size: int = opt(64, "pairs per shard file")
    batch_size: int = opt(8, "pairs per sampler call (each call samples 2x as many images)")
    latent_dtype: str = opt(
        "fp16", "latent storage dtype", choices=tuple(LATENT_STORAGE), parse=latent_dtype_name
    )

    def check(self, world: int = 1) -> None:
        """Raise a one-line ``UsageError`` for a bad setting."""
        if self.variant not in VARIANTS:
            raise UsageError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.perturb not in PERTURBS:
            raise UsageError(f"perturb must be one of {PERTURBS}, got {self.perturb!r}")
        if self.task not in TASKS:
            raise UsageError(f"task must be one of {tuple(TASKS)}, got {self.task!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise UsageError("shard_size and batch_size must be >= 1")
        for name in ("steps", "resolution"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"{name} must be >= 1, got {v}")
        latent_dtype_name(self.latent_dtype)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world > 1 and not dist:
            raise ValueError("world > 1 needs an initialised torch.distributed process group")


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
    config: PairConfig | None = None,
    *,
    llm: Callable | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    prompts_file: str | None = None,
    base: dict | None = None,
    **overrides: Any,
) -> Path:
    """Generate the pair dataset for ``prompts`` into ``out_dir`` and return its path.

    ``config`` holds every setting that shapes the data (``overrides`` replace its fields,
    e.g. ``steps=2``). ``llm`` (for ``perturb="llm"``) is a :class:`bench.t2i.llm.LocalLM` or
    any object with a ``perturb(prompts, rngs, task) -> PerturbResult`` method. Finished
    shards are skipped; a shard made with different settings or prompts is an error.
    ``base`` (:func:`bench.t2i.provenance.base_record`) is recorded in ``info.json``. No
    pairs at all (every prompt skipped) is a ``UsageError``, and nothing is left behind.
    """
    cfg = dataclasses.replace(config or PairConfig(), **overrides)
    prompts = list(prompts)
    _check_inputs(cfg, world, llm, prompts)
    n = len(prompts)
    steps = cfg.steps or backbone.default_steps
    guidance = backbone.default_guidance if cfg.guidance is None else float(cfg.guidance)
    resolution = cfg.resolution or backbone.default_resolution
    variant, perturb, seed, task = cfg.variant, cfg.perturb, cfg.seed, cfg.task
    shard_size, latent_dtype = cfg.shard_size, storage_dtype(cfg.latent_dtype)
    latent_shape = list(backbone.latent_shape(resolution))
    out = Path(out_dir)
    created = not out.exists()
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
    todo = _unfinished_shards(out, params, prompts, num_shards, rank, world)
    bar = None
    if progress and rank == 0 and todo:
        from tqdm import tqdm

        total = sum(min(shard_size, n - k * shard_size) for k in todo)
        bar = tqdm(total=total, desc=f"pairs ({variant})", unit="pair")
    fallbacks = 0
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        run = dataclasses.replace(cfg, steps=steps, guidance=guidance, resolution=resolution)
        recs, xw, xl, fb, skipped = _make_shard(backbone, prompts, idx, run, llm, bar)
        for r, rec in enumerate(recs):
            rec.update(shard=k, row=r)
        fallbacks += fb
        write_shard(out, k, xw, xl, recs, params, latent_dtype, skipped)
    if bar is not None:
        bar.close()
    _barrier()
    if not any(read_shard_header(shard_path(out, k))[1] for k in range(num_shards)):
        _no_pairs(out, num_shards, n, variant, rank, created)
    if rank == 0:
        _finalize_pairs(out, dict(params, prompts_file=prompts_file, base=base), num_shards)
    _barrier()
    return out


def _check_inputs(cfg: PairConfig, world: int, llm: Callable | None, prompts: list[str]) -> None:
    """The settings, the language model ``perturb="llm"`` needs and the prompt count
    (a one-line ``UsageError``)."""
    cfg.check(world)
    if cfg.perturb == "llm" and llm is None:
        raise UsageError("perturb='llm' needs a local language model (--llm DIR)")
    if len(prompts) == 0:
        raise UsageError("no prompts")
    if cfg.variant != "paired" and len(prompts) < 2:
        raise UsageError(f"variant {cfg.variant!r} needs at least 2 prompts")


def _unfinished_shards(
    out: Path, params: dict, prompts: list[str], num_shards: int, rank: int, world: int
) -> list[int]:
    """This rank's shards still to make; a finished one must match ``params`` and
    ``prompts`` (:func:`_check_existing`)."""
    todo = []
    for k in (k for k in range(num_shards) if k % world == rank):
        path = shard_path(out, k)
        if path.is_file():
            _check_existing(path, params, prompts)
            continue
        todo.append(k)
    return todo


def _finalize_pairs(out: Path, info: dict, num_shards: int) -> None:
    """Rank 0, once every shard is written: info.json with the LLM fallbacks and the skipped
    prompts (both also said on the terminal)."""
    n, perturb = info["num_prompts"], info["perturb"]
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


def _no_pairs(out: Path, num_shards: int, n: int, variant: str, rank: int, created: bool) -> None:
    """Every prompt was skipped: remove the empty shards (they hold nothing), and the folders
    this call created if nothing else is in them, and raise."""
    if rank == 0:
        for k in range(num_shards):
            shard_path(out, k).unlink(missing_ok=True)
        for d in (shard_path(out, 0).parent, out) if created else (shard_path(out, 0).parent,):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    _barrier()
    raise UsageError(
        f"no pairs: all {n} prompts were skipped because the degraded prompt equals the "
        f"prompt (one word or emoji only; --variant {variant} needs c- != c); nothing "
        f"written to {out}"
    )


def _check_existing(path: Path, params: dict, prompts: list[str]) -> None:
    try:
        _, recs, old = read_shard_header(path)
    except Exception:
        raise UsageError(f"{path}: unreadable shard; delete it and rerun") from None
    if old != json.loads(json.dumps(params, sort_keys=True)):
        raise UsageError(f"{path}: made with different settings; use a fresh --out directory")
    if any(r["index"] >= len(prompts) or prompts[r["index"]] != r["prompt"] for r in recs):
        raise UsageError(f"{path}: made from different prompts; use a fresh --out directory")


def _count_fallbacks(out: Path, num_shards: int) -> int:
    return sum(
        bool(r.get("llm_fallback"))
        for k in range(num_shards)
        for r in read_shard_header(shard_path(out, k))[1]
    )


def _make_shard(backbone, prompts, idx, cfg: PairConfig, llm, bar):
    """Records and (x0_w, x0_l) latents for prompt indices ``idx``; also the fallback count.
    ``cfg`` has steps, guidance and resolution resolved for the backbone."""
    n = len(prompts)
    variant, perturb, seed, batch_size = cfg.variant, cfg.perturb, cfg.seed, cfg.batch_size
    rngs = [_stream(seed, i, 1) for i in idx]
    if perturb == "llm":
        res = llm.perturb([prompts[i] for i in idx], rngs, cfg.task)
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
    empty = torch.empty(0, *backbone.latent_shape(cfg.resolution))
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
            texts, gens, steps=cfg.steps, guidance=cfg.guidance, resolution=cfg.resolution
        ).cpu()  # (2b, C, h, w)
        w, l_ = lat.chunk(2)
        xw.append(w)
        xl.append(l_)
        if bar is not None:
            bar.update(len(chunk))
    fallbacks = sum(f for i, f in zip(idx, fell, strict=True) if i not in skipped)
    return records, torch.cat(xw), torch.cat(xl), fallbacks, skipped
