"""One training step's math, shared by the trainer and the step benchmark.

:func:`encode_step` encodes a batch's prompts in one text-encoder call, :func:`compute_loss`
runs the policy and the reference rows the method needs (``minddspo.methods``) and returns
the method's loss and diagnostics, :func:`draw_noise` and :func:`drop_prompts` draw the
step's randomness from one generator per pair (:func:`train_process`: the training
timesteps' process), and :func:`build_optimizer` builds AdamW or Adafactor with the linear
warmup.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.t2i.backbones import Backbone, Cond
from bench.t2i.config import TrainConfig
from bench.t2i.errors import UsageError
from bench.t2i.reference import Reference
from minddspo.methods import method_loss, method_spec
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


def compute_loss(
    cfg: TrainConfig,
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
    """Per-sample loss ``(B,)`` of ``cfg.method`` and detached diagnostics.

    One policy forward on ``[x_t^w; x_t^l]`` and one reference forward on the rows the
    method table asks for (:meth:`minddspo.methods.MethodSpec.ref_rows`): ``[x_t^w|c,
    x_t^l|c]``, ``+ [x_t^l|c-]`` (ddspo, dspo_cpp), ``+ [x_t^w|∅, x_t^l|∅]`` (target
    guidance W != 1, SPEC §2). The reference runs first (no grad). Which tensors the loss
    compares and where the timestep weight goes is :func:`minddspo.methods.method_loss`'s.
    With ``swapped`` (random-condition mixing, :mod:`bench.t2i.randcond`) and
    ``--rand-cond-kept forward`` the contrastive targets are used on the swapped rows only,
    the forward-process targets on the others; with ``contrastive`` (the default) every row
    uses the contrastive targets and the swapped rows differ only in their prompts.
    sft with ``--sft-branch pair``: ``policy`` is ``(winner, loser)``, the loss the sum of
    the winner's on ``x_t^w`` and the loser's on ``x_t^l`` (both with ``c``), each side's in
    the diagnostics (:data:`PAIR_SFT_KEYS`).
    """
    if cfg.rand_cond_kept != "forward":  # contrastive (or unset): the mask changes nothing
        swapped = None
    c, c_neg, c_uncond = conds
    spec = method_spec(cfg.method)
    x_w, x_l = backbone.noise(x0_w, noise_w, t), backbone.noise(x0_l, noise_l, t)
    proc = loss_process(cfg, backbone)  # targets, and every prediction through proc.output
    y_w, y_l = proc.target(x0_w, noise_w, t), proc.target(x0_l, noise_l, t)
    w = backbone.t_weight(cfg.timestep_weight, t)
    beta, beta_logit = (cfg.beta, cfg.beta_logit) if spec.score_matching else (cfg.beta, None)
    if not spec.preference and cfg.sft_branch == "pair":  # both sides, one adapter each
        winner, loser = policy  # (f_win, f_lose) being trained: each on its side, with c
        per_side = {}
        for key, net, x, target in (("winner", winner, x_w, y_w), ("loser", loser, x_l, y_l)):
            pred = proc.output(backbone.forward(net, x, t, c), x, t)
            per_side[key] = method_loss(
                cfg.method, pred_w=pred, target_w=target, weight=w, weight_kind=cfg.timestep_weight
            ).loss
        diag = {f"loss_{k}": v.detach() for k, v in per_side.items()}
        return per_side["winner"] + per_side["loser"], diag
    if not spec.preference:  # sft: one side only, forward-process targets
        if cfg.sft_branch == "loser":  # DD-CPP's losing model (official): x0_l with c
            x, cc, target = x_l, c, y_l
        elif cfg.sft_branch == "loser_neg":  # variant: x0_l with the loser's prompt c-
            x, cc, target = x_l, c_neg, y_l
        else:  # the winners with c (also DD-CPP's winning model)
            x, cc, target = x_w, c, y_w
        pred = proc.output(backbone.forward(policy, x, t, cc), x, t)
        out = method_loss(
            cfg.method, pred_w=pred, target_w=target, weight=w, weight_kind=cfg.timestep_weight
        )
        return out.loss, {}

    ref = _reference_rows(cfg, backbone, reference, spec, (x_w, x_l), conds, t, pair, swapped)
    x_wl, t2 = torch.cat([x_w, x_l]), t.repeat(2)
    pred_w, pred_l = proc.output(backbone.forward(policy, x_wl, t2, c.cat(c)), x_wl, t2).chunk(2)
    pair_w, pair_l = _contrastive_targets(cfg, backbone, ref, (x_w, x_l), c, t, pair)
    if swapped is not None:  # --rand-cond-kept forward: contrastive on the swapped rows only
        if pair_w is None:
            pair_w, pair_l = ref["w"], ref["l_neg"]
        swap = append_dims(swapped, y_w.ndim)
        pair_w, pair_l = torch.where(swap, pair_w, y_w), torch.where(swap, pair_l, y_l)
    out = method_loss(
        cfg.method,
        pred_w=pred_w,
        pred_l=pred_l,
        ref_w=ref["w"],
        ref_l=ref["l"],
        ref_l_neg=ref.get("l_neg"),
        target_w=y_w,
        target_l=y_l,
        pair_w=pair_w,
        pair_l=pair_l,
        beta=beta,
        beta_logit=beta_logit,
        weight=w,
        weight_kind=cfg.timestep_weight,
    )
    return out.loss, _diag(out)


def _reference_rows(cfg, backbone, reference, spec, xs, conds, t, pair, swapped) -> dict:
    """One batched reference forward over the rows the loss needs, by name."""
    (x_w, x_l), (c, c_neg, c_uncond) = xs, conds
    rows = {"w": (x_w, c), "l": (x_l, c), "l_neg": (x_l, c_neg)}
    names = list(spec.ref_rows(policy_pair=pair is not None))
    if swapped is not None and pair is None and c_uncond is None and "l_neg" not in names:
        names.append("l_neg")  # the swapped rows' contrastive loser target
    if c_uncond is not None:  # guided targets also need f_ref(., ∅)
        rows |= {"w_uncond": (x_w, c_uncond), "l_uncond": (x_l, c_uncond)}
        names += ["w_uncond", "l_uncond"]
    xs_, cs = [rows[n][0] for n in names], [rows[n][1] for n in names]
    k = len(names)
    x_k, t_k = torch.cat(xs_), t.repeat(k)
    out = loss_process(cfg, backbone).output(reference(x_k, t_k, cs[0].cat(*cs[1:])), x_k, t_k)
    return dict(zip(names, out.chunk(k), strict=True))


def _contrastive_targets(cfg, backbone, ref, xs, c, t, pair):
    """A policy pair's predictions, or the guided reference targets; (None, None) when the
    method's own reference rows are the targets."""
    x_w, x_l = xs
    if pair is not None:  # any contrastive policy pair (paper Sec. 3.2)
        out = loss_process(cfg, backbone).output
        with torch.no_grad():
            return (
                out(backbone.forward(pair[0], x_w, t, c), x_w, t),
                out(backbone.forward(pair[1], x_l, t, c), x_l, t),
            )
    if "w_uncond" in ref:  # guided reference targets (SPEC §2), a variant, not DDSPO
        return (
            cfg_combine(ref["w_uncond"], ref["w"], cfg.target_guidance),
            cfg_combine(ref["l_uncond"], ref["l_neg"], cfg.target_guidance),
        )
    return None, None


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
