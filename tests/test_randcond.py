"""Random-condition mixing (--rand-cond-prompts): schedule, prompt files, row swaps, loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import train_t2i
from bench.t2i.config import TrainConfig, UsageError, resolve
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.randcond import ExtraPrompt, mix_rows, rand_cond_probability, read_extra_prompts
from bench.t2i.reference import Reference
from bench.t2i.step import compute_loss, encode_step, loss_spec
from bench.t2i.tiny import tiny_backbone


def test_schedules():
    f = torch.tensor([0.0, 0.5, 0.7, 0.9, 1.0])
    sig = rand_cond_probability("sigmoid", f, 20.0)
    assert sig[2] == pytest.approx(0.5) and sig[0] < 1e-5 and sig[4] > 0.997
    assert torch.all(sig[1:] > sig[:-1])
    exp = rand_cond_probability("exponential", f, 5.0)
    assert exp[4] == 1 and exp[0] == pytest.approx(math.exp(-5))
    assert torch.equal(rand_cond_probability("constant", f), torch.ones(5))
    with pytest.raises(ValueError, match="schedule"):
        rand_cond_probability("constant_1", f)


def test_read_extra_prompts(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": "a red cube on a table", "neg_prompts": ["a cube", "red table"]},
                {"prompt": "in the training set", "neg_prompts": ["training"]},
                {"prompt": "single", "neg_prompt": "singular"},
                {"prompt": "same as its neg", "neg_prompts": ["same as its neg", " "]},
                {"prompt": "no neg", "neg_prompts": []},
            ]
        )
        + "\n\n"
    )
    t = tmp_path / "x.txt"
    t.write_text("two words here\nlonely\n")
    got = read_extra_prompts([j, t], exclude={"in the training set"})
    assert got == [
        ExtraPrompt("a red cube on a table", ("a cube", "red table")),
        ExtraPrompt("single", ("singular",)),
        ExtraPrompt("same as its neg", ("same as its neg", " ")),
        ExtraPrompt("two words here", ()),
    ]
    # the official loader (ddspo/data.py), transcribed, keeps the same "neg_prompts" entries
    official = []
    for line in j.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        negs = item.get("neg_prompts")
        if item["prompt"] != "in the training set" and isinstance(negs, list) and negs:
            official.append(ExtraPrompt(item["prompt"], tuple(negs)))
    assert [e for e in got if e.prompt != "single" and e.negs] == official
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "neg_prompts": ["o"]}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_extra_prompts([bad])
    with pytest.raises(ValueError, match="not found"):
        read_extra_prompts([tmp_path / "nope.jsonl"])
    with pytest.raises(ValueError, match="no usable extra prompt"):
        read_extra_prompts([t], exclude={"two words here"})


EXTRA = [ExtraPrompt("a blue ball", ("a ball",)), ExtraPrompt("three small dogs", ())]


def test_mix_rows_follows_the_noise_level():
    prompts, negs = ["p0", "p1", "p2", "p3"], ["n0", "n1", "n2", "n3"]
    t = torch.tensor([0, 999, 0, 999])
    p, n, swapped = mix_rows(prompts, negs, t, 1000, gens(0, 4), EXTRA, "sigmoid", 20.0)
    assert swapped.tolist() == [False, True, False, True]  # p(0) ~ 1e-6, p(1) ~ 0.998
    assert p[0] == "p0" and n[2] == "n2"
    for i in (1, 3):
        item = next(e for e in EXTRA if e.prompt == p[i])
        assert n[i] in item.negs or (not item.negs and set(n[i].split()) < set(p[i].split()))
    # each row's stream advances alike whatever is swapped
    g1, g2 = gens(1, 4), gens(1, 4)
    mix_rows(prompts, negs, t, 1000, g1, EXTRA, "constant")
    mix_rows(prompts, negs, torch.zeros(4, dtype=torch.long), 1000, g2, EXTRA, "exponential")
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    # a row's swap and prompt do not depend on the rows beside it
    alone = mix_rows(prompts[2:], negs[2:], t[2:], 1000, gens(0, 4)[2:], EXTRA, "constant")
    both = mix_rows(prompts, negs, t, 1000, gens(0, 4), EXTRA, "constant")
    assert (alone[0], alone[1]) == (both[0][2:], both[1][2:])


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@pytest.fixture(scope="module")
def step_inputs():
    torch.manual_seed(0)
    bb = tiny_backbone("sd", seed=0)
    policy = bb.denoiser
    ref = Reference(bb, policy, lora=False, periodic=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    shape = (3, bb.latent_channels, 8, 8)
    x0_w, x0_l, noise = (torch.randn(shape, generator=g) for _ in range(3))
    conds = encode_step(bb, ["a red cube", "two cats", "a dog"], ["red", "cats", "dog"],
                        need_neg=True, need_uncond=False)  # fmt: skip
    return bb, policy, ref, (x0_w, x0_l, conds, torch.tensor([100, 500, 900]), noise, noise)


@pytest.mark.parametrize("method", ["ddspo", "dspo_cpp"])
def test_kept_rows_train_like_the_forward_target_method(step_inputs, method):
    bb, policy, ref, args = step_inputs
    rc = dict(rand_cond_prompts=["x.jsonl"], rand_cond_kept="forward")
    cfg = resolve(TrainConfig(tiny=True, method=method, beta=5.0, **rc))
    base = {"ddspo": "dpo", "dspo_cpp": "dspo"}[method]
    cfg_base = resolve(TrainConfig(tiny=True, method=base, beta=5.0, beta_logit=cfg.beta_logit))
    with torch.no_grad():
        none = torch.zeros(3, dtype=torch.bool)
        kept, _ = compute_loss(loss_spec(cfg, bb), bb, policy, ref, *args, swapped=none)
        forward, _ = compute_loss(loss_spec(cfg_base, bb), bb, policy, ref, *args)
        swapped, _ = compute_loss(loss_spec(cfg, bb), bb, policy, ref, *args, swapped=~none)
        contrastive, _ = compute_loss(loss_spec(cfg, bb), bb, policy, ref, *args)
        mask = torch.tensor([True, False, True])
        mixed, _ = compute_loss(loss_spec(cfg, bb), bb, policy, ref, *args, swapped=mask)
    torch.testing.assert_close(kept, forward)  # Diffusion-DPO / DSPO on kept rows
    torch.testing.assert_close(swapped, contrastive)  # TF-CPP on swapped rows
    assert not torch.allclose(kept, contrastive)
    torch.testing.assert_close(mixed, torch.where(mask, contrastive, forward))  # row by row


def _official_dpo_loss(model_pred, ref_pred, target, beta):
    """The official trainer's per-row Diffusion-DPO loss (ddspo/dpo.py), transcribed:
    rows ``[winners; losers]``, mean squared errors per row, ``-logsigmoid(-beta/2 ...)``."""
    dims = list(range(1, model_pred.ndim))
    m = (model_pred - target).pow(2).mean(dim=dims)
    r = (ref_pred - target).pow(2).mean(dim=dims)
    (mw, ml), (rw, rl) = m.chunk(2), r.chunk(2)
    return -torch.nn.functional.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl)))


def test_rand_cond_kept_rows_match_the_official_with_and_without_cpp(step_inputs):
    """Same tensors through ours and a transcription of the official SD trainer: the
    default (contrastive) is the official ``--cpp --rand_cond``, ``forward`` the official
    ``--rand_cond`` alone; swapped rows differ only in their prompts in both."""
    bb, policy, ref, (x0_w, x0_l, conds, t, noise, _) = step_inputs
    beta, swapped = 5.0, torch.tensor([True, False, True])
    # the swapped rows' prompts (mix_rows' output) are what both trainers encode
    c, c_neg, _ = encode_step(bb, ["a blue ball", "two cats", "three small dogs"],
                              ["a ball", "cats", "small dogs"], need_neg=True, need_uncond=False)  # fmt: skip
    x_t = torch.cat([bb.noise(x0_w, noise, t), bb.noise(x0_l, noise, t)])
    t2 = t.repeat(2)
    with torch.no_grad():
        model_pred = bb.forward(policy, x_t, t2, c.cat(c))
        ref_pred = ref(x_t, t2, c.cat(c))

        def official(cpp):
            target = torch.cat([noise, noise]).clone()
            paired = torch.zeros(3, dtype=torch.long) if cpp else (~swapped).long()
            idx = (paired == 0).nonzero(as_tuple=True)[0]
            rows = torch.cat([idx, idx + 3])
            target[rows] = ref(x_t[rows], t2[rows], c.index(idx).cat(c_neg.index(idx)))
            return _official_dpo_loss(model_pred, ref_pred, target, beta)

        losses = {}
        for kept in ("contrastive", "forward", None):
            rc = dict(rand_cond_prompts=["x.jsonl"], rand_cond_kept=kept)
            cfg = resolve(TrainConfig(tiny=True, method="ddspo", beta=beta, **rc))
            args = (x0_w, x0_l, (c, c_neg, None), t, noise, noise)
            losses[kept], _ = compute_loss(
                loss_spec(cfg, bb), bb, policy, ref, *args, swapped=swapped
            )
    torch.testing.assert_close(losses["contrastive"], official(cpp=True))
    torch.testing.assert_close(losses["forward"], official(cpp=False))
    torch.testing.assert_close(losses[None], losses["contrastive"])  # the default
    assert not torch.allclose(official(cpp=True), official(cpp=False), rtol=1e-2)


def test_rand_cond_timing_sets_the_swap_rate_per_noise_level():
    """``independent`` (the official SD3/SANA trainers): one swap rate at every noise level,
    E[p(t'/T)] over a uniform t' (0.30 for the sigmoid, lambda 20); ``step``: p(t/T)."""
    n, T = 4000, 1000
    expected = float(rand_cond_probability("sigmoid", torch.arange(T) / T, 20.0).mean())
    assert expected == pytest.approx(0.30, abs=0.01)
    prompts, negs = ["p"] * n, ["n"] * n
    for sigma, step_rate in ((0.2, 4.5e-5), (0.9, 0.982)):
        t = torch.full((n,), int(sigma * T))
        g = gens(0, n)
        _, _, indep = mix_rows(prompts, negs, t, T, g, EXTRA, "sigmoid", 20.0, "independent")
        _, _, step = mix_rows(prompts, negs, t, T, g, EXTRA, "sigmoid", 20.0, "step")
        assert indep.float().mean().item() == pytest.approx(expected, abs=0.03)
        assert step.float().mean().item() == pytest.approx(step_rate, abs=0.01)
    with pytest.raises(ValueError, match="timing"):
        mix_rows(prompts, negs, t, T, g, EXTRA, "sigmoid", 20.0, "uniform")


def test_rand_cond_defaults_per_backbone():
    rc = dict(tiny=True, rand_cond_prompts=["x.jsonl"])
    for backbone, timing in (("sd", "step"), ("sdxl", "step"), ("sana", "independent"),
                             ("sd3", "independent")):  # fmt: skip
        cfg = resolve(TrainConfig(backbone=backbone, **rc))
        assert (cfg.rand_cond_kept, cfg.rand_cond_timing) == ("contrastive", timing)
    cfg = resolve(TrainConfig(backbone="sana", rand_cond_timing="step", **rc))
    assert cfg.rand_cond_timing == "step"
    plain = resolve(TrainConfig(tiny=True, backbone="sana"))
    assert (plain.rand_cond_kept, plain.rand_cond_timing) == (None, None)


def test_config_checks():
    for name, value in (("rand_cond_kept", "forward"), ("rand_cond_timing", "step")):
        with pytest.raises(UsageError, match=f"--{name.replace('_', '-')} applies with"):
            resolve(TrainConfig(tiny=True, **{name: value}))
    with pytest.raises(UsageError, match="rand-cond kept"):
        resolve(TrainConfig(tiny=True, rand_cond_prompts=["x"], rand_cond_kept="both"))
    with pytest.raises(UsageError, match="ddspo and dspo_cpp only"):
        resolve(TrainConfig(tiny=True, method="dpo", rand_cond_prompts=["x.jsonl"]))
    with pytest.raises(UsageError, match="rand-cond schedule"):
        resolve(TrainConfig(tiny=True, rand_cond_prompts=["x"], rand_cond_schedule="linear"))
    with pytest.raises(UsageError, match="rand-cond-lambda"):
        resolve(TrainConfig(tiny=True, rand_cond_prompts=["x"], rand_cond_lambda=0.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:4], out, steps=2, progress=False)
    return out


def test_trainer_mixes_and_logs_the_share(data, tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"prompt": "a green tree", "neg_prompts": ["a tree"]}) + "\n")
    base = ["--tiny", "--data", str(data), "--no-progress", "--batch-size", "2", "--max-steps", "2"]
    flags = ["--rand-cond-prompts", str(extra), "--rand-cond-schedule", "constant"]
    assert train_t2i.main([*base, "--out", str(tmp_path / "a"), *flags]) == 0
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rand_cond_share"] for r in recs if "loss" in r] == [1.0, 1.0]
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["rand_cond_prompts"] == [str(extra)] and cfg["rand_cond_schedule"] == "constant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = train_t2i.main([*base, "--out", str(tmp_path / "b"), "--rand-cond-prompts", str(bad)])
    assert rc == 2 and not (tmp_path / "b" / "config.json").exists()
