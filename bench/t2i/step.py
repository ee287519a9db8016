"""One training step's math, shared by the trainer and the step benchmark.

:func:`loss_spec` resolves, once before the loop, what a step computes (:class:`LossSpec`:
the method and its betas, the timestep weight, the process the loss compares in, the
reference rows, where the contrastive targets come from). :func:`compute_loss` then reads
as the official trainers' ``training_step``: noise, one reference forward, one policy
forward, :func:`minddspo.methods.method_loss`. :func:`encode_step` encodes a batch's
prompts in one text-encoder call; :func:`draw_noise` and :func:`drop_prompts` draw a step's
randomness from one generator per pair (:func:`train_process`: the training timesteps'
process); :func:`build_optimizer` builds AdamW or Adafactor with the linear warmup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bench.t2i.backbones import Backbone, Cond
from bench.t2i.config import TrainConfig
from bench.t2i.errors import UsageError
from bench.t2i.reference import Reference
from minddspo.methods import method_loss, method_spec
from minddspo.process import DiffusionProcess
from minddspo.schedules import append_dims, cfg_combine

DIAG_KEYS = ("implicit_acc", "gap_w", "gap_l", "err_w", "err_l")
PAIR_SFT_KEYS = ("loss_winner", "loss_loser")  # sft --sft-branch pair: each side's own loss


def encode_step(
    backbone: Backbone,
    prompts: list[str],
    neg_prompts: list[str],
    *,
    need_neg,
    need_uncond,
    encode_empty: bool = False,
) -> tuple[Cond, Cond | None, Cond | None]:
    """Encode the step's unique prompts in ONE text-encoder call -> ``(c, c-, ∅)`` per row.

    ``encode_empty`` (``--dropped-prompt-encoding encoded``): a prompt ``""`` in ``prompts``
    or ``neg_prompts`` (one ``--proportion-empty-prompts`` dropped) goes through the text
    encoders even where the backbone gives ``""`` zero embeddings (SDXL), as Diffusion-DPO's
    SDXL trainer encodes it; the unconditional ``∅`` keeps the pipeline's encoding."""
    raw = encode_empty and getattr(backbone, "zero_empty_prompt", False)
    texts = list(prompts)
    if need_neg:
        texts += neg_prompts
    if need_uncond and not raw:
        texts.append("")
    texts = list(dict.fromkeys(texts))  # unique, in order
    row = {p: i for i, p in enumerate(texts)}
    enc = backbone.encode_prompts(texts, encode_empty=raw)  # SDXL: "" through the CLIPs

    def pick(ps: list[str]) -> Cond:
        return enc.index(torch.tensor([row[p] for p in ps]))

    c_neg = pick(neg_prompts) if need_neg else None
    c_uncond = None
    if need_uncond:
        c_uncond = backbone.empty_cond(len(prompts)) if raw else pick([""] * len(prompts))
    return pick(prompts), c_neg, c_uncond


#: sft: the (side, prompt) each trained network regresses, by --sft-branch; pair: two networks
SFT_SIDES = {
    "winner": (("winner", "c"),),
    "loser": (("loser", "c"),),  # DD-CPP's losing model (official): x0_l with c
    "loser_neg": (("loser", "c_neg"),),  # variant: x0_l with the loser's prompt c-
    "pair": (("winner", "c"), ("loser", "c")),  # f_win and f_lose, one adapter each
}
#: where a CPP method's contrastive targets come from: its own c- reference row
#: (``reference``), CFG-combined reference rows (``guided``), a policy pair (``pair``);
#: ``none`` for the methods without CPP targets
CONTRASTS = ("none", "reference", "guided", "pair")


@dataclass(frozen=True)
class LossSpec:
    """What a training step computes, resolved once from the config (:func:`loss_spec`)."""

    method: str
    beta: float
    beta_logit: float | None  # the DSPO family's inside beta; None for the other methods
    weight_kind: str  # --timestep-weight: none | lambda | linear
    process: DiffusionProcess  # the targets and prediction outputs the loss compares
    ref_rows: tuple[str, ...]  # rows of the one reference forward (:func:`_reference_forward`)
    contrast: str = "none"  # one of CONTRASTS
    guidance: float = 1.0  # contrast "guided": the CFG scale W of the targets
    kept_forward: bool = False  # --rand-cond-kept forward: unswapped rows on y_w, y_l
    sft_sides: tuple[tuple[str, str], ...] = ()  # sft: SFT_SIDES[--sft-branch]


def loss_spec(cfg: TrainConfig, backbone: Backbone) -> LossSpec:
    """The step of a resolved ``cfg`` on ``backbone``: which loss, which reference rows,
    which contrastive targets. The trainer and the step benchmark call it before their loop."""
    spec = method_spec(cfg.method)
    contrast = "none"
    if spec.cpp:
        contrast = "pair" if cfg.policy_pair else "reference"
        contrast = "guided" if cfg.target_guidance != 1.0 else contrast
    rows = spec.ref_rows(policy_pair=contrast == "pair")  # sft: none
    if contrast == "guided":  # the guided targets also need f_ref(., ∅)
        rows += ("w_uncond", "l_uncond")
    return LossSpec(
        method=cfg.method,
        beta=cfg.beta,
        beta_logit=cfg.beta_logit if spec.score_matching else None,
        weight_kind=cfg.timestep_weight,
        process=loss_process(cfg, backbone),
        ref_rows=rows,
        contrast=contrast,
        guidance=cfg.target_guidance,
        kept_forward=cfg.rand_cond_kept == "forward",
        sft_sides=() if spec.preference else SFT_SIDES[cfg.sft_branch],
    )


def compute_loss(
    spec: LossSpec,
    backbone: Backbone,
    policy: torch.nn.Module,  # sft --sft-branch pair: (winner, loser), both trained
    reference: Reference | None,
    x0_w: torch.Tensor,  # (B, C, h, w) winner latents
    x0_l: torch.Tensor,  # (B, C, h, w) loser latents
    conds: tuple[Cond, Cond | None, Cond | None],  # c, c- (CPP methods), ∅ (target guidance)
    t: torch.Tensor,  # (B,) network timesteps, shared by both branches (SPEC §1)
    noise_w: torch.Tensor,  # (B, C, h, w)
    noise_l: torch.Tensor,  # (B, C, h, w); the same tensor unless --independent-noise
    pair: tuple[torch.nn.Module, torch.nn.Module] | None = None,  # (f_win, f_lose)
    swapped: torch.Tensor | None = None,  # (B,) bool: rows swapped by --rand-cond-prompts
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss ``(B,)`` of ``spec.method`` and detached diagnostics.

    Noise both sides, one reference forward (no grad) on the rows ``spec.ref_rows`` names,
    one policy forward on ``[x_t^w; x_t^l]``, then :func:`minddspo.methods.method_loss`,
    which decides what the loss compares and where the timestep weight goes. The contrastive
    targets of a CPP method come from ``spec.contrast``; with ``swapped`` (random-condition
    mixing, :mod:`bench.t2i.randcond`) and ``spec.kept_forward`` they are used on the
    swapped rows only, the forward-process targets on the others. sft regresses each of its
    ``spec.sft_sides`` (``policy`` is ``(winner, loser)`` for two sides; the loss is their
    sum, each side's in the diagnostics, :data:`PAIR_SFT_KEYS`).
    """
    if (pair is not None) != (spec.contrast == "pair"):
        raise ValueError(f"a policy pair must be given exactly when the contrast is 'pair' "
                         f"(it is {spec.contrast!r})")  # fmt: skip
    out = spec.process.output
    x_w, x_l = backbone.noise(x0_w, noise_w, t), backbone.noise(x0_l, noise_l, t)
    y_w, y_l = spec.process.target(x0_w, noise_w, t), spec.process.target(x0_l, noise_l, t)
    weight = backbone.t_weight(spec.weight_kind, t)
    if spec.sft_sides:
        sides = {"winner": (x_w, y_w), "loser": (x_l, y_l)}
        return _sft_loss(spec, backbone, policy, sides, conds, t, weight)
    c = conds[0]
    ref = _reference_forward(spec, backbone, reference, (x_w, x_l), conds, t)
    x_wl, t2 = torch.cat([x_w, x_l]), t.repeat(2)
    pred_w, pred_l = out(backbone.forward(policy, x_wl, t2, c.cat(c)), x_wl, t2).chunk(2)
    kept = swapped if spec.kept_forward else None
    pair_w, pair_l = _contrast(spec, backbone, ref, pair, (x_w, x_l), c, t, (y_w, y_l), kept)
    loss = method_loss(
        spec.method,
        pred_w=pred_w,
        pred_l=pred_l,
        ref_w=ref["w"],
        ref_l=ref["l"],
        ref_l_neg=ref.get("l_neg"),
        target_w=y_w,
        target_l=y_l,
        pair_w=pair_w,
        pair_l=pair_l,
        beta=spec.beta,
        beta_logit=spec.beta_logit,
        weight=weight,
        weight_kind=spec.weight_kind,
    )
    return loss.loss, _diag(loss)


def _sft_loss(spec, backbone, policy, sides, conds, t, weight):
    """sft: each network on its side's forward-process target; the sum, and with two sides
    each one's loss as a diagnostic."""
    nets = policy if isinstance(policy, tuple) else (policy,)
    prompts = {"c": conds[0], "c_neg": conds[1]}
    losses = {}
    for net, (side, prompt) in zip(nets, spec.sft_sides, strict=True):
        x, target = sides[side]
        pred = spec.process.output(backbone.forward(net, x, t, prompts[prompt]), x, t)
        losses[side] = method_loss(
            "sft", pred_w=pred, target_w=target, weight=weight, weight_kind=spec.weight_kind
        ).loss
    if len(losses) == 1:
        return losses[spec.sft_sides[0][0]], {}
    diag = {f"loss_{k}": v.detach() for k, v in losses.items()}
    return losses["winner"] + losses["loser"], diag


def _reference_forward(spec, backbone, reference, xs, conds, t) -> dict:
    """One batched reference forward over ``spec.ref_rows``, by name::

    w  f_ref(x_t^w, c)   l  f_ref(x_t^l, c)   l_neg  f_ref(x_t^l, c-)
    w_uncond, l_uncond   f_ref(x_t^w, ∅), f_ref(x_t^l, ∅)   (guided targets, SPEC §2)
    """
    (x_w, x_l), (c, c_neg, c_uncond) = xs, conds
    rows = {
        "w": (x_w, c), "l": (x_l, c), "l_neg": (x_l, c_neg),
        "w_uncond": (x_w, c_uncond), "l_uncond": (x_l, c_uncond),
    }  # fmt: skip
    xs_, cs = zip(*(rows[n] for n in spec.ref_rows), strict=True)
    k = len(spec.ref_rows)
    x_k, t_k = torch.cat(xs_), t.repeat(k)
    pred = spec.process.output(reference(x_k, t_k, cs[0].cat(*cs[1:])), x_k, t_k)
    return dict(zip(spec.ref_rows, pred.chunk(k), strict=True))


def _contrast(spec, backbone, ref, pair, xs, c, t, ys, swapped):
    """The contrastive targets ``(pair_w, pair_l)`` of ``spec.contrast``, or ``(None, None)``
    where the method reads its own reference rows. ``swapped`` (kept forward): the swapped
    rows take them, the others the forward-process targets ``ys``."""
    (x_w, x_l), out = xs, spec.process.output
    if spec.contrast == "pair":  # any contrastive policy pair (paper Sec. 3.2)
        with torch.no_grad():
            pair_w = out(backbone.forward(pair[0], x_w, t, c), x_w, t)
            pair_l = out(backbone.forward(pair[1], x_l, t, c), x_l, t)
    elif spec.contrast == "guided":  # guided reference targets (SPEC §2), a variant
        pair_w = cfg_combine(ref["w_uncond"], ref["w"], spec.guidance)
        pair_l = cfg_combine(ref["l_uncond"], ref["l_neg"], spec.guidance)
    elif spec.contrast == "reference" and swapped is not None:
        pair_w, pair_l = ref["w"], ref["l_neg"]
    else:
        return None, None
    if swapped is not None:
        swap = append_dims(swapped, ys[0].ndim)
        pair_w, pair_l = torch.where(swap, pair_w, ys[0]), torch.where(swap, pair_l, ys[1])
    return pair_w, pair_l


def loss_process(cfg: TrainConfig, backbone: Backbone):
    """The process whose ``target``/``output`` the loss compares: the backbone's, or with
    ``--precondition-outputs`` (flow backbones) the x0-space one (x0 targets, predictions
    ``x_t - sigma v``) for the policy, reference and policy-pair predictions alike. The guided
    targets (``cfg_combine``) commute with it: the map is affine in the prediction."""
    if not cfg.precondition_outputs:
        return backbone.process
    if not hasattr(backbone.process, "precondition_outputs"):
        raise UsageError(f"--precondition-outputs needs a flow backbone, not {backbone.name}")
    return dataclasses.replace(backbone.process, precondition_outputs=True)


def train_process(cfg: TrainConfig, backbone: Backbone):
    """The process training timesteps are drawn from: the backbone's, or with
    ``--train-shift s`` (flow backbones) the same with the resolution shift ``s``. Only the
    draw of ``t`` changes (``x_t``, targets and weights depend on ``sigma = t / T`` alone);
    sampling keeps the pipeline's shift."""
    shift = cfg.train_shift
    if shift is None or shift == getattr(backbone.schedule, "shift", None):
        return backbone.process
    if not hasattr(backbone.schedule, "shift"):
        raise UsageError(f"--train-shift needs a flow backbone, not {backbone.name}")
    schedule = dataclasses.replace(backbone.schedule, shift=float(shift))
    return dataclasses.replace(backbone.process, schedule=schedule)


def drop_prompts(
    cfg: TrainConfig, gens: list[torch.Generator], prompts: list[str], negs: list[str]
) -> tuple[list[str], list[str]]:
    """``--proportion-empty-prompts p``: each pair's prompt (and its degraded prompt) becomes
    "" with probability p, as the Diffusion-DPO and DSPO trainers do (their default 0.2), so
    the model keeps an unconditional branch for CFG; one uniform draw from each row's
    generator. p = 0 draws nothing."""
    p = cfg.proportion_empty_prompts
    if p <= 0:
        return list(prompts), list(negs)
    drop = [torch.rand(1, generator=g).item() < p for g in gens]
    return (
        ["" if d else c for c, d in zip(prompts, drop, strict=True)],
        ["" if d else c for c, d in zip(negs, drop, strict=True)],
    )


def draw_noise(
    cfg: TrainConfig, backbone: Backbone, gens: list[torch.Generator], x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Timesteps ``(B,)`` and forward noise ``(B, C, h, w)``, row i from ``gens[i]``
    (:func:`bench.t2i.data.row_generators`; drawn on the CPU, so a run does not depend on the
    device or on how its rows are split over ranks). Winner and loser share both unless
    --independent-noise. Each row draws t, then the winner's noise, then the loser's."""
    proc = train_process(cfg, backbone)
    t = torch.cat([proc.sample_t(1, g, cfg.timestep_sampler, cfg.timestep_gamma) for g in gens])
    noise_w = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    noise_l = noise_w
    if cfg.independent_noise:
        noise_l = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    return t.to(x0.device), noise_w.to(x0.device), noise_l.to(x0.device)


def _diag(out) -> dict[str, torch.Tensor]:
    return {k: getattr(out, k) for k in DIAG_KEYS}


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    if cfg.optimizer == "adafactor":  # Diffusion-DPO's SDXL setting: fixed lr, no relative step
        from transformers.optimization import Adafactor

        opt = Adafactor(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    else:
        opt = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
    warmup, start = cfg.warmup_steps, cfg.warmup_from  # linear warmup, then constant
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + start) / warmup) if warmup else 1.0
    )
    return opt, sched
