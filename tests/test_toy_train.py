"""Batched == one-at-a-time, determinism, Adam parity, caching and the reference-update loop."""

import pytest
import torch
from toy_helpers import TINY
from toy_oracle import StackedAdam, forward

import toy2d.train as tt
from toy2d.model import init_params
from toy2d.train import FinetuneConfig, Run, Strategy, finetune, load_references, sample

FT = FinetuneConfig(steps=6, batch=16, n_probe=16)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def refs():
    return load_references(TINY, [0, 1])


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)


def test_batched_equals_one_at_a_time(refs):
    runs = [
        Run("dpo", 3, 400.0, 0),
        Run("ddspo", 5, 200.0, 1),
        Run("dspo", 3, 800.0, 0),
        Run("sft", 2, 400.0, 1),
        Run(
            "dspo_cpp",
            2,
            400.0,
            0,
            Strategy(timestep_sampler="geometric", timestep_weight="lambda"),
        ),
        Run(
            "ddspo",
            3,
            400.0,
            1,
            Strategy(ref_update="periodic", ref_tau=2, timestep_weight="linear"),
        ),
    ]
    batched, blog = finetune(TINY, FT, runs, refs)
    xb, _ = sample(TINY, batched, [r.seed for r in runs], 4, ddim_steps=5)
    for i, r in enumerate(runs):
        one, log = finetune(TINY, FT, [r], refs)
        assert _close({k: v[i : i + 1] for k, v in batched.items()}, one), r
        assert log.copy_steps[0] == blog.copy_steps[i]
        x1, _ = sample(TINY, one, [r.seed], 4, ddim_steps=5)
        assert torch.allclose(xb[i], x1[0], atol=1e-4)


def test_deterministic_and_seed_dependent(refs):
    a, _ = finetune(TINY, FT, [Run("ddspo", 3, 400.0, 0)], refs)
    b, _ = finetune(TINY, FT, [Run("ddspo", 3, 400.0, 0)], refs)
    c, _ = finetune(TINY, FT, [Run("ddspo", 3, 400.0, 1)], refs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not _close(a, c)
    xa, _ = sample(TINY, a, [0], 4, sampler="ddpm")
    xb, _ = sample(TINY, b, [0], 4, sampler="ddpm")
    assert torch.equal(xa, xb)


def test_references_batched_equal_separate_and_are_cached(refs, monkeypatch):
    solo = tt.train_references(TINY, [1])
    assert _close({k: v[1:2] for k, v in tt.train_references(TINY, [0, 1]).items()}, solo)
    assert _close(refs[1], solo)

    def boom(*a, **k):
        raise AssertionError("should have been loaded from the cache")

    monkeypatch.setattr(tt, "train_references", boom)
    again = load_references(TINY, [0, 1])
    assert all(torch.equal(again[0][k], refs[0][k]) for k in refs[0])


def test_stacked_adam_matches_torch_adam():
    p0 = init_params(TINY.mlp, [torch.Generator().manual_seed(0)])
    x = torch.randn(1, 32, 2, generator=torch.Generator().manual_seed(1))
    t = torch.randint(0, 20, (1, 32), generator=torch.Generator().manual_seed(2))
    c = torch.randint(0, 8, (1, 32), generator=torch.Generator().manual_seed(3))
    mine = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    ref = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt_a, opt_b = StackedAdam(mine, torch.tensor([3e-3])), torch.optim.Adam(ref.values(), lr=3e-3)
    for _ in range(5):
        la = forward(mine, x, t, c, TINY.mlp).pow(2).mean()
        opt_a.step(dict(zip(mine, torch.autograd.grad(la, list(mine.values())), strict=True)))
        opt_b.zero_grad()
        forward(ref, x, t, c, TINY.mlp).pow(2).mean().backward()
        opt_b.step()
    assert _close(
        {k: v.detach() for k, v in mine.items()}, {k: v.detach() for k, v in ref.items()}, 1e-6
    )


def test_reference_copies_every_tau_and_freezes_above_delta(refs, monkeypatch):
    scripted = iter([0.001, 0.002, 0.5, 9.0, 9.0])
    seen = []

    def fake_divergence(ref_pred, init_pred, weight=None):
        seen.append(ref_pred.clone())
        return torch.tensor(next(scripted))

    monkeypatch.setattr(tt, "divergence_estimate", fake_divergence)
    st = Strategy(ref_update="periodic", ref_tau=3, ref_delta=0.1)
    ft = FinetuneConfig(steps=14, batch=8, n_probe=8)
    _, log = finetune(TINY, ft, [Run("dpo", 2, 400.0, 0, st)], refs)
    assert log.copy_steps[0] == [3, 6, 9]  # copies at tau, 2 tau, 3 tau; none after the freeze
    assert log.freeze_step[0] == 9  # 0.5 > delta = 0.1
    assert [d for _, d in log.divergences[0]] == pytest.approx([0.001, 0.002, 0.5])
    assert not torch.equal(seen[0], seen[1])  # the reference really changed between copies

    _, flog = finetune(TINY, ft, [Run("dpo", 2, 400.0, 0)], refs)
    assert flog.copy_steps[0] == [] and flog.freeze_step[0] is None


def test_real_divergence_is_logged(refs):
    st = Strategy(ref_update="periodic", ref_tau=2, ref_delta=1e9)
    _, log = finetune(
        TINY,
        FinetuneConfig(steps=4, batch=8, n_probe=8, lr=1e-2),
        [Run("ddspo", 2, 400.0, 0, st)],
        refs,
    )
    (s1, d1), (s2, d2) = log.divergences[0]
    assert (s1, s2) == (2, 4) and 0.0 < d1 < d2 and log.freeze_step[0] is None
