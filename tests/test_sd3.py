"""The SD3 backbone on tiny random models: parity with diffusers' StableDiffusion3Pipeline
(sampler, prompt encoding, LoRA files), loading, training defaults, the "precondition
outputs" loss, and the commands end to end (make_pairs, train_t2i incl. two torchrun ranks,
sample)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from t2i_helpers import LOG2, LOG2_TOL

from bench import make_pairs, sample, train_t2i
from bench.t2i import step
from bench.t2i.backbones import SD3Backbone, load_backbone, prompt_generator
from bench.t2i.checkpoint import latest_checkpoint
from bench.t2i.config import TrainConfig, UsageError, resolve, resolve_for_backbone
from bench.t2i.reference import Reference
from bench.t2i.tiny import save_tiny_pipeline, tiny_backbone
from bench.t2i.weights import (
    LORA_FILE,
    PIPELINE_CALL_FILE,
    add_lora,
    lora_targets,
    save_lora,
    write_pipeline_call,
)
from minddspo.process import FlowProcess

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog on the grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bb() -> SD3Backbone:
    return tiny_backbone("sd3")


def _pipeline(bb):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**bb.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ parity with diffusers


def test_sampler_parity_with_sd3_pipeline(bb):
    """Our flow Euler loop + batched CFG == StableDiffusion3Pipeline (same initial latents)."""
    x_T = bb.initial_latents(torch.Generator().manual_seed(3), 2)
    ours = bb.generate(PROMPTS, latents=x_T, steps=4, guidance=7.0)
    ref = _pipeline(bb)(
        PROMPTS,
        latents=x_T.clone(),
        num_inference_steps=4,
        guidance_scale=7.0,
        height=32,
        width=32,
        max_sequence_length=bb.max_sequence_length,
        output_type="latent",
    ).images
    assert ours.shape == (2, 16, 16, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_the_pipeline_samples_as_we_do_only_with_the_written_call_kwargs(bb, tmp_path):
    """The pipeline's default T5 length (256) is not what we train with: its images differ
    from ours (tiny random SD3, 3 prompts, 8 steps: up to 24 uint8 levels, 3.5 on average);
    called with pipeline_call.json's arguments they agree (up to rounding)."""
    from bench.t2i.validation import to_uint8

    kwargs = json.loads(write_pipeline_call(bb, tmp_path).read_text())["call_kwargs"]
    assert kwargs == {"max_sequence_length": bb.max_sequence_length}
    prompts = [*PROMPTS, "a lighthouse on a rocky cliff during a storm"]
    x_T = bb.initial_latents(torch.Generator().manual_seed(3), len(prompts))
    common = dict(latents=x_T, num_inference_steps=8, guidance_scale=7.0, height=32, width=32,
                  output_type="latent")  # fmt: skip

    def pixels(latents):
        return to_uint8(bb.decode_latents(latents)).int()

    ours = pixels(bb.generate(prompts, latents=x_T, steps=8, guidance=7.0))
    pipe = _pipeline(bb)
    told = pixels(pipe(prompts, **{**common, "latents": x_T.clone()}, **kwargs).images)
    default = pixels(pipe(prompts, **{**common, "latents": x_T.clone()}).images)
    assert (ours - told).abs().max() <= 1
    assert (ours - default).abs().max() >= 10


def test_prompt_encoding_matches_encode_prompt(bb):
    """CLIP-L + CLIP-G penultimate states (padded to T5's width) then T5 on tokens; pooled =
    both CLIP projections; "" is the pipeline's default negative prompt."""
    pe, neg, pooled, neg_pooled = _pipeline(bb).encode_prompt(
        PROMPTS,
        PROMPTS,
        PROMPTS,
        do_classifier_free_guidance=True,
        negative_prompt="",
        max_sequence_length=bb.max_sequence_length,
    )
    c = bb.encode_prompts(PROMPTS).tensors
    torch.testing.assert_close(c["encoder_hidden_states"], pe)
    torch.testing.assert_close(c["pooled_projections"], pooled)
    u = bb.encode_prompts(["", ""]).tensors
    torch.testing.assert_close(u["encoder_hidden_states"], neg)
    torch.testing.assert_close(u["pooled_projections"], neg_pooled)
    h = c["encoder_hidden_states"]  # (B, 24 CLIP + 24 T5 tokens, 96)
    assert h.shape == (2, 48, 96) and c["pooled_projections"].shape == (2, 32 + 48)
    assert h[:, :24, 80:].abs().sum() == 0  # CLIP features zero-padded from 80 to 96
    mixed = bb.encode_prompts([PROMPTS[0], ""]).tensors  # one batched call, "" included
    torch.testing.assert_close(mixed["encoder_hidden_states"][0], pe[0])
    torch.testing.assert_close(mixed["encoder_hidden_states"][1], neg[0])


def test_lora_targets_joint_attention_and_load_lora_weights(bb, tmp_path):
    """LoRA also on add_q/k/v_proj and to_add_out; the saved file, loaded by
    StableDiffusion3Pipeline.load_lora_weights, gives the trained network (alpha != rank)."""
    net = tiny_backbone("sd3").denoiser
    assert lora_targets(net)[4:] == ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    assert lora_targets(tiny_backbone("sd").denoiser) == ["to_q", "to_k", "to_v", "to_out.0"]
    add_lora(net, 4, 8.0)
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q", "0"} <= wrapped
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_lora(bb, net, tmp_path)
    pipe = _pipeline(tiny_backbone("sd3"))
    pipe.load_lora_weights(tmp_path, weight_name=LORA_FILE)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([120.0, 870.0])
    c = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        want = bb.forward(net, x, t, c)
        got = bb.forward(pipe.transformer, x, t, c)
        base = bb.forward(bb.denoiser, x, t, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the LoRA does something


# ---------------------------------------------------------------- loading and process


def test_load_backbone_roundtrip(bb, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    path = save_tiny_pipeline("sd3", tmp_path / "sd3")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    keys = {"transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert keys | {"tokenizer", "tokenizer_2", "tokenizer_3"} <= index.keys()
    loaded = load_backbone(path)  # detected from model_index.json
    assert type(loaded) is SD3Backbone and loaded.schedule == bb.schedule
    assert loaded.schedule.shift == 3.0 and loaded.max_sequence_length == 24
    for (k, v), (k2, v2) in zip(
        loaded.denoiser.state_dict().items(), bb.denoiser.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    for k, v in bb.encode_prompts([*PROMPTS, ""]).tensors.items():
        torch.testing.assert_close(loaded.encode_prompts([*PROMPTS, ""]).tensors[k], v)
    assert loaded.vae.config.shift_factor == 0.0609  # the base encode/decode applies it
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    z = loaded.vae.encode(img).latent_dist.mean
    torch.testing.assert_close(loaded.encode_images(img), (z - 0.0609) * 1.5305)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
    assert type(pipe.tokenizer_3).__name__ == "T5Tokenizer"
    with pytest.raises(ValueError, match="flow model"):
        load_backbone(path, prediction_type="epsilon")


def test_logit_normal_default_and_official_scale():
    cfg = resolve(TrainConfig(tiny=True, backbone="sd3", method="ddspo"))
    assert (cfg.timestep_sampler, cfg.beta, cfg.lr) == ("logit_normal", 2000.0, 2000 / 2.048e8)
    assert resolve(TrainConfig(tiny=True, backbone="sd3", method="dpo")).beta == 8000.0
    uniform = resolve(TrainConfig(tiny=True, backbone="sd3", timestep_sampler="uniform"))
    assert uniform.timestep_sampler == "uniform"  # an explicit choice wins
    assert resolve(TrainConfig(tiny=True, backbone="sana")).timestep_sampler == "uniform"
    # precondition outputs: the official SD3 default, off elsewhere unless asked for
    assert cfg.precondition_outputs is True
    assert resolve(TrainConfig(tiny=True, backbone="sana")).precondition_outputs is False
    assert resolve(TrainConfig(tiny=True, backbone="sd")).precondition_outputs is False
    off = TrainConfig(tiny=True, backbone="sd3", precondition_outputs=False)
    assert resolve(off).precondition_outputs is False
    with pytest.raises(UsageError, match="flow backbones"):
        resolve_for_backbone(TrainConfig(tiny=True, precondition_outputs=True), "sdxl")
    # SD3's training density: sigmoid(N(0, 1)), then the scheduler's shift 3
    proc = tiny_backbone("sd3").process
    t = proc.sample_t(20000, torch.Generator().manual_seed(0), "logit_normal")
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(1)))
    want = 3 * u / (1 + 2 * u)  # shift_sigma(u, 3)
    q = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(
        torch.quantile(t / 1000, q), torch.quantile(want, q), atol=0.01, rtol=0
    )


# ------------------------------------------------------------------ precondition outputs


def test_precondition_outputs_perfect_velocity_has_zero_error():
    on = FlowProcess(tiny_backbone("sd3").schedule, precondition_outputs=True)
    off = dataclasses.replace(on, precondition_outputs=False)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    t = torch.tensor([1.0, 250.0, 700.0, 999.0])
    x_t, v = on.add_noise(x0, eps, t), eps - x0  # the exact velocity
    torch.testing.assert_close(on.target(x0, eps, t), x0)
    torch.testing.assert_close(on.output(v, x_t, t), x0, rtol=0, atol=1e-5)  # zero error
    assert torch.equal(off.output(v, x_t, t), v) and torch.equal(off.target(x0, eps, t), v)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    wrong = v + 0.1  # x0-space error = sigma * velocity error
    err = on.output(wrong, x_t, t) - x0
    torch.testing.assert_close(err, -0.1 * sigma.expand_as(err), rtol=0, atol=1e-5)


def test_precondition_outputs_converts_every_prediction(bb, spy_method_loss):
    """Policy, reference and reference-on-c- rows all become x0 = x_t - sigma v; targets x0."""
    calls = spy_method_loss(step)
    policy = tiny_backbone("sd3").denoiser
    reference = Reference(bb, policy, lora=False, periodic=False)
    with torch.no_grad():  # the policy moves away from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(5)
    x0_w, x0_l = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    noise, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([300.0, 800.0])
    conds = step.encode_step(bb, ["a cat", "a dog"], ["a", "dog"], need_neg=True, need_uncond=False)
    losses = {}
    for on in (False, True):
        cfg = resolve(
            TrainConfig(tiny=True, backbone="sd3", method="ddspo", precondition_outputs=on)
        )
        losses[on], _ = step.compute_loss(
            step.loss_spec(cfg, bb), bb, policy, reference, x0_w, x0_l, conds, t, noise, noise
        )
    kw = calls[-1][1]
    c, c_neg, _ = conds
    x_w, x_l = bb.noise(x0_w, noise, t), bb.noise(x0_l, noise, t)
    s = (t / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        want = {
            "pred_w": x_w - s * bb.forward(policy, x_w, t, c),
            "pred_l": x_l - s * bb.forward(policy, x_l, t, c),
            "ref_w": x_w - s * bb.forward(reference.net, x_w, t, c),
            "ref_l_neg": x_l - s * bb.forward(reference.net, x_l, t, c_neg),
        }
    for k, v in want.items():
        torch.testing.assert_close(kw[k], v, rtol=1e-4, atol=1e-5)
    assert torch.equal(kw["target_w"], x0_w) and torch.equal(kw["target_l"], x0_l)
    assert not torch.allclose(losses[True], losses[False])


# ---------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``make_pairs.py --tiny sd3``: 4 pairs in two shards."""
    out = tmp_path_factory.mktemp("pairs-sd3") / "ds"
    argv = ["--tiny", "sd3", "--out", str(out), "--steps", "2", "--max-prompts", "4"]
    assert make_pairs.main([*argv, "--shard-size", "2", "--no-progress"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["backbone"] == "sd3"
    return out


def test_train_lora_precondition_then_sample(data, tmp_path, capsys):
    """train_t2i.py --tiny --backbone sd3 --method ddspo (LoRA, x0-space loss), 2 steps;
    then sample.py --tiny sd3 with the LoRA checkpoint."""
    out = tmp_path / "run"
    argv = ["--tiny", "--backbone", "sd3", "--method", "ddspo", "--data", str(data)]
    argv += ["--out", str(out), "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    assert train_t2i.main([*argv, "--lora", "4", "--precondition-outputs"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "end" not in r] == [1, 2]
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=LOG2_TOL)  # policy == ref
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["precondition_outputs"] is True and cfg["timestep_sampler"] == "logit_normal"
    assert (out / "final" / LORA_FILE).is_file()
    call = json.loads((out / "final" / PIPELINE_CALL_FILE).read_text())  # for diffusers users
    assert call["pipeline"] == "StableDiffusion3Pipeline"
    assert call["call_kwargs"] == {"max_sequence_length": 24}  # the tiny T5's; 77 on SD3-medium
    capsys.readouterr()
    samples = tmp_path / "samples"
    argv = ["--tiny", "sd3", "--out", str(samples), "--steps", "2", "--max-prompts", "2"]
    assert sample.main([*argv, "--no-progress", "--checkpoint", f"lora={out / 'final'}"]) == 0
    assert "wrote 2 x 2 images" in capsys.readouterr().out
    assert (samples / "lora" / "00001.png").is_file()


@pytest.mark.timeout(300)  # a hung gloo rank ignores SIGINT (tests/README.md, "Traps")
def test_torchrun_two_ranks_sd3_ddspo(data, tmp_path):
    """``torchrun --nproc_per_node=2 train_t2i.py --tiny --backbone sd3 --method ddspo``."""
    out, timeout = tmp_path / "run", 240
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["timeout", "-s", "KILL", str(timeout), sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node=2", str(REPO / "bench" / "train_t2i.py"),
           "--tiny", "--backbone", "sd3", "--method", "ddspo", "--data", str(data),
           "--out", str(out), "--max-steps", "2", "--batch-size", "1", "--no-progress"]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2" in p.stdout
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(end["param_sha256"]) == 2 and len(set(end["param_sha256"])) == 1
    assert (latest_checkpoint(out / "checkpoints") / "transformer").is_dir()


def test_generate_per_prompt_generators(bb):
    lat = bb.generate(
        ["a cat", "", "two dogs"], [prompt_generator(0, i) for i in range(3)], steps=2
    )
    alone = bb.generate(["two dogs"], [prompt_generator(0, 2)], steps=2)
    torch.testing.assert_close(alone, lat[2:], rtol=1e-4, atol=1e-4)
