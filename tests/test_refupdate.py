"""Stable reference-model update rule (Kang et al. 2025; SPEC §4)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minddspo.refupdate import ReferenceUpdateRule, divergence_estimate

PROPS = settings(max_examples=50, deadline=None)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 8),
    scale=st.floats(1e-3, 1e3),
    use_w=st.booleans(),
)
def test_divergence_is_nonnegative_and_zero_iff_the_predictions_agree(seed, b, scale, use_w):
    init = randn(b, 3, 4, seed=seed)
    ref = init + scale * randn(b, 3, 4, seed=seed + 1)
    w = torch.rand(b, generator=torch.Generator().manual_seed(seed)) + 0.1 if use_w else None
    d0 = divergence_estimate(init.clone(), init, w)
    assert d0.ndim == 0 and d0.dtype == torch.float32 and d0.item() == 0.0
    d = divergence_estimate(ref, init, w).item()
    assert d > 0
    # symmetric in its two arguments (a squared distance), whichever way the reference moved
    assert divergence_estimate(init, ref, w).item() == pytest.approx(d, rel=1e-5)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), a=st.floats(0.01, 10.0), k=st.floats(1.01, 10.0))
def test_divergence_grows_with_the_distance_in_either_direction(seed, a, k):
    init, y = randn(4, 6, seed=seed), randn(4, 6, seed=seed + 1)
    # toward the winners' targets (the case the old signed estimate called negative) and away
    for direction in (y - init, init - y):
        near = divergence_estimate(init + a * direction, init).item()
        far = divergence_estimate(init + k * a * direction, init).item()
        assert 0 < near < far
        assert far == pytest.approx(k * k * near, rel=1e-4)  # quadratic in the distance


def test_divergence_value_and_weight():
    init = torch.ones(2, 4)
    ref = torch.stack([torch.full((4,), 2.0), torch.full((4,), 4.0)])  # e = 1, 9
    assert divergence_estimate(ref, init).item() == pytest.approx((1 + 9) / 2)
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert divergence_estimate(ref, init, w).item() == pytest.approx((0.5 + 18) / 2)
    assert divergence_estimate(ref.half(), init.half()).dtype == torch.float32


def test_a_reference_that_moves_toward_the_winners_freezes():
    """The old signed estimate went negative here and such a reference never froze."""
    y = torch.zeros(8, 4)
    init = torch.ones(8, 4)
    rule = ReferenceUpdateRule("periodic", tau=1, delta=0.1)
    frozen_at = None
    for step in range(1, 20):  # the reference closes in on the winners' targets
        ref = init + (y - init) * (step / 20)
        if rule.freezes(divergence_estimate(ref, init).item()):
            frozen_at = step
            break
    assert frozen_at is not None
    # first step with e(ref, init) = (step/20)^2 > 0.1 is step 7 ((7/20)^2 = 0.1225)
    assert frozen_at == 7


@PROPS
@given(tau=st.integers(1, 100), step=st.integers(-5, 10_000))
def test_copy_due_every_tau_steps_unless_frozen(tau, step):
    periodic = ReferenceUpdateRule("periodic", tau=tau)
    assert periodic.copy_due(step, frozen=False) == (step > 0 and step % tau == 0)
    assert not periodic.copy_due(step, frozen=True)
    assert not ReferenceUpdateRule("frozen", tau=tau).copy_due(step, frozen=False)


@PROPS
@given(delta=st.floats(1e-6, 1.0))
def test_freezes_exactly_when_the_divergence_exceeds_delta(delta):
    rule = ReferenceUpdateRule("periodic", tau=16, delta=delta)
    assert not rule.freezes(delta)  # strictly greater
    assert rule.freezes(math.nextafter(delta, math.inf))
    assert not rule.freezes(math.nextafter(delta, -math.inf))
    assert not rule.freezes(-1.0) and rule.freezes(10 * delta)
    assert not ReferenceUpdateRule("frozen", delta=delta).freezes(10 * delta)


def test_a_training_run_copies_until_the_divergence_crosses_delta():
    """The caller's loop (refupdate docstring): copy every tau steps, estimate D after each
    copy, freeze once D > delta; the crossing copy is kept."""
    rule = ReferenceUpdateRule("periodic", tau=4, delta=0.01)
    divergences = iter([0.002, 0.005, 0.01, 0.02, 0.5, 0.5])  # the 4th copy crosses
    frozen, copies = False, []
    for step in range(1, 41):
        if rule.copy_due(step, frozen):
            copies.append(step)
            frozen = rule.freezes(next(divergences))
    assert copies == [4, 8, 12, 16] and frozen


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="ema"),
        dict(mode="periodic", tau=0),
        dict(mode="periodic", tau=-3),
        dict(mode="periodic", delta=0.0),
        dict(mode="periodic", delta=-0.1),
        dict(mode="periodic", delta=float("nan")),
        dict(mode="periodic", delta=float("inf")),
    ],
)
def test_bad_rules_raise(kwargs):
    with pytest.raises(ValueError):
        ReferenceUpdateRule(**kwargs)


def test_the_default_rule_keeps_the_reference_fixed():
    """The default is the plain protocol: no copy at any step, no freeze at any divergence;
    and a rule cannot be changed after it is made."""
    rule = ReferenceUpdateRule()
    assert not any(rule.copy_due(step, frozen=False) for step in range(1, 1000))
    assert not rule.freezes(1e9)
    assert ReferenceUpdateRule("periodic").copy_due(rule.tau, frozen=False)  # periodic does
    with pytest.raises(AttributeError):  # frozen dataclass
        rule.tau = 16
