"""Noise schedules, parameterisation conversions and sampler steps (SPEC §6).

Time direction, stated once: discrete index ``t = 0`` is the *cleanest* step and
``t = T - 1`` the *noisiest* (diffusers' convention), so ``alphas_cumprod`` decreases
with ``t`` and samplers walk ``t`` downwards. For rectified flow, ``sigma = 0`` is data
and ``sigma = 1`` is pure noise; the network's timestep input is ``sigma * T``.

Tables are built in float64 and cast to the sample dtype only when gathered, so that
``a_t`` and ``s_t`` are exact to the last float32 ulp whatever the training dtype.
Noise is always passed *in*: nothing in this module draws random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to ``x`` until it has ``ndim`` dims (k-diffusion)."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def _extract(table: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
    """Gather ``table[t]`` and broadcast it against ``like`` in ``like``'s dtype/device."""
    t = torch.as_tensor(t, device=table.device, dtype=torch.long)
    out = table[t].to(device=like.device, dtype=like.dtype)
    if out.ndim == 0:
        return out
    return append_dims(out, like.ndim)


# --------------------------------------------------------------------------- betas


def make_betas(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> Tensor:
    """DDPM betas in float64 (Ho et al. 2020; Nichol & Dhariwal 2021 for the cosine)."""
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2024, Alg. 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * a0 / (a0 - aT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class DDPMSchedule:
    """A discrete VP schedule: ``x_t = a_t x0 + s_t eps`` with ``a_t^2 + s_t^2 = 1``."""

    betas: Tensor  # (T,) float64
    alphas_cumprod: Tensor  # (T,) float64, decreasing in t

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def alpha(self, t: Tensor | int, like: Tensor) -> Tensor:
        """``a_t = sqrt(abar_t)`` broadcast against ``like``."""
        return _extract(self.alphas_cumprod.sqrt(), t, like)

    def sigma(self, t: Tensor | int, like: Tensor) -> Tensor:
        """``s_t = sqrt(1 - abar_t)`` broadcast against ``like``."""
        return _extract((1 - self.alphas_cumprod).sqrt(), t, like)

    def log_snr(self) -> Tensor:
        """``log(abar / (1 - abar))`` per step, float64 (T,); strictly decreasing."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    def snr(self) -> Tensor:
        """``abar / (1 - abar)`` per step, float64 (T,)."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Forward process ``q(x_t | x0)``; same as diffusers' ``add_noise``."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """v-prediction target ``v = a_t eps - s_t x0`` (Salimans & Ho 2022)."""
        return self.alpha(t, x0) * noise - self.sigma(t, x0) * x0

    def target(self, x0: Tensor, noise: Tensor, t: Tensor | int, prediction_type: str) -> Tensor:
        """The regression target of a denoiser of ``prediction_type``."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, t)
        if prediction_type == "sample":
            return x0
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )


def ddpm_schedule(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
) -> DDPMSchedule:
    """Build a :class:`DDPMSchedule`; defaults are Stable Diffusion's."""
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if rescale_betas_zero_snr:
        # abar_T = 0 exactly would make x0 = (x_t - s eps)/a undefined for epsilon models.
        # diffusers' Euler scheduler floors it at 2^-24; we do the same, but stay below
        # abar_{T-2} so that log-SNR remains strictly decreasing (diffusers' DDPM/DDIM keep 0).
        alphas_cumprod = alphas_cumprod.clone()
        alphas_cumprod[-1] = min(2**-24, float(alphas_cumprod[-2]) / 2)
    return DDPMSchedule(betas=betas, alphas_cumprod=alphas_cumprod)


# ------------------------------------------------------------- parameterisations


def eps_to_x0(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``x0 = (x_t - s eps) / a``."""
    return (x_t - s * eps) / a


def x0_to_eps(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``eps = (x_t - a x0) / s``."""
    return (x_t - a * x0) / s


def v_to_x0(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``x0 = a x_t - s v``."""
    return a * x_t - s * v


def v_to_eps(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``eps = s x_t + a v``."""
    return s * x_t + a * v


def eps_x0_to_v(eps: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``v = a eps - s x0``."""
    return a * eps - s * x0


def pred_to_x0_eps(
    model_output: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Turn a network output of ``prediction_type`` into ``(x0, eps)``."""
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, model_output, a, s), model_output
    if prediction_type == "v_prediction":
        return v_to_x0(x_t, model_output, a, s), v_to_eps(x_t, model_output, a, s)
    if prediction_type == "sample":
        return model_output, x0_to_eps(x_t, model_output, a, s)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ------------------------------------------------------------------- samplers


def inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> Tensor:
    """Descending int64 timesteps for sampling (Lin et al. 2024, Table 2; diffusers' spacings)."""
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    if spacing == "leading":
        ratio = T // n
        ts = (torch.arange(n, dtype=torch.float64) * ratio).round().flip(0) + steps_offset
    elif spacing == "trailing":
        ratio = T / n
        # np.arange with a float step overshoots by one element for some n (T=1000,
        # n=61: the last is -6e-13, i.e. timestep -1); diffusers keeps it, we stop at n.
        ts = torch.from_numpy(np.arange(T, 0, -ratio)[:n]).round() - 1
    elif spacing == "linspace":
        # numpy's linspace, as diffusers: torch's differs in the last ulp, which flips
        # the rounding of exact .5 ties (T=50, n=45: 24.5 -> 24 vs 25).
        ts = torch.from_numpy(np.linspace(0, T - 1, n).round()[::-1].copy())
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return ts.to(torch.long)


def _abar_at(schedule: DDPMSchedule, t: int, final_alpha_cumprod: float) -> float:
    return float(schedule.alphas_cumprod[t]) if t >= 0 else final_alpha_cumprod


def ddim_step(
    schedule: DDPMSchedule,
    model_output: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: Tensor | None = None,
    set_alpha_to_one: bool = True,
) -> Tensor:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, Eq. 12); ``t_prev < 0`` ends.

    With ``eta > 0`` the injected ``noise`` (same shape as ``x_t``) is required.
    """
    final = 1.0 if set_alpha_to_one else float(schedule.alphas_cumprod[0])
    ab_t = float(schedule.alphas_cumprod[t])
    ab_prev = _abar_at(schedule, t_prev, final)
    a, s = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    x0, eps = pred_to_x0_eps(model_output, x_t, a, s, prediction_type)
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = eta * math.sqrt(max(var, 0.0))
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - std**2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0")
        x_prev = x_prev + std * noise
    return x_prev


def ddpm_step(
    schedule: DDPMSchedule,
    model_output: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    *,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
) -> Tensor:
    """One ancestral step from the posterior ``q(x_{t_prev} | x_t, x0_hat)`` (Ho et al. 2020, Eq. 7).

    Variance is the posterior's ("fixed_small"); ``noise`` is required unless ``t_prev < 0``.
    """
    ab_t = float(schedule.alphas_cumprod[t])
    ab_prev = _abar_at(schedule, t_prev, 1.0)
    a, s = math.sqrt(ab_t), math.sqrt(1 - ab_t)
    x0, _ = pred_to_x0_eps(model_output, x_t, a, s, prediction_type)
    alpha_step = ab_t / ab_prev
    beta_step = 1 - alpha_step
    c0 = math.sqrt(ab_prev) * beta_step / (1 - ab_t)
    ct = math.sqrt(alpha_step) * (1 - ab_prev) / (1 - ab_t)
    mean = c0 * x0 + ct * x_t
    if t_prev < 0:
        return mean
    if noise is None:
        raise ValueError("noise is required for a DDPM step with t_prev >= 0")
    var = max((1 - ab_prev) / (1 - ab_t) * beta_step, 1e-20)
    return mean + math.sqrt(var) * noise


# -------------------------------------------------------------- rectified flow


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Resolution shift ``sigma' = s sigma / (1 + (s - 1) sigma)`` (SD3, Esser et al. 2024)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``exp(mu)``, ``mu`` linear in the number of image
    tokens (``base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len``).

    diffusers' "dynamic shifting" maps ``sigma`` to ``e^mu / (e^mu + 1/sigma - 1)``, which is
    :func:`shift_sigma` with ``shift = e^mu``; so a dynamically shifted schedule is a
    :class:`FlowSchedule` with this constant shift for one image size.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


#: inference grids of :meth:`FlowSchedule.inference_sigmas`
FLOW_GRIDS = ("scheduler", "pipeline")


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps``; target ``v = eps - x0``.

    ``grid`` picks the inference sigmas before the shift: ``"scheduler"`` the scheduler's own
    ``set_timesteps(n)`` grid (SD3, SANA), ``"pipeline"`` the explicit
    ``linspace(1, 1/n, n)`` that ``FluxPipeline`` passes as ``sigmas``.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    grid: str = "scheduler"

    def add_noise(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        sigma = append_dims(sigma.to(x0.dtype), x0.ndim) if sigma.ndim else sigma.to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def velocity(x0: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching target ``v = eps - x0``."""
        return noise - x0

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep input for ``sigma``."""
        return sigma * self.num_train_timesteps

    def train_sigmas(self, u: Tensor) -> Tensor:
        """Map uniform-or-logit-normal draws ``u in (0, 1)`` to shifted training sigmas."""
        return shift_sigma(u, self.shift)

    def inference_sigmas(self, num_inference_steps: int) -> Tensor:
        """Descending sigmas with a trailing 0, float64 (n + 1,), as diffusers'
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (which shifts the lower end twice),
        or with ``grid="pipeline"`` as ``FluxPipeline`` calls it."""
        T, s = self.num_train_timesteps, self.shift
        n = int(num_inference_steps)
        if self.grid == "pipeline":  # FluxPipeline: sigmas = linspace(1, 1/n, n), then shifted
            sig = shift_sigma(torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64), s)
            return torch.cat([sig, sig.new_zeros(1)])
        if self.grid != "scheduler":
            raise ValueError(f"flow grid must be one of {FLOW_GRIDS}, got {self.grid!r}")
        sigma_min = shift_sigma(1.0 / T, s)
        base = (
            torch.linspace(1.0 * T, sigma_min * T, int(num_inference_steps), dtype=torch.float64)
            / T
        )
        sig = shift_sigma(base, s)
        return torch.cat([sig, sig.new_zeros(1)])


def flow_euler_step(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Euler step of the probability-flow ODE: ``x <- x + (sigma_next - sigma) v``."""
    return x + (sigma_next - sigma) * v


# ------------------------------------------------------------------- guidance


def cfg_combine(uncond: Tensor, cond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)`` (Ho & Salimans 2022)."""
    return uncond + guidance_scale * (cond - uncond)


def cfg_split(output: Tensor, guidance_scale: float) -> Tensor:
    """Combine a batched ``[uncond; cond]`` forward output (first half unconditional)."""
    uncond, cond = output.chunk(2)
    return cfg_combine(uncond, cond, guidance_scale)
