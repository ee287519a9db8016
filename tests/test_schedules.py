"""Schedules, conversions and sampler steps (SPEC §6): identities, and parity with diffusers.

diffusers is the oracle here, not a dependency of the core. Its tables are float32 and
ours are float64, so parity is checked at float32 tolerance: about 1e-5 relative, with an
absolute floor where float32 cancellation in diffusers (1 - abar near t = 0, the
zero-SNR rescale) dominates. Each tolerance says which.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from minddspo import schedules as S

SCHEDULE_KW = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),  # Ho et al.'s DDPM
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),  # Stable Diffusion
    "squaredcos_cap_v2": dict(),  # betas do not depend on beta_start / beta_end
}
CASES = [(name, rescale) for name in SCHEDULE_KW for rescale in (False, True)]
PROPS = settings(max_examples=40, deadline=None)


@functools.cache
def ours(name: str, rescale: bool = False, T: int = 1000) -> S.DDPMSchedule:
    return S.ddpm_schedule(T, name, rescale_betas_zero_snr=rescale, **SCHEDULE_KW[name])


def theirs(cls, name: str, rescale: bool = False, T: int = 1000, **kw):
    return cls(
        num_train_timesteps=T,
        beta_schedule=name,
        rescale_betas_zero_snr=rescale,
        **SCHEDULE_KW[name],
        **kw,
    )


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ identities


@pytest.mark.parametrize(("name", "rescale"), CASES)
def test_tables_are_float64_and_alpha2_plus_sigma2_is_one(name, rescale):
    sch = ours(name, rescale)
    assert sch.betas.dtype == sch.alphas_cumprod.dtype == torch.float64
    assert sch.num_train_timesteps == 1000
    assert ((sch.betas > 0) & (sch.betas <= 1)).all()
    torch.testing.assert_close(sch.alphas_cumprod[0], 1 - sch.betas[0], rtol=1e-15, atol=0.0)
    t = torch.arange(1000)
    like = torch.zeros(1000, 2, 3, dtype=torch.float64)
    a, s = sch.alpha(t, like), sch.sigma(t, like)
    assert a.shape == s.shape == (1000, 1, 1)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=0.0, atol=1e-14)
    # gathered in the sample's dtype
    assert sch.alpha(t, like.float()).dtype == torch.float32
    assert sch.alpha(5, like).ndim == 0


@pytest.mark.parametrize(("name", "rescale"), CASES)
def test_log_snr_is_strictly_decreasing(name, rescale):
    sch = ours(name, rescale)
    lam = sch.log_snr()
    assert torch.isfinite(lam).all()
    torch.testing.assert_close(sch.snr(), lam.exp(), rtol=1e-10, atol=0.0)
    assert (lam[1:] < lam[:-1]).all()
    if rescale:
        # abar_T = 0 exactly is floored at min(2**-24, abar_{T-2} / 2) so that s_T / a_T
        # stays finite and the last step stays the noisiest.
        floor = min(2.0**-24, sch.alphas_cumprod[-2].item() / 2)
        assert sch.alphas_cumprod[-1].item() == floor


@PROPS
@given(T=st.integers(1, 2000), name=st.sampled_from(tuple(SCHEDULE_KW)))
def test_make_betas_formulas(T, name):
    betas = S.make_betas(name, T, 0.00085, 0.012)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    if name == "linear":
        assert betas[0].item() == 0.00085 and (T == 1 or betas[-1].item() == 0.012)
    elif name == "scaled_linear":
        assert math.isclose(betas[0].item(), 0.00085, rel_tol=1e-14)
        if T > 1:
            assert math.isclose(betas[-1].item(), 0.012, rel_tol=1e-14)
        if T > 2:  # linear in sqrt(beta)
            assert (betas.sqrt().diff().std() / betas.sqrt().diff().mean()) < 1e-9
    else:

        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        for i in {0, T // 2, T - 1}:
            assert math.isclose(
                betas[i].item(), min(1 - abar((i + 1) / T) / abar(i / T), 0.999), rel_tol=1e-12
            )
        assert betas.max() <= 0.999 and betas[-1].item() == 0.999  # abar(1) = 0: capped


@pytest.mark.parametrize("name", SCHEDULE_KW)
def test_zero_terminal_snr_rescale(name):
    betas = S.make_betas(name, 1000, **SCHEDULE_KW[name])
    new = S.rescale_zero_terminal_snr(betas)
    old_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    new_sqrt = torch.cumprod(1 - new, 0).sqrt()
    assert new[-1].item() == 1.0 and new_sqrt[-1].item() == 0.0
    torch.testing.assert_close(new_sqrt[0], old_sqrt[0], rtol=1e-14, atol=0.0)
    # sqrt(abar) is an affine map of the old one (Lin et al. 2024, Alg. 1)
    ratio = (new_sqrt[:-1] - new_sqrt[-1]) / (old_sqrt[:-1] - old_sqrt[-1])
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-9, atol=0.0)


# ----------------------------------------------------------- parameterisations

log_snrs = st.floats(-8.0, 8.0)


@PROPS
@given(lam=log_snrs, seed=st.integers(0, 2**31 - 1))
def test_conversions_round_trip(lam, seed):
    a = torch.tensor(math.sqrt(1 / (1 + math.exp(-lam))), dtype=torch.float64)
    s = torch.tensor(math.sqrt(1 / (1 + math.exp(lam))), dtype=torch.float64)
    x0, eps = randn(3, 4, seed=seed, dtype=torch.float64), randn(3, 4, seed=seed + 1).double()
    x_t = a * x0 + s * eps
    v = S.eps_x0_to_v(eps, x0, a, s)
    tol = dict(rtol=0.0, atol=1e-9)
    torch.testing.assert_close(v, a * eps - s * x0, rtol=0.0, atol=0.0)
    torch.testing.assert_close(S.eps_to_x0(x_t, eps, a, s), x0, **tol)
    torch.testing.assert_close(S.x0_to_eps(x_t, x0, a, s), eps, **tol)
    torch.testing.assert_close(S.v_to_x0(x_t, v, a, s), x0, **tol)
    torch.testing.assert_close(S.v_to_eps(x_t, v, a, s), eps, **tol)
    for kind, pred in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        got_x0, got_eps = S.pred_to_x0_eps(pred, x_t, a, s, kind)
        torch.testing.assert_close(got_x0, x0, **tol)
        torch.testing.assert_close(got_eps, eps, **tol)


@PROPS
@given(
    case=st.sampled_from(CASES),
    t=st.lists(st.integers(0, 998), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
)
def test_schedule_targets_are_consistent_with_the_conversions(case, t, seed):
    sch = ours(*case)
    t = torch.tensor(t)
    x0 = randn(len(t), 2, 3, seed=seed, dtype=torch.float64)
    eps = randn(len(t), 2, 3, seed=seed + 1, dtype=torch.float64)
    x_t, v = sch.add_noise(x0, eps, t), sch.get_velocity(x0, eps, t)
    a, s = sch.alpha(t, x0), sch.sigma(t, x0)
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=0.0, atol=0.0)
    torch.testing.assert_close(S.v_to_x0(x_t, v, a, s), x0, rtol=0.0, atol=1e-9)
    torch.testing.assert_close(S.v_to_eps(x_t, v, a, s), eps, rtol=0.0, atol=1e-9)
    assert torch.equal(sch.target(x0, eps, t, "epsilon"), eps)
    assert torch.equal(sch.target(x0, eps, t, "v_prediction"), v)
    assert torch.equal(sch.target(x0, eps, t, "sample"), x0)


def test_append_dims():
    assert S.append_dims(torch.ones(3), 4).shape == (3, 1, 1, 1)
    assert S.append_dims(torch.ones(3, 2), 2).shape == (3, 2)
    with pytest.raises(ValueError):
        S.append_dims(torch.ones(3, 2, 1), 2)


def test_cfg():
    u, c = randn(2, 3, seed=1), randn(2, 3, seed=2)
    torch.testing.assert_close(S.cfg_combine(u, c, 1.0), c)
    assert torch.equal(S.cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(S.cfg_combine(u, c, 7.5), u + 7.5 * (c - u))
    # batched forward output: first half unconditional
    assert torch.equal(S.cfg_split(torch.cat([u, c]), 7.5), S.cfg_combine(u, c, 7.5))


# --------------------------------------------------------- parity: DDPM tables


@pytest.mark.parametrize(("name", "rescale"), CASES)
def test_tables_match_diffusers(name, rescale):
    sch, ref = ours(name, rescale), theirs(DDPMScheduler, name, rescale)
    # betas: float32 tolerance; under the rescale diffusers' float32 1 - abar_t/abar_{t-1}
    # cancels (tiny betas near t = 0, betas near 1 at the end), hence the absolute floor.
    torch.testing.assert_close(sch.betas.float(), ref.betas, rtol=5e-5, atol=1e-6 if rescale else 0)
    end = -1 if rescale else None
    torch.testing.assert_close(
        sch.alphas_cumprod[:end].float(), ref.alphas_cumprod[:end], rtol=1e-5, atol=1e-6
    )
    if rescale:  # diffusers' DDPM/DDIM keep abar_T = 0; ours floors it (see schedules.py)
        assert ref.alphas_cumprod[-1].item() == 0.0
    ddim = theirs(DDIMScheduler, name, rescale, steps_offset=1, clip_sample=False)
    assert torch.equal(ddim.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize(("name", "rescale"), CASES)
def test_add_noise_and_get_velocity_match_diffusers(name, rescale):
    sch, ref = ours(name, rescale), theirs(DDPMScheduler, name, rescale)
    # every t, except the last of a rescaled schedule, where diffusers has a_T = 0 and we
    # have a_T = 2**-12 (the floor above)
    t = torch.arange(999 if rescale else 1000)
    x0, eps = randn(len(t), 2, 3, seed=1), randn(len(t), 2, 3, seed=2)
    # a_t, s_t from diffusers' float32 abar: s_t = sqrt(1 - abar) near t = 0 carries up to
    # ~1e-5 absolute error, hence atol 5e-5 on unit-normal inputs.
    tol = dict(rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(sch.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), **tol)
    torch.testing.assert_close(sch.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t), **tol)
    assert sch.add_noise(x0, eps, t).dtype == torch.float32


# ------------------------------------------------------------ parity: samplers


def with_float64_tables(ref, sch: S.DDPMSchedule, set_alpha_to_one: bool = False):
    """Give a diffusers scheduler our float64 tables. Its step formula can then be checked
    to float64 precision, apart from the float32 rounding of its own tables."""
    ref.betas = sch.betas.clone()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = sch.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.final_alpha_cumprod = ref.one if set_alpha_to_one else ref.alphas_cumprod[0]
    return ref


# float64 tables: the same formula to 1e-10. Stock float32 tables: near t = 0 diffusers'
# beta_t = 1 - abar_t / abar_prev cancels in float32 (~5e-4 relative for beta_t ~ 1e-4).
STEP_TOL = {True: dict(rtol=1e-10, atol=1e-10), False: dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("spacing", "n"), [("leading", 10), ("trailing", 10), ("trailing", 7)])
def test_ddim_step_matches_diffusers(spacing, n, prediction_type, set_alpha_to_one, eta, precise):
    sch = ours("scaled_linear")
    ref = theirs(
        DDIMScheduler,
        "scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    if precise:
        ref = with_float64_tables(ref, sch, set_alpha_to_one)
    dtype = torch.float64 if precise else torch.float32
    ref.set_timesteps(n)
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out = (
            randn(2, 3, 4, seed=3 * i, dtype=dtype),
            randn(2, 3, 4, seed=3 * i + 1, dtype=dtype),
        )
        noise = randn(2, 3, 4, seed=3 * i + 2, dtype=dtype) if eta > 0 else None
        expect = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        got = S.ddim_step(
            sch,
            out,
            t,
            t - 1000 // n,  # diffusers' previous timestep, whatever the spacing
            x,
            prediction_type=prediction_type,
            eta=eta,
            noise=noise,
            set_alpha_to_one=set_alpha_to_one,
        )
        torch.testing.assert_close(got, expect, **STEP_TOL[precise], msg=f"t={t}")


def _ddpm_prev(timesteps: list[int], i: int) -> int:
    return timesteps[i + 1] if i + 1 < len(timesteps) else -1


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("spacing", "n"), [("leading", 10), ("trailing", 10), ("trailing", 7)])
def test_ddpm_step_matches_diffusers(spacing, n, prediction_type, precise):
    sch = ours("scaled_linear")
    ref = theirs(
        DDPMScheduler,
        "scaled_linear",
        clip_sample=False,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    if precise:
        ref = with_float64_tables(ref, sch)
    dtype = torch.float64 if precise else torch.float32
    ref.set_timesteps(n)
    ts = ref.timesteps.tolist()
    for i, t in enumerate(ts):
        x, out = (
            randn(2, 3, 4, seed=2 * i, dtype=dtype),
            randn(2, 3, 4, seed=2 * i + 1, dtype=dtype),
        )
        # diffusers draws the step noise as randn(shape, generator, dtype) when t > 0;
        # replay the same draw from an identically seeded generator.
        expect = ref.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        t_prev = _ddpm_prev(ts, i)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=dtype)
        got = S.ddpm_step(
            sch,
            out,
            t,
            t_prev,
            x,
            prediction_type=prediction_type,
            noise=noise if t_prev >= 0 else None,
        )
        if t_prev < 0 < t:
            # we return the posterior mean; diffusers still adds noise (t > 0) with its
            # variance floor clamp(1e-20), i.e. 1e-10 * noise (trailing spacing's last step)
            got = got + 1e-10 * noise
        torch.testing.assert_close(got, expect, **STEP_TOL[precise], msg=f"t={t}")


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ddpm_step_over_all_train_steps_matches_diffusers(t, precise):
    """Without set_timesteps diffusers steps t -> t - 1 through all T steps."""
    sch, ref = ours("linear"), theirs(DDPMScheduler, "linear", clip_sample=False)
    if precise:
        ref = with_float64_tables(ref, sch)
    dtype = torch.float64 if precise else torch.float32
    x, out = randn(2, 5, seed=t, dtype=dtype), randn(2, 5, seed=t + 1, dtype=dtype)
    expect = ref.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    got = S.ddpm_step(sch, out, t, t - 1, x, noise=noise if t > 0 else None)
    torch.testing.assert_close(got, expect, **STEP_TOL[precise])


@PROPS
@given(
    T=st.sampled_from((1000, 999, 50, 7, 1)),
    spacing=st.sampled_from(S.SPACINGS),
    steps_offset=st.sampled_from((0, 1)),
    data=st.data(),
)
def test_inference_timesteps_match_ddim_set_timesteps(T, spacing, steps_offset, data):
    n = data.draw(st.integers(1, T))
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(n)
    got = S.inference_timesteps(n, T, spacing, steps_offset)
    expect = ref.timesteps
    assert got.dtype == torch.long and got.shape == (n,)
    if spacing == "trailing" and len(expect) == n + 1:
        # diffusers' np.arange(T, 0, -T/n) overshoots by one element for some n (e.g.
        # T=1000, n=61) and appends the invalid timestep -1; ours stops at n.
        assert expect[-1].item() == -1
        expect = expect[:n]
    assert torch.equal(got, expect)


@PROPS
@given(T=st.integers(1, 1200), spacing=st.sampled_from(S.SPACINGS), data=st.data())
def test_inference_timesteps_are_n_distinct_valid_descending_steps(T, spacing, data):
    n = data.draw(st.integers(1, T))
    ts = S.inference_timesteps(n, T, spacing)
    assert ts.shape == (n,)
    assert (ts[1:] < ts[:-1]).all()
    assert ts.min() >= 0 and ts.max() <= T - 1
    if spacing == "trailing":
        assert ts[0] == T - 1  # trailing always starts at the noisiest step


def test_trailing_timesteps_regression_1000_61():
    ts = S.inference_timesteps(61, 1000, "trailing")
    assert len(ts) == 61 and ts[0] == 999 and ts[-1] == 15


# ------------------------------------------------------------- rectified flow


@PROPS
@given(
    sigma=st.floats(0.0, 1.0),
    shift=st.floats(0.1, 10.0),
    other=st.floats(0.0, 1.0),
)
def test_shift_sigma(sigma, shift, other):
    out = S.shift_sigma(sigma, shift)
    assert math.isclose(out, shift * sigma / (1 + (shift - 1) * sigma), rel_tol=1e-15)
    assert 0.0 <= out <= 1.0 + 1e-15
    assert math.isclose(S.shift_sigma(out, 1 / shift), sigma, rel_tol=1e-9, abs_tol=1e-12)
    assert S.shift_sigma(sigma, 1.0) == pytest.approx(sigma, rel=1e-15)
    if shift > 1:
        assert out >= sigma - 1e-15  # a shift > 1 spends more time at high noise
    if other > sigma:
        assert S.shift_sigma(other, shift) >= out  # monotone
    assert S.shift_sigma(0.0, shift) == 0.0 and S.shift_sigma(1.0, shift) == pytest.approx(1.0)
    assert S.shift_sigma(0.5, 3.0) == 0.75
    t = torch.tensor([sigma, other], dtype=torch.float64)
    torch.testing.assert_close(
        S.shift_sigma(t, shift), torch.tensor([out, S.shift_sigma(other, shift)]).double()
    )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_train_sigmas_match_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = torch.from_numpy(np.linspace(1, 1000, 1000)[::-1].copy()) / 1000
    ours_ = S.FlowSchedule(shift=shift).train_sigmas(u)
    torch.testing.assert_close(ours_.float(), ref.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_inference_sigmas_and_euler_step_match_diffusers(shift, n):
    flow = S.FlowSchedule(shift=shift)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(n)
    sig = flow.inference_sigmas(n)
    assert sig.dtype == torch.float64 and sig.shape == (n + 1,)
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0 and (sig.diff() < 0).all()
    torch.testing.assert_close(sig.float(), ref.sigmas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flow.timestep(sig[:-1]).float(), ref.timesteps, rtol=1e-6, atol=1e-4)
    x = randn(2, 3, 4, seed=0)
    for i, t in enumerate(ref.timesteps):
        v = randn(2, 3, 4, seed=i + 1)
        expect = ref.step(v, t, x).prev_sample
        got = S.flow_euler_step(x, v, sig[i].item(), sig[i + 1].item())
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        x = expect


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_add_noise_matches_diffusers_scale_noise(shift):
    flow = S.FlowSchedule(shift=shift)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(10)
    x0, eps = randn(1, 3, 4, seed=1), randn(1, 3, 4, seed=2)
    for t, sigma in zip(ref.timesteps, ref.sigmas, strict=False):
        expect = ref.scale_noise(x0, t[None], eps)
        torch.testing.assert_close(flow.add_noise(x0, eps, sigma), expect, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(flow.add_noise(x0, eps, sigma[None]), expect)


@PROPS
@given(s1=st.floats(0.0, 1.0), s2=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_flow_interpolation_identities(s1, s2, seed):
    flow = S.FlowSchedule()
    x0, eps = randn(3, 4, seed=seed, dtype=torch.float64), randn(3, 4, seed=seed + 1).double()
    v = flow.velocity(x0, eps)
    assert torch.equal(v, eps - x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.tensor(0.0)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.tensor(1.0)), eps)
    x1 = flow.add_noise(x0, eps, torch.tensor(s1, dtype=torch.float64))
    x2 = flow.add_noise(x0, eps, torch.tensor(s2, dtype=torch.float64))
    # the exact velocity carries x_{s1} to x_{s2} in one Euler step (straight paths)
    torch.testing.assert_close(S.flow_euler_step(x1, v, s1, s2), x2, rtol=0.0, atol=1e-12)
    per_sample = flow.add_noise(x0, eps, torch.tensor([s1, s2, s1], dtype=torch.float64))
    torch.testing.assert_close(per_sample[1], x2[1], rtol=0.0, atol=1e-15)
    assert flow.timestep(torch.tensor(s1)).item() == pytest.approx(s1 * 1000)


# ------------------------------------------------------------------ validation


def test_schedule_value_errors():
    sch = ours("scaled_linear")
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="beta_schedule"):
        S.make_betas("cosine")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        S.make_betas("linear", 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.inference_timesteps(0, 1000)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.inference_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="spacing"):
        S.inference_timesteps(10, 1000, "karras")
    with pytest.raises(ValueError, match="noise"):
        S.ddim_step(sch, x, 500, 400, x, eta=0.5)
    with pytest.raises(ValueError, match="noise"):
        S.ddpm_step(sch, x, 500, 400, x)
    with pytest.raises(ValueError, match="prediction_type"):
        S.pred_to_x0_eps(x, x, 1.0, 0.0, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        sch.target(x, x, 5, "flow")
    # the controls: no noise is needed when eta = 0 or at the last DDPM step
    S.ddim_step(sch, x, 500, 400, x, eta=0.0)
    S.ddpm_step(sch, x, 0, -1, x)


@pytest.mark.parametrize("n", [1, 4, 28])
@pytest.mark.parametrize("seq_len", [64, 1024, 4096])
def test_flux_pipeline_grid_and_dynamic_shift_match_diffusers(seq_len, n):
    """FluxPipeline: sigmas linspace(1, 1/n, n), exponential dynamic shift with mu from the
    image sequence length (calculate_shift) == FlowSchedule(resolution_shift(...), "pipeline")."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert S.resolution_shift(seq_len) == pytest.approx(math.exp(mu), rel=1e-12)
    ref = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    flow = S.FlowSchedule(shift=S.resolution_shift(seq_len), grid="pipeline")
    sig = flow.inference_sigmas(n)
    torch.testing.assert_close(sig.float(), ref.sigmas, rtol=1e-6, atol=1e-7)
    # the scheduler's own grid is another one (its lower end shifted twice)
    if n > 1:
        other = S.FlowSchedule(shift=flow.shift).inference_sigmas(n)
        assert not torch.allclose(other.float(), ref.sigmas, atol=1e-4)
    with pytest.raises(ValueError, match="flow grid"):
        S.FlowSchedule(grid="karras").inference_sigmas(n)
