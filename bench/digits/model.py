"""The tiny Stable Diffusion of the digits benchmark: built from configs, trained on the
scenes, saved as a standard ``StableDiffusionPipeline`` directory, cached by its config.

* tokenizer: a ``CLIPTokenizer`` over the 256 byte characters plus whole-word merges for
  the caption words (built in code, offline; saved with the pipeline);
* ``AutoencoderKL`` (16 x 16 x 3 pixels <-> 4 x 8 x 8 latents), trained first on scenes;
* ``CLIPTextModel`` (hidden 32, 2 layers) and ``UNet2DConditionModel`` (32/64 channels,
  cross-attention at both levels), trained together on (latent, caption) with captions
  dropped to "" 10 % of the time (so classifier-free guidance works) and a share of the
  captions wrong (``caption_error``), so the base model follows prompts only partly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.t2i.tokens import byte_chars

from . import scenes
from .util import atomic_dir, done, mark_done

MAX_TOKENS = 16


@dataclass(frozen=True)
class BaseConfig:
    """Everything that decides the base pipeline's weights (its cache key)."""

    n_scenes: int = 24000
    caption_error: float = 0.3
    cfg_dropout: float = 0.1
    vae_steps: int = 300
    vae_lr: float = 2e-3
    unet_steps: int = 1500
    unet_lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    refine_steps: int = 1200  # phase 2: a warm restart of the UNet + text encoder schedule
    refine_lr: float = 5e-4

    def phase1(self) -> BaseConfig:
        """The config of the first phase (no refinement), whose cache phase 2 starts from."""
        return replace(self, refine_steps=0, refine_lr=0.0)

    def key(self) -> str:
        d = asdict(self)
        if self.refine_steps == 0:  # phase-1 keys predate the refine fields: keep them
            d.pop("refine_steps")
            d.pop("refine_lr")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------ tokenizer


def build_tokenizer():
    """A ``CLIPTokenizer`` in which every caption word is one token (unknown text still
    tokenizes, character by character). Merges are added until each word is whole."""
    from transformers import CLIPTokenizer

    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for _ in range(10):
        vocab_now = dict(vocab, **{"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
        tok = CLIPTokenizer(vocab=vocab_now, merges=list(merges), model_max_length=MAX_TOKENS)
        split = [tok.tokenize(w) for w in scenes.WORDS]
        todo = [parts for parts in split if len(parts) > 1]
        if not todo:
            return tok
        for parts in todo:  # join the current pieces left to right, after existing merges
            cur = parts[0]
            for p in parts[1:]:
                if (cur, p) not in merges:
                    merges.append((cur, p))
                cur += p
                vocab.setdefault(cur, len(vocab))
    raise RuntimeError("could not build whole-word merges for the caption words")


# ------------------------------------------------------------------------ components


def build_components(seed: int) -> dict:
    """Random components (seeded) in diffusers' pipeline naming."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=scenes.SIDE,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=scenes.SIDE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(vae=vae, text_encoder=text, unet=unet, tokenizer=tok, scheduler=sched)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """``(N, 16, 16)`` in [0, 1] -> ``(N, 3, 16, 16)`` in [-1, 1] (grey as RGB)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() * 2 - 1
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over 5 % of the steps, then cosine decay to 0."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train_vae(vae, pixels: torch.Tensor, cfg: BaseConfig, progress: bool) -> float:
    """Fit the autoencoder (L1 + small KL); set its ``scaling_factor`` to 1 / latent std."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="base: vae", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_lr)
        x = pixels[torch.randint(len(pixels), (cfg.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(pixels[:2048]).latent_dist.mean
        rec = vae.decode(z[:512]).sample
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return float((rec - pixels[:512]).abs().mean())


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means, ``(N, 4, 8, 8)``."""
    sf = float(vae.config.scaling_factor)
    with torch.no_grad():
        parts = [
            vae.encode(pixels[i : i + 1024]).latent_dist.mean for i in range(0, len(pixels), 1024)
        ]
    return torch.cat(parts) * sf


def train_unet(
    comps: dict,
    latents: torch.Tensor,
    texts: list[str],
    cfg: BaseConfig,
    progress: bool,
    phase: int = 1,
):
    """Joint text-encoder + UNet epsilon-prediction training (phase 1: ``unet_steps`` at
    ``unet_lr``; phase 2: ``refine_steps`` at ``refine_lr``); returns the losses."""
    steps, peak = (cfg.unet_steps, cfg.unet_lr) if phase == 1 else (cfg.refine_steps, cfg.refine_lr)
    unet, text, tok, sched = (comps[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    gen = torch.Generator().manual_seed(cfg.seed + 2 if phase == 1 else cfg.seed + 3)
    unet.requires_grad_(True)
    text.requires_grad_(True)
    ids = tok(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids = ids.input_ids
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    abar = sched.alphas_cumprod.float()
    unet.train()
    text.train()
    losses: list[float] = []
    for step in tqdm(range(steps), desc=f"base: unet ({phase})", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, peak)
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0, c = latents[idx], ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout
        c[drop] = empty
        t = torch.randint(0, len(abar), (cfg.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encoder_hidden_states=text(c).last_hidden_state).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return losses


def save_pipeline(comps: dict, out: Path) -> None:
    """Save as a standard diffusers ``StableDiffusionPipeline`` directory."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(out)


def training_set(cfg: BaseConfig, digits: scenes.Digits):
    """The base model's scenes (as pixels) and captions, a pure function of ``cfg``."""
    rng = np.random.default_rng(cfg.seed)
    prompts = scenes.sample_train_prompts(cfg.n_scenes, rng)
    images = scenes.make_scenes(prompts, digits.train_x, digits.train_y, rng)
    texts, wrong = scenes.captions(prompts, cfg.caption_error, rng)
    return to_pixels(images), texts, wrong


def load_components(pipe: Path) -> dict:
    """The components of a saved pipeline directory (offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(local_files_only=True)
    return dict(
        vae=AutoencoderKL.from_pretrained(pipe / "vae", **kw).eval(),
        text_encoder=CLIPTextModel.from_pretrained(pipe / "text_encoder", **kw),
        unet=UNet2DConditionModel.from_pretrained(pipe / "unet", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(pipe / "tokenizer", **kw),
        scheduler=DDIMScheduler.from_pretrained(pipe / "scheduler", **kw),
    )


def train_base(
    cfg: BaseConfig,
    digits: scenes.Digits,
    out: Path,
    progress: bool = True,
    start: Path | None = None,
) -> dict:
    """Train the base pipeline into ``out`` (atomically) and return its training stats.
    Phase 1 trains everything from scratch; phase 2 (``start`` = the phase-1 pipeline)
    continues the UNet and text encoder for ``refine_steps``."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pixels, texts, wrong = training_set(cfg, digits)
    if start is None:
        comps = build_components(cfg.seed)
        vae_l1 = train_vae(comps["vae"], pixels, cfg, progress)
    else:
        comps = load_components(Path(start))
        vae_l1 = json.loads((Path(start).parent / "stats.json").read_text())["vae_l1"]
    latents = encode_latents(comps["vae"], pixels)
    losses = train_unet(comps, latents, texts, cfg, progress, phase=1 if start is None else 2)
    stats = {
        "config": asdict(cfg),
        "vae_l1": vae_l1,
        "unet_loss_last100": float(np.mean(losses[-100:])) if losses else None,
        "captions_wrong": float(wrong.mean()),
        "unet_params": sum(p.numel() for p in comps["unet"].parameters()),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    with atomic_dir(out) as tmp:
        save_pipeline(comps, tmp / "pipeline")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def cached_base(cfg: BaseConfig, digits, cache: Path, progress: bool = True) -> Path:
    """The pipeline dir of ``cfg`` under ``cache/base-<key>``, trained on first use."""
    out = Path(cache) / f"base-{cfg.key()}"
    if not done(out):
        start = (
            None if cfg.refine_steps == 0 else cached_base(cfg.phase1(), digits, cache, progress)
        )
        if out.exists():
            shutil.rmtree(out)
        train_base(cfg, digits, out, progress, start)
        mark_done(out, {"key": cfg.key()})
    return out / "pipeline"
