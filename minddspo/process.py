"""The diffusion process a model trains and samples with, behind one small interface.

A backbone holds one :class:`DDPMProcess` (SD-1.x, SDXL: discrete timesteps, epsilon or
v-prediction) or one :class:`FlowProcess` (SANA, SD3: rectified flow, velocity). Both speak
in the *network's* timestep ``t`` (an int index for DDPM, ``sigma * T`` for flows), so the
trainer and the samplers never ask which one they have:

    x_t    = process.add_noise(x0, noise, t)
    target = process.target(x0, noise, t)             # what the loss compares predictions with
    pred   = process.output(net(x_t, t), x_t, t)      # the prediction in the target's space
    t      = process.sample_t(batch, generator, sampler, gamma)   # training timesteps
    w      = process.weight(kind, t)                  # none | lambda | linear (Kang et al.)
    x0     = process.sample(denoise, x_T, steps, ...) # DDIM / DDPM / Euler, minddspo.sampling

Nothing here draws random numbers except :meth:`sample_t` and the DDPM sampler, both from
the generator they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .sampling import Denoise, Progress, ddim_sample, ddpm_sample, flow_sample
from .schedules import DDPMSchedule, FlowSchedule, append_dims
from .timesteps import WEIGHTS, flow_lambda, sample_flow_u, sample_timesteps, timestep_weight


class DiffusionProcess(Protocol):
    prediction_type: str
    samplers: tuple[str, ...]  # the first is the default

    @property
    def num_train_timesteps(self) -> int: ...

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...

    def output(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor: ...

    def sample_t(
        self, batch: int, generator: torch.Generator | None, sampler: str, gamma: float
    ) -> Tensor: ...

    def weight(self, kind: str, t: Tensor) -> Tensor | None: ...

    def sample(
        self,
        denoise: Denoise,
        x: Tensor,
        steps: int,
        *,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class DDPMProcess:
    """A discrete DDPM schedule; ``spacing``, ``steps_offset`` and ``set_alpha_to_one`` are
    the scheduler config's (they shape DDIM/DDPM inference timesteps only)."""

    schedule: DDPMSchedule
    prediction_type: str = "epsilon"
    spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    samplers: tuple[str, ...] = ("ddim", "ddpm")

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.schedule.target(x0, noise, t, self.prediction_type)

    def output(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The network's prediction is already in the target's space (eps or v)."""
        return pred

    def sample_t(self, batch, generator, sampler: str = "uniform", gamma: float = 0.9) -> Tensor:
        """Discrete training timesteps, int64 ``(batch,)`` (on the generator's device)."""
        return sample_timesteps(sampler, batch, self.num_train_timesteps, generator, gamma=gamma)

    def weight(self, kind: str, t: Tensor) -> Tensor | None:
        return timestep_weight(kind, t, self.num_train_timesteps, snr=self.schedule.snr())

    def sample(self, denoise, x, steps, *, sampler=None, generator=None, progress=None):
        """DDIM (eta 0, deterministic) or ancestral DDPM (step noise from ``generator``)."""
        sampler = sampler or self.samplers[0]
        if sampler == "ddpm":
            return ddpm_sample(
                denoise, x, self.schedule, steps, prediction_type=self.prediction_type,
                spacing=self.spacing, generator=generator, progress=progress,
            )  # fmt: skip
        if sampler != "ddim":
            raise ValueError(f"sampler must be ddim or ddpm for a DDPM model, got {sampler!r}")
        return ddim_sample(
            denoise, x, self.schedule, steps, prediction_type=self.prediction_type,
            spacing=self.spacing, steps_offset=self.steps_offset,
            set_alpha_to_one=self.set_alpha_to_one, progress=progress,
        )  # fmt: skip


@dataclass(frozen=True)
class FlowProcess:
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps`` with target ``eps - x0``; the
    network's timestep is ``sigma * T`` (float).

    ``precondition_outputs`` (SD3's option, after EDM's output preconditioning): the loss
    compares data predictions ``x0 = x_t - sigma v`` with the target ``x0`` instead of
    velocities; the network and the sampler still speak velocity.
    """

    schedule: FlowSchedule
    prediction_type: str = "flow"
    samplers: tuple[str, ...] = ("euler",)
    precondition_outputs: bool = False

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

    def sigma(self, t: Tensor) -> Tensor:
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, noise, self.sigma(t).to(x0.device))

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return x0 if self.precondition_outputs else self.schedule.velocity(x0, noise)

    def output(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity ``pred``, or with ``precondition_outputs`` its data prediction
        ``x_t - sigma v`` (exact: ``x_t - sigma (eps - x0) = x0``)."""
        if not self.precondition_outputs:
            return pred
        sigma = self.sigma(t).to(device=pred.device, dtype=pred.dtype)
        return x_t.to(pred.dtype) - append_dims(sigma, pred.ndim) * pred

    def sample_t(self, batch, generator, sampler: str = "uniform", gamma: float = 0.9) -> Tensor:
        """``sigma * T`` (float32) with ``sigma`` the shifted draw of ``u`` (uniform grid,
        geometric or logit-normal; :func:`minddspo.timesteps.sample_flow_u`)."""
        T = self.num_train_timesteps
        u = sample_flow_u(sampler, batch, generator, T=T, gamma=gamma)
        return self.schedule.timestep(self.schedule.train_sigmas(u)).float()

    def weight(self, kind: str, t: Tensor) -> Tensor | None:
        if kind == "none":
            return None
        if kind == "lambda":
            return flow_lambda(self.sigma(t), self.num_train_timesteps).to(t.device)
        if kind == "linear":
            return self.sigma(t)
        raise ValueError(f"timestep weight must be one of {WEIGHTS}, got {kind!r}")

    def sample(self, denoise, x, steps, *, sampler=None, generator=None, progress=None):
        """Euler integration of the probability-flow ODE (deterministic)."""
        if sampler not in (None, *self.samplers):
            raise ValueError(
                f"a flow model samples with the Euler sampler (sampler='euler' or None), "
                f"got {sampler!r}"
            )
        return flow_sample(denoise, x, self.schedule, steps, progress=progress)
