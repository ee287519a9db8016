"""minddspo.process: one interface over DDPM and rectified-flow training and sampling."""

from __future__ import annotations

import pytest
import torch

from minddspo.process import DDPMProcess, FlowProcess
from minddspo.sampling import ddim_sample, ddpm_sample, flow_sample
from minddspo.schedules import FlowSchedule, ddpm_schedule
from minddspo.timesteps import sample_timesteps, timestep_weight

SCHED = ddpm_schedule(num_train_timesteps=100)


def _x(seed=0, shape=(3, 2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_ddpm_process_is_the_schedule(pt):
    proc = DDPMProcess(SCHED, prediction_type=pt)
    x0, eps = _x()
    t = torch.tensor([0, 40, 99])
    a, s = SCHED.alpha(t, x0), SCHED.sigma(t, x0)
    torch.testing.assert_close(proc.add_noise(x0, eps, t), a * x0 + s * eps)
    want = eps if pt == "epsilon" else a * eps - s * x0
    torch.testing.assert_close(proc.target(x0, eps, t), want)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(proc.sample_t(64, g1, "geometric", 0.8),
                       sample_timesteps("geometric", 64, 100, g2, gamma=0.8))  # fmt: skip
    w = proc.weight("lambda", t)
    assert torch.equal(w, timestep_weight("lambda", t, 100, snr=SCHED.snr()))
    assert w[0] == 1 and w[2] == 2
    assert proc.num_train_timesteps == 100


def test_ddpm_process_refuses_flow_prediction():
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        DDPMProcess(SCHED, prediction_type="flow")


def test_flow_process_speaks_network_timesteps():
    proc = FlowProcess(FlowSchedule(shift=3.0, num_train_timesteps=1000))
    x0, eps = _x(1)
    t = torch.tensor([0.0, 250.0, 1000.0])  # sigma 0, 0.25, 1
    sigma = torch.tensor([0.0, 0.25, 1.0]).view(3, 1, 1, 1)
    torch.testing.assert_close(proc.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(proc.target(x0, eps, t), eps - x0)
    assert torch.equal(proc.weight("linear", t), torch.tensor([0.0, 0.25, 1.0]))
    lam = proc.weight("lambda", t)
    assert lam[0] == 1 and lam[2] == 2 and 1 < lam[1] < 2
    assert proc.weight("none", t) is None
    draws = proc.sample_t(4000, torch.Generator().manual_seed(0), "uniform")
    assert draws.dtype == torch.float32 and 0 < draws.min() and draws.max() <= 1000
    # shift 3 pushes the uniform grid towards noise: the median sigma is 0.75, not 0.5
    assert draws.median().item() == pytest.approx(750, abs=25)


def test_samplers_are_the_shared_loops():
    x, _ = _x(2, (2, 2, 4, 4))
    den = lambda x_, t_: 0.1 * x_ + 0.001 * t_.float().view(-1, 1, 1, 1)
    proc = DDPMProcess(SCHED, prediction_type="epsilon", spacing="trailing", steps_offset=0)
    want = ddim_sample(den, x, SCHED, 5, spacing="trailing", steps_offset=0)
    assert torch.equal(proc.sample(den, x, 5), want)  # ddim is the default
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    got = proc.sample(den, x, 5, sampler="ddpm", generator=g1)
    assert torch.equal(got, ddpm_sample(den, x, SCHED, 5, spacing="trailing", generator=g2))
    assert not torch.equal(got, want)
    with pytest.raises(ValueError, match="ddim or ddpm"):
        proc.sample(den, x, 5, sampler="euler")
    flow = FlowProcess(FlowSchedule(shift=2.0))
    assert torch.equal(flow.sample(den, x, 4), flow_sample(den, x, FlowSchedule(shift=2.0), 4))
    assert torch.equal(flow.sample(den, x, 4, sampler="euler"), flow.sample(den, x, 4))
    for name in ("ddpm", "ddim", "flow"):  # DDPM sampler names are no aliases of Euler
        with pytest.raises(ValueError, match=f"Euler sampler .*got '{name}'"):
            flow.sample(den, x, 4, sampler=name)


def test_backbones_do_not_override_the_math():
    from bench.t2i.backbones import ADAPTERS, Backbone

    math = ("noise", "target", "sample_t", "t_weight", "_sample")
    for name, cls in ADAPTERS.items():
        own = [m for m in math if m in cls.__dict__ and cls is not Backbone]
        assert not own, f"{name} overrides {own}: put the math in minddspo.process"
