"""Timestep samplers and per-timestep weights (SPEC §4; Kang et al. 2025, "Rethinking DPO").

Index direction (as in :mod:`minddspo.schedules`): ``t = 0`` is the cleanest step and
``t = T - 1`` the noisiest. Every sampler takes a ``torch.Generator`` and draws nothing
from global state, so a run is reproducible from its seed alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

SAMPLERS = ("uniform", "geometric", "logit_normal")
WEIGHTS = ("none", "lambda", "linear")


def _check(batch: int, T: int) -> None:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T}")


def sample_uniform(batch: int, T: int, generator: torch.Generator | None = None) -> Tensor:
    """``t ~ U{0, ..., T-1}``, int64 ``(batch,)``."""
    _check(batch, T)
    return torch.randint(0, T, (batch,), generator=generator)


#: the geometric sampler's unit of time: gamma is the decay per 1/GEOMETRIC_UNITS of the schedule
GEOMETRIC_UNITS = 100


def geometric_probs(T: int, gamma: float = 0.9) -> Tensor:
    """``P(t) ∝ gamma^(100 k / T)`` with ``k = T - 1 - t``, float64 ``(T,)``.

    ``k`` counts steps down from the noisiest index, so for ``gamma < 1`` the mass sits at
    the high-noise end. That is the end where Kang et al. find the reward scale smallest
    (the preference signal is weakest when ``x_t`` says little about ``x0``), so sampling
    it more often counters the imbalance. ``gamma = 1`` is uniform; ``gamma > 1`` skews
    toward the clean end.

    The exponent is in *normalised* time (our choice, SPEC §4): ``gamma`` is the decay per
    1 % of the schedule, so one ``gamma`` gives the same distribution of ``t / T`` for
    ``T = 100`` (the toy, where this is exactly ``gamma^k``) and ``T = 1000`` (SD). With
    ``gamma = 0.9`` about 41 % of the draws fall in the noisiest 5 % of the steps for any
    ``T``; a per-index ``gamma^k`` would put 99.5 % there at ``T = 1000``.
    """
    _check(1, T)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    k = torch.arange(T - 1, -1, -1, dtype=torch.float64)  # k[t] = T - 1 - t
    logp = k * (GEOMETRIC_UNITS / T) * torch.log(torch.tensor(float(gamma), dtype=torch.float64))
    return torch.softmax(logp, dim=0)


def sample_geometric(
    batch: int, T: int, generator: torch.Generator | None = None, gamma: float = 0.9
) -> Tensor:
    """``t`` drawn from :func:`geometric_probs`, int64 ``(batch,)``."""
    _check(batch, T)
    return torch.multinomial(
        geometric_probs(T, gamma), batch, replacement=True, generator=generator
    )


def sample_logit_normal_u(
    batch: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    """``u = sigmoid(N(mean, std^2))`` in (0, 1), float32 ``(batch,)`` (SD3's default for flows)."""
    _check(batch, 1)
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))


def sample_timesteps(
    kind: str,
    batch: int,
    T: int,
    generator: torch.Generator | None = None,
    *,
    gamma: float = 0.9,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Discrete timesteps, int64 ``(batch,)``, from one of :data:`SAMPLERS`.

    ``logit_normal`` maps ``u`` to ``floor(u T)``, so it is symmetric about the middle step.
    """
    if kind == "uniform":
        return sample_uniform(batch, T, generator)
    if kind == "geometric":
        return sample_geometric(batch, T, generator, gamma)
    if kind == "logit_normal":
        u = sample_logit_normal_u(batch, generator, mean, std)
        return (u * T).long().clamp_(0, T - 1)
    raise ValueError(f"timestep sampler must be one of {SAMPLERS}, got {kind!r}")


def sample_flow_u(
    kind: str,
    batch: int,
    generator: torch.Generator | None = None,
    *,
    T: int = 1000,
    gamma: float = 0.9,
    mean: float = 0.0,
    std: float = 1.0,
) -> Tensor:
    """Continuous ``u in (0, 1]`` for flow matching (before the resolution shift), float32.

    ``uniform`` and ``geometric`` go through the discrete grid ``(t + 1) / T``, so the
    geometric skew means the same thing for flows as for DDPM schedules.
    """
    if kind == "logit_normal":
        return sample_logit_normal_u(batch, generator, mean, std)
    t = sample_timesteps(kind, batch, T, generator, gamma=gamma)
    return (t.float() + 1) / T


def lambda_from_noise_level(inv_sqrt_snr: Tensor, lo: float, hi: float) -> Tensor:
    """``lambda = 1 + (x - lo) / (hi - lo)`` for ``x = 1/sqrt(SNR)``, clamped to [1, 2]."""
    if not hi > lo:
        raise ValueError(f"need hi > lo for the normalisation, got lo={lo}, hi={hi}")
    return 1 + ((inv_sqrt_snr - lo) / (hi - lo)).clamp(0, 1)


def lambda_table(snr: Tensor) -> Tensor:
    """Kang et al.'s ``lambda(t) = 1 + norm(1/sqrt(SNR(t)))`` over a schedule, float64 ``(T,)``.

    ``norm`` is min-max over the schedule's own steps, so lambda runs from exactly 1 at
    ``t = 0`` (clean) to exactly 2 at ``t = T - 1`` (noisy) and is monotone in between.
    """
    x = snr.double().rsqrt()
    return lambda_from_noise_level(x, float(x.min()), float(x.max()))


def flow_lambda(sigma: Tensor, T: int = 1000) -> Tensor:
    """``lambda`` for rectified flow, where ``1/sqrt(SNR) = sigma / (1 - sigma)``.

    The ratio is unbounded at ``sigma = 1``, so the normalisation uses the grid's range
    ``[1/T, 1 - 1/T]`` and sigma is clipped to it.
    """
    lo_s, hi_s = 1.0 / T, 1.0 - 1.0 / T
    s = sigma.double().clamp(lo_s, hi_s)
    return lambda_from_noise_level(s / (1 - s), lo_s / (1 - lo_s), hi_s / (1 - hi_s)).float()


def timestep_weight(kind: str, t: Tensor, T: int, snr: Tensor | None = None) -> Tensor | None:
    """Per-sample weight for discrete ``t``: ``none`` -> None, ``lambda`` -> lambda(t)
    (needs the schedule's ``snr`` table), ``linear`` -> ``t / (T - 1)``. float32 ``(B,)``."""
    if kind == "none":
        return None
    if kind == "lambda":
        if snr is None:
            raise ValueError("the 'lambda' timestep weight needs the schedule's snr table")
        return lambda_table(snr)[t.cpu()].float().to(t.device)
    if kind == "linear":
        return t.float() / max(T - 1, 1)
    raise ValueError(f"timestep weight must be one of {WEIGHTS}, got {kind!r}")
