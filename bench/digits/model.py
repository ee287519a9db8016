"""The tiny Stable Diffusion of the digits benchmark: built from configs, trained on the
scenes, saved as a standard ``StableDiffusionPipeline`` directory, cached by its config.

* tokenizer: a ``CLIPTokenizer`` over the 256 byte characters plus whole-word merges for
  the caption words (built in code, offline; saved with the pipeline);
* ``AutoencoderKL`` (16 x 16 x 3 pixels <-> 4 x 8 x 8 latents), trained first on scenes;
* ``CLIPTextModel`` (hidden 32, 2 layers) and ``UNet2DConditionModel`` (32/64 channels,
  cross-attention at both levels), trained together on (latent, caption) with captions
  dropped to "" 10 % of the time (so classifier-free guidance works), a share of the
  captions' content wrong (``caption_error``), so the base model follows prompts only
  partly, and each detail phrase named half of the time (``detail``), so shorter prompts
  are in its distribution too. Constant learning rate after a warm-up; the saved weights
  are an exponential moving average (``ema``) of the trained ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench.t2i.errors import UsageError
from bench.t2i.tokens import byte_chars

from . import scenes
from .util import atomic_dir, done, mark_done

MAX_TOKENS = 20
SHIPPED = Path(__file__).resolve().parent / "base"  # the base pipeline shipped in the repo
MANIFEST = "manifest.json"  # its config, training stats and the sha256 of every file


@dataclass(frozen=True)
class BaseConfig:
    """Everything that decides the base pipeline's weights (its cache key)."""

    n_scenes: int = 24000
    caption_error: float = 0.2
    detail: float = 0.5  # probability that each detail phrase is named in a caption
    cfg_dropout: float = 0.1
    vae_steps: int = 1000  # 300 left the digits unreadable after a VAE round trip
    vae_lr: float = 5e-3
    unet_steps: int = 4000  # the first snapshot in the target regime (bench/RESULTS.md)
    unet_lr: float = 1e-3
    batch_size: int = 64
    ema: float = 0.999
    seed: int = 0

    def key(self) -> str:
        d = asdict(self)
        return "v3-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


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
    """Linear warmup over 5 % of the steps, then cosine decay to 0 (the VAE)."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _ema_decay(step: int, decay: float) -> float:
    """The EMA's decay at ``step``: ``(1 + step) / (10 + step)`` early on, at most ``decay``."""
    return min(decay, (1 + step) / (10 + step))


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
    snapshots: tuple[int, ...] = (),
    save=None,
):
    """Joint text-encoder + UNet epsilon-prediction training: ``unet_steps`` at ``unet_lr``
    (linear warm-up over 200 steps), then the EMA weights are loaded; returns the losses.

    ``save(step)`` is called after each step in ``snapshots`` with the EMA weights loaded
    (and may save them): the learning rate does not depend on ``unet_steps``, so the
    snapshot at step N is the base of the same config with ``unet_steps=N``, bit for bit."""
    unet, text, tok, sched = (comps[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    unet.requires_grad_(True)
    text.requires_grad_(True)
    ids = tok(
        texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    ids = ids.input_ids
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    abar = sched.alphas_cumprod.float()
    unet.train()
    text.train()
    losses: list[float] = []
    for step in tqdm(range(cfg.unet_steps), desc="base: unet", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * min(1.0, (step + 1) / 200)
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
        with torch.no_grad():
            decay = _ema_decay(step, cfg.ema)
            for e, p in zip(ema, params, strict=True):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(loss.item())
        if step + 1 in snapshots:
            with _loaded(params, ema):
                save(step + 1)
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return losses


@contextmanager
def _loaded(params: list[torch.Tensor], values: list[torch.Tensor]):
    """Temporarily copy ``values`` into ``params`` (restored afterwards, bit for bit)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


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
    prompts = scenes.sample_train_prompts(cfg.n_scenes, rng, cfg.detail)
    images = scenes.make_scenes(prompts, digits.train_x, digits.train_y, rng)
    texts, wrong = scenes.captions(prompts, cfg.caption_error, rng)
    return to_pixels(images), texts, wrong


def train_base(
    cfg: BaseConfig,
    digits: scenes.Digits,
    out: Path,
    progress: bool = True,
    snapshots: tuple[int, ...] = (),
    snapshot_dir: Path | None = None,
) -> dict:
    """Train the base pipeline into ``out`` (atomically) and return its training stats.
    ``snapshots``: steps at which the EMA pipeline is also saved, as
    ``snapshot_dir/step-N/pipeline`` (the base of ``unet_steps=N``; see :func:`train_unet`)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pixels, texts, wrong = training_set(cfg, digits)
    comps = build_components(cfg.seed)
    vae_l1 = train_vae(comps["vae"], pixels, cfg, progress)
    latents = encode_latents(comps["vae"], pixels)

    def save(step: int) -> None:
        with atomic_dir(Path(snapshot_dir) / f"step-{step}") as tmp:
            save_pipeline(comps, tmp / "pipeline")

    steps = snapshots if snapshot_dir is not None else ()
    losses = train_unet(comps, latents, texts, cfg, progress, steps, save)
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
        if out.exists():
            shutil.rmtree(out)
        train_base(cfg, digits, out, progress)
        mark_done(out, {"key": cfg.key()})
    return out / "pipeline"


class ShippedBaseError(UsageError):
    """A file of the shipped base pipeline is missing or differs from its checksum."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(folder: Path, cfg: BaseConfig, stats: dict, command: str) -> Path:
    """``folder/manifest.json`` for the pipeline in ``folder/pipeline``: the config (and its
    key), the training stats, the command that trains it and every file's sha256."""
    pipe = Path(folder) / "pipeline"
    files = sorted(p for p in pipe.rglob("*") if p.is_file())
    manifest = {
        "key": cfg.key(),
        "config": asdict(cfg),
        "stats": stats,
        "command": command,
        "sha256": {p.relative_to(pipe).as_posix(): _sha256(p) for p in files},
    }
    out = Path(folder) / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def shipped_base(cfg: BaseConfig, folder: Path = SHIPPED) -> tuple[Path, dict] | None:
    """The shipped pipeline and its stats when it was made with ``cfg`` (None when it was
    not, or none is shipped); :class:`ShippedBaseError` naming the first file that is missing or differs
    from its checksum."""
    man = Path(folder) / MANIFEST
    if not man.is_file():
        return None
    manifest = json.loads(man.read_text())
    if manifest.get("key") != cfg.key():
        return None
    pipe = Path(folder) / "pipeline"
    for rel, digest in sorted(manifest["sha256"].items()):
        f = pipe / rel
        if not f.is_file() or _sha256(f) != digest:
            raise ShippedBaseError(
                f"{f}: missing or changed (sha256 differs from {man.name}); restore it with "
                "git checkout, or train the base with --train-base"
            )
    return pipe, manifest["stats"]
