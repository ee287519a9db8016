"""Stable reference-model updates (Kang et al. 2025, "Rethinking DPO in Diffusion Models"; SPEC §4).

The rule is pure: it says *when* to copy the trained weights into the reference and
*when* to stop; the caller owns the weights. Not an EMA and not a loss term.

Per step ``k`` (1-based count of optimizer steps done):

1. if the reference is not frozen and ``k % tau == 0``: copy policy -> reference;
2. right after a copy, estimate the divergence ``D`` of the reference from the initial
   model on a few winner samples (:func:`divergence_estimate`);
3. if ``D > delta`` the reference is frozen from then on (the copy that crossed stays:
   freezing stops *further* updates, it does not roll back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .losses import per_sample_error

REF_UPDATES = ("frozen", "periodic")


@dataclass(frozen=True)
class ReferenceUpdateRule:
    """``mode='frozen'`` never updates; ``'periodic'`` copies every ``tau`` steps until ``D > delta``."""

    mode: str = "frozen"
    tau: int = 32  # Kang et al. use 16, 32 or 64
    delta: float = 0.005  # 0.005 for SD-1.5, 0.002 for SDXL

    def __post_init__(self) -> None:
        if self.mode not in REF_UPDATES:
            raise ValueError(f"ref update must be one of {REF_UPDATES}, got {self.mode!r}")
        if int(self.tau) < 1:
            raise ValueError(f"ref tau must be >= 1, got {self.tau}")
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"ref delta must be finite and > 0, got {self.delta}")

    def copy_due(self, step: int, frozen: bool) -> bool:
        """Copy the policy into the reference after optimizer step ``step`` (1-based)?"""
        return self.mode == "periodic" and not frozen and step > 0 and step % self.tau == 0

    def freezes(self, divergence: float) -> bool:
        """Does an estimated divergence freeze the reference? (strictly above ``delta``)"""
        return self.mode == "periodic" and divergence > self.delta


def divergence_estimate(
    ref_pred: Tensor, init_pred: Tensor, weight: Tensor | None = None
) -> Tensor:
    """``D = E[c_t e(f_ref, f_init)]`` >= 0: divergence of the reference from the initial model.

    For Gaussian reverse kernels with a shared variance, ``KL(p_ref || p_init)`` at step
    ``t`` is ``c_t ||mu_ref - mu_init||^2`` and the means differ only through the
    predictions, so the KL is proportional to the squared distance of the two models'
    predictions on the same noised sample (Kang et al. Eq. 8, Gaussian form; SPEC §4).
    ``ref_pred`` and ``init_pred`` are the current reference's and the initial model's
    predictions on the same noised winner samples, ``(B, ...)``; ``weight`` ``(B,)`` is
    ``c_t`` (None: 1, i.e. the per-dim mean squared distance). Scalar float32, 0 exactly
    when the two agree, growing with their distance whichever way the reference moved.
    """
    d = per_sample_error(ref_pred, init_pred)
    if weight is not None:
        d = d * weight.float()
    return d.mean()
