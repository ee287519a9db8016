"""Where a run of the official DDSPO recipe and ours could differ: the training noise
levels of SANA, the shared forward noise, the warmup's first steps, gradient clipping."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from bench import train_t2i
from bench.t2i.checkpoint import STATE_FILE
from bench.t2i.config import (
    TrainConfig,
    UsageError,
    adopt_saved_defaults,
    resolve,
    resume_mismatches,
    to_dict,
)
from bench.t2i.data import row_generators
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.step import build_optimizer, draw_noise
from bench.t2i.tiny import tiny_backbone
from minddspo.process import FlowProcess
from minddspo.schedules import FlowSchedule


def _flow_backbone(shift: float):
    """Just what ``draw_noise`` reads of a flow backbone."""
    proc = FlowProcess(FlowSchedule(shift=shift, num_train_timesteps=1000))
    return types.SimpleNamespace(name="sana", process=proc, schedule=proc.schedule)


def _gens(n: int) -> list[torch.Generator]:
    return row_generators(0, range(n))


def test_official_sana_scheduler_ignores_flow_shift():
    """The official SANA trainer builds a ``FlowMatchEulerDiscreteScheduler`` from SANA's
    scheduler config (a DPM-Solver config with ``flow_shift``); that class knows no
    ``flow_shift``, so its training grid is ``t = 1..1000`` with ``sigma = t / 1000``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sana_cfg = {"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0,
                "num_train_timesteps": 1000, "use_flow_sigmas": True}  # fmt: skip
    official = FlowMatchEulerDiscreteScheduler.from_config(sana_cfg)
    assert official.config.shift == 1.0
    grid = official.timesteps  # indexed by (u * 1000).long(), u ~ U[0, 1)
    torch.testing.assert_close(official.sigmas, grid / 1000)
    # ours with the SANA default (--train-shift 1): the same grid, the same uniform law
    cfg = resolve(TrainConfig(tiny=True, backbone="sana"))
    assert cfg.train_shift == 1.0
    x0 = torch.zeros(20000, 1, 1, 1)
    t, _, _ = draw_noise(cfg, _flow_backbone(3.0), _gens(20000), x0)
    assert set(t.tolist()) <= set(grid.tolist())
    assert (t / 1000).mean().item() == pytest.approx(0.5, abs=0.01)
    # the pipeline's shift 3 (--train-shift 3, our old default): mean sigma 0.676
    t3, _, _ = draw_noise(dataclasses.replace(cfg, train_shift=3.0), _flow_backbone(1.0),
                          _gens(20000), x0)  # fmt: skip
    assert (t3 / 1000).mean().item() == pytest.approx(0.676, abs=0.01)


def test_train_shift_defaults_and_checks():
    assert resolve(TrainConfig(tiny=True, backbone="sd3")).train_shift is None  # scheduler's
    assert resolve(TrainConfig(tiny=True, backbone="sana", train_shift=3.0)).train_shift == 3.0
    with pytest.raises(UsageError, match="--train-shift applies to flow backbones only"):
        resolve(TrainConfig(tiny=True, backbone="sd", train_shift=1.0))
    with pytest.raises(UsageError, match="--train-shift must be > 0"):
        resolve(TrainConfig(tiny=True, backbone="sana", train_shift=0.0))


def test_winner_and_loser_share_their_noise():
    """The official trainers noise winner and loser with one draw (``--pos_neg_different_
    noise`` off); ``--independent-noise`` draws the loser's separately."""
    bb = _flow_backbone(1.0)
    x0 = torch.zeros(3, 2, 4, 4)
    cfg = resolve(TrainConfig(tiny=True, backbone="sana"))
    _, nw, nl = draw_noise(cfg, bb, _gens(3), x0)
    assert torch.equal(nw, nl)
    cfg = dataclasses.replace(cfg, independent_noise=True)
    t2, nw2, nl2 = draw_noise(cfg, bb, _gens(3), x0)
    assert torch.equal(nw2, nw) and not torch.allclose(nw2, nl2)  # the winner's draw is kept


def test_a_rows_timestep_and_noise_do_not_depend_on_its_neighbours():
    """draw_noise: row i from gens[i] alone (t, then the winner's noise, then the loser's),
    so positions 5-6 drawn alone equal rows 5-6 of positions 0-6."""
    bb = _flow_backbone(1.0)
    for independent in (False, True):
        cfg = resolve(TrainConfig(tiny=True, backbone="sana", independent_noise=independent))
        alone = draw_noise(cfg, bb, row_generators(0, [5, 6]), torch.zeros(2, 2, 4, 4))
        every = draw_noise(cfg, bb, row_generators(0, range(7)), torch.zeros(7, 2, 4, 4))
        for a, b in zip(alone, every, strict=True):
            assert torch.equal(a, b[5:])
        assert torch.equal(every[1], every[2]) != independent


def _lrs(cfg: TrainConfig, n: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer(cfg, [p])
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_first_steps_match_diffusers_constant_with_warmup():
    """``--warmup-from 0`` (default) is diffusers' ``constant_with_warmup``, the official
    trainers' scheduler: the first optimizer step at lr 0; ``1`` starts from lr / W."""
    from diffusers.optimization import get_scheduler

    cfg = resolve(TrainConfig(tiny=True, lr=1e-3, warmup_steps=4))
    p = torch.nn.Parameter(torch.zeros(1))
    official = get_scheduler(
        "constant_with_warmup", optimizer=torch.optim.AdamW([p], lr=1e-3),
        num_warmup_steps=4, num_training_steps=10,
    )  # fmt: skip
    want = []
    for _ in range(7):
        want.append(official.get_last_lr()[0])
        official.optimizer.step()
        official.step()
    assert want == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 3)
    assert _lrs(cfg, 7) == pytest.approx(want)
    shifted = _lrs(dataclasses.replace(cfg, warmup_from=1), 7)
    assert shifted == pytest.approx([2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 4)
    with pytest.raises(UsageError, match="--warmup-from must be 0 or 1"):
        resolve(TrainConfig(tiny=True, warmup_from=2))


def test_grad_clipping_defaults_follow_the_optimizer():
    assert resolve(TrainConfig(tiny=True)).max_grad_norm == 1.0
    assert resolve(TrainConfig(tiny=True, optimizer="adafactor")).max_grad_norm == 0.0
    assert (
        resolve(TrainConfig(tiny=True, optimizer="adafactor", max_grad_norm=1.0)).max_grad_norm
        == 1.0
    )


def test_new_fields_on_resume_of_an_older_checkpoint():
    """A checkpoint saved before these fields existed meant the old behaviour; it is
    compared only where the field changes something."""
    cfg = resolve(TrainConfig(tiny=True))
    saved = {k: v for k, v in to_dict(cfg).items() if k not in ("warmup_from", "rand_cond_kept",
                                                                "rand_cond_timing")}  # fmt: skip
    assert resume_mismatches(cfg, saved, world=1, saved_world=1) == []
    warm = resolve(TrainConfig(tiny=True, warmup_steps=3))
    saved_warm = dict(saved, warmup_steps=3)
    assert resume_mismatches(warm, saved_warm, world=1, saved_world=1) == ["--warmup-from 1 -> 0"]
    rc = resolve(TrainConfig(tiny=True, rand_cond_prompts=["x.jsonl"]))
    saved_rc = dict(saved, rand_cond_prompts=["x.jsonl"])
    assert resume_mismatches(rc, saved_rc, world=1, saved_world=1) == [
        "--rand-cond-kept 'forward' -> 'contrastive'"
    ]
    # resumed, a field left at its default takes the old behaviour and the run continues
    assert adopt_saved_defaults(warm, saved_warm).warmup_from == 1
    assert adopt_saved_defaults(rc, saved_rc).rand_cond_kept == "forward"
    explicit = resolve(TrainConfig(tiny=True, warmup_steps=3, warmup_from=1))
    assert adopt_saved_defaults(explicit, dict(saved_warm, warmup_from=0)).warmup_from == 1


def _old(cfg: TrainConfig, *missing: str) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in missing}


def test_sana_train_shift_and_adafactor_clipping_of_an_older_checkpoint():
    """Saved before --train-shift (SANA: the scheduler's flow_shift) and before Adafactor's
    no-clipping default (clip 1.0): resuming continues the old run unless a flag asks
    otherwise, which is then refused."""
    sana = resolve(TrainConfig(tiny="sana"))
    assert sana.train_shift == 1.0
    saved = _old(sana, "train_shift")
    assert resume_mismatches(sana, saved, world=1, saved_world=1) == ["--train-shift None -> 1.0"]
    kept = adopt_saved_defaults(sana, saved)
    assert kept.train_shift is None
    assert resume_mismatches(kept, saved, world=1, saved_world=1) == []
    again = adopt_saved_defaults(sana, to_dict(kept))  # its next checkpoint says None
    assert again.train_shift is None
    asked = resolve(TrainConfig(tiny="sana", train_shift=2.0))
    assert adopt_saved_defaults(asked, saved).train_shift == 2.0
    assert resume_mismatches(asked, saved, world=1, saved_world=1) == ["--train-shift None -> 2.0"]
    ada = resolve(TrainConfig(tiny=True, optimizer="adafactor"))
    saved_ada = dict(_old(ada, "max_grad_norm"))
    assert adopt_saved_defaults(ada, saved_ada).max_grad_norm == 1.0
    saved_ada_new = to_dict(ada)  # saved with the new default: kept
    assert adopt_saved_defaults(ada, saved_ada_new).max_grad_norm == 0.0
    asked = resolve(TrainConfig(tiny=True, optimizer="adafactor", max_grad_norm=0.5))
    assert resume_mismatches(
        adopt_saved_defaults(asked, saved_ada), saved_ada, world=1, saved_world=1
    ) == ["--max-grad-norm 1.0 -> 0.5"]
    sd3 = resolve(TrainConfig(tiny="sd3", rand_cond_prompts=["x.jsonl"], warmup_steps=2))
    old_sd3 = _old(sd3, "precondition_outputs", "rand_cond_timing", "warmup_from", "lora_init",
                   "text_dtype", "dropped_prompt_encoding", "rand_cond_kept")  # fmt: skip
    kept = adopt_saved_defaults(sd3, old_sd3)
    assert (kept.precondition_outputs, kept.rand_cond_timing, kept.warmup_from) == (
        False, "step", 1)  # fmt: skip
    assert resume_mismatches(kept, old_sd3, world=1, saved_world=1) == []


def test_trainer_resumes_a_sana_adafactor_checkpoint_saved_before_the_new_fields(tmp_path):
    out = tmp_path / "r"
    argv = ["--tiny", "sana", "--max-steps", "1", "--batch-size", "1", "--tiny-pairs", "2",
            "--no-progress", "--optimizer", "adafactor", "--out", str(out)]  # fmt: skip
    assert train_t2i.main(argv) == 0
    ckpt = next((out / "checkpoints").iterdir())
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    for k in ("train_shift", "max_grad_norm"):
        del state["config"][k]
    torch.save(state, ckpt / STATE_FILE)
    resume = [*argv[:2], "--max-steps", "2", *argv[4:], "--resume", str(ckpt)]
    assert train_t2i.main(resume) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["train_shift"], written["max_grad_norm"]) == (None, 1.0)
    further = [*argv[:2], "--max-steps", "3", *argv[4:], "--resume", "latest"]
    assert train_t2i.main(further) == 0  # its own checkpoint now says the same


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:4], out, steps=2, progress=False)
    return out


def test_trainer_first_step_at_lr_zero_leaves_the_weights(data, tmp_path):
    base = ["--tiny", "--data", str(data), "--no-progress", "--max-steps", "3", "--lr", "1e-3",
            "--warmup-steps", "2", "--method", "sft"]  # fmt: skip
    assert train_t2i.main([*base, "--out", str(tmp_path / "a")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in recs if "loss" in r] == pytest.approx([0.0, 5e-4, 1e-3])
    assert train_t2i.main([*base, "--out", str(tmp_path / "b"), "--warmup-from", "1"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in recs if "loss" in r] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_text_dtype_puts_the_text_encoders_alone_in_bf16(tmp_path):
    """``--text-dtype bf16``: the official SANA trainer's Gemma-2 in bf16 while the rest
    (here fp32) keeps its dtype; the encodings reach the denoiser in its own dtype."""
    bb = tiny_backbone("sana")
    bb.to("cpu", None, torch.bfloat16)
    enc, vae = bb.components["text_encoder"], bb.vae
    assert next(enc.parameters()).dtype == torch.bfloat16
    assert next(vae.parameters()).dtype == next(bb.denoiser.parameters()).dtype == torch.float32
    cond = bb.encode_prompts(["a red cube", ""])
    assert cond.tensors["encoder_hidden_states"].dtype == torch.bfloat16
    x = torch.zeros(2, bb.latent_channels, 8, 8)
    assert bb.forward(bb.denoiser, x, torch.tensor([100, 900]), cond).dtype == torch.float32
    argv = ["--tiny", "--backbone", "sana", "--max-steps", "1", "--batch-size", "1",
            "--tiny-pairs", "2", "--no-progress", "--out", str(tmp_path / "r")]  # fmt: skip
    assert train_t2i.main([*argv, "--text-dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["text_dtype"] == "bf16"
    with pytest.raises(UsageError, match="--text-dtype fp16 needs CUDA"):
        resolve(TrainConfig(tiny=True, device="cpu", text_dtype="fp16"))


def _diffusion_dpo_sdxl_encoding(bb, captions):
    """Diffusion-DPO's SDXL trainer (``encode_prompt_sdxl``), transcribed: each tokenizer
    pads to its max length, penultimate hidden states concatenated, the pooled output of
    the last encoder; ``""`` is encoded like any caption."""
    hs = []
    for tk, ek in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = bb.components[tk], bb.components[ek]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        out = enc(ids, output_hidden_states=True)
        hs.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hs, dim=-1), pooled


def test_sdxl_dropped_prompts_are_encoded_as_diffusion_dpo():
    from bench.t2i.step import encode_step

    bb = tiny_backbone("sdxl")
    prompts, negs = ["a red cube", ""], ["a cube", ""]  # the second pair dropped
    with torch.no_grad():
        h_ref, pooled_ref = _diffusion_dpo_sdxl_encoding(bb, prompts)
        c, c_neg, unc = encode_step(bb, prompts, negs, need_neg=True, need_uncond=True,
                                    encode_empty=True)  # fmt: skip
        z, _, z_unc = encode_step(bb, prompts, negs, need_neg=True, need_uncond=True)
    torch.testing.assert_close(c.tensors["encoder_hidden_states"], h_ref)
    torch.testing.assert_close(c.tensors["text_embeds"], pooled_ref)
    torch.testing.assert_close(c_neg.index(torch.tensor([1])).tensors["text_embeds"],
                               pooled_ref[1:])  # fmt: skip
    assert h_ref[1].abs().sum() > 0 and not z.tensors["encoder_hidden_states"][1].any()
    for u in (unc, z_unc):  # the unconditional branch stays the pipeline's zeros
        assert not u.tensors["encoder_hidden_states"].any() and not u.tensors["text_embeds"].any()
    assert bb.zero_empty_prompt  # restored
    calls = []
    encode = bb._encode

    def spy(texts, **kw):
        calls.append((list(texts), kw))
        return encode(texts, **kw)

    class Guarded(type(bb)):  # the backbone's shared state is never written by a step
        def __setattr__(self, name, value):
            assert name != "zero_empty_prompt", "encode_step wrote zero_empty_prompt"
            super().__setattr__(name, value)

    bb._encode, bb.__class__ = spy, Guarded
    with torch.no_grad():
        for _ in range(2):
            again = encode_step(bb, prompts, negs, need_neg=True, need_uncond=True,
                                encode_empty=True)  # fmt: skip
            for a, b in zip(again, (c, c_neg, unc), strict=True):
                for k in a.tensors:
                    assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert [""] not in [t for t, _ in calls]  # the empty prompt: cached by the first step
    assert all(kw == {"zero_empty": False} for t, kw in calls if t != [""])
    cfg = resolve(TrainConfig(tiny=True, backbone="sdxl", proportion_empty_prompts=0.2))
    assert cfg.dropped_prompt_encoding == "encoded"
