"""Timestep samplers and per-timestep weights (SPEC §4; Kang et al. 2025)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minddspo import timesteps as TS
from minddspo.schedules import ddpm_schedule

PROPS = settings(max_examples=40, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (tables): the test uses a fixed seed, so it is
# deterministic; a wrong distribution exceeds these by orders of magnitude.
CHI2_999 = {19: 43.82, 49: 85.35}


@pytest.mark.parametrize(("T", "gamma"), [(20, 0.9), (20, 0.7), (50, 0.95), (20, 1.0)])
def test_geometric_sampler_frequencies_match_geometric_probs(T, gamma):
    n = 200_000
    t = TS.sample_geometric(n, T, gen(0), gamma)
    assert t.dtype == torch.long and t.shape == (n,)
    assert t.min() >= 0 and t.max() <= T - 1
    counts = np.bincount(t.numpy(), minlength=T)
    probs = TS.geometric_probs(T, gamma).numpy()
    assert chi_square(counts, probs) < CHI2_999[T - 1]
    # the statistic can fail: the mirrored distribution is far outside it
    if gamma < 1:
        assert chi_square(counts, probs[::-1].copy()) > 100 * CHI2_999[T - 1]
    # the same through the dispatcher
    t2 = TS.sample_timesteps("geometric", n, T, gen(0), gamma=gamma)
    assert torch.equal(t, t2)


@PROPS
@given(T=st.integers(1, 2000), gamma=st.floats(0.05, 0.999))
def test_geometric_probs_skew_toward_high_noise(T, gamma):
    p = TS.geometric_probs(T, gamma)
    assert p.dtype == torch.float64 and p.shape == (T,)
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-12)
    assert (p >= 0).all()
    if T > 1:
        assert p.argmax().item() == T - 1  # the noisiest step is the likeliest
        assert (p[1:] >= p[:-1]).all()
        # P(t) / P(t+1) = gamma^(100/T): gamma is the decay per 1 % of the schedule
        ok = p[:-1] > 1e-300
        ratio = torch.full_like(p[:-1][ok], gamma ** (100 / T))
        torch.testing.assert_close((p[:-1] / p[1:])[ok], ratio, rtol=1e-9, atol=0.0)


def test_geometric_probs_are_the_per_index_form_on_the_toy_schedule():
    """At T = 100 the normalised form is exactly P(t) ∝ gamma^(T-1-t)."""
    k = torch.arange(99, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(TS.geometric_probs(100, 0.9), 0.9**k / (0.9**k).sum())


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.97])
def test_geometric_skew_is_independent_of_T(gamma):
    """One gamma, one distribution of t / T, whether T = 100 (toy) or T = 1000 (SD)."""
    p100, p1000 = TS.geometric_probs(100, gamma), TS.geometric_probs(1000, gamma)
    # mass of every 1 % block of the schedule agrees
    torch.testing.assert_close(p1000.reshape(100, 10).sum(1), p100, rtol=1e-9, atol=1e-15)
    for T in (100, 200, 1000, 4000):  # the noisiest 5 % of the steps
        tail = TS.geometric_probs(T, gamma)[-(T // 20) :].sum().item()
        assert tail == pytest.approx((1 - gamma**5) / (1 - gamma**100), rel=1e-9)


def test_sd_default_no_longer_puts_almost_all_mass_in_the_last_five_percent():
    """Per-index gamma^k with gamma = 0.9 put 99.5 % of draws at t >= 950 when T = 1000."""
    p = TS.geometric_probs(1000, 0.9)
    assert p[950:].sum().item() == pytest.approx((1 - 0.9**5) / (1 - 0.9**100), rel=1e-9)
    assert p[950:].sum().item() < 0.5
    assert p[:500].sum().item() > 0.003  # the clean half is still visited
    t = TS.sample_geometric(100_000, 1000, gen(3), 0.9)
    assert abs((t >= 950).float().mean().item() - (1 - 0.9**5)) < 0.01


def test_geometric_probs_gamma_one_is_uniform_and_above_one_skews_clean():
    torch.testing.assert_close(TS.geometric_probs(10, 1.0), torch.full((10,), 0.1).double())
    p = TS.geometric_probs(10, 1.1)
    assert p.argmax().item() == 0 and (p[1:] < p[:-1]).all()


@pytest.mark.parametrize(
    "case",
    [
        ("linear", dict(beta_start=1e-4, beta_end=0.02), False),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012), False),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012), True),
        ("squaredcos_cap_v2", dict(), False),
        ("squaredcos_cap_v2", dict(), True),
    ],
)
def test_lambda_table_spans_one_to_two_and_grows_with_noise(case):
    name, kw, rescale = case
    snr = ddpm_schedule(1000, name, rescale_betas_zero_snr=rescale, **kw).snr()
    lam = TS.lambda_table(snr)
    assert lam.dtype == torch.float64 and lam.shape == (1000,)
    assert lam.min().item() == 1.0 and lam.max().item() == 2.0
    assert lam[0].item() == 1.0 and lam[-1].item() == 2.0  # clean end 1, noisy end 2
    assert (lam.diff() >= 0).all()
    # it is 1 + min-max normalised 1/sqrt(SNR)
    x = snr.rsqrt()
    torch.testing.assert_close(lam, 1 + (x - x.min()) / (x.max() - x.min()), rtol=1e-12, atol=0.0)


@PROPS
@given(sigma=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20), T=st.integers(3, 2000))
def test_flow_lambda_is_monotone_in_one_to_two(sigma, T):
    s = torch.tensor(sorted(sigma), dtype=torch.float64)
    lam = TS.flow_lambda(s, T)
    assert lam.dtype == torch.float32
    assert (lam >= 1).all() and (lam <= 2).all() and (lam.diff() >= 0).all()
    ends = TS.flow_lambda(torch.tensor([0.0, 1.0 / T, 1 - 1.0 / T, 1.0], dtype=torch.float64), T)
    assert ends.tolist() == [1.0, 1.0, 2.0, 2.0]


@PROPS
@given(T=st.integers(2, 2000), t=st.lists(st.integers(0, 10**6), min_size=1, max_size=16))
def test_linear_timestep_weight(T, t):
    t = torch.tensor(t) % T
    w = TS.timestep_weight("linear", t, T)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, t.float() / (T - 1))
    assert (w >= 0).all() and (w <= 1).all()


def test_other_timestep_weights():
    snr = ddpm_schedule().snr()
    t = torch.tensor([0, 10, 500, 999])
    assert TS.timestep_weight("none", t, 1000) is None
    w = TS.timestep_weight("lambda", t, 1000, snr)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, TS.lambda_table(snr)[t].float())
    assert w[0].item() == 1.0 and w[-1].item() == 2.0
    assert TS.timestep_weight("linear", torch.tensor([0]), 1).item() == 0.0  # T = 1: no 0/0


@pytest.mark.parametrize("kind", TS.SAMPLERS)
def test_samplers_are_deterministic_given_the_generator_seed(kind):
    a = TS.sample_timesteps(kind, 512, 1000, gen(3))
    b = TS.sample_timesteps(kind, 512, 1000, gen(3))
    c = TS.sample_timesteps(kind, 512, 1000, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == (512,)
    assert a.min() >= 0 and a.max() <= 999
    u1, u2 = TS.sample_flow_u(kind, 256, gen(5)), TS.sample_flow_u(kind, 256, gen(5))
    assert torch.equal(u1, u2) and u1.dtype == torch.float32
    assert (u1 > 0).all() and (u1 <= 1).all()
    # nothing is drawn from the global RNG
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    TS.sample_timesteps(kind, 8, 1000, gen(6))
    TS.sample_flow_u(kind, 8, gen(6))
    assert torch.equal(torch.rand(1), before)


def test_sampler_distributions():
    n, T = 100_000, 1000
    u = TS.sample_uniform(n, T, gen(0))
    assert u.min() == 0 and u.max() == T - 1
    assert abs(u.double().mean().item() - (T - 1) / 2) < 5  # sd of the mean ~0.9
    ln = TS.sample_logit_normal_u(n, gen(0), mean=1.0, std=0.5)
    assert (ln > 0).all() and (ln < 1).all()
    # the median of sigmoid(N(m, s)) is sigmoid(m)
    assert abs(ln.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
    lt = TS.sample_timesteps("logit_normal", n, T, gen(0))
    assert abs(lt.double().median().item() - T / 2) < 10  # symmetric about the middle
    # flow u: the discrete samplers live on the grid (t + 1) / T
    fu = TS.sample_flow_u("geometric", 1000, gen(0), T=50)
    torch.testing.assert_close(fu * 50, (fu * 50).round())
    assert fu.double().mean() > 0.75  # skewed toward sigma = 1 (noise)


@pytest.mark.parametrize(
    "call",
    [
        lambda: TS.sample_uniform(0, 10),
        lambda: TS.sample_uniform(4, 0),
        lambda: TS.sample_geometric(0, 10),
        lambda: TS.geometric_probs(0),
        lambda: TS.geometric_probs(10, 0.0),
        lambda: TS.geometric_probs(10, -0.5),
        lambda: TS.sample_logit_normal_u(0),
        lambda: TS.sample_timesteps("beta", 4, 10),
        lambda: TS.sample_flow_u("beta", 4),
        lambda: TS.timestep_weight("lambda", torch.tensor([1]), 10),  # needs snr
        lambda: TS.timestep_weight("cosine", torch.tensor([1]), 10),
        lambda: TS.lambda_from_noise_level(torch.ones(2), 1.0, 1.0),
    ],
)
def test_value_errors(call):
    with pytest.raises(ValueError):
        call()
