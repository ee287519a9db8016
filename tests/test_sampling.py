"""minddspo.sampling's model-agnostic loops against full diffusers scheduler loops.

The network is a fake denoiser, a fixed linear function of x and t, so any mismatch in
timesteps, coefficients or noise order shows up in the final sample. "precise" runs give
diffusers our float64 tables and float64 samples (same formulas to ~1e-9); the stock runs
use diffusers' own float32 tables (float32 tolerance, accumulated over the steps).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from minddspo import sampling
from minddspo import schedules as S
from minddspo.sampling import ddim_sample, ddpm_sample, flow_sample, guided
from minddspo.schedules import FlowSchedule, ddpm_schedule

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TOL = {True: dict(rtol=1e-9, atol=1e-9), False: dict(rtol=1e-3, atol=1e-3)}


def fake_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed linear function of x and t; ``t`` is (B,) (int steps or float sigma * T)."""
    return 0.7 * x - 0.1 * x.flip(-1) + 1e-4 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def with_float64_tables(ref, sch: S.DDPMSchedule, set_alpha_to_one: bool = False):
    ref.betas = sch.betas.clone()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = sch.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ref.final_alpha_cumprod = ref.one if set_alpha_to_one else ref.alphas_cumprod[0]
    return ref


def x_T(dtype, seed=0):
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("spacing", "n"), [("leading", 10), ("trailing", 10), ("trailing", 7), ("linspace", 10)]
)
def test_ddim_sample_matches_a_diffusers_ddim_loop(spacing, n, prediction_type, eta, precise):
    sch = ddpm_schedule(1000, **SD)
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        **SD,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    if precise:
        ref = with_float64_tables(ref, sch)
    dtype = torch.float64 if precise else torch.float32
    ref.set_timesteps(n)
    x, g = x_T(dtype), torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        pred = fake_denoiser(x, t.expand(x.shape[0]))
        x = ref.step(pred, t, x, eta=eta, generator=g if eta > 0 else None).prev_sample
    got = ddim_sample(
        fake_denoiser,
        x_T(dtype),
        sch,
        n,
        prediction_type=prediction_type,
        eta=eta,
        spacing=spacing,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(got, x, **TOL[precise])


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("T", "n", "spacing"),
    [(100, None, "leading"), (1000, 10, "leading"), (1000, 7, "leading"), (1000, 10, "trailing")],
)
def test_ddpm_sample_matches_a_diffusers_ddpm_loop(T, n, spacing, prediction_type, precise):
    sch = ddpm_schedule(T, "linear", beta_start=1e-4, beta_end=0.02)
    ref = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    if precise:
        ref = with_float64_tables(ref, sch)
    dtype = torch.float64 if precise else torch.float32
    ref.set_timesteps(T if n is None else n)
    x, g = x_T(dtype), torch.Generator().manual_seed(2)
    for t in ref.timesteps:
        pred = fake_denoiser(x, t.expand(x.shape[0]))
        x = ref.step(pred, t, x, generator=g).prev_sample
    got = ddpm_sample(
        fake_denoiser,
        x_T(dtype),
        sch,
        n,
        prediction_type=prediction_type,
        spacing=spacing,
        generator=torch.Generator().manual_seed(2),
    )
    # trailing: diffusers also draws noise at the last step (t = 99 > 0) and adds it with
    # std sqrt(1e-20) = 1e-10; we stop at the posterior mean. Well inside the tolerance.
    torch.testing.assert_close(got, x, **TOL[precise])


def test_ddpm_sample_trailing_with_uneven_spacing_matches_diffusers():
    sch = ddpm_schedule(1000, "linear", beta_start=1e-4, beta_end=0.02)
    ref = with_float64_tables(
        DDPMScheduler(
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            clip_sample=False,
            timestep_spacing="trailing",
        ),
        sch,
    )
    ref.set_timesteps(7)
    x, g = x_T(torch.float64), torch.Generator().manual_seed(2)
    for t in ref.timesteps:
        x = ref.step(fake_denoiser(x, t.expand(x.shape[0])), t, x, generator=g).prev_sample
    got = ddpm_sample(
        fake_denoiser,
        x_T(torch.float64),
        sch,
        7,
        spacing="trailing",
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(got, x, **TOL[True])


@pytest.mark.parametrize("n", [1, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sample_matches_a_diffusers_flow_match_euler_loop(shift, n):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(n)
    x = x_T(torch.float32)
    for t in ref.timesteps:
        x = ref.step(fake_denoiser(x, t.expand(x.shape[0])), t, x).prev_sample
    got = flow_sample(fake_denoiser, x_T(torch.float32), FlowSchedule(shift=shift), n)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_stochastic_samplers_are_pure_functions_of_the_seed():
    sch = ddpm_schedule(1000, **SD)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return ddim_sample(fake_denoiser, x_T(torch.float32), sch, 5, eta=1.0, generator=g)

    assert torch.equal(sample(0), sample(0))
    assert not torch.allclose(sample(0), sample(1))


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_guided_uses_one_batched_forward(scale):
    calls = []

    def forward(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.reshape(-1, 1) + 0.01 * t.reshape(-1, 1)

    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    x, t = torch.randn(2, 4), torch.tensor([10, 10])
    out = guided(forward, cond, uncond, scale, lambda u, c: torch.cat([u, c]))(x, t)
    if scale == 1.0:
        assert calls == [2]  # only the conditional branch
        torch.testing.assert_close(out, x * cond.reshape(-1, 1) + 0.1)
    else:
        assert calls == [4]  # [uncond; cond] in one forward
        u = x * uncond.reshape(-1, 1) + 0.1
        c = x * cond.reshape(-1, 1) + 0.1
        torch.testing.assert_close(out, u + scale * (c - u))


@pytest.mark.parametrize("n", [7, 10, 30])
def test_ddim_next_prev_timestep_walks_the_listed_steps(n):
    """``prev_timestep="next"`` against a transcription: step to the next listed t, end at -1."""
    sch = ddpm_schedule(100, "linear", beta_start=1e-4, beta_end=0.02)
    ts = S.inference_timesteps(n, 100, "trailing").tolist()
    x = x_T(torch.float64)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < n else -1
        pred = fake_denoiser(x, torch.full((x.shape[0],), t))
        x = S.ddim_step(sch, pred, t, t_prev, x, set_alpha_to_one=True)
    kw = dict(spacing="trailing", steps_offset=0, set_alpha_to_one=True)
    got = ddim_sample(fake_denoiser, x_T(torch.float64), sch, n, prev_timestep="next", **kw)
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    stride = ddim_sample(fake_denoiser, x_T(torch.float64), sch, n, **kw)
    if 100 % n == 0:  # evenly spaced: the stride lands on the next listed step
        torch.testing.assert_close(stride, got, rtol=0, atol=0)
    else:
        assert not torch.allclose(stride, got)
    with pytest.raises(ValueError, match="prev_timestep"):
        ddim_sample(fake_denoiser, x_T(torch.float64), sch, n, prev_timestep="last")


def test_noise_sampler_replaces_the_generator_draw_in_the_same_order():
    """The default draws one ``randn`` per stochastic step; a custom sampler (here one
    generator per batch row, as the toy's stacked members) is called at the same steps."""
    sch = ddpm_schedule(50, "linear", beta_start=1e-4, beta_end=0.02)
    calls = []
    draw = sampling.default_noise_sampler(x_T(torch.float32), torch.Generator().manual_seed(3))

    def recording(t, t_prev):
        calls.append((t, t_prev))
        return draw(t, t_prev)

    got = ddpm_sample(fake_denoiser, x_T(torch.float32), sch, 10, noise_sampler=recording)
    want = ddpm_sample(
        fake_denoiser, x_T(torch.float32), sch, 10, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(got, want)
    ts = S.inference_timesteps(10, 50).tolist()
    assert calls == list(zip(ts[:-1], ts[1:], strict=True))  # no draw after the last step

    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    rows = ddpm_sample(
        fake_denoiser,
        x_T(torch.float32),
        sch,
        10,
        noise_sampler=lambda t, t_prev: torch.cat(
            [torch.randn(1, 3, 4, 4, generator=g) for g in gens]
        ),
    )
    for i in range(2):  # each row a function of its own generator only
        one = ddpm_sample(
            fake_denoiser,
            x_T(torch.float32)[i : i + 1],
            sch,
            10,
            generator=torch.Generator().manual_seed(10 + i),
        )
        torch.testing.assert_close(rows[i : i + 1], one)
