"""Backbone adapters on tiny random models: shapes, math hooks, loading, sampler parity."""

import json
import shutil

import pytest
import torch

from bench.t2i.backbones import (
    BACKBONES,
    Cond,
    load_backbone,
    prompt_generator,
)
from bench.t2i.tiny import save_tiny_pipeline, tiny_backbone

PROMPTS = ["a red cat on a mat", "", "two dogs"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbones():
    return {name: tiny_backbone(name) for name in BACKBONES}


# --------------------------------------------------------------------------- Cond


def test_cond_ops():
    a = Cond({"h": torch.randn(2, 3, 4), "m": torch.ones(2, 3, dtype=torch.long)})
    b = Cond({"h": torch.randn(1, 3, 4), "m": torch.zeros(1, 3, dtype=torch.long)})
    c = a.cat(b, b)
    assert len(c) == 4 and c.tensors["h"].shape == (4, 3, 4)
    assert torch.equal(c.tensors["h"][2], b.tensors["h"][0])
    assert torch.equal(c.index(2).tensors["m"], b.tensors["m"])  # int keeps the batch dim
    assert len(c.index(slice(1, 3))) == 2
    assert torch.equal(c.index(torch.tensor([3, 0])).tensors["h"][1], a.tensors["h"][0])
    half = c.to(dtype=torch.float16)
    assert half.tensors["h"].dtype == torch.float16 and half.tensors["m"].dtype == torch.long
    r = b.repeat(5)
    assert len(r) == 5 and torch.equal(r.tensors["h"][4], b.tensors["h"][0])
    with pytest.raises(ValueError, match="batch of 1"):
        a.repeat(3)


def test_prompt_generator():
    x = torch.randn(3, generator=prompt_generator(7, 2))
    assert torch.equal(x, torch.randn(3, generator=prompt_generator(7, 2)))
    assert not torch.equal(x, torch.randn(3, generator=prompt_generator(7, 3)))
    assert not torch.equal(x, torch.randn(3, generator=prompt_generator(8, 2)))


# ---------------------------------------------------------------- shapes and hooks


def test_flow_backbones_are_the_ones_with_a_flow_process(backbones):
    from bench.t2i.backbones import FLOW_BACKBONES
    from minddspo.process import FlowProcess

    flow = [n for n, bb in backbones.items() if isinstance(bb.process, FlowProcess)]
    assert FLOW_BACKBONES == tuple(flow) and set(flow) < set(BACKBONES)
    assert [bb.name for bb in backbones.values()] == list(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes_and_hooks(backbones, name):
    bb = backbones[name]
    C = bb.latent_channels  # 16 for sd3 and flux, 4 for the others
    assert bb.name == name and C == (16 if name in ("sd3", "flux") else 4)
    assert bb.default_resolution == 32
    cond = bb.encode_prompts(PROMPTS)
    assert len(cond) == 3
    for t in cond.tensors.values():
        assert t.shape[0] == 3 and not t.requires_grad
    g = torch.Generator().manual_seed(0)
    t = bb.sample_t(3, g)
    assert t.shape == (3,)
    x0, eps = torch.randn(3, C, 16, 16), torch.randn(3, C, 16, 16)
    x_t, y = bb.noise(x0, eps, t), bb.target(x0, eps, t)
    if bb.prediction_type == "flow":  # sana, sd3, flux
        assert t.dtype == torch.float32 and ((t > 0) & (t <= 1000)).all()
        sigma = (t / 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
        torch.testing.assert_close(y, eps - x0)
    else:
        assert t.dtype == torch.long and ((t >= 0) & (t < 1000)).all()
        ab = bb.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
        torch.testing.assert_close(y, eps)
    pred = bb.forward(bb.denoiser, x_t, t, cond)
    assert pred.shape == x0.shape and pred.dtype == torch.float32
    assert bb.t_weight("none", t) is None
    for kind in ("lambda", "linear"):
        w = bb.t_weight(kind, t)
        assert w.shape == (3,) and torch.isfinite(w).all()
    lat = bb.generate(PROMPTS, [prompt_generator(0, i) for i in range(3)], steps=2)
    assert lat.shape == (3, C, 16, 16) and torch.isfinite(lat).all()
    # per-prompt generators: a prompt's sample does not depend on its batch (up to rounding)
    alone = bb.generate(PROMPTS[2:], [prompt_generator(0, 2)], steps=2)
    torch.testing.assert_close(alone, lat[2:], rtol=1e-4, atol=1e-4)
    img = bb.decode_latents(lat)
    assert img.shape == (3, 3, 32, 32) and img.abs().max() <= 1
    assert bb.encode_images(img).shape == (3, C, 16, 16)


def test_v_prediction_and_override(tmp_path):
    bb = tiny_backbone("sd", prediction_type="v_prediction")
    assert bb.prediction_type == "v_prediction"
    x0, eps, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    torch.testing.assert_close(bb.target(x0, eps, t), bb.schedule.get_velocity(x0, eps, t))
    bb.save_pretrained(tmp_path)
    assert load_backbone(tmp_path).prediction_type == "v_prediction"
    assert load_backbone(tmp_path, prediction_type="epsilon").prediction_type == "epsilon"
    with pytest.raises(ValueError, match="flow model"):
        tiny_backbone("sana", prediction_type="epsilon")


def test_sdxl_conditioning(backbones):
    bb = backbones["sdxl"]
    c = bb.encode_prompts(["a cat", ""])
    assert c.tensors["encoder_hidden_states"].shape[-1] == 64  # 32 + 32 concatenated
    assert c.tensors["text_embeds"].shape == (2, 32)
    assert c.tensors["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    assert c.tensors["encoder_hidden_states"][1].abs().sum() == 0  # force_zeros_for_empty_prompt
    assert c.tensors["text_embeds"][0].abs().sum() > 0


def test_sana_attention_mask(backbones):
    c = backbones["sana"].encode_prompts(["a cat", ""])
    m = c.tensors["encoder_attention_mask"]
    assert m.dtype == torch.long and m[0].sum() > m[1].sum() >= 1  # bos survives for ""


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", BACKBONES)
def test_load_backbone_roundtrip(tiny_pipeline_dir, backbones, name, tmp_path):
    path = tiny_pipeline_dir(name)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"].endswith("Pipeline")
    bb = load_backbone(path)
    ref = backbones[name]
    assert type(bb) is type(ref) and bb.name == name
    if ref.prediction_type == "flow":
        assert bb.schedule == ref.schedule  # FlowSchedule(shift=3.0)
    else:
        assert torch.equal(bb.schedule.alphas_cumprod, ref.schedule.alphas_cumprod)
    for (k, v), (k2, v2) in zip(
        bb.denoiser.state_dict().items(), ref.denoiser.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    for k in ref.encode_prompts(PROMPTS).tensors:
        torch.testing.assert_close(
            bb.encode_prompts(PROMPTS).tensors[k], ref.encode_prompts(PROMPTS).tensors[k]
        )
    # a loaded backbone saves again into a loadable directory
    bb.save_pretrained(tmp_path / "again")
    assert load_backbone(tmp_path / "again", name=name).name == name


def test_real_sd_layout_loads_and_saves(tiny_sd_dir, tmp_path):
    """A released SD-1.5 index names a safety checker and feature extractor we do not load;
    our saved copy drops them and still opens in diffusers' StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "released"
    shutil.copytree(tiny_sd_dir, src)
    index = json.loads((src / "model_index.json").read_text())
    index.update(
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
        feature_extractor=["transformers", "CLIPImageProcessor"],
        requires_safety_checker=True,
    )
    (src / "model_index.json").write_text(json.dumps(index))
    bb = load_backbone(src)
    bb.save_pretrained(tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert pipe.safety_checker is None and type(pipe.unet) is type(bb.denoiser)


def test_load_denoiser(tiny_sd_dir, backbones):
    net = backbones["sd"].load_denoiser(tiny_sd_dir)  # finds unet/ inside
    assert type(net).__name__ == "UNet2DConditionModel"
    with pytest.raises(ValueError, match="config.json"):
        backbones["sd"].load_denoiser(tiny_sd_dir / "vae" / "nothing")


def test_load_backbone_bad_dirs(tmp_path, tiny_sd_dir):
    with pytest.raises(ValueError, match="not a directory"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(ValueError, match="model_index.json"):
        load_backbone(tmp_path)
    (tmp_path / "model_index.json").write_text("{nope")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_backbone(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline class 'Flux2KleinPipeline'"):
        load_backbone(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"missing components \['transformer', .* 'flux'"):
        load_backbone(tmp_path)
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    index["unet"] = ["diffusers", "NoSuchUNet"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown class diffusers.NoSuchUNet"):
        load_backbone(tmp_path)
    del index["unet"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing components \['unet'\]"):
        load_backbone(tmp_path)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="missing component folder"):
        load_backbone(tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="cannot load UNet2DConditionModel"):
        load_backbone(tmp_path)
    with pytest.raises(ValueError, match="unknown backbone"):
        tiny_backbone("flux2")


def test_save_tiny_pipeline_deterministic(tmp_path):
    a = save_tiny_pipeline("sana", tmp_path / "a", seed=3)
    b = save_tiny_pipeline("sana", tmp_path / "b", seed=3)
    for f in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (a / f).read_bytes() == (b / f).read_bytes()


# --------------------------------------------------------------------- sampler parity


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_parity_with_stable_diffusion_pipeline(prediction_type):
    """Our DDIM loop + batched CFG == diffusers' StableDiffusionPipeline (DDIMScheduler)."""
    from diffusers import StableDiffusionPipeline

    bb = tiny_backbone("sd", prediction_type=prediction_type)
    c = bb.components
    pipe = StableDiffusionPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["unet"],
        scheduler=c["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog on the grass"]
    x_T = bb.initial_latents(torch.Generator().manual_seed(0), 2)
    ours = bb.generate(prompts, latents=x_T, steps=4, guidance=7.5)
    ref = pipe(
        prompts,
        latents=x_T.clone(),
        num_inference_steps=4,
        guidance_scale=7.5,
        negative_prompt=["", ""],
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_ddim_parity_with_sdxl_pipeline(backbones):
    """SDXL: two encoders, pooled embeds, time ids and zeroed empty negative match diffusers."""
    from diffusers import StableDiffusionXLPipeline

    bb = backbones["sdxl"]
    pipe = StableDiffusionXLPipeline(**bb.components, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog on the grass"]
    x_T = bb.initial_latents(torch.Generator().manual_seed(1), 2)
    ours = bb.generate(prompts, latents=x_T, steps=3, guidance=5.0)
    ref = pipe(
        prompts,
        latents=x_T.clone(),
        num_inference_steps=3,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_flow_euler_parity_with_sana_pipeline(backbones):
    """Our flow Euler loop == diffusers' SanaPipeline with FlowMatchEulerDiscreteScheduler
    (built from the same tiny Gemma-2 encoder; prompts in the default "official" style, the
    official DDSPO trainer's complex-human-instruction prefix)."""
    from diffusers import SanaPipeline

    from bench.t2i.backbones import official_complex_human_instruction

    bb = backbones["sana"]
    c = bb.components
    pipe = SanaPipeline(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        vae=c["vae"],
        transformer=c["transformer"],
        scheduler=c["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cat", "a blue dog on the grass"]
    x_T = bb.initial_latents(torch.Generator().manual_seed(2), 2)
    ours = bb.generate(prompts, latents=x_T, steps=5, guidance=4.5)
    ref = pipe(
        prompts,
        latents=x_T.clone(),
        num_inference_steps=5,
        guidance_scale=4.5,
        height=32,
        width=32,
        use_resolution_binning=False,
        complex_human_instruction=list(official_complex_human_instruction()),
        max_sequence_length=bb.max_sequence_length,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
