"""Model-agnostic sampling loops over the step functions of :mod:`minddspo.schedules`.

A sampler sees the network only through ``denoise(x, t) -> prediction``, where ``t`` is
the *network's* timestep input, one per batch row ``(B,)``: an int index for DDPM
schedules, ``sigma * T`` for flows. The prediction is of the schedule's kind (epsilon /
v_prediction / sample / flow velocity). Classifier-free guidance is layered on with
:func:`guided`, which evaluates unconditional and conditional branches in one batched
forward. Time runs as in :mod:`minddspo.schedules`: from the noisiest step down to data.

Noise is never drawn behind the caller's back (k-diffusion's style): the starting noise
is passed in, and the stochastic samplers (DDPM, DDIM with ``eta > 0``) take one noise
tensor per step from ``noise_sampler(t, t_prev)`` -- by default ``torch.randn`` from the
given ``generator`` -- so a sample is a pure function of its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .schedules import (
    DDPMSchedule,
    FlowSchedule,
    cfg_combine,
    ddim_step,
    ddpm_step,
    flow_euler_step,
    inference_timesteps,
)

Denoise = Callable[[Tensor, Tensor], Tensor]
NoiseSampler = Callable[[int, int], Tensor]  # (t, t_prev) -> noise shaped like x
Progress = Callable[[Iterable], Iterable]
PREV_TIMESTEPS = ("stride", "next")


def guided(
    forward: Callable[[Tensor, Tensor, object], Tensor],
    cond: object,
    uncond: object,
    guidance_scale: float,
    concat: Callable[[object, object], object],
) -> Denoise:
    """Wrap ``forward(x, t, cond)`` into a CFG denoiser with one batched forward per step.

    ``concat(uncond, cond)`` stacks the two conditionings along the batch (first half
    unconditional). With ``guidance_scale == 1`` only the conditional branch is run.
    """
    if guidance_scale == 1.0:
        return lambda x, t: forward(x, t, cond)
    both = concat(uncond, cond)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out = forward(torch.cat([x, x]), torch.cat([t, t]), both)
        u, c = out.chunk(2)
        return cfg_combine(u, c, guidance_scale)

    return denoise


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` in call order."""
    return lambda t, t_prev: torch.randn(
        x.shape, generator=generator, device=x.device, dtype=x.dtype
    )


def _tvec(value, x: Tensor, dtype=torch.long) -> Tensor:
    return torch.full((x.shape[0],), value, device=x.device, dtype=dtype)


@torch.no_grad()
def ddim_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: DDPMSchedule,
    num_inference_steps: int,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    prev_timestep: str = "stride",
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12) from ``x_T``; ``x_T`` is used as is (scale 1).

    Defaults are Stable Diffusion's scheduler config (leading spacing, offset 1,
    ``set_alpha_to_one=False``). ``prev_timestep="stride"`` steps to ``t - T // n`` as
    diffusers' DDIMScheduler; ``"next"`` steps to the next listed timestep and ends at -1
    (exact for any spacing, e.g. trailing with ``T % n != 0``).
    """
    if prev_timestep not in PREV_TIMESTEPS:
        raise ValueError(f"prev_timestep must be one of {PREV_TIMESTEPS}, got {prev_timestep!r}")
    T = schedule.num_train_timesteps
    ts = inference_timesteps(num_inference_steps, T, spacing, steps_offset).tolist()
    stride = T // num_inference_steps
    noise_sampler = noise_sampler or default_noise_sampler(x_T, generator)
    x = x_T
    for i in progress(range(len(ts))) if progress else range(len(ts)):
        t = ts[i]
        if prev_timestep == "stride":
            t_prev = t - stride
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        pred = denoise(x, _tvec(t, x))
        noise = noise_sampler(t, t_prev) if eta > 0 else None
        x = ddim_step(
            schedule,
            pred,
            t,
            t_prev,
            x,
            prediction_type=prediction_type,
            eta=eta,
            noise=noise,
            set_alpha_to_one=set_alpha_to_one,
        )
    return x


@torch.no_grad()
def ddpm_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: DDPMSchedule,
    num_inference_steps: int | None = None,
    *,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Eq. 7); ``num_inference_steps=None`` uses all T.

    Steps go to the next listed timestep, as DDPMScheduler; no noise after the last step.
    """
    T = schedule.num_train_timesteps
    n = T if num_inference_steps is None else num_inference_steps
    ts = inference_timesteps(n, T, spacing, 0).tolist()
    noise_sampler = noise_sampler or default_noise_sampler(x_T, generator)
    x = x_T
    for i in progress(range(n)) if progress else range(n):
        t = ts[i]
        t_prev = ts[i + 1] if i + 1 < n else -1
        pred = denoise(x, _tvec(t, x))
        noise = noise_sampler(t, t_prev) if t_prev >= 0 else None
        x = ddpm_step(schedule, pred, t, t_prev, x, prediction_type=prediction_type, noise=noise)
    return x


@torch.no_grad()
def flow_sample(
    denoise: Denoise,
    x_1: Tensor,
    schedule: FlowSchedule,
    num_inference_steps: int,
    *,
    progress: Progress | None = None,
) -> Tensor:
    """Euler integration of a rectified flow from noise ``x_1`` (sigma=1) to data (sigma=0).

    The network sees ``t = sigma * T`` (float), as diffusers' FlowMatchEulerDiscreteScheduler.
    """
    sigmas = schedule.inference_sigmas(num_inference_steps).tolist()
    x = x_1
    for i in progress(range(len(sigmas) - 1)) if progress else range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = denoise(x, _tvec(s * schedule.num_train_timesteps, x, torch.float32))
        x = flow_euler_step(x, v, s, s_next)
    return x
