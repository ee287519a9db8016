"""bench/t2i/gpu_cost.py: the FLOP counter against a hand count, the method rows, memory, configs."""

import json
import re

import pytest
import torch
from torch import nn

from bench import bench_step
from bench.t2i import gpu_cost
from bench.t2i.gpu_cost import (
    Arch,
    Recipe,
    build_arch,
    count_flops,
    memory,
    method_rows,
    step_flops,
)
from minddspo.methods import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

# bench/t2i/tiny.py's SD UNet on 8 x 8 latents (CrossAttnDownBlock2D + DownBlock2D, 32/64 channels)
TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_CLIP = {
    "_class_name": "CLIPTextModel",
    "vocab_size": 514,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 12,
    "bos_token_id": 512,
    "eos_token_id": 513,
    "pad_token_id": 513,
}
TINY = Arch("tiny_sd", "tiny SD", "sd", "unet", (("text_encoder", 12),), 12)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A config root holding the tiny backbone, in the layout of bench/t2i/configs/."""
    d = tmp_path_factory.mktemp("configs")
    (d / TINY.key).mkdir()
    (d / TINY.key / "unet.json").write_text(json.dumps(TINY_UNET))
    (d / TINY.key / "text_encoder.json").write_text(json.dumps(TINY_CLIP))
    return d


def hand_count(net: nn.Module, run) -> tuple[int, int]:
    """``(forward, backward)`` FLOPs of ``run()``, by hand from the shapes the layers see.

    Conv2d / Linear: 2 x MACs = 2 x out.numel() x (C_in / groups) x kh x kw (Linear: x
    in_features); its backward is one such product per gradient autograd needs (the weight's;
    the input's unless the input is a leaf without grad, e.g. x_t or the text states).
    Attention (diffusers ``Attention``, shapes from its to_q / to_k outputs): QK^T and AV,
    2 x B x heads x Lq x Lk x d each; its backward is four such products (dQ, dK, dP, dV).
    """
    from diffusers.models.attention_processor import Attention

    total = {"fwd": 0, "bwd": 0}
    seen: dict[int, dict[str, torch.Size]] = {}

    def layer(mod, inp, out):
        if isinstance(mod, nn.Linear):
            f = 2 * out.numel() * mod.in_features
        else:
            kh, kw = mod.kernel_size
            f = 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        total["fwd"] += f
        total["bwd"] += f * (inp[0].requires_grad + mod.weight.requires_grad)

    def record(key, name):
        def hook(mod, inp, out):
            seen.setdefault(key, {})[name] = out.shape

        return hook

    def attention(mod, inp, out):
        (b, lq, inner), (_, lk, _) = seen[id(mod)]["q"], seen[id(mod)]["k"]
        f = 2 * (2 * b * mod.heads * lq * lk * (inner // mod.heads))  # QK^T + AV
        total["fwd"] += f
        total["bwd"] += 2 * f

    handles = []
    for m in net.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            handles.append(m.register_forward_hook(layer))
        if isinstance(m, Attention):
            handles.append(m.to_q.register_forward_hook(record(id(m), "q")))
            handles.append(m.to_k.register_forward_hook(record(id(m), "k")))
            handles.append(m.register_forward_hook(attention))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return total["fwd"], total["bwd"]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_equals_hand_count_of_convs_matmuls_and_attention(root, device):
    built = build_arch(TINY, root=root, device=device)
    net, rows = built.denoiser.train(), 3

    def forward():
        with torch.no_grad():
            gpu_cost.denoise(built, net, rows)

    def forward_backward():
        gpu_cost.denoise(built, net, rows).square().mean().backward()

    fwd, _ = hand_count(net, forward)
    assert count_flops(forward) == fwd  # exact: integer FLOPs, no tolerance
    fwd_again, bwd = hand_count(net, forward_backward)
    assert fwd_again == fwd and fwd < bwd < 2 * fwd  # x_t and the text states need no grad
    assert count_flops(forward_backward) == fwd + bwd


def test_method_rows_follow_the_method_table():
    # (prompts encoded, reference rows, policy rows) per pair, as compute_loss runs them
    assert {m: method_rows(m) for m in METHODS} == {
        "sft": (1, 0, 1),
        "dpo": (1, 2, 2),
        "dspo": (1, 2, 2),
        "dspo_cpp": (2, 3, 2),
        "ddspo": (2, 3, 2),
    }


def test_step_flops_ratios_on_a_tiny_unet(root):
    built = build_arch(TINY, root=root)
    f = step_flops(built, METHODS, checkpointing=True)
    dpo, ddspo, sft = f["dpo"], f["ddspo"], f["sft"]
    assert f["dspo"] == dpo and f["dspo_cpp"] == ddspo
    assert 2 * ddspo.reference == 3 * dpo.reference  # 3 reference rows vs 2
    assert ddspo.text == 2 * dpo.text > 0  # c and c- vs c
    assert ddspo.policy == dpo.policy == 2 * sft.policy and sft.reference == 0
    # backward = two forwards but for x_t's own gradient: the ratio sits just above 9/8
    ratio = ddspo.denoiser / dpo.denoiser
    assert 9 / 8 < ratio < 9 / 8 + 0.005, ratio
    # gradient checkpointing re-runs at most one forward of the policy rows (2)
    assert 0 < dpo.recompute <= dpo.reference


def test_lora_reference_is_the_base_and_its_backward_skips_base_weight_grads(root):
    full, lora = build_arch(TINY, root=root), build_arch(TINY, root=root, lora=4)
    f_full = step_flops(full, ["dpo"])["dpo"]
    f_lora = step_flops(lora, ["dpo"])["dpo"]
    assert f_lora.reference == f_full.reference  # adapters off: the base model
    assert f_lora.policy < f_full.policy


def test_memory_counts_the_trainers_tensors(root):
    built = build_arch(TINY, root=root)
    n = sum(p.numel() for p in built.denoiser.parameters())
    kw = dict(gradient_checkpointing=False, batch_size=1, grad_accum=1, gpus=1)
    adamw = memory(built, Recipe("tiny_sd", 0, "adamw", "fp16", **kw))
    assert adamw.params == adamw.trainable == n
    assert adamw.weights == adamw.grads == 4 * n  # fp32 master weights and grads
    n_tensors = len(list(built.denoiser.parameters()))
    assert adamw.optimizer == 8 * n + 4 * n_tensors  # exp_avg, exp_avg_sq, fp32 step
    assert adamw.reference == 2 * n  # frozen fp16 copy
    adafactor = memory(built, Recipe("tiny_sd", 0, "adafactor", "fp16", **kw))
    assert 0 < adafactor.optimizer < adamw.optimizer / 2  # factored second moment, no first
    lora = memory(build_arch(TINY, root=root, lora=4), Recipe("tiny_sd", 4, "adamw", "bf16", **kw))
    assert lora.reference == 0 and 0 < lora.trainable < n and lora.grads == 4 * lora.trainable
    assert lora.base_cast == 2 * n  # the frozen base in bf16 instead of fp32
    assert lora.total() == lora.total(with_reference=False)


def test_fsdp_recipe_shards_weights_grads_and_optimizer_only(root):
    """An fsdp recipe holds 1/gpus of the policy's weights, grads and AdamW state per GPU;
    the reference copy and the frozen encoders stay whole."""
    built = build_arch(TINY, root=root)
    kw = dict(gradient_checkpointing=False, batch_size=1, grad_accum=1)
    whole = memory(built, Recipe("tiny_sd", 0, "adamw", "bf16", gpus=8, **kw))
    sharded = memory(built, Recipe("tiny_sd", 0, "adamw", "bf16", gpus=8, fsdp=True, **kw))
    for field in ("weights", "grads", "optimizer"):
        assert getattr(sharded, field) == -(-getattr(whole, field) // 8)
    assert (sharded.reference, sharded.frozen) == (whole.reference, whole.frozen) != (0, 0)
    # --shard-reference shard: the reference divided too; unsharded recipes keep it whole
    assert sharded.reference_sharded == -(-whole.reference // 8) < whole.reference_sharded
    assert whole.reference_sharded == whole.reference
    assert sharded.total(shard_reference=True) == sharded.total() - sharded.reference + (
        sharded.reference_sharded
    )
    assert sharded.params == whole.params and sharded.trainable == whole.trainable
    assert (
        "FSDP x8 (computed)" in Recipe("x", 0, "adamw", "bf16", True, 1, 1, 8, fsdp=True).describe()
    )


def test_flux_recipes_share_one_arch():
    """Two recipes of one model (LoRA on 1 GPU, FSDP full fine-tune on 8) in recipes.json."""
    recipes = gpu_cost.load_recipes()
    lora, fsdp = recipes["flux1_dev"], recipes["flux1_dev_fsdp8"]
    assert (lora.arch, lora.lora, lora.gpus, lora.fsdp) == ("flux1_dev", 128, 1, False)
    assert (fsdp.arch, fsdp.lora, fsdp.gpus, fsdp.fsdp) == ("flux1_dev", 0, 8, True)
    assert lora.pairs_per_step == fsdp.pairs_per_step == 2048
    assert [r.arch for r in recipes.values() if r.arch != r.name] == ["flux1_dev"]


def test_flux_config_has_the_published_size_and_runs_on_meta():
    """FLUX.1-dev's transformer: 11,901,408,320 parameters (19 double + 38 single blocks,
    guidance embedder); one meta forward of the packed 1024 px latents."""
    arch = gpu_cost.ARCHS["flux1_dev"]
    built = build_arch(arch)
    net = built.denoiser
    assert sum(p.numel() for p in net.parameters()) == 11_901_408_320
    assert (net.config.in_channels, net.config.guidance_embeds) == (64, True)
    with torch.no_grad():
        out = gpu_cost.denoise(built, net, 1)
    assert out.shape == (1, 64**2, 64) and out.device.type == "meta"
    assert built.vae.config.latent_channels == 16 and built.vae.config.shift_factor == 0.1159


# published sizes: SD-1.5 UNet 859.52M, SDXL UNet 2.567B, SD3-medium MMDiT 2.03B ("2B"),
# SANA-1.6B 1.60B; latents 64x64x4, 128x128x4, 128x128x16, 32x32x32
@pytest.mark.parametrize(
    "key, params, latent",
    [
        ("sd15", 859_520_964, (4, 64)),
        ("sdxl", 2_567_463_684, (4, 128)),
        ("sd3_medium", 2_028_328_000, (16, 128)),
        ("sana_1600m", 1_604_462_752, (32, 32)),
    ],
)
def test_real_denoiser_configs_have_the_published_sizes(key, params, latent):
    arch = gpu_cost.ARCHS[key]
    net = gpu_cost.build_module(gpu_cost.CONFIG_DIR / key / f"{arch.denoiser}.json")
    assert sum(p.numel() for p in net.parameters()) == params
    assert (net.config.in_channels, net.config.sample_size) == latent


@pytest.mark.slow
@pytest.mark.timeout(1800)  # counts FLUX.1-dev's 12B parameters on the meta device: minutes
def test_computed_gpu_table_cli(tmp_path, capsys):
    md = tmp_path / "gpu.md"
    assert bench_step.main(["--computed-gpu-table", "--md", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("Computed, not measured") and text in capsys.readouterr().out
    rows = [r.split("|")[1:-1] for r in text.splitlines() if re.match(r"\| (SD|SANA)", r)]
    assert len(rows) == 4 * len(METHODS) + 4  # FLOPs rows, then one memory row per model
    ddspo = {r[0].strip(): r for r in rows[:20] if r[2].strip() == "ddspo"}
    for model in ("SD-1.5", "SDXL"):  # full fine-tunes: the 9/8 floor of the denoiser FLOPs
        assert float(ddspo[model][9]) == pytest.approx(1.125, abs=1e-3)
