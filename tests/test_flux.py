"""The FLUX.1 backbone on tiny random models: parity with diffusers' FluxPipeline (prompt
encoding, sampler with the dynamic shift, LoRA files), packing, the guidance embedding in
every training row, loading, training defaults, and the commands end to end (make_pairs,
train_t2i incl. two torchrun ranks, sample, evaluate, train_policy_pair)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from t2i_helpers import LOG2, LOG2_TOL

from bench import bench_step, evaluate, make_pairs, sample, train_policy_pair, train_t2i
from bench.t2i import step
from bench.t2i.backbones import BACKBONES, FLOW_BACKBONES, FluxBackbone, load_backbone
from bench.t2i.checkpoint import latest_checkpoint
from bench.t2i.config import TrainConfig, UsageError, parse_args, resolve
from bench.t2i.data import row_generators
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
from minddspo.methods import METHODS
from minddspo.schedules import resolution_shift

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog on the grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bb() -> FluxBackbone:
    return tiny_backbone("flux")


def _pipeline(bb):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**bb.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _saved_and_loaded_in_the_pipeline(bb, net, folder):
    """Give the LoRA's B matrices random values (so it moves the network), save it as the
    trainer does, and load it into a fresh pipeline with ``load_lora_weights``."""
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_lora(bb, net, folder)
    pipe = _pipeline(tiny_backbone("flux"))
    pipe.load_lora_weights(folder, weight_name=LORA_FILE)
    return pipe


# ------------------------------------------------------------------ parity with diffusers


def test_prompt_encoding_matches_encode_prompt(bb):
    """T5 sequence (max_sequence_length tokens) + CLIP's pooled output, as the pipeline."""
    pipe = _pipeline(bb)
    pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=bb.max_sequence_length)
    c = bb.encode_prompts(PROMPTS).tensors
    torch.testing.assert_close(c["encoder_hidden_states"], pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(c["pooled_projections"], pooled, rtol=0, atol=1e-6)
    assert c["encoder_hidden_states"].shape == (2, 24, 96)
    assert c["pooled_projections"].shape == (2, 32)
    assert bb.max_sequence_length == 24  # min(512, the tiny T5 tokenizer's 24)
    assert torch.equal(text_ids, torch.zeros(24, 3))  # what _forward passes as txt_ids
    mixed = bb.encode_prompts([PROMPTS[1], ""]).tensors  # "" is encoded like any prompt
    e_pe, e_pooled, _ = pipe.encode_prompt([""], max_sequence_length=bb.max_sequence_length)
    torch.testing.assert_close(mixed["encoder_hidden_states"][0], pe[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed["encoder_hidden_states"][1], e_pe[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed["pooled_projections"][1], e_pooled[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [3.5, 1.5])
def test_sampler_parity_with_flux_pipeline(bb, guidance):
    """Our Euler loop (pipeline sigma grid, dynamic shift of 8x8 tokens, the guidance in the
    embedding, no CFG) == FluxPipeline.__call__ from the same packed latents."""
    x_T = bb.initial_latents(torch.Generator().manual_seed(3), 2)
    ours = bb.generate(PROMPTS, latents=x_T, steps=4, guidance=guidance)
    ref = _pipeline(bb)(
        PROMPTS,
        latents=bb.pack(x_T.clone()),
        num_inference_steps=4,
        guidance_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=bb.max_sequence_length,
        output_type="latent",
    ).images  # packed (B, 64 tokens, 64)
    assert ours.shape == (2, 16, 16, 16) and ref.shape == (2, 64, 64)
    torch.testing.assert_close(bb.pack(ours), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb.unpack(ref, 16, 16), ours, rtol=1e-5, atol=1e-5)
    assert torch.equal(bb.unpack(bb.pack(x_T), 16, 16), x_T)


def test_pipeline_call_file_only_when_the_pipeline_defaults_differ(bb, tmp_path):
    """At FLUX.1's 512 T5 tokens the pipeline's defaults sample as we do: no file."""
    b = tiny_backbone("flux")
    assert json.loads(write_pipeline_call(b, tmp_path).read_text())["call_kwargs"] == {
        "max_sequence_length": 24
    }
    b.max_sequence_length = 512
    assert b.pipeline_call_kwargs() == {}
    assert write_pipeline_call(b, tmp_path / "real") is None


def test_sampler_parity_at_another_resolution(bb):
    """64 px (32 x 32 latents, 256 tokens): the pipeline's shift exp(mu) of that size; the
    training process is untouched."""
    before = bb.schedule
    x_T = bb.initial_latents(torch.Generator().manual_seed(4), 1, resolution=64)
    assert x_T.shape == (1, 16, 32, 32)
    ours = bb.generate(PROMPTS[:1], latents=x_T, steps=3)
    ref = _pipeline(bb)(
        PROMPTS[:1], latents=bb.pack(x_T.clone()), num_inference_steps=3, height=64, width=64,
        max_sequence_length=bb.max_sequence_length, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(bb.pack(ours), ref, rtol=1e-5, atol=1e-5)
    assert bb.sampling_process(x_T).schedule.shift == pytest.approx(math.exp(0.5))
    assert bb.schedule is before and bb.schedule.shift == pytest.approx(resolution_shift(64))


def test_guidance_value_changes_samples_and_leaves_training_alone(bb):
    x_T = bb.initial_latents(torch.Generator().manual_seed(3), 1)
    c, t = bb.encode_prompts(PROMPTS[:1]), torch.tensor([500.0])
    with torch.no_grad():
        before = bb.forward(bb.denoiser, x_T, t, c)
    a = bb.generate(PROMPTS[:1], latents=x_T, steps=2, guidance=3.5)
    b = bb.generate(PROMPTS[:1], latents=x_T, steps=2, guidance=1.0)
    assert (a - b).abs().max() > 1e-3
    with torch.no_grad():  # training forwards keep bb.guidance after sampling with another
        assert torch.equal(bb.forward(bb.denoiser, x_T, t, c), before)


def test_lora_targets_and_load_lora_weights(bb, tmp_path):
    """LoRA on both streams' attention projections; the saved file, loaded by
    FluxPipeline.load_lora_weights, gives the trained network (alpha != rank) and the
    pipeline's sampler reproduces ours with it."""
    net = tiny_backbone("flux").denoiser
    assert lora_targets(net) == [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    ]  # fmt: skip
    add_lora(net, 4, 8.0)
    wrapped = {n for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert "single_transformer_blocks.0.attn.to_q.lora_A" in wrapped  # single-stream too
    assert "transformer_blocks.0.attn.add_k_proj.lora_A" in wrapped
    pipe = _saved_and_loaded_in_the_pipeline(bb, net, tmp_path)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([120.0, 870.0])
    c = bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        want = bb.forward(net, x, t, c)
        got = bb.forward(pipe.transformer, x, t, c)
        base = bb.forward(bb.denoiser, x, t, c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the LoRA does something
    x_T = bb.initial_latents(torch.Generator().manual_seed(1), 2)
    ours = bb.generate(PROMPTS, latents=x_T, steps=2, net=net.eval())
    ref = pipe(
        PROMPTS, latents=bb.pack(x_T), num_inference_steps=2, height=32, width=32,
        max_sequence_length=bb.max_sequence_length, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(bb.pack(ours), ref, rtol=1e-5, atol=1e-5)


def test_lora_on_the_mlps_too_loads_in_the_pipeline(bb, tmp_path):
    """--lora-targets with FLUX's MLPs (double-stream ff/ff_context, single-stream proj_mlp):
    dotted names select them; the file loads in FluxPipeline and gives the same network."""
    net = tiny_backbone("flux").denoiser
    mlp = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"]
    add_lora(net, 4, None, ["to_q", "to_k", "to_v", *mlp])
    wrapped = {n.removesuffix(".lora_A") for n, _ in net.named_modules() if n.endswith(".lora_A")}
    assert {
        "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp",
    } <= wrapped  # fmt: skip
    pipe = _saved_and_loaded_in_the_pipeline(bb, net, tmp_path)
    x, t, c = torch.randn(2, 16, 16, 16), torch.tensor([120.0, 870.0]), bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.forward(pipe.transformer, x, t, c), bb.forward(net, x, t, c), rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match=r"no module named \['ff.net.9'\]"):
        add_lora(tiny_backbone("flux").denoiser, 4, None, ["ff.net.9"])


# ---------------------------------------------------------------- loading and process


def test_names_come_from_one_list():
    from bench.t2i import cli, config

    assert "flux" in BACKBONES and "flux" in FLOW_BACKBONES
    assert cli.BACKBONES is BACKBONES and config.BACKBONES is BACKBONES
    assert config.FLOW_BACKBONES is FLOW_BACKBONES


def test_dynamic_shift_follows_the_resolution(bb):
    """The shift of training and sampling is exp(mu) of the image token count."""
    b = tiny_backbone("flux")
    assert b.default_resolution == 32 and b.latent_channels == 16
    assert b.schedule.shift == pytest.approx(resolution_shift(64))  # 16x16 latents: 8x8 tokens
    assert b.schedule.grid == "pipeline"
    b.resolution = 64  # what the trainer sets from the dataset's latents
    assert b.schedule.shift == pytest.approx(math.exp(0.5))  # 16x16 tokens: base_shift
    assert b.process.schedule is b.schedule
    t = b.sample_t(20000, torch.Generator().manual_seed(0), "logit_normal") / 1000
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(1)))
    s = resolution_shift(256)
    assert torch.quantile(t, 0.5).item() == pytest.approx(
        torch.quantile(s * u / (1 + (s - 1) * u), 0.5).item(), abs=0.02
    )
    with pytest.raises(ValueError, match="odd latent side 9; flux packs 2 x 2"):
        b.latent_shape(18)


def test_trainer_sets_the_shift_from_the_dataset_resolution(tmp_path):
    """check_data: the pairs' latent side sets the training shift; an odd side is one
    UsageError naming the dataset."""
    from types import SimpleNamespace

    b = tiny_backbone("flux")
    ds = SimpleNamespace(info={"backbone": "flux"}, latent_shape=(16, 32, 32), root=tmp_path)
    train_t2i.check_data(ds, b)
    assert b.resolution == 64 and b.schedule.shift == pytest.approx(resolution_shift(256))
    ds.latent_shape = (16, 15, 15)
    with pytest.raises(UsageError, match=f"^{tmp_path}: resolution 30 gives an odd latent side 15"):
        train_t2i.check_data(ds, b)
    assert b.resolution == 64  # unchanged


def test_load_backbone_roundtrip(bb, tmp_path):
    from diffusers import FluxPipeline

    path = save_tiny_pipeline("flux", tmp_path / "flux")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    keys = {"transformer", "vae", "scheduler", "text_encoder", "text_encoder_2"}
    assert keys | {"tokenizer", "tokenizer_2"} <= index.keys()
    loaded = load_backbone(path)  # detected from model_index.json
    assert type(loaded) is FluxBackbone and loaded.schedule == bb.schedule
    for (k, v), (k2, v2) in zip(
        loaded.denoiser.state_dict().items(), bb.denoiser.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    for k, v in bb.encode_prompts([*PROMPTS, ""]).tensors.items():
        torch.testing.assert_close(loaded.encode_prompts([*PROMPTS, ""]).tensors[k], v)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    z = loaded.vae.encode(img).latent_dist.mean
    torch.testing.assert_close(loaded.encode_images(img), (z - 0.1159) * 0.3611)
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is True
    with pytest.raises(ValueError, match="flux is a flow model"):
        load_backbone(path, prediction_type="epsilon")


def test_unsupported_scheduler_setting_is_named(tmp_path):
    path = save_tiny_pipeline("flux", tmp_path / "flux")
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"use_karras_sigmas": True}))
    with pytest.raises(ValueError, match=r"unsupported settings \['use_karras_sigmas'\]"):
        load_backbone(path)


def test_training_defaults_and_flux_guidance_flag():
    cfg = resolve(TrainConfig(tiny=True, backbone="flux", method="ddspo"))
    assert (cfg.timestep_sampler, cfg.beta, cfg.flux_guidance) == ("logit_normal", 2000.0, 3.5)
    assert cfg.precondition_outputs is False
    assert parse_args(["--tiny", "--backbone", "flux", "--flux-guidance", "2"]).flux_guidance == 2
    assert resolve(TrainConfig(tiny=True, backbone="sd3")).flux_guidance is None
    flags = ["--tiny", "--backbone", "flux", "--flux-guidance", "2"]
    assert train_t2i.load_model(parse_args(flags)).guidance == 2.0  # reaches the backbone
    assert train_t2i.load_model(parse_args(flags[:3])).guidance == 3.5
    with pytest.raises(
        UsageError, match="--flux-guidance applies to the flux backbone only, not sd3"
    ):
        resolve(TrainConfig(tiny=True, backbone="sd3", flux_guidance=2.0))
    with pytest.raises(UsageError, match="--flux-guidance must be >= 0"):
        resolve(TrainConfig(tiny=True, backbone="flux", flux_guidance=-1.0))


# --------------------------------------------------------------------- one training step


@pytest.mark.parametrize("method", METHODS)
def test_one_step_every_method_same_guidance_in_every_row(method):
    """Each method's step runs and back-propagates; every policy and reference forward
    (f_ref(x_t^l, c-) included) sees the one guidance value --flux-guidance gives."""
    b = tiny_backbone("flux")
    b.guidance = 2.25
    cfg = resolve(TrainConfig(tiny=True, backbone="flux", method=method, lora=2))
    add_lora(b.denoiser, 2, None)
    policy = b.denoiser
    reference = Reference(b, policy, lora=True, periodic=False)
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["guidance"].clone(), kwargs["hidden_states"].shape[0]))

    handle = policy.register_forward_pre_hook(hook, with_kwargs=True)
    g = torch.Generator().manual_seed(5)
    x0_w, x0_l = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    t, noise, _ = step.draw_noise(cfg, b, row_generators(5, range(2)), x0_w)
    conds = step.encode_step(
        b, ["a cat", "a dog"], ["a", "dog"], need_neg=cfg.uses_neg, need_uncond=False
    )
    loss, _ = step.compute_loss(
        step.loss_spec(cfg, b), b, policy, reference, x0_w, x0_l, conds, t, noise, noise
    )
    loss.mean().backward()
    handle.remove()
    assert torch.isfinite(loss).all() and loss.shape == (2,)
    grads = [p.grad for p in policy.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    rows = sum(n for _, n in seen)
    want_rows = 2 if method == "sft" else 4 + 2 * (3 if cfg.uses_neg else 2)  # policy + ref
    assert rows == want_rows
    for gvec, n in seen:
        assert torch.equal(gvec, torch.full((n,), 2.25))


# ---------------------------------------------------------------------- the commands


def test_bench_step_tiny_flux(capsys):
    """The step benchmark on tiny flux (latent side from the VAE, no CFG comparison)."""
    rc = bench_step.main(["--tiny", "--backbone", "flux", "--batch", "1", "--reps", "1",
                          "--warmup", "0", "--methods", "dpo,ddspo"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert lines[0] == "# make_pairs CFG batched vs unbatched: skipped, flux samples without CFG"
    assert lines[1].startswith("# tiny flux, batch 1 pairs, latents 16x16x16")
    assert lines[-1].startswith("ratio ddspo/dpo: ")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``make_pairs.py --tiny flux``: 4 pairs in two shards."""
    out = tmp_path_factory.mktemp("pairs-flux") / "ds"
    argv = ["--tiny", "flux", "--out", str(out), "--steps", "2", "--max-prompts", "4"]
    assert make_pairs.main([*argv, "--shard-size", "2", "--no-progress"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["backbone"] == "flux"
    return out


def test_odd_latent_side_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "ds"
    argv = ["--tiny", "flux", "--out", str(out), "--resolution", "30", "--max-prompts", "2"]
    assert make_pairs.main([*argv, "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: resolution 30 gives an odd latent side 15; flux packs 2 x 2 latent patches"
    ]
    assert not out.exists()


def test_train_lora_then_sample_then_evaluate(data, tmp_path, capsys):
    """train_t2i --tiny flux (LoRA, --flux-guidance 2.0), then sample.py --tiny
    flux with the LoRA checkpoint, then evaluate.py --tiny on the samples."""
    out = tmp_path / "run"
    argv = ["--tiny", "flux", "--method", "ddspo", "--data", str(data)]
    argv += ["--out", str(out), "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    assert train_t2i.main([*argv, "--lora", "4", "--flux-guidance", "2.0"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "end" not in r] == [1, 2]
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=LOG2_TOL)  # policy == ref
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["flux_guidance"], cfg["timestep_sampler"]) == (2.0, "logit_normal")
    assert (out / "final" / LORA_FILE).is_file()
    call = json.loads((out / "final" / PIPELINE_CALL_FILE).read_text())  # for diffusers users
    assert call["pipeline"] == "FluxPipeline"
    assert call["call_kwargs"] == {"max_sequence_length": 24}  # the tiny T5's cap
    capsys.readouterr()
    samples = tmp_path / "samples"
    argv = ["--tiny", "flux", "--out", str(samples), "--steps", "2", "--max-prompts", "2"]
    assert sample.main([*argv, "--no-progress", "--checkpoint", f"lora={out / 'final'}"]) == 0
    assert "wrote 2 x 2 images" in capsys.readouterr().out
    assert (samples / "lora" / "00001.png").is_file()
    ev = tmp_path / "eval"
    assert evaluate.main(["--images", str(samples), "--tiny", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert set(res["models"]) == {"base", "lora"} and res["n_prompts"] == 2


def test_train_policy_pair_flux(data, tmp_path, capsys):
    out = tmp_path / "pair"
    argv = ["--tiny", "--backbone", "flux", "--data", str(data), "--max-steps", "1"]
    argv += ["--out", str(out), "--no-progress", "--batch-size", "2"]
    assert train_policy_pair.main(argv, run=train_t2i.main) == 0  # one run of both adapters
    for side in ("winner", "loser"):
        assert (out / side / "final" / LORA_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["backbone"] == "flux"
    assert "--winner-policy" in capsys.readouterr().out


@pytest.mark.slow  # about a minute on a busy 2-core machine
@pytest.mark.timeout(300)  # a hung gloo rank ignores SIGINT
def test_torchrun_two_ranks_flux_ddspo(data, tmp_path):
    """``torchrun --nproc_per_node=2 train_t2i.py --tiny --backbone flux --method ddspo``."""
    out, timeout = tmp_path / "run", 240
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["timeout", "-s", "KILL", str(timeout), sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node=2", str(REPO / "bench" / "train_t2i.py"),
           "--tiny", "--backbone", "flux", "--method", "ddspo", "--data", str(data),
           "--out", str(out), "--max-steps", "2", "--batch-size", "1", "--no-progress"]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2" in p.stdout
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(end["param_sha256"]) == 2 and len(set(end["param_sha256"])) == 1
    assert (latest_checkpoint(out / "checkpoints") / "transformer").is_dir()
