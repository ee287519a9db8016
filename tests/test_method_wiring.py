"""The toy and the trainer route every method through minddspo.methods.method_loss, with
the right tensors in the right places. Each test recomputes one step's tensors on its own
(generator draws, forward passes, targets) and compares them with what the caller passed,
so swapping the winner/loser policies, f_ref(x_t^l, c) for f_ref(x_t^l, c-), a halved
beta or a weight in the wrong place fails here; the table's own semantics are pinned in
tests/test_methods.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from toy_helpers import TINY
from toy_oracle import forward

import toy2d.train as tt
from minddspo.methods import method_loss
from minddspo.timesteps import lambda_table, sample_timesteps
from toy2d.data import generator

FT = tt.FinetuneConfig(steps=2, batch=8, n_probe=8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))


def _toy_step_tensors(run, ft, refs, params, step):
    """Recompute step ``step``'s inputs of member ``run`` from its own generator."""
    setup, T = TINY, TINY.schedule.num_train_timesteps
    sched = setup.schedule.build()
    pairs = tt.make_preference_pairs(setup, ft.pairs, run.n_pairs, run.seed, refs[run.seed])
    g = generator("finetune", *run.key())
    for _ in range(step):  # the same draws, in the same order, as finetune
        idx = torch.randint(0, len(pairs.c), (ft.batch,), generator=g)
        t = sample_timesteps(run.strategy.timestep_sampler, ft.batch, T, g)
        eps = torch.randn(ft.batch, 2, generator=g)
    t1, eps1 = t[None], eps[None]
    xt_w = sched.add_noise(pairs.x_w[idx][None], eps1, t1)
    xt_l = sched.add_noise(pairs.x_l[idx][None], eps1, t1)
    c, c_neg = pairs.c[idx][None], pairs.c_neg[idx][None]
    ref = refs[run.seed]
    f = lambda p, x, cc: forward(p, x, t1, cc, setup.mlp)[0]  # noqa: E731
    return {
        "pred_w": f(params, xt_w, c),
        "pred_l": f(params, xt_l, c),
        "ref_w": f(ref, xt_w, c),
        "ref_l": f(ref, xt_l, c),
        "ref_l_neg": f(ref, xt_l, c_neg),
        "target_w": eps,
        "target_l": eps,
        "t": t,
        "snr": sched.snr(),
    }


@pytest.mark.parametrize(
    "method, beta, weight",
    [
        ("ddspo", 400.0, "lambda"),
        ("dpo", 200.0, "linear"),
        ("dspo", 800.0, "none"),
        ("dspo_cpp", 400.0, "lambda"),
        ("sft", 400.0, "none"),
    ],
)
def test_one_toy_step_is_a_method_table_call_on_the_right_tensors(
    spy_method_loss, method, beta, weight
):
    refs = tt.load_references(TINY, [0])
    run = tt.Run(method, 3, beta, 0, tt.Strategy(timestep_weight=weight))
    params1, _ = tt.finetune(TINY, replace(FT, steps=1), [run], refs)  # the policy after step 1
    calls = spy_method_loss(tt)
    _, log = tt.finetune(TINY, FT, [run], refs)
    assert [c[0] for c in calls] == [method, method]  # one table call per step
    _, kw, out = calls[1]
    want = _toy_step_tensors(run, FT, refs, params1, step=2)
    names = (
        ("pred_w", "target_w")
        if method == "sft"
        else tuple(k for k in want if k[0] in "prt" and k != "t")
    )
    for name in names:
        torch.testing.assert_close(kw[name], want[name], rtol=1e-5, atol=1e-6, msg=name)

    # scales: the cell's beta is the logit scale; DSPO-family runs take beta_out outside
    # (one value per row: a batched sweep puts several strengths in one call)
    def rows(value: float) -> torch.Tensor:
        return torch.full((kw["pred_w"].shape[0],), value, dtype=torch.float32)

    if method in ("dspo", "dspo_cpp"):
        assert torch.equal(kw["beta"], rows(FT.beta_out))
        assert torch.equal(kw["beta_logit"], rows(beta))
    else:
        assert torch.equal(kw["beta"], rows(beta)) and kw["beta_logit"] is None
    assert kw["weight_kind"] == weight
    if weight == "lambda":
        torch.testing.assert_close(kw["weight"], lambda_table(want["snr"])[want["t"]].float())
    elif weight == "linear":
        T = TINY.schedule.num_train_timesteps
        torch.testing.assert_close(kw["weight"], want["t"].float() / (T - 1))
    else:
        assert kw["weight"] is None
    # and the step's loss (the logged tail loss: one step) is that direct call's
    direct = method_loss(
        method,
        **{k: want[k] for k in names},
        beta=kw["beta"],
        beta_logit=kw["beta_logit"],
        weight=kw["weight"],
        weight_kind=weight,
    )
    assert log.final_loss[0] == pytest.approx(direct.loss.mean().item(), rel=1e-5)


def test_toy_dspo_runs_take_their_own_beta_out(spy_method_loss):
    refs = tt.load_references(TINY, [0])
    calls = spy_method_loss(tt)
    runs = [tt.Run("dspo", 3, 400.0, 0, beta_out=0.5), tt.Run("dspo", 3, 400.0, 0, beta_out=0.01)]
    tt.finetune(TINY, replace(FT, steps=1), runs, refs)
    ((_, kw, _),) = calls  # one call for the group, each member's rows with its own beta_out
    per_member = kw["beta"].reshape(2, FT.batch)
    want = torch.tensor([[0.5], [0.01]], dtype=torch.float32).expand(2, FT.batch)
    assert torch.equal(per_member, want)
    assert torch.equal(kw["beta_logit"], torch.full((2 * FT.batch,), 400.0))
    with pytest.raises(ValueError, match="beta_out applies to"):
        tt.Run("dpo", 3, 400.0, 0, beta_out=0.5)


# ----------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def t2i():
    from bench.t2i.reference import Reference
    from bench.t2i.tiny import tiny_backbone

    torch.manual_seed(0)
    bb = tiny_backbone("sd", seed=0)
    policy = bb.denoiser
    ref = Reference(bb, policy, lora=False, periodic=False)
    with torch.no_grad():  # move the policy away from the reference: every term non-trivial
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bb, policy, ref


def _t2i_inputs(bb, guidance=1.0):
    from bench.t2i.step import encode_step

    g = torch.Generator().manual_seed(3)
    shape = (2, bb.latent_channels, 8, 8)
    x0_w, x0_l = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise_w, noise_l = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([100, 700])
    conds = encode_step(
        bb, ["a red cube", "two cats"], ["red", "cats"], need_neg=True, need_uncond=guidance != 1
    )
    return x0_w, x0_l, conds, t, noise_w, noise_l


@pytest.mark.parametrize(
    "method, guidance, pair, weight",
    [
        ("ddspo", 1.0, False, "lambda"),
        ("dspo_cpp", 1.0, False, "linear"),
        ("dpo", 1.0, False, "none"),
        ("dspo", 1.0, False, "lambda"),
        ("ddspo", 3.0, False, "none"),
        ("dspo_cpp", 2.0, False, "none"),
        ("ddspo", 1.0, True, "none"),
        ("sft", 1.0, False, "linear"),
    ],
)
def test_trainer_step_is_a_method_table_call_on_the_right_tensors(
    spy_method_loss, t2i, method, guidance, pair, weight
):
    import bench.t2i.step as tr
    from bench.t2i.config import TrainConfig, resolve
    from minddspo.schedules import cfg_combine

    bb, policy, ref = t2i
    policies = dict(winner_policy="W", loser_policy="L") if pair else {}
    cfg = resolve(
        TrainConfig(tiny=True, method=method, target_guidance=guidance, timestep_weight=weight,
                    **policies)
    )  # fmt: skip
    x0_w, x0_l, conds, t, n_w, n_l = _t2i_inputs(bb, guidance)
    c, c_neg, c_unc = conds
    win = lose = None
    if pair:  # two distinct "fine-tunes": the reference net, perturbed two ways
        win, lose = (ref.net, policy)
    calls = spy_method_loss(tr)
    spec = tr.loss_spec(cfg, bb)
    loss, _ = tr.compute_loss(
        spec, bb, policy, ref, x0_w, x0_l, conds, t, n_w, n_l, (win, lose) if pair else None
    )
    ((m, kw, out),) = calls
    assert m == method and torch.equal(loss, out.loss)
    x_w, x_l = bb.noise(x0_w, n_w, t), bb.noise(x0_l, n_l, t)
    with torch.no_grad():
        want = {
            "pred_w": bb.forward(policy, x_w, t, c),
            "target_w": bb.target(x0_w, n_w, t),
        }
        if method != "sft":
            want |= {
                "pred_l": bb.forward(policy, x_l, t, c),
                "ref_w": ref(x_w, t, c),
                "ref_l": ref(x_l, t, c),
                "target_l": bb.target(x0_l, n_l, t),
            }
        if method in ("ddspo", "dspo_cpp") and not pair:
            want["ref_l_neg"] = ref(x_l, t, c_neg)
        if guidance != 1.0:
            want["pair_w"] = cfg_combine(ref(x_w, t, c_unc), ref(x_w, t, c), guidance)
            want["pair_l"] = cfg_combine(ref(x_l, t, c_unc), ref(x_l, t, c_neg), guidance)
        if pair:
            want["pair_w"] = bb.forward(win, x_w, t, c)
            want["pair_l"] = bb.forward(lose, x_l, t, c)
    for name, value in want.items():
        torch.testing.assert_close(kw[name].detach(), value, rtol=1e-4, atol=1e-5, msg=name)
    if "pair_w" not in want:
        assert kw.get("pair_w") is None
    assert kw.get("beta", cfg.beta) == cfg.beta and (method == "sft") == ("beta" not in kw)
    assert kw.get("beta_logit") == (cfg.beta_logit if method in ("dspo", "dspo_cpp") else None)
    assert kw["weight_kind"] == weight
    if weight == "none":
        assert kw["weight"] is None
    else:
        torch.testing.assert_close(kw["weight"], bb.t_weight(weight, t))


@pytest.mark.parametrize("method", ["sft", "dpo", "dspo", "dspo_cpp", "ddspo"])
def test_a_step_is_one_reference_forward_then_one_policy_forward(t2i, method):
    """The trainer's step runs the denoisers as the GPU cost counts them
    (:func:`bench.t2i.gpu_cost.method_rows`): one batched reference forward over the
    method's rows, then one policy forward over ``[x_t^w; x_t^l]`` (sft: the winners)."""
    import bench.t2i.step as tr
    from bench.t2i.config import TrainConfig, resolve
    from bench.t2i.gpu_cost import method_rows

    bb, policy, ref = t2i
    calls = []

    def spy(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            calls.append((name, x.shape[0]))

        return hook

    handles = [policy.register_forward_pre_hook(spy("policy"), with_kwargs=True),
               ref.net.register_forward_pre_hook(spy("reference"), with_kwargs=True)]  # fmt: skip
    try:
        spec = tr.loss_spec(resolve(TrainConfig(tiny=True, method=method)), bb)
        with torch.no_grad():
            tr.compute_loss(spec, bb, policy, ref, *_t2i_inputs(bb))
    finally:
        for h in handles:
            h.remove()
    _, ref_rows, policy_rows = method_rows(method)
    want = [("reference", 2 * ref_rows)] if ref_rows else []
    assert calls == [*want, ("policy", 2 * policy_rows)]  # 2 pairs per batch


def test_a_step_draws_nothing_from_the_global_generators(t2i):
    """Resume restores no RNG state: a step's draws come from its rows' generators only, so
    the global torch, numpy and python generators must stay untouched by a whole step."""
    import random

    import numpy as np

    import bench.t2i.step as tr
    from bench.t2i.config import TrainConfig, resolve
    from bench.t2i.data import row_generators
    from bench.t2i.randcond import ExtraPrompt, mix_rows

    bb, policy, ref = t2i
    cfg = resolve(TrainConfig(tiny=True, method="ddspo", proportion_empty_prompts=0.5,
                              rand_cond_prompts=["x.txt"]))  # fmt: skip
    x0_w, x0_l, _, _, _, _ = _t2i_inputs(bb)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    gens = row_generators(0, range(2))
    t, n_w, n_l = tr.draw_noise(cfg, bb, gens, x0_w)
    extra = [ExtraPrompt("three small dogs", ())]
    prompts, negs, swapped = mix_rows(["a red cube", "two cats"], ["red", "cats"], t, 1000,
                                      gens, extra, "constant")  # fmt: skip
    prompts, negs = tr.drop_prompts(cfg, gens, prompts, negs)
    conds = tr.encode_step(bb, prompts, negs, need_neg=True, need_uncond=False)
    loss, _ = tr.compute_loss(tr.loss_spec(cfg, bb), bb, policy, ref, x0_w, x0_l, conds, t,
                              n_w, n_l, swapped=swapped)  # fmt: skip
    loss.mean().backward()
    policy.zero_grad(set_to_none=True)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
