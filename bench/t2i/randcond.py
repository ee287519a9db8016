"""Random-condition mixing: unpaired TF-CPP supervision from extra prompts (``--rand-cond-prompts``).

The official DDSPO trainer's ``--rand_cond --extra_text_path`` (KU-MIIL/DDSPO,
``ddspo/data.py`` and ``ddspo/adapters/sd.py``), re-derived: every training row draws its
timestep first; with probability ``p(t / T)`` (:func:`rand_cond_probability`,
by default a sigmoid that is 1/2 at 70 % noise) its prompt pair ``(c, c-)`` is swapped for an
extra prompt and one of its degraded prompts, while its images ``(x0_w, x0_l)`` stay. A
swapped row trains towards the contrastive targets on the new prompts, ``f_ref(x_t^w, c')``
and ``f_ref(x_t^l, c'-)`` (a policy pair's or guided targets when those are on). A kept row
trains, by default (``--rand-cond-kept contrastive``, the official ``--cpp --rand_cond``),
towards the contrastive targets on its own prompts; with ``--rand-cond-kept forward`` (the
official ``--rand_cond`` without ``--cpp``) towards the forward-process targets, which is
Diffusion-DPO's loss for ``ddspo`` and DSPO's for ``dspo_cpp``. Which ``t`` decides the
swap: ``--rand-cond-timing`` (:func:`mix_rows`).

How it differs from the pair variants of ``make_pairs`` (SPEC §5): ``not_paired`` and
``rand_positive`` change which *images* form a pair when the data are made; this changes a
row's *prompts and targets* at training time, per step, depending on its noise level.

Extra prompt files: ``.jsonl`` lines ``{"prompt": ..., "neg_prompts": [...]}`` (the official
format; ``"neg_prompt": "..."`` also works) or ``.txt`` (one prompt per line; ``c'-`` is
then made by random word removal at draw time). Prompts that are in the training set and
``.jsonl`` entries with an empty prompt or no degraded prompt are left out, as the official
loader does; it keeps degraded prompts equal to their prompt, and so do we.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.t2i.errors import UsageError
from minddspo.perturb import random_removal

#: the swap schedules p(t / T) of ``--rand-cond-schedule`` (:func:`rand_cond_probability`)
RAND_COND_SCHEDULES = ("sigmoid", "exponential", "constant")


def rand_cond_probability(kind: str, frac: Tensor, lam: float = 20.0) -> Tensor:
    """Probability that a row is swapped to an unpaired prompt (random-condition mixing, the
    official DDSPO trainer's ``--rand_cond``), as a function of the noise level
    ``frac = t / T`` in [0, 1] (``sigma`` for flows):

    * ``sigmoid``     ``1 / (1 + exp(-lam (frac - 0.7)))``: mostly at high noise, half at 0.7;
    * ``exponential`` ``exp(-lam (1 - frac))``: 1 at pure noise, decaying towards data;
    * ``constant``    1 (the official ``constant_1``).

    float32, shaped like ``frac``.
    """
    frac = frac.float()
    if kind == "sigmoid":
        return torch.sigmoid(lam * (frac - 0.7))
    if kind == "exponential":
        return torch.exp(-lam * (1 - frac))
    if kind == "constant":
        return torch.ones_like(frac)
    raise ValueError(f"rand-cond schedule must be one of {RAND_COND_SCHEDULES}, got {kind!r}")


@dataclass(frozen=True)
class ExtraPrompt:
    prompt: str
    negs: tuple[str, ...]  # empty: c- by random word removal when drawn


def _jsonl_item(path: Path, n: int, line: str) -> ExtraPrompt | None:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise UsageError(f'{path}:{n}: expected an object with a "prompt" string')
    negs = item.get("neg_prompts", item.get("neg_prompt", []))
    negs = [negs] if isinstance(negs, str) else negs
    if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
        raise UsageError(f'{path}:{n}: "neg_prompts" must be a list of strings')
    # as the official loader: every listed degraded prompt counts, even one equal to the
    # prompt (that row's contrast is then zero); an empty list makes the entry unusable
    return ExtraPrompt(item["prompt"], tuple(negs)) if negs and item["prompt"] else None


def read_extra_prompts(
    paths: Sequence[str | Path], exclude: Iterable[str] = ()
) -> list[ExtraPrompt]:
    """The usable extra prompts of ``paths`` (see the module docstring); ``exclude``: the
    training set's prompts. Raises a one-line ``UsageError`` naming the file (and line)."""
    exclude = set(exclude)
    out: list[ExtraPrompt] = []
    for path in map(Path, paths):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UsageError(f"{path}: extra prompt file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read ({e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                item = _jsonl_item(path, n, line)
            else:
                item = ExtraPrompt(line.strip(), ()) if len(line.split()) > 1 else None
            if item is not None and item.prompt not in exclude:
                out.append(item)
    if not out:
        raise UsageError(
            f"no usable extra prompt in {', '.join(map(str, paths))} (each needs a degraded "
            "prompt, or two words for random removal; prompts of the "
            "training set are left out)"
        )
    return out


def mix_rows(
    prompts: Sequence[str],
    negs: Sequence[str],
    t: Tensor,
    num_train_timesteps: int,
    gens: Sequence[torch.Generator],
    extra: Sequence[ExtraPrompt],
    schedule: str = "sigmoid",
    lam: float = 20.0,
    timing: str = "step",
) -> tuple[list[str], list[str], Tensor]:
    """Swap rows to extra prompts with probability ``p(t / T)``; returns the new prompts,
    degraded prompts and the swap mask ``(B,)`` (bool, on ``t``'s device). Row i draws from
    ``gens[i]``, the same number of draws whatever is swapped, so its stream stays aligned.

    ``timing``: ``"step"`` decides with the step's ``t``; ``"independent"`` with a separate
    uniform integer draw ``t' ~ U{0, ..., T-1}`` per row, as the official SD3/SANA trainers
    (their data loader draws ``t'`` for the swap, their step then its own ``t``), so a row
    is swapped with probability ``E[p(t'/T)]`` (0.30 for the default sigmoid) at every
    noise level. On SD-1.x/SDXL the official trainer uses one draw for both (``"step"``)."""
    if timing not in ("step", "independent"):
        raise ValueError(f"rand-cond timing must be step or independent, got {timing!r}")
    out_p, out_n, swap = list(prompts), list(negs), []
    t_cpu = t.detach().cpu()
    for i, g in enumerate(gens):
        ti = t_cpu[i : i + 1]
        if timing == "independent":
            ti = torch.randint(num_train_timesteps, (1,), generator=g)
        p = rand_cond_probability(schedule, ti.float() / num_train_timesteps, lam)
        swap.append(bool(torch.rand(1, generator=g) < p))
        pick = int(torch.randint(len(extra), (1,), generator=g))
        which = torch.rand(1, generator=g).item()
        seed = int(torch.randint(0, 2**62, (1,), generator=g))  # random removal, this row
        if not swap[-1]:
            continue
        item = extra[pick]
        out_p[i] = item.prompt
        if item.negs:
            out_n[i] = item.negs[min(int(which * len(item.negs)), len(item.negs) - 1)]
        else:
            out_n[i] = random_removal(item.prompt, random.Random(seed))
    return out_p, out_n, torch.tensor(swap, dtype=torch.bool, device=t.device)
