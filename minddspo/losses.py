"""Preference losses for diffusion models: Diffusion-DPO, DDSPO, DSPO and DSPO+CPP.

Every method is a pure function of network predictions (SPEC §2-§3). The caller runs
the networks, picks the targets and reduces the returned per-sample loss; nothing here
draws noise or touches a model. All arithmetic is float32 whatever the input dtype.

Shapes (``...`` = any number of non-batch dims, identical across all tensors):
    pred_w, pred_l   (B, ...)  policy  f_theta(x_t^w, t, c), f_theta(x_t^l, t, c)
    ref_w, ref_l     (B, ...)  reference f_ref(x_t^w, t, c), f_ref(x_t^l, t, c)
    target_w/_l      (B, ...)  what the winner / loser branch is scored against
    ref_l_neg        (B, ...)  f_ref(x_t^l, t, c-)  (DDSPO's losing-policy target)
    logit_weight, loss_weight  (B,)

``beta`` (and DSPO's ``beta_logit``) is a float, or a ``(B,)`` tensor with one value per
sample, so that a batched sweep can put runs of different strengths in one call: every
sample's result equals, bit for bit, what a call on the same batch with its value as a
float gives for it. (Across *different* batches a sample's last bit can move: torch's CPU
exp/log kernels round a vectorised block and a leftover tail differently.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLoss(NamedTuple):
    """Unreduced loss plus detached diagnostics; every field has shape ``(B,)``."""

    loss: Tensor  # per-sample loss, carries the gradient; the caller reduces it
    logits: Tensor  # s of SPEC §2 (detached)
    implicit_acc: Tensor  # 1.0 where s > 0 else 0.0
    gap_w: Tensor  # e(p_w, y_w) - e(r_w, y_w): < 0 means the policy beats the ref on the winner
    gap_l: Tensor  # e(p_l, y_l) - e(r_l, y_l): > 0 means the policy moved away on the loser
    err_w: Tensor  # e(p_w, y_w)
    err_l: Tensor  # e(p_l, y_l)


# ------------------------------------------------------------------ validation


def _per_sample(value: object) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0


def _check_beta(
    name: str, value: float | Tensor, batch: int | None = None, device=None
) -> float | Tensor:
    """A positive finite number (a 0-dim tensor counts as one), or a ``(B,)`` float tensor of
    them, one per sample. A per-sample tensor is checked once ``batch`` is known (until then
    it is returned as given) and moved to ``device``."""
    if _per_sample(value):
        if batch is None:
            return value
        if not value.is_floating_point() or value.shape != (batch,):
            raise ValueError(
                f"{name} as a tensor must be floating point of shape ({batch},), "
                f"got {value.dtype} {tuple(value.shape)}"
            )
        v = value.detach().to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            raise ValueError(f"{name} must be finite and > 0 in every sample")
        return v
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def _check_tensors(named: dict[str, Tensor]) -> int:
    """All tensors float, same shape, non-empty batch; returns B."""
    first_name, first = None, None
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.ndim == 0:
            raise ValueError(f"{name} must have a batch dimension, got a scalar")
        if first is None:
            first_name, first = name, x
        elif x.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {first_name} has {tuple(first.shape)}"
            )
    assert first is not None
    if first.shape[0] == 0:
        raise ValueError(f"{first_name} has an empty batch")
    return first.shape[0]


def _check_weight(name: str, w: Tensor | None, batch: int) -> Tensor | None:
    if w is None:
        return None
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape ({batch},)")
    if w.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(w.shape)}")
    return w.float()


# ------------------------------------------------------------------------ core


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """``e(pred, target)``: mean over non-batch dims of the squared error, float32, ``(B,)``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _core(pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight):
    """The shared Diffusion-DPO logit (SPEC §2) and its ingredients, all ``(B,)`` float32."""
    err_w, err_l = per_sample_error(pred_w, target_w), per_sample_error(pred_l, target_l)
    with torch.no_grad():  # the reference is frozen: its errors are constants
        ref_err_w, ref_err_l = per_sample_error(ref_w, target_w), per_sample_error(ref_l, target_l)
    gap_w, gap_l = err_w - ref_err_w, err_l - ref_err_l
    s = -0.5 * beta * (gap_w - gap_l)
    if logit_weight is not None:
        s = logit_weight * s  # Kang et al.'s lambda(t) scales the reward inside the sigmoid
    return s, gap_w, gap_l, err_w, err_l


def _validated_core(pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight, names):
    batch = _check_tensors(
        dict(zip(names, (pred_w, pred_l, ref_w, ref_l, target_w, target_l), strict=True))
    )
    beta = _check_beta("beta", _check_beta("beta", beta), batch, pred_w.device)
    logit_weight = _check_weight("logit_weight", logit_weight, batch)
    return batch, _core(pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight)


_DPO_NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "target_w", "target_l")
_CPP_NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "ref_w", "ref_l_neg")


def _package(loss, s, gap_w, gap_l, err_w, err_l, loss_weight) -> PreferenceLoss:
    if loss_weight is not None:
        loss = loss * loss_weight
    d = s.detach()
    return PreferenceLoss(
        loss=loss,
        logits=d,
        implicit_acc=(d > 0).float(),
        gap_w=gap_w.detach(),
        gap_l=gap_l.detach(),
        err_w=err_w.detach(),
        err_l=err_l.detach(),
    )


def preference_logits(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    *,
    beta: float | Tensor,
    logit_weight: Tensor | None = None,
) -> Tensor:
    """The preference logit of SPEC §2, with gradient, ``(B,)`` float32::

        s = -0.5 beta [(e(p_w,y_w) - e(r_w,y_w)) - (e(p_l,y_l) - e(r_l,y_l))]

    (Wallace et al. 2024, Eq. 14; DDSPO paper Eq. 4.) ``beta`` follows the Diffusion-DPO
    reference code, where ``beta = 5000`` includes the 0.5.
    """
    _, (s, *_) = _validated_core(
        pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight, _DPO_NAMES
    )
    return s


def _logistic_loss(
    pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight, loss_weight, names
) -> PreferenceLoss:
    batch, (s, gap_w, gap_l, err_w, err_l) = _validated_core(
        pred_w, pred_l, ref_w, ref_l, target_w, target_l, beta, logit_weight, names
    )
    loss_weight = _check_weight("loss_weight", loss_weight, batch)
    return _package(F.softplus(-s), s, gap_w, gap_l, err_w, err_l, loss_weight)  # -log sigma(s)


def dpo_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    *,
    beta: float | Tensor,
    logit_weight: Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> PreferenceLoss:
    """Diffusion-DPO (Wallace et al. 2024, Eq. 14): ``-log sigma(s)`` per sample.

    ``target_w``/``target_l`` are the forward-process targets of each branch (``eps`` for
    epsilon models, ``v`` for v-prediction, ``eps - x0`` for flow).
    """
    return _logistic_loss(
        pred_w,
        pred_l,
        ref_w,
        ref_l,
        target_w,
        target_l,
        beta,
        logit_weight,
        loss_weight,
        _DPO_NAMES,
    )


def ddspo_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    ref_l_neg: Tensor,
    *,
    beta: float | Tensor,
    logit_weight: Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> PreferenceLoss:
    """DDSPO with the prompt-perturbed reference as contrastive policy pair (paper Eq. 5).

    The shared core with targets ``(ref_w, ref_l_neg)``: the winner term is a distillation
    toward ``f_ref(x_t^w, c)`` (its reference part is exactly 0) and the loser term
    penalises moving closer to ``f_ref(x_t^l, c-)`` than the reference itself is.
    For guided targets or any other policy pair, call :func:`dpo_loss` with those targets.
    """
    return _logistic_loss(
        pred_w, pred_l, ref_w, ref_l, ref_w, ref_l_neg, beta, logit_weight, loss_weight, _CPP_NAMES
    )


def _score_matching_loss(
    pred_w, pred_l, ref_w, ref_l, reward_w, reward_l, target_w, beta, beta_logit, loss_weight, names
) -> PreferenceLoss:
    """DSPO's regression (SPEC §3): reward targets in the logit, ``target_w`` in the residual."""
    beta = _check_beta("beta", beta)  # a number now; a per-sample tensor once B is known
    beta_logit = beta if beta_logit is None else _check_beta("beta_logit", beta_logit)
    batch, (s, gap_w, gap_l, err_w, err_l) = _validated_core(
        pred_w, pred_l, ref_w, ref_l, reward_w, reward_l, beta_logit, None, names[:6]
    )
    _check_tensors({names[0]: pred_w, names[6]: target_w})
    beta = _check_beta("beta", beta, batch, pred_w.device)
    loss_weight = _check_weight("loss_weight", loss_weight, batch)
    p_w = pred_w.float()
    # (1 - sigma(s)) is not detached, as in the official DSPO code (SPEC §3).
    k = (beta * torch.sigmoid(-s)).reshape(batch, *([1] * (p_w.ndim - 1)))
    resid = (p_w - target_w.float()) - k * (p_w - ref_w.float())
    loss = resid.pow(2).flatten(1).mean(1)
    return _package(loss, s, gap_w, gap_l, err_w, err_l, loss_weight)


_DSPO_DOC_REGIMES = """
    **Two scales.** ``beta`` multiplies the preference term outside; ``beta_logit`` scales
    the reward inside the sigmoid (``None``: the same value as ``beta``, as the official
    code does). Which values are meaningful, and why the official ``beta = 0.001`` alone is
    numerically SFT: SPEC §3.
"""


def dspo_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    target_w: Tensor,
    target_l: Tensor,
    *,
    beta: float | Tensor,
    beta_logit: float | Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> PreferenceLoss:
    """DSPO (Zhu et al., ICLR 2025; DDSPO paper Eq. 6 / Eq. 33), official SD-1.5 form::

        loss = mean_dims || (p_w - y_w) - beta (1 - sigma(s)) (p_w - r_w) ||^2

    ``s`` is the logit of SPEC §2 with ``beta_logit`` and the forward-process targets
    ``(y_w, y_l)``, as in Diffusion-DPO; ``sigma(s)`` is not detached (official code). Only
    the winner is regressed; the loser enters only through ``s``. ``A(t)`` is dropped, as
    in DSPO and the DDSPO appendix.
    """
    return _score_matching_loss(
        pred_w,
        pred_l,
        ref_w,
        ref_l,
        target_w,
        target_l,
        target_w,
        beta,
        beta_logit,
        loss_weight,
        _DPO_NAMES + ("target_w",),
    )


def dspo_cpp_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    ref_l_neg: Tensor,
    target_w: Tensor,
    *,
    beta: float | Tensor,
    beta_logit: float | Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> PreferenceLoss:
    """DSPO+CPP (DDSPO paper Sec. 3.4, Eq. 33 with the redefined reward ``r_theta``)::

        s    = logit of SPEC §2 with reward targets (q_w, q_l) = (r_w, f_ref(x_t^l, c-))
        loss = mean_dims || (p_w - y_w) - beta (1 - sigma(s)) (p_w - r_w) ||^2

    The paper only redefines the reward with the contrastive policy pair; the regression
    term keeps ``target_w`` = ``y_w``, the winner's *forward-process* target (eps^w / v^w /
    flow target). At the reference ``s = 0``, the loss is ``e(r_w, y_w)`` and its gradient
    is SFT's times ``(1 - beta/2)``: not 0, so a fine-tune leaves the reference.
    With ``(q_w, q_l) = (y_w, y_l)`` it is :func:`dspo_loss`.
    """
    return _score_matching_loss(
        pred_w,
        pred_l,
        ref_w,
        ref_l,
        ref_w,
        ref_l_neg,
        target_w,
        beta,
        beta_logit,
        loss_weight,
        _CPP_NAMES + ("target_w",),
    )


dspo_loss.__doc__ += _DSPO_DOC_REGIMES
dspo_cpp_loss.__doc__ += _DSPO_DOC_REGIMES


def dspo_pair_loss(
    pred_w: Tensor,
    pred_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    reward_target_w: Tensor,
    reward_target_l: Tensor,
    target_w: Tensor,
    *,
    beta: float | Tensor,
    beta_logit: float | Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> PreferenceLoss:
    """DSPO with any contrastive policy pair ``(q_w, q_l)`` as reward targets (paper Sec. 3.2).

    :func:`dspo_loss` is ``(q_w, q_l) = (y_w, y_l)``; :func:`dspo_cpp_loss` is
    ``(r_w, f_ref(x_t^l, c-))``; guided targets or a winner/loser fine-tune pair go here.
    The regression term always uses the forward-process ``target_w``.
    """
    names = ("pred_w", "pred_l", "ref_w", "ref_l", "reward_target_w", "reward_target_l")
    return _score_matching_loss(
        pred_w,
        pred_l,
        ref_w,
        ref_l,
        reward_target_w,
        reward_target_l,
        target_w,
        beta,
        beta_logit,
        loss_weight,
        names + ("target_w",),
    )


def sft_loss(pred: Tensor, target: Tensor, *, loss_weight: Tensor | None = None) -> PreferenceLoss:
    """Supervised fine-tuning on winners only: ``loss = e(pred, target)`` per sample.

    Returned as a :class:`PreferenceLoss` so callers need no branch; there is no logit, so
    ``logits``, ``implicit_acc``, ``gap_w``, ``gap_l`` and ``err_l`` are NaN (undefined),
    and ``err_w`` is the error itself.
    """
    batch = _check_tensors({"pred": pred, "target": target})
    loss = per_sample_error(pred, target)
    w = _check_weight("loss_weight", loss_weight, batch)
    nan = torch.full_like(loss, float("nan")).detach()
    return PreferenceLoss(
        loss=loss if w is None else loss * w,
        logits=nan,
        implicit_acc=nan,
        gap_w=nan,
        gap_l=nan,
        err_w=loss.detach(),
        err_l=nan,
    )
