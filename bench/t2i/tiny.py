"""Tiny random text-to-image components built from configs, for tests and ``--tiny`` runs.

Nothing is downloaded: every model is built from a config with random weights (seeded),
and every tokenizer from an in-memory vocabulary. The shapes mirror the real backbones
so that the adapters in :mod:`bench.t2i.backbones` run the same code paths on them:

* ``sd``   – SD-1.x: ``UNet2DConditionModel`` (32/64 channels, cross-attention 32),
  ``AutoencoderKL`` (2 levels, pixel/latent factor 2), ``CLIPTextModel`` (hidden 32) with a
  byte-level ``CLIPTokenizer``, ``DDIMScheduler`` (scaled_linear, steps_offset 1).
* ``sdxl`` – SDXL: the same UNet with ``addition_embed_type="text_time"`` and
  cross-attention 64 (= 32 + 32, the two encoders' penultimate states concatenated), a
  ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` (pooled projection 32).
* ``sana`` – SANA: ``SanaTransformer2DModel`` (2 layers), ``AutoencoderDC`` (2 levels,
  factor 2; it builds and runs on CPU), a tiny ``Gemma2Model`` (SANA's real encoder family)
  with a byte-fallback ``GemmaTokenizer``, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
* ``sd3``  – SD3: ``SD3Transformer2DModel`` (2 joint blocks, patch 2) on 16-channel latents,
  an ``AutoencoderKL`` with SD3's ``shift_factor`` and no quant convs, two
  ``CLIPTextModelWithProjection`` (hidden 32 and 48, the CLIP-L/CLIP-G pair) with the
  byte-level ``CLIPTokenizer``, a ``T5EncoderModel`` (d_model 96, wider than the CLIPs'
  80 so the zero padding runs) with a ``T5Tokenizer`` built from an in-memory unigram
  vocabulary, ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3-medium's).
* ``flux`` – FLUX.1-dev: ``FluxTransformer2DModel`` (1 double-stream + 1 single-stream
  block, 2 heads x 16, RoPE axes 4 + 6 + 6, ``guidance_embeds=True``) on 16-channel latents
  packed 2 x 2 (64 input features), an ``AutoencoderKL`` with FLUX's 16 channels, scaling
  and shift factors and no quant convs, a ``CLIPTextModel`` (hidden 32; its pooled output)
  and the SD3 ``T5EncoderModel``/``T5Tokenizer``, the FLUX.1-dev scheduler
  (``use_dynamic_shifting``, base/max shift 0.5/1.15 over 256..4096 image tokens).

Latents are 16 x 16 with 4 channels (16 for sd3 and flux) and images 32 x 32 for all. On an idle
2-core CPU a UNet forward at batch 8 takes about 40 ms, the SANA transformer's about 6 ms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bench.t2i.backbones import ADAPTERS, BACKBONES, Backbone, save_components
from bench.t2i.errors import UsageError
from bench.t2i.scorers import ClipScorer
from bench.t2i.tokens import byte_chars

TINY_LATENT = 16  # latent side
TINY_CHANNELS = 4  # latent channels
TINY_TEXT_LEN = 24  # tokenizer max length (CLIP pads to it; SANA uses it as max_sequence_length)
TINY_SD3_CHANNELS = 16  # SD3's latent channels


def clip_tokenizer(max_length: int = TINY_TEXT_LEN):
    """A byte-level ``CLIPTokenizer`` with no merges: one token per character (the offline
    tokenizer trap in tests/README.md)."""
    from transformers import CLIPTokenizer

    chars = byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def gemma_tokenizer(max_length: int = TINY_TEXT_LEN):
    """A ``GemmaTokenizer`` over lowercase letters and a space marker, other bytes by fallback."""
    from transformers import GemmaTokenizer

    vocab = {s: i for i, s in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz\u2581":
        vocab[c] = len(vocab)
    return GemmaTokenizer(
        vocab=vocab,
        merges=[],
        add_bos_token=True,
        padding_side="right",
        model_max_length=max_length,
    )


def t5_tokenizer(max_length: int = TINY_TEXT_LEN):
    """A ``T5Tokenizer`` (unigram) over letters, digits, punctuation and the ``▁`` word marker,
    built from an in-memory vocabulary; other characters map to ``<unk>``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    pieces += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(with_projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig

    kw = dict(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_TEXT_LEN,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    if with_projection:
        kw["projection_dim"] = hidden
    return CLIPTextConfig(**kw)


def _unet(cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        # projection input = 6 time ids x addition_time_embed_dim + pooled text (32)
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    return UNet2DConditionModel(
        sample_size=TINY_LATENT,
        in_channels=TINY_CHANNELS,
        out_channels=TINY_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    )


def _vae_kl(**overrides):
    """SD's tiny VAE (4 latent channels); ``overrides`` change its config (SD3's layout)."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=TINY_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_LATENT * 2,
        scaling_factor=0.18215,
    )
    return AutoencoderKL(**(config | overrides))


def _vae_sd3():
    """SD3's VAE layout: 16 latent channels, a shift factor, no quant convs."""
    return _vae_kl(
        latent_channels=TINY_SD3_CHANNELS,
        scaling_factor=1.5305,  # SD3-medium's
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _t5_config(vocab_size: int):
    """The tiny T5 encoder (d_model 96) of sd3 and flux."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=96,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _sd3_components(build, prediction_type: str | None) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if prediction_type not in (None, "flow"):
        raise UsageError(f"sd3 is a flow model; prediction_type {prediction_type!r} is invalid")
    tok3 = t5_tokenizer()
    t5_cfg = _t5_config(len(tok3))
    clip_l, clip_g = _clip_text_config(True, hidden=32), _clip_text_config(True, hidden=48)
    return dict(
        transformer=build(
            0,
            lambda: SD3Transformer2DModel(
                sample_size=TINY_LATENT,
                patch_size=2,
                in_channels=TINY_SD3_CHANNELS,
                out_channels=TINY_SD3_CHANNELS,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=t5_cfg.d_model,
                caption_projection_dim=32,
                pooled_projection_dim=clip_l.projection_dim + clip_g.projection_dim,
                pos_embed_max_size=TINY_LATENT,
            ),
        ),
        vae=_frozen(build(1, _vae_sd3)),
        text_encoder=_frozen(build(2, lambda: CLIPTextModelWithProjection(clip_l))),
        text_encoder_2=_frozen(build(3, lambda: CLIPTextModelWithProjection(clip_g))),
        text_encoder_3=_frozen(build(4, lambda: T5EncoderModel(t5_cfg))),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def _flux_components(build, prediction_type: str | None) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    if prediction_type not in (None, "flow"):
        raise UsageError(f"flux is a flow model; prediction_type {prediction_type!r} is invalid")
    tok2 = t5_tokenizer()
    t5_cfg, clip_cfg = _t5_config(len(tok2)), _clip_text_config(hidden=32)
    return dict(
        transformer=build(
            0,
            lambda: FluxTransformer2DModel(
                patch_size=1,
                in_channels=4 * TINY_SD3_CHANNELS,  # 2 x 2 packed latent patches
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=t5_cfg.d_model,
                pooled_projection_dim=clip_cfg.hidden_size,  # CLIP's pooled output
                guidance_embeds=True,  # FLUX.1-dev
                axes_dims_rope=(4, 6, 6),  # sums to the head dim
            ),
        ),
        vae=_frozen(
            build(
                1,
                lambda: _vae_kl(
                    latent_channels=TINY_SD3_CHANNELS,
                    scaling_factor=0.3611,  # FLUX.1's
                    shift_factor=0.1159,
                    use_quant_conv=False,
                    use_post_quant_conv=False,
                ),
            )
        ),
        text_encoder=_frozen(build(2, lambda: CLIPTextModel(clip_cfg))),
        text_encoder_2=_frozen(build(3, lambda: T5EncoderModel(t5_cfg))),
        tokenizer=clip_tokenizer(),
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    )


def _ddim(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _frozen(m: torch.nn.Module) -> torch.nn.Module:
    return m.eval().requires_grad_(False)


def _sana_components(build) -> dict[str, Any]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = gemma_tokenizer()
    text_cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return dict(
        transformer=build(
            0,
            lambda: SanaTransformer2DModel(
                in_channels=TINY_CHANNELS,
                out_channels=TINY_CHANNELS,
                num_attention_heads=2,
                attention_head_dim=16,
                num_layers=2,
                num_cross_attention_heads=2,
                cross_attention_head_dim=16,
                cross_attention_dim=32,
                caption_channels=32,
                mlp_ratio=2.0,
                sample_size=TINY_LATENT,
                patch_size=1,
            ),
        ),
        vae=_frozen(
            build(
                1,
                lambda: AutoencoderDC(
                    in_channels=3,
                    latent_channels=TINY_CHANNELS,
                    attention_head_dim=8,
                    encoder_block_types=("ResBlock", "ResBlock"),
                    decoder_block_types=("ResBlock", "ResBlock"),
                    encoder_block_out_channels=(8, 16),
                    decoder_block_out_channels=(8, 16),
                    encoder_layers_per_block=(1, 1),
                    decoder_layers_per_block=(1, 1),
                    encoder_qkv_multiscales=((), ()),
                    decoder_qkv_multiscales=((), ()),
                    scaling_factor=0.41407,
                ),
            )
        ),
        text_encoder=_frozen(build(2, lambda: Gemma2Model(text_cfg))),
        tokenizer=tok,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def tiny_components(name: str, seed: int = 0, prediction_type: str | None = None) -> dict[str, Any]:
    """The components of a tiny pipeline, keyed by diffusers' pipeline component names.

    Weights are a pure function of ``(name, seed)``: each module is built right after
    ``torch.manual_seed`` of a fixed offset of ``seed``. The global RNG state is restored.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in ADAPTERS:
        raise UsageError(f"tiny backbone must be one of {tuple(ADAPTERS)}, got {name!r}")
    if name == "sana" and prediction_type not in (None, "flow"):
        raise UsageError(f"sana is a flow model; prediction_type {prediction_type!r} is invalid")
    state = torch.random.get_rng_state()
    try:

        def build(offset: int, fn):
            torch.manual_seed(seed * 1000 + offset)
            return fn()

        if name == "sd":
            return dict(
                unet=build(0, lambda: _unet(32, sdxl=False)),
                vae=_frozen(build(1, _vae_kl)),
                text_encoder=_frozen(build(2, lambda: CLIPTextModel(_clip_text_config()))),
                tokenizer=clip_tokenizer(),
                scheduler=_ddim(prediction_type or "epsilon"),
            )
        if name == "sdxl":
            return dict(
                unet=build(0, lambda: _unet(64, sdxl=True)),
                vae=_frozen(build(1, _vae_kl)),
                text_encoder=_frozen(build(2, lambda: CLIPTextModel(_clip_text_config()))),
                text_encoder_2=_frozen(
                    build(3, lambda: CLIPTextModelWithProjection(_clip_text_config(True)))
                ),
                tokenizer=clip_tokenizer(),
                tokenizer_2=clip_tokenizer(),
                scheduler=_ddim(prediction_type or "epsilon"),
            )
        if name == "sd3":
            return _sd3_components(build, prediction_type)
        if name == "flux":
            return _flux_components(build, prediction_type)
        return _sana_components(build)
    finally:
        torch.random.set_rng_state(state)


def save_tiny_pipeline(
    name: str, out_dir: str | Path, seed: int = 0, prediction_type: str | None = None
) -> Path:
    """Save a tiny random pipeline of backbone ``name`` to ``out_dir`` in diffusers layout."""
    return save_components(name, tiny_components(name, seed, prediction_type), out_dir)


def save_tiny_causal_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Llama causal LM and a byte-fallback tokenizer (for the ``llm``
    perturbation path in tests; its answers are noise, so every prompt falls back)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = gemma_tokenizer(max_length=4096)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_backbone(name: str, seed: int = 0, prediction_type: str | None = None) -> Backbone:
    """A backbone of tiny random models built from configs (this module), CPU-fast."""
    if name not in ADAPTERS:
        raise UsageError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    extra = {"force_zeros_for_empty_prompt": True} if name == "sdxl" else {}
    return ADAPTERS[name](
        tiny_components(name, seed, prediction_type),
        prediction_type=prediction_type,
        pipeline_config=extra,
    )


# ----------------------------------------------------------------------- tiny scorers

#: ``evaluate.py --tiny``: random tiny CLIPs standing in for the real scorers (seed, learned
#: logit scale or None) -- for smoke runs on CPU, never for numbers anyone should read
TINY_SCORERS = {"clip": (0, None), "pickscore": (1, 50.0)}


def tiny_clip(seed: int = 0, logit_scale: float | None = None):
    """A random tiny ``CLIPModel`` (hidden 32, 32x32 images) with an offline byte-level
    ``CLIPTokenizer`` and a ``CLIPImageProcessor``: ``(model, tokenizer, image_processor)``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = clip_tokenizer(max_length=32)
    ids = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
    layers = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "max_position_embeddings": 32,
            **ids,
            **layers,
        },
        vision_config={"hidden_size": 32, "image_size": 32, "patch_size": 8, **layers},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if logit_scale is not None:
        model.logit_scale.data.fill_(math.log(logit_scale))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tok, proc


def save_tiny_clip(path: str | Path, seed: int = 0, logit_scale: float | None = None) -> Path:
    """:func:`tiny_clip` saved as a local transformers directory (what ``--clip`` reads)."""
    from transformers import CLIPProcessor

    model, tok, proc = tiny_clip(seed, logit_scale)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return Path(path)


def tiny_scorer(kind: str, device="cpu") -> ClipScorer:
    """A :data:`TINY_SCORERS` scorer, built in memory (nothing downloaded or written)."""
    seed, scale = TINY_SCORERS[kind]
    model, tok, proc = tiny_clip(seed, scale)
    return ClipScorer(kind, model.to(device), tok, proc, device)
