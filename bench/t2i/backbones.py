"""One small adapter per text-to-image backbone: SD-1.x, SDXL, SANA, SD3 and FLUX.1.

An adapter hides what differs between backbones (text encoders, extra conditioning,
parameterisation, VAE) behind one interface the trainer, ``make_pairs`` and ``sample``
share. All schedule, sampler and timestep math comes from :mod:`minddspo` (the loops
from :mod:`minddspo.sampling`); diffusers supplies only the networks and their configs.

Conventions:

* ``t`` is always the *network's* timestep input, shape ``(B,)``: an int64 index in
  ``[0, T)`` for DDPM backbones (SD, SDXL), ``sigma * T`` as float32 for flow (SANA, SD3,
  FLUX).
* :class:`Cond` holds batch-first conditioning tensors; ``encode_prompts([""])`` is the
  unconditional branch (zeros for SDXL when its ``model_index.json`` asks for
  ``force_zeros_for_empty_prompt``, as diffusers does).
* Initial noise for :meth:`Backbone.generate` is drawn on the CPU in float32, so a
  sample does not depend on the device. Pass one ``torch.Generator`` per prompt
  (:func:`prompt_generator`) to make every image a function of ``(seed, prompt index)``
  alone, whatever the batch it is generated in.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.t2i.errors import UsageError
from minddspo.process import DDPMProcess, DiffusionProcess, FlowProcess
from minddspo.sampling import guided
from minddspo.schedules import DDPMSchedule, FlowSchedule, ddpm_schedule, resolution_shift

SANA_PROMPT_STYLES = ("official", "plain")  # SanaBackbone.prompt_style


def official_complex_human_instruction() -> tuple[str, ...]:
    """The complex-human-instruction lines of the official DDSPO SANA trainer: diffusers'
    ``SanaPipeline.__call__`` default, whose last line the official list ends without the
    trailing space (``"User Prompt:"``, so the prompt follows the colon directly)."""
    import inspect

    from diffusers import SanaPipeline

    lines = list(
        inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    )
    lines[-1] = lines[-1].rstrip()
    return tuple(lines)


# ---------------------------------------------------------------------- conditioning


@dataclass
class Cond:
    """Text conditioning of a batch; every tensor is batch-first."""

    tensors: dict[str, Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def cat(self, *others: Cond) -> Cond:
        """Concatenate along the batch: ``[self; others...]``."""
        return Cond(
            {k: torch.cat([v] + [o.tensors[k] for o in others]) for k, v in self.tensors.items()}
        )

    def index(self, idx) -> Cond:
        """Select rows (an int keeps the batch dim)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device=None, dtype=None) -> Cond:
        """Move to ``device``; ``dtype`` applies to floating tensors only (masks keep theirs)."""
        return Cond(
            {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                for k, v in self.tensors.items()
            }
        )

    def repeat(self, n: int) -> Cond:
        """Expand a batch-1 conditioning (e.g. the empty prompt) to ``n`` rows."""
        if len(self) != 1:
            raise ValueError(f"Cond.repeat expects a batch of 1, got {len(self)}")
        return Cond({k: v.expand(n, *v.shape[1:]).contiguous() for k, v in self.tensors.items()})


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, index)`` by numpy's SeedSequence mixing.

    Used for the initial noise of prompt ``index``, so that ``make_pairs`` and ``sample``
    give each prompt the same image whatever the batching, rank or resume point.
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def token_ids(tok, prompts: list[str], max_length: int | None = None) -> Tensor:
    """``prompts`` padded (right) and truncated to ``max_length`` (default: the tokenizer's)."""
    return tok(
        prompts,
        padding="max_length",
        max_length=max_length or tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _param_dtype(net: torch.nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def move_module(m: torch.nn.Module, device, dtype: torch.dtype | None) -> None:
    """``m.to(device, dtype)``, casting only when the dtype really changes (a same-dtype
    cast makes diffusers warn about modules it keeps in float32)."""
    if dtype is None or dtype == _param_dtype(m):
        m.to(device)
    else:
        m.to(device=device, dtype=dtype)


# -------------------------------------------------------------------------- backbones


class Backbone:
    """Base adapter. Subclasses set the class attributes and the text/denoiser glue."""

    name: str = ""
    flow: bool = False  # a rectified-flow model (FlowProcess), not a DDPM one
    pipeline_class: str = ""  # the diffusers pipeline this backbone loads and saves as
    denoiser_subfolder: str = "unet"
    default_guidance: float = 7.5
    default_steps: int = 25
    text_keys: tuple[str, ...] = ("text_encoder",)

    def __init__(
        self,
        components: dict[str, Any],
        *,
        prediction_type: str | None = None,
        pipeline_config: dict | None = None,
    ):
        self.components = components  # pipeline component name -> module/tokenizer/scheduler
        self.pipeline_config = dict(pipeline_config or {})  # non-component model_index entries
        self.denoiser: torch.nn.Module = components[self.denoiser_subfolder]
        self.vae = components["vae"].eval().requires_grad_(False)
        for key in self.text_keys:
            components[key].eval().requires_grad_(False)
        self.scheduler = components["scheduler"]
        self.scheduler_config = dict(self.scheduler.config)
        self.process = self._make_process(prediction_type)
        self.schedule = self.process.schedule  # DDPMSchedule or FlowSchedule
        self.prediction_type = self.process.prediction_type
        self.latent_channels = int(self.denoiser.config.in_channels)
        self.vae_scale_factor = self._vae_scale_factor()
        self.default_resolution = self._default_resolution()
        self._uncond_cache: dict[tuple, Cond] = {}
        self._empty_cache: dict[int | None, Cond] = {}

    # --- construction helpers
    def _make_process(self, prediction_type: str | None) -> DiffusionProcess:
        """The DDPM process of the scheduler config (SD, SDXL); flow backbones override."""
        cfg = self.scheduler_config
        pt = prediction_type or cfg.get("prediction_type") or "epsilon"
        if pt not in ("epsilon", "v_prediction"):
            raise UsageError(
                f"{self.name}: prediction_type must be epsilon or v_prediction, got {pt!r}"
            )
        if cfg.get("trained_betas") is not None:
            betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
            schedule = DDPMSchedule(betas, torch.cumprod(1 - betas, 0))
        else:
            schedule = ddpm_schedule(
                num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
                beta_start=cfg.get("beta_start", 0.00085),
                beta_end=cfg.get("beta_end", 0.012),
                rescale_betas_zero_snr=cfg.get("rescale_betas_zero_snr", False),
            )
        return DDPMProcess(
            schedule,
            prediction_type=pt,
            spacing=cfg.get("timestep_spacing", "leading"),
            steps_offset=cfg.get("steps_offset", 1),
            set_alpha_to_one=cfg.get("set_alpha_to_one", False),
        )

    def _default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def _vae_scale_factor(self) -> int:
        cfg = self.vae.config
        chans = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
        return 2 ** (len(chans) - 1)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.schedule.num_train_timesteps)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.components[k] for k in self.text_keys]

    def to(
        self, device, dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None
    ) -> Backbone:
        """Move every module to ``device``; text encoders (to ``text_dtype`` when given) and
        VAE also to ``dtype`` (the VAE stays float32 when its config says ``force_upcast``).
        The denoiser keeps its dtype: the trainer decides it (fp32 master weights under
        autocast)."""
        self.denoiser.to(device)
        for enc in self.text_encoders():
            move_module(enc, device, text_dtype or dtype)
        move_module(self.vae, device, None if self.vae.config.get("force_upcast", False) else dtype)
        self._uncond_cache.clear()
        self._empty_cache.clear()
        return self

    def for_inference(self, device, dtype: torch.dtype | None = None) -> Backbone:
        """Like :meth:`to`, but the denoiser too is cast to ``dtype`` and frozen: for
        sampling (make_pairs, sample.py), where no fp32 master weights are needed."""
        self.to(device, dtype)
        move_module(self.denoiser, device, dtype)
        self.denoiser.eval().requires_grad_(False)
        return self

    # --- text
    def _encode(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, encode_empty: bool = False) -> Cond:
        """Encode ``prompts`` in one batched tokenizer/encoder call; ``""`` is unconditional.
        ``encode_empty``: ``""`` goes through the text encoders even where the backbone gives
        it zero embeddings (SDXL's :attr:`zero_empty_prompt`)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a string")
        if encode_empty and getattr(self, "zero_empty_prompt", False):
            return self._encode(list(prompts), zero_empty=False)
        return self._encode(list(prompts))

    def empty_cond(self, n: int) -> Cond:
        """``encode_prompts([""])`` repeated ``n`` times, encoded once (the training step's;
        cached apart from sampling's, which runs under autocast)."""
        key = getattr(self, "resolution", None)  # SDXL: the time_ids
        if key not in self._empty_cache:
            self._empty_cache[key] = self.encode_prompts([""])
        return self._empty_cache[key].repeat(n)

    def _uncond(self, negative_prompt: str, n: int) -> Cond:
        key = (negative_prompt,)
        if key not in self._uncond_cache:
            self._uncond_cache[key] = self.encode_prompts([negative_prompt])
        return self._uncond_cache[key].repeat(n)

    # --- denoiser
    def forward(self, net: torch.nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """``net(x_t, t, cond)`` as a float32 prediction of :attr:`prediction_type`.

        ``net`` is the policy (possibly DDP-wrapped or with LoRA) or the reference. Inputs
        are cast to ``net``'s parameter dtype; under autocast that is a no-op for fp32 nets.
        """
        dtype = _param_dtype(net)
        c = cond.to(device=x_t.device, dtype=dtype)
        return self._forward(net, x_t.to(dtype), t.to(x_t.device), c).float()

    def _forward(self, net, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process ``x_t`` for network timesteps ``t``."""
        return self.process.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Regression target of the denoiser (eps, v or the flow velocity)."""
        return self.process.target(x0, noise, t)

    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None,
        sampler: str = "uniform",
        gamma: float = 0.9,
    ) -> Tensor:
        """Training timesteps ``(batch,)`` (on the generator's device)."""
        return self.process.sample_t(batch, generator, sampler, gamma)

    def t_weight(self, kind: str, t: Tensor) -> Tensor | None:
        """Per-sample weights ``(B,)`` for ``kind`` in none/lambda/linear (Kang et al. 2025)."""
        return self.process.weight(kind, t)

    # --- VAE
    def _vae_in(self, x: Tensor) -> Tensor:
        p = next(self.vae.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Pixels in [-1, 1], ``(B, 3, H, W)`` -> scaled latents (posterior mean), float32."""
        cfg = self.vae.config
        z = self.vae.encode(self._vae_in(images)).latent_dist.mean
        shift = cfg.get("shift_factor") or 0.0
        return ((z - shift) * cfg.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> pixels in [-1, 1], float32 ``(B, 3, H, W)``."""
        cfg = self.vae.config
        shift = cfg.get("shift_factor") or 0.0
        x = self.vae.decode(self._vae_in(latents / cfg.scaling_factor + shift)).sample
        return x.float().clamp(-1, 1)

    # --- sampling
    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        res = resolution or self.default_resolution
        if res % self.vae_scale_factor:
            raise UsageError(f"resolution {res} is not a multiple of {self.vae_scale_factor}")
        side = res // self.vae_scale_factor
        return (self.latent_channels, side, side)

    def initial_latents(
        self,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        batch: int,
        resolution: int | None = None,
    ) -> Tensor:
        """Unit Gaussian noise ``(B, C, h, w)``, float32, drawn on the CPU.

        One generator: a single ``randn`` of the whole block. A list: row ``i`` is one
        ``randn((1, C, h, w))`` from ``generator[i]``.
        """
        shape = self.latent_shape(resolution)
        if generator is None or isinstance(generator, torch.Generator):
            return torch.randn((batch, *shape), generator=generator)
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} prompts")
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generator])

    def _cond_for_sampling(self, prompts: list[str], resolution: int | None) -> Cond:
        return self.encode_prompts(prompts)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        negative_prompt: str = "",
        latents: Tensor | None = None,
        net: torch.nn.Module | None = None,
        progress: Callable | None = None,
        resolution: int | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """Sample latents ``(B, C, h, w)`` (float32) with batched classifier-free guidance.

        ``latents`` overrides the initial noise. ``sampler`` is one of the process's
        ``samplers``, by default its first: ``ddim`` (eta 0) or ``ddpm`` for DDPM backbones,
        ``euler`` for flow backbones. Steps and guidance
        default to the paper's settings for the backbone (App. E).
        """
        prompts = list(prompts)
        net = self.denoiser if net is None else net
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        device = self.device
        if latents is None:
            latents = self.initial_latents(generator, len(prompts), resolution)
        x = latents.to(device=device, dtype=torch.float32)
        if resolution is None:
            resolution = x.shape[-1] * self.vae_scale_factor
        cond = self._cond_for_sampling(prompts, resolution)
        uncond = self._uncond(negative_prompt, len(prompts))
        uncond = self._with_time_ids(uncond, resolution)
        fwd = lambda x_, t_, c_: self.forward(net, x_, t_, c_)
        denoise = guided(fwd, cond, uncond, guidance, lambda u, c: u.cat(c))
        return self._sample(denoise, x, steps, progress, sampler, generator)

    def _with_time_ids(self, cond: Cond, resolution: int) -> Cond:
        return cond

    def _sample(self, denoise, x, steps, progress, sampler, generator) -> Tensor:
        gen = None
        if sampler == "ddpm":
            # Step noise comes from one generator on x's device, seeded by a draw from the
            # (first) given generator: deterministic per batch, not per prompt.
            first = generator[0] if isinstance(generator, Sequence) else generator
            seed = int(torch.randint(0, 2**62, (1,), generator=first))
            gen = torch.Generator(x.device).manual_seed(seed)
        return self.sampling_process(x).sample(
            denoise, x, steps, sampler=sampler, generator=gen, progress=progress
        )

    def sampling_process(self, x: Tensor) -> DiffusionProcess:
        """The process that samples latents like ``x``: :attr:`process`, or on FLUX the one
        with the shift of ``x``'s token count."""
        return self.process

    def pipeline_call_kwargs(self) -> dict:
        """Arguments of the diffusers pipeline's ``__call__`` whose defaults differ from
        what this backbone trains and samples with (none: the defaults reproduce it)."""
        return {}

    # --- files
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the full pipeline in diffusers layout (``model_index.json`` + subfolders)."""
        return save_components(self.name, self.components, out_dir, self.pipeline_config)

    def load_denoiser(self, path: str | Path) -> torch.nn.Module:
        """Load a denoiser saved with ``save_pretrained`` from ``path`` (the model folder
        itself, or a folder holding it under ``unet/`` or ``transformer/``)."""
        path = Path(path)
        if (path / self.denoiser_subfolder / "config.json").is_file():
            path = path / self.denoiser_subfolder
        if not (path / "config.json").is_file():
            raise UsageError(f"{path}: no config.json of a saved {self.denoiser_subfolder}")
        return type(self.denoiser).from_pretrained(path, local_files_only=True)


class SDBackbone(Backbone):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, epsilon or v-prediction UNet."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    default_guidance = 7.5
    default_steps = 25

    def _encode(self, prompts: list[str]) -> Cond:
        tok, enc = self.components["tokenizer"], self.components["text_encoder"]
        h = enc(token_ids(tok, prompts).to(enc.device))[0]  # (B, L, D)
        return Cond({"encoder_hidden_states": h})

    def _forward(self, net, x_t, t, cond):
        return net(x_t, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample


class SDXLBackbone(Backbone):
    """SDXL: two CLIP encoders (penultimate states concatenated, pooled text from the
    second) and the micro-conditioning ``time_ids = (H, W, 0, 0, H, W)`` per sample."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    default_guidance = 5.0
    default_steps = 25
    text_keys = ("text_encoder", "text_encoder_2")

    def __init__(self, components, *, prediction_type=None, pipeline_config=None):
        super().__init__(
            components, prediction_type=prediction_type, pipeline_config=pipeline_config
        )
        # diffusers' SDXL pipelines use zero embeddings for an empty negative prompt
        self.zero_empty_prompt = bool(
            self.pipeline_config.get("force_zeros_for_empty_prompt", True)
        )
        self.resolution = self.default_resolution  # the size put into time_ids by encode_prompts

    def _time_ids(self, n: int, resolution: int, device) -> Tensor:
        r = float(resolution)
        return torch.tensor([[r, r, 0.0, 0.0, r, r]], device=device).expand(n, 6).contiguous()

    def _encode(self, prompts: list[str], zero_empty: bool | None = None) -> Cond:
        hs, pooled = [], None
        for tk, ek in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tok, enc = self.components[tk], self.components[ek]
            out = enc(token_ids(tok, prompts).to(enc.device), output_hidden_states=True)
            hs.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model, (B, P)
        h = torch.cat(hs, dim=-1)  # (B, L, D1 + D2)
        if self.zero_empty_prompt if zero_empty is None else zero_empty:
            empty = torch.tensor([p == "" for p in prompts], device=h.device)
            h = torch.where(empty[:, None, None], torch.zeros_like(h), h)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        time_ids = self._time_ids(len(prompts), self.resolution, h.device).to(h.dtype)
        return Cond({"encoder_hidden_states": h, "text_embeds": pooled, "time_ids": time_ids})

    def _with_time_ids(self, cond: Cond, resolution: int) -> Cond:
        ids = self._time_ids(len(cond), resolution, cond.tensors["time_ids"].device)
        return Cond({**cond.tensors, "time_ids": ids.to(cond.tensors["time_ids"].dtype)})

    def _cond_for_sampling(self, prompts, resolution):
        return self._with_time_ids(self.encode_prompts(prompts), resolution)

    def _forward(self, net, x_t, t, cond):
        c = cond.tensors
        added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        return net(
            x_t, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added
        ).sample


class SanaBackbone(Backbone):
    """SANA: linear DiT on DC-AE latents, rectified flow, Gemma-2 text with attention mask.

    :attr:`prompt_style` picks the prompt encoding (the trainer's ``--sana-prompt-style``):

    * ``"official"`` (default) – as the official DDSPO SANA trainer, which calls
      ``SanaPipeline.encode_prompt(prompt, max_sequence_length=300,
      complex_human_instruction=...)``: the pipeline's text preprocessing (lowercase and
      strip; no caption cleaning), the complex-human-instruction prefix, padding to
      ``len(prefix tokens) + max_sequence_length - 2`` and keeping the first token plus the
      last ``max_sequence_length - 1``. The encoding is diffusers' own ``encode_prompt``.
      The empty prompt is the unconditional branch and is encoded as the pipeline encodes
      its negative prompt (no prefix), so CFG sampling matches ``SanaPipeline``.
    * ``"plain"`` – the raw prompt, right-padded to ``max_sequence_length``.

    ``max_sequence_length`` is ``min(300, tokenizer.model_max_length)``.
    """

    name = "sana"
    flow = True
    pipeline_class = "SanaPipeline"
    denoiser_subfolder = "transformer"
    default_guidance = 4.5
    default_steps = 20
    prompt_style: str = "official"  # official | plain (see the class docstring)
    #: the "official" style's prefix lines; None = :func:`official_complex_human_instruction`
    complex_human_instruction: tuple[str, ...] | None = None

    def _make_process(self, prediction_type):
        if prediction_type not in (None, "flow"):
            raise UsageError(
                f"sana is a flow model; prediction_type {prediction_type!r} is invalid"
            )
        cfg = self.scheduler_config
        # FlowMatchEulerDiscreteScheduler calls it ``shift``; SANA's DPM-Solver config ``flow_shift``
        shift = cfg.get("shift") if "shift" in cfg else cfg.get("flow_shift", 1.0)
        T = int(cfg.get("num_train_timesteps", 1000))
        self.max_sequence_length = min(300, int(self.components["tokenizer"].model_max_length))
        return FlowProcess(FlowSchedule(shift=float(shift or 1.0), num_train_timesteps=T))

    def _encode(self, prompts: list[str]) -> Cond:
        if self.prompt_style not in SANA_PROMPT_STYLES:
            raise UsageError(
                f"sana prompt style must be one of {SANA_PROMPT_STYLES}, got {self.prompt_style!r}"
            )
        if self.prompt_style == "plain":
            return self._encode_plain(prompts)
        cond_rows = [i for i, p in enumerate(prompts) if p != ""]
        if not cond_rows:
            return self._encode_plain(prompts)
        h, mask, _, _ = self._text_pipeline().encode_prompt(
            [prompts[i] for i in cond_rows],
            do_classifier_free_guidance=False,
            device=self.components["text_encoder"].device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=list(
                self.complex_human_instruction or official_complex_human_instruction()
            ),
        )
        if len(cond_rows) == len(prompts):
            return Cond({"encoder_hidden_states": h, "encoder_attention_mask": mask})
        out = self._encode_plain([""]).repeat(len(prompts))  # "" = the pipeline's negative
        oh, om = out.tensors["encoder_hidden_states"], out.tensors["encoder_attention_mask"]
        rows = torch.tensor(cond_rows, device=oh.device)
        oh[rows] = h.to(oh.dtype)
        om[rows.to(om.device)] = mask.to(device=om.device, dtype=om.dtype)
        return out

    def _text_pipeline(self):
        """A text-only ``SanaPipeline`` over our tokenizer and encoder (for ``encode_prompt``)."""
        from diffusers import SanaPipeline

        c = self.components
        pipe = getattr(self, "_sana_text_pipe", None)
        if pipe is None or pipe.text_encoder is not c["text_encoder"]:
            pipe = SanaPipeline(
                tokenizer=c["tokenizer"],
                text_encoder=c["text_encoder"],
                vae=None,
                transformer=None,
                scheduler=None,
            )
            pipe.set_progress_bar_config(disable=True)
            self._sana_text_pipe = pipe
        return pipe

    def _encode_plain(self, prompts: list[str]) -> Cond:
        tok, enc = self.components["tokenizer"], self.components["text_encoder"]
        tok.padding_side = "right"
        batch = tok(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = batch.attention_mask.to(enc.device)
        h = enc(batch.input_ids.to(enc.device), attention_mask=mask)[0]  # (B, L, D)
        return Cond({"encoder_hidden_states": h, "encoder_attention_mask": mask})

    def _forward(self, net, x_t, t, cond):
        scale = float(self.denoiser.config.get("timestep_scale", 1.0))
        out = net(
            x_t,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            timestep=t.float() * scale,
        ).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned-sigma heads: keep the velocity
            out = out[:, : x_t.shape[1]]
        return out

    @torch.no_grad()
    def encode_images(self, images):
        z = self.vae.encode(self._vae_in(images)).latent
        return (z * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents):
        x = self.vae.decode(self._vae_in(latents / self.vae.config.scaling_factor)).sample
        return x.float().clamp(-1, 1)


class SD3Backbone(Backbone):
    """Stable Diffusion 3: MMDiT (``SD3Transformer2DModel``) on 16-channel KL latents,
    rectified flow with the scheduler's ``shift`` (3.0 for SD3-medium), three text encoders.

    Prompts are encoded as ``StableDiffusion3Pipeline.encode_prompt`` (and the official DDSPO
    SD3 adapter) do: the penultimate hidden states of CLIP-L and CLIP-G, concatenated on
    features and zero-padded to T5's width, then concatenated with the T5 sequence on tokens;
    the pooled projection is the concatenation of both CLIPs' ``text_embeds``. The empty
    prompt goes through the same path, as the pipeline encodes its default negative prompt,
    so CFG sampling matches the pipeline. The T5 sequence is :attr:`max_sequence_length`
    tokens: 77 as the official DDSPO SD3 trainer (``ddspo/args.py``), not the pipeline's
    default 256 (pass ``max_sequence_length=77`` to the pipeline for the same samples).

    Sampling defaults (28 steps, guidance 7.0) are ``StableDiffusion3Pipeline.__call__``'s,
    the settings of the SD3-medium release.
    """

    name = "sd3"
    flow = True
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_subfolder = "transformer"
    default_guidance = 7.0
    default_steps = 28
    text_keys = ("text_encoder", "text_encoder_2", "text_encoder_3")
    max_sequence_length: int = 77  # T5 tokens (official DDSPO SD3 trainer)

    def _make_process(self, prediction_type):
        if prediction_type not in (None, "flow"):
            raise UsageError(f"sd3 is a flow model; prediction_type {prediction_type!r} is invalid")
        cfg = self.scheduler_config
        T = int(cfg.get("num_train_timesteps", 1000))
        self.max_sequence_length = min(
            type(self).max_sequence_length, int(self.components["tokenizer_3"].model_max_length)
        )
        return FlowProcess(
            FlowSchedule(shift=float(cfg.get("shift") or 1.0), num_train_timesteps=T)
        )

    def pipeline_call_kwargs(self) -> dict:
        # the pipeline pads T5 to 256 tokens by default; those extra (padding) tokens take
        # part in the joint attention and change the images
        return {"max_sequence_length": self.max_sequence_length}

    def _encode(self, prompts: list[str]) -> Cond:
        # both CLIPs pad to the first tokenizer's length, as the pipeline's tokenizer_max_length
        clip_len = self.components["tokenizer"].model_max_length
        hs, pooled = [], []
        for tk, ek in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            tok, enc = self.components[tk], self.components[ek]
            ids = token_ids(tok, prompts, clip_len)
            out = enc(ids.to(enc.device), output_hidden_states=True)
            hs.append(out.hidden_states[-2])  # (B, L, D_i)
            pooled.append(out[0])  # text_embeds, (B, P_i)
        tok, enc = self.components["tokenizer_3"], self.components["text_encoder_3"]
        ids = token_ids(tok, prompts, self.max_sequence_length)
        t5 = enc(ids.to(enc.device))[0]  # (B, S, D_T5)
        clip = torch.cat(hs, dim=-1).to(t5)  # (B, L, D_1 + D_2)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, L, D_T5)
        h = torch.cat([clip, t5], dim=-2)  # (B, L + S, D_T5)
        return Cond({"encoder_hidden_states": h, "pooled_projections": torch.cat(pooled, -1)})

    def _forward(self, net, x_t, t, cond):
        c = cond.tensors
        return net(
            hidden_states=x_t,
            timestep=t.float(),
            encoder_hidden_states=c["encoder_hidden_states"],
            pooled_projections=c["pooled_projections"],
        ).sample


class FluxBackbone(Backbone):
    """FLUX.1 ([dev], [schnell]): the MMDiT ``FluxTransformer2DModel`` on 16-channel KL
    latents packed into 2 x 2 patches (64 features per token), with RoPE position ids and,
    for the guidance-distilled [dev], a guidance embedding; rectified flow.

    * Latents stay ``(B, 16, h, w)`` everywhere (pair files, the loss, the sampler);
      :meth:`_forward` packs them as ``FluxPipeline._pack_latents``, passes the image ids of
      ``_prepare_latent_image_ids`` and all-zero text ids, the timestep as ``sigma`` (the
      pipeline's ``timestep / 1000``), and unpacks the velocity. The per-sample MSE of the
      methods does not depend on the token order, so packing changes no loss.
    * Guidance: [dev] has no classifier-free guidance; the guidance value is an input of
      every forward (``guidance_embeds``). :attr:`guidance` (the trainer's
      ``--flux-guidance``, default the pipeline's 3.5) is used for every row a method
      evaluates, policy and reference alike, including ``f_ref(x_t^l, c-)``. Sampling runs
      one conditional forward per step with ``guidance`` in the embedding, as
      ``FluxPipeline.__call__`` with ``true_cfg_scale=1``; ``negative_prompt`` is unused.
    * Prompts are encoded as ``FluxPipeline.encode_prompt``: CLIP-L's pooled output and the
      T5 sequence (last hidden state) padded to :attr:`max_sequence_length` tokens, the
      pipeline's default 512 (capped by the T5 tokenizer's ``model_max_length``); sampling
      with the pipeline's defaults therefore reproduces ours. ``""`` is encoded like any prompt.
    * Noise levels: the scheduler's resolution-dependent shift. With
      ``use_dynamic_shifting`` (FLUX.1-dev) the shift is ``exp(mu)``, ``mu`` from the image
      token count (``calculate_shift``), for sampling and training alike (training at the
      dataset's resolution, :attr:`resolution`); otherwise the config's ``shift``
      ([schnell]: 1). Sampling uses the pipeline's sigma grid ``linspace(1, 1/n, n)``.
    * The default resolution is the VAE config's ``sample_size`` (1024 for FLUX.1, the
      pipeline's ``default_sample_size * vae_scale_factor``).

    Sampling defaults (28 steps, guidance 3.5) are ``FluxPipeline.__call__``'s (FLUX.1-dev).
    """

    name = "flux"
    flow = True
    pipeline_class = "FluxPipeline"
    denoiser_subfolder = "transformer"
    default_guidance = 3.5
    default_steps = 28
    text_keys = ("text_encoder", "text_encoder_2")
    max_sequence_length: int = 512  # T5 tokens: FluxPipeline's default
    guidance: float = 3.5  # the guidance embedding of every training forward

    def __init__(self, components, *, prediction_type=None, pipeline_config=None):
        super().__init__(
            components, prediction_type=prediction_type, pipeline_config=pipeline_config
        )
        self.latent_channels = int(self.denoiser.config.in_channels) // 4  # 2x2 packing
        self.max_sequence_length = min(
            type(self).max_sequence_length, int(self.components["tokenizer_2"].model_max_length)
        )

    def _default_resolution(self) -> int:
        return int(self.vae.config.sample_size)

    def pipeline_call_kwargs(self) -> dict:
        # FluxPipeline pads T5 to 512 tokens by default: only a shorter cap (a tokenizer whose
        # model_max_length is below 512, such as the tiny one's) needs saying
        n = self.max_sequence_length
        return {} if n == type(self).max_sequence_length else {"max_sequence_length": n}

    def _make_process(self, prediction_type):
        if prediction_type not in (None, "flow"):
            raise UsageError(
                f"flux is a flow model; prediction_type {prediction_type!r} is invalid"
            )
        cfg = self.scheduler_config
        unsupported = [
            k
            for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                      "shift_terminal", "invert_sigmas", "stochastic_sampling")
            if cfg.get(k)
        ]  # fmt: skip
        if cfg.get("use_dynamic_shifting") and cfg.get("time_shift_type", "exponential") != (
            "exponential"
        ):
            unsupported.append("time_shift_type")
        if unsupported:
            raise UsageError(f"flux scheduler: unsupported settings {unsupported}")
        self._resolution = self._default_resolution()
        return self._process_for(self._resolution // self._vae_scale_factor())

    def _process_for(self, latent_side: int) -> FlowProcess:
        """The flow process of ``latent_side x latent_side`` latents (its shift)."""
        cfg = self.scheduler_config
        shift = float(cfg.get("shift") or 1.0)
        if cfg.get("use_dynamic_shifting"):
            shift = resolution_shift(
                (latent_side // 2) ** 2,  # image tokens after 2x2 packing
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        T = int(cfg.get("num_train_timesteps", 1000))
        return FlowProcess(FlowSchedule(shift=shift, num_train_timesteps=T, grid="pipeline"))

    @property
    def resolution(self) -> int:
        """The training image size, whose token count sets the dynamic shift (the trainer
        sets it from the dataset's latents)."""
        return self._resolution

    @resolution.setter
    def resolution(self, value: int) -> None:
        self.process = self._process_for(self.latent_shape(int(value))[-1])  # checks it first
        self.schedule = self.process.schedule
        self._resolution = int(value)

    def latent_shape(self, resolution=None):
        shape = super().latent_shape(resolution)
        if shape[-1] % 2:
            raise UsageError(
                f"resolution {resolution or self.default_resolution} gives an odd latent side "
                f"{shape[-1]}; flux packs 2 x 2 latent patches"
            )
        return shape

    def _encode(self, prompts: list[str]) -> Cond:
        tok, enc = self.components["tokenizer"], self.components["text_encoder"]
        ids = token_ids(tok, prompts, tok.model_max_length)
        pooled = enc(ids.to(enc.device), output_hidden_states=False).pooler_output  # (B, P)
        tok, enc = self.components["tokenizer_2"], self.components["text_encoder_2"]
        ids = token_ids(tok, prompts, self.max_sequence_length)
        h = enc(ids.to(enc.device), output_hidden_states=False)[0]  # (B, S, D_T5)
        return Cond({"encoder_hidden_states": h, "pooled_projections": pooled.to(h.device)})

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``, as ``FluxPipeline._pack_latents``."""
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, h: int, w: int) -> Tensor:
        """The inverse of :meth:`pack` for ``h x w`` latents."""
        b, _, d = x.shape
        x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, d // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> Tensor:
        """RoPE ids ``(h/2 * w/2, 3)`` of the packed tokens: ``(0, row, col)``."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def _forward(self, net, x_t, t, cond):
        c = cond.tensors
        b, _, h, w = x_t.shape
        h_txt = c["encoder_hidden_states"]
        guidance = None
        if self.denoiser.config.get("guidance_embeds", False):  # net may be DDP-wrapped
            # float32 as the pipeline passes it (a Cond entry would be cast to the net's dtype)
            g = getattr(self, "_sampling_guidance", self.guidance)
            guidance = torch.full((b,), float(g), device=x_t.device, dtype=torch.float32)
        out = net(
            hidden_states=self.pack(x_t),
            encoder_hidden_states=h_txt,
            pooled_projections=c["pooled_projections"],
            timestep=t.float() / self.num_train_timesteps,
            img_ids=self.image_ids(h, w, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(h_txt.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            guidance=guidance,
        ).sample
        return self.unpack(out, h, w)

    @torch.no_grad()
    def generate(self, prompts, generator=None, *, guidance=None, negative_prompt="", **kw):
        """Sample latents ``(B, 16, h, w)``: Euler on the pipeline's grid with the shift of the
        latents' size, one conditional forward per step with ``guidance`` (default 3.5) in
        the guidance embedding (no CFG; ``negative_prompt`` is unused)."""
        self._sampling_guidance = self.default_guidance if guidance is None else float(guidance)
        try:
            return super().generate(prompts, generator, guidance=1.0, **kw)
        finally:
            del self._sampling_guidance

    def _uncond(self, negative_prompt, n):
        return None  # no CFG: guided() with scale 1 runs the conditional branch only

    def sampling_process(self, x: Tensor) -> FlowProcess:
        return self._process_for(x.shape[-1])  # the shift of these latents' token count


#: backbone name -> its adapter, each under its own ``name``
ADAPTERS: dict[str, type[Backbone]] = {
    cls.name: cls for cls in (SDBackbone, SDXLBackbone, SanaBackbone, SD3Backbone, FluxBackbone)
}
#: every backbone name (``--backbone``, ``--tiny NAME``); the one list the commands import
BACKBONES = tuple(ADAPTERS)
#: the rectified-flow backbones (``--precondition-outputs`` applies, flow training defaults)
FLOW_BACKBONES = tuple(name for name, cls in ADAPTERS.items() if cls.flow)


# ---------------------------------------------------------------------------- loading


def _detect(index: dict, path: Path) -> str:
    cls = str(index.get("_class_name", ""))
    if "XL" in cls and cls.startswith("StableDiffusion"):
        return "sdxl"
    if cls.startswith("StableDiffusion") and "3" not in cls:
        return "sd"
    if cls.startswith("Sana"):
        return "sana"
    if cls.startswith("StableDiffusion3"):
        return "sd3"
    if cls.startswith("Flux") and not cls.startswith("Flux2"):
        return "flux"
    if "text_encoder_2" in index and "unet" in index:
        return "sdxl"
    if "unet" in index and "text_encoder" in index:
        return "sd"
    if "transformer" in index and "Sana" in str(index["transformer"]):
        return "sana"
    if "transformer" in index and "SD3" in str(index["transformer"]):
        return "sd3"
    if "transformer" in index and "FluxTransformer2DModel" in str(index["transformer"]):
        return "flux"
    raise UsageError(f"{path}: unsupported pipeline class {cls!r} (supported: {BACKBONES})")


def _load_component(path: Path, key: str, entry) -> Any:
    import diffusers
    import transformers

    lib_name, cls_name = entry
    lib = {"diffusers": diffusers, "transformers": transformers}.get(lib_name)
    cls = getattr(lib, cls_name, None) if lib is not None else None
    if cls is None and key.startswith("tokenizer") and lib_name == "transformers":
        cls = transformers.AutoTokenizer  # e.g. a *TokenizerFast name a newer release dropped
    if cls is None:
        raise UsageError(
            f"{path / 'model_index.json'}: unknown class {lib_name}.{cls_name} for {key!r}"
        )
    if not (path / key).is_dir():
        raise UsageError(f"{path / key}: missing component folder")
    try:
        if key == "scheduler":
            return cls.from_pretrained(path, subfolder=key, local_files_only=True)
        return cls.from_pretrained(path / key, local_files_only=True)
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # a .bin that needs more than
        # tensors: diffusers and transformers read .bin files with torch.load(weights_only=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path / key}: cannot load {cls_name} ({first})") from None


def load_backbone(
    pretrained_dir: str | Path, name: str | None = None, prediction_type: str | None = None
) -> Backbone:
    """Load a backbone from a local diffusers pipeline directory (never the network).

    ``name`` is detected from ``model_index.json`` when not given; ``prediction_type``
    overrides the scheduler config's (SD/SDXL). Raises a one-line ``UsageError`` when the
    directory is missing, not a diffusers pipeline, or holds an unknown class.
    """
    path = Path(pretrained_dir)
    if not path.is_dir():
        raise UsageError(f"{path}: not a directory")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UsageError(f"{path}: no model_index.json, not a diffusers pipeline directory")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as e:
        raise UsageError(f"{index_file}: invalid JSON ({e})") from None
    if not isinstance(index, dict):
        raise UsageError(f"{index_file}: not a diffusers model index")
    detected = _detect(index, path)
    name = name or detected
    if name not in ADAPTERS:
        raise UsageError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    adapter = ADAPTERS[name]
    needed = (adapter.denoiser_subfolder, "vae", "scheduler", *adapter.text_keys) + tuple(
        k.replace("text_encoder", "tokenizer") for k in adapter.text_keys
    )
    entries = {k: v for k, v in index.items() if not k.startswith("_")}
    missing = [k for k in needed if not (isinstance(entries.get(k), list) and entries[k][0])]
    if missing:
        raise UsageError(f"{index_file}: missing components {missing} for backbone {name!r}")
    components = {k: _load_component(path, k, entries[k]) for k in needed}
    # keep plain settings (e.g. force_zeros_for_empty_prompt); drop components we do not load
    extra = {
        k: v
        for k, v in entries.items()
        if k not in needed
        and k != "requires_safety_checker"
        and not (isinstance(v, list) and v[:1] != [None])
    }
    return adapter(components, prediction_type=prediction_type, pipeline_config=extra)


def model_index(name: str, components: dict[str, Any], extra: dict | None = None) -> dict:
    """A diffusers ``model_index.json`` dict for ``components`` (library, class per entry)."""
    import diffusers

    index: dict[str, Any] = {
        "_class_name": ADAPTERS[name].pipeline_class,
        "_diffusers_version": diffusers.__version__,
    }
    for key, obj in sorted(components.items()):
        lib = type(obj).__module__.split(".")[0]
        index[key] = [lib, type(obj).__name__]
    if name == "sd":
        index.update(
            safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None]
        )
        index["requires_safety_checker"] = False
    if name == "sdxl":
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
        index["force_zeros_for_empty_prompt"] = True
    if name in ("sd3", "flux"):  # the pipeline's optional IP-adapter components, not loaded
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    index.update(extra or {})
    return index


def save_components(
    name: str, components: dict[str, Any], out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write ``components`` as a diffusers pipeline directory (``model_index.json`` + subfolders)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, obj in components.items():
        obj.save_pretrained(out / key)
    (out / "model_index.json").write_text(
        json.dumps(model_index(name, components, extra), indent=2) + "\n"
    )
    return out
