"""Properties, reference parity and input validation of the preference losses (SPEC §2-§4, §7)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from minddspo.losses import (
    PreferenceLoss,
    ddspo_loss,
    dpo_loss,
    dspo_cpp_loss,
    dspo_loss,
    dspo_pair_loss,
    preference_logits,
    sft_loss,
)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
METHODS = ("dpo", "ddspo", "dspo", "dspo_cpp")
LOGISTIC = ("dpo", "ddspo")  # -log sigma(s) losses; they take logit_weight
CPP = ("ddspo", "dspo_cpp")  # reward targets (ref_w, ref_l_neg)
PROPS = settings(max_examples=30, deadline=None)

shapes = st.builds(
    lambda b, rest: (b, *rest),
    st.integers(1, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
)
betas = st.floats(1e-3, 1e4, allow_nan=False, allow_infinity=False)
seeds = st.integers(0, 2**31 - 1)


@dataclass
class Batch:
    pred_w: Tensor
    pred_l: Tensor
    ref_w: Tensor
    ref_l: Tensor
    target_w: Tensor
    target_l: Tensor
    ref_l_neg: Tensor

    def reward_targets(self, method: str) -> tuple[Tensor, Tensor]:
        """The (y_w, y_l) each method's logit s scores against (SPEC §2 table, §3).

        DSPO's regression term is always against the forward-process ``target_w``."""
        return (self.ref_w, self.ref_l_neg) if method in CPP else (self.target_w, self.target_l)


def make_batch(shape, dtype=torch.float32, seed=0, scale=1.0) -> Batch:
    """Targets ~ N(0,1); predictions = targets + scale * N(0,1), so errors are ~scale^2."""
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(shape, generator=g, dtype=torch.float64)

    tw, tl, neg = randn(), randn(), randn()
    t = [tw + scale * randn(), tl + scale * randn(), tw + scale * randn(), tl + scale * randn()]
    return Batch(*(x.to(dtype) for x in (*t, tw, tl, neg)))


def run(method: str, b: Batch, pred_w=None, pred_l=None, **kw) -> PreferenceLoss:
    pw = b.pred_w if pred_w is None else pred_w
    pl = b.pred_l if pred_l is None else pred_l
    if method == "dpo":
        return dpo_loss(pw, pl, b.ref_w, b.ref_l, b.target_w, b.target_l, **kw)
    if method == "dspo":
        return dspo_loss(pw, pl, b.ref_w, b.ref_l, b.target_w, b.target_l, **kw)
    if method == "ddspo":
        return ddspo_loss(pw, pl, b.ref_w, b.ref_l, b.ref_l_neg, **kw)
    return dspo_cpp_loss(pw, pl, b.ref_w, b.ref_l, b.ref_l_neg, b.target_w, **kw)


def err(pred: Tensor, target: Tensor) -> Tensor:
    """e(pred, target) in float64, written independently of the package."""
    d = pred.detach().double() - target.detach().double()
    return d.pow(2).reshape(d.shape[0], -1).mean(1)


# ------------------------------------------------------------------ properties


@PROPS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), beta=betas, seed=seeds)
def test_policy_equal_to_reference_gives_exactly_log2(shape, dtype, beta, seed):
    b = make_batch(shape, dtype, seed)
    log2 = torch.full((shape[0],), math.log(2.0), dtype=torch.float32)
    zero = torch.zeros(shape[0])
    for method in LOGISTIC:
        out = run(method, b, pred_w=b.ref_w.clone(), pred_l=b.ref_l.clone(), beta=beta)
        assert torch.equal(out.loss, log2), method
        assert torch.equal(out.logits.abs(), zero), method
        assert torch.equal(out.implicit_acc, zero), method
    # DSPO and DSPO+CPP at the reference: s = 0 and the correction term vanishes, leaving
    # plain regression of the winner on its forward-process target -- for dspo_cpp too,
    # whose reward targets differ but whose regression target does not (SPEC §3).
    e_w = (b.ref_w.float() - b.target_w.float()).pow(2).reshape(shape[0], -1).mean(1)
    for method in ("dspo", "dspo_cpp"):
        out = run(method, b, pred_w=b.ref_w.clone(), pred_l=b.ref_l.clone(), beta=beta)
        assert torch.equal(out.loss, e_w), method
        assert torch.equal(out.logits.abs(), zero), method
    assume(bool((e_w > 0).all()))  # (bf16 can round ref_w onto target_w)
    assert (out.loss > 0).all()  # not the old, identically-0 dspo_cpp


@PROPS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), beta=betas, seed=seeds)
def test_swapping_winner_and_loser_negates_the_logits(shape, dtype, beta, seed):
    b = make_batch(shape, dtype, seed)
    out = dpo_loss(b.pred_w, b.pred_l, b.ref_w, b.ref_l, b.target_w, b.target_l, beta=beta)
    sw = dpo_loss(b.pred_l, b.pred_w, b.ref_l, b.ref_w, b.target_l, b.target_w, beta=beta)
    assert torch.equal(sw.logits, -out.logits)
    assert torch.equal(sw.gap_w, out.gap_l) and torch.equal(sw.gap_l, out.gap_w)
    # -log sigma(s) - (-log sigma(-s)) = -s
    torch.testing.assert_close(out.loss - sw.loss, -out.logits, rtol=1e-5, atol=1e-5)
    s = preference_logits(b.pred_w, b.pred_l, b.ref_w, b.ref_l, b.ref_w, b.ref_l_neg, beta=beta)
    s_sw = preference_logits(b.pred_l, b.pred_w, b.ref_l, b.ref_w, b.ref_l_neg, b.ref_w, beta=beta)
    assert torch.equal(s_sw, -s)
    d = dspo_loss(b.pred_w, b.pred_l, b.ref_w, b.ref_l, b.target_w, b.target_l, beta=beta)
    d_sw = dspo_loss(b.pred_l, b.pred_w, b.ref_l, b.ref_w, b.target_l, b.target_w, beta=beta)
    assert torch.equal(d_sw.logits, -d.logits)


@PROPS
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=betas,
    k=st.floats(1e-2, 1e2),
    seed=seeds,
)
def test_logits_are_linear_in_beta(shape, dtype, beta, k, seed):
    b = make_batch(shape, dtype, seed)
    for method in LOGISTIC:
        out, out_k = run(method, b, beta=beta), run(method, b, beta=k * beta)
        torch.testing.assert_close(out_k.logits, k * out.logits, rtol=2e-6, atol=0.0)
        # and s is -0.5 beta (gap_w - gap_l), read off the diagnostics
        expect = -0.5 * beta * (out.gap_w.double() - out.gap_l.double())
        torch.testing.assert_close(out.logits.double(), expect, rtol=2e-6, atol=1e-30)
    # DSPO's logit uses beta_logit alone; the regression beta does not enter it
    for method in ("dspo", "dspo_cpp"):
        out = run(method, b, beta=1.0, beta_logit=beta)
        out_k = run(method, b, beta=3.0, beta_logit=k * beta)
        torch.testing.assert_close(out_k.logits, k * out.logits, rtol=2e-6, atol=0.0)
        assert torch.equal(run(method, b, beta=beta).logits, out.logits)  # None: same as beta


@PROPS
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=betas,
    seed=seeds,
    weighted=st.booleans(),
)
def test_cpp_methods_are_the_shared_core_with_targets_ref_w_and_ref_l_neg(
    shape, dtype, beta, seed, weighted
):
    b = make_batch(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lw = torch.rand(shape[0], generator=g) + 0.5 if weighted else None
    tw = torch.rand(shape[0], generator=g) if weighted else None
    args = (b.pred_w, b.pred_l, b.ref_w, b.ref_l)
    dd = ddspo_loss(*args, b.ref_l_neg, beta=beta, logit_weight=lw, loss_weight=tw)
    core = dpo_loss(*args, b.ref_w, b.ref_l_neg, beta=beta, logit_weight=lw, loss_weight=tw)
    for name in PreferenceLoss._fields:
        assert torch.equal(getattr(dd, name), getattr(core, name)), name
    s = preference_logits(*args, b.ref_w, b.ref_l_neg, beta=beta, logit_weight=lw)
    assert torch.equal(s, dd.logits)
    # the winner term is pure distillation: the reference part e(r_w, r_w) is exactly 0
    assert torch.equal(dd.gap_w, dd.err_w)

    # DSPO+CPP: the same reward targets, in the logit only (with beta_logit); the
    # regression keeps the forward-process target_w -- dspo_pair_loss with (r_w, r_l^-).
    kw = dict(beta=beta, beta_logit=2 * beta, loss_weight=tw)
    cpp = dspo_cpp_loss(*args, b.ref_l_neg, b.target_w, **kw)
    pair = dspo_pair_loss(*args, b.ref_w, b.ref_l_neg, b.target_w, **kw)
    for name in PreferenceLoss._fields:
        assert torch.equal(getattr(cpp, name), getattr(pair, name)), name
    s = preference_logits(*args, b.ref_w, b.ref_l_neg, beta=2 * beta)
    assert torch.equal(s, cpp.logits)
    assert torch.equal(cpp.gap_w, cpp.err_w)


@PROPS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), beta=st.floats(1e-2, 10.0), seed=seeds)
def test_dspo_cpp_closed_form(shape, dtype, beta, seed):
    """loss = e((p_w - y_w) - c (p_w - r_w)), c = beta (1 - sigma(s)), y_w the forward
    target; in the special case y_w = r_w the residual is (1 - c)(p_w - r_w)."""
    b = make_batch(shape, dtype, seed)
    out = run("dspo_cpp", b, beta=beta)
    c = (beta * torch.sigmoid(-out.logits.double())).reshape(-1, *([1] * (len(shape) - 1)))
    p_w, y_w, r_w = (x.double() for x in (b.pred_w, b.target_w, b.ref_w))
    expect = err((p_w - y_w) - c * (p_w - r_w), torch.zeros_like(p_w))
    torch.testing.assert_close(out.loss.double(), expect, rtol=1e-4, atol=1e-6)
    special = dspo_cpp_loss(b.pred_w, b.pred_l, b.ref_w, b.ref_l, b.ref_l_neg, b.ref_w, beta=beta)
    assert torch.equal(special.logits, out.logits)  # the logit does not see target_w
    c = c.reshape(-1)
    torch.testing.assert_close(
        special.loss.double(), (1 - c) ** 2 * err(b.pred_w, b.ref_w), rtol=1e-4, atol=1e-6
    )


def _sgd_step(x: Tensor, grad: Tensor, size: Tensor) -> Tensor:
    """One SGD step with a per-sample learning rate making the step norm ``size`` (B,)."""
    flat = grad.detach().double().reshape(grad.shape[0], -1)
    lr = size / flat.norm(dim=1)
    return x.detach().double() - lr.reshape(-1, *([1] * (x.ndim - 1))) * grad.detach().double()


@PROPS
@given(
    method=st.sampled_from(LOGISTIC),
    shape=shapes,
    dtype=st.sampled_from((torch.float32, torch.float64)),
    beta=st.floats(1e-2, 10.0),
    seed=seeds,
)
def test_logistic_gradients_pull_the_winner_and_push_the_loser(method, shape, dtype, beta, seed):
    b = make_batch(shape, dtype, seed)
    y_w, y_l = b.reward_targets(method)
    p_w = b.pred_w.clone().requires_grad_(True)
    p_l = b.pred_l.clone().requires_grad_(True)
    out = run(method, b, pred_w=p_w, pred_l=p_l, beta=beta)
    assume(bool((out.logits.abs() < 30).all()))  # sigma(-s) must not underflow to 0
    out.loss.sum().backward()
    # a step of 1% of the distance to the target: small enough to be first-order
    new_w = _sgd_step(p_w, p_w.grad, 0.01 * err(p_w, y_w).sqrt())
    new_l = _sgd_step(p_l, p_l.grad, 0.01 * err(p_l, y_l).sqrt())
    assert (err(new_w, y_w) < err(p_w, y_w)).all()
    assert (err(new_l, y_l) > err(p_l, y_l)).all()


@PROPS
@given(
    method=st.sampled_from(("dspo", "dspo_cpp")),
    shape=shapes,
    beta=st.floats(1e-2, 1.9),
    beta_logit=st.floats(1e-2, 1e3),
    seed=seeds,
)
def test_dspo_gradients(method, shape, beta, beta_logit, seed):
    """DSPO regresses only the winner; sigma(s) is not detached (SPEC §3)."""
    b = make_batch(shape, torch.float32, seed)
    y_w = b.target_w  # the regression target is the forward-process one for both methods
    # At the reference (start of training) s = 0 and c = beta/2 < 1: the winner is
    # pulled toward its forward target -- for dspo_cpp too --, and the loser gets exactly
    # no gradient because the only path to it, through s, is multiplied by p_w - r_w = 0.
    p_w = b.ref_w.clone().requires_grad_(True)
    p_l = b.ref_l.clone().requires_grad_(True)
    run(method, b, pred_w=p_w, pred_l=p_l, beta=beta, beta_logit=beta_logit).loss.sum().backward()
    assert torch.count_nonzero(p_l.grad) == 0
    new_w = _sgd_step(p_w, p_w.grad, 0.01 * err(p_w, y_w).sqrt())
    assert (err(new_w, y_w) < err(p_w, y_w)).all()
    # Away from the reference the loser does get a gradient through sigma(s).
    p_w = b.pred_w.clone().requires_grad_(True)
    p_l = b.pred_l.clone().requires_grad_(True)
    out = run(method, b, pred_w=p_w, pred_l=p_l, beta=beta, beta_logit=min(beta_logit, 10.0))
    # away from saturation: for |s| > ~17, sigma(s) rounds to 1 in float32 and its
    # derivative, the only path to the loser, to 0
    assume(bool((out.logits.abs() < 10).all()))
    out.loss.sum().backward()
    assert p_l.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_give_finite_loss_and_gradients(method, sign, magnitude, dtype):
    b = make_batch((4, 3, 2), torch.float64, seed=7)
    _, y_l = b.reward_targets(method)
    # winner: policy and reference nearly equally good; loser: one of them off by 1,
    # so s = +-0.5 beta (up to the tiny winner gap) and |s| = magnitude.
    b.pred_w = b.target_w + 0.1
    b.ref_w = b.target_w + 0.11 if method not in CPP else b.pred_w + 0.01
    a, r = (1.0, 0.0) if sign > 0 else (0.0, 1.0)
    b.pred_l, b.ref_l = y_l + a, y_l + r
    b = Batch(*(x.to(dtype) for x in vars(b).values()))
    p_w = b.pred_w.clone().requires_grad_(True)
    p_l = b.pred_l.clone().requires_grad_(True)
    out = run(method, b, pred_w=p_w, pred_l=p_l, beta=2 * magnitude)
    assert out.logits.abs().min() > 0.5 * magnitude and out.logits.abs().max() < 2 * magnitude
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.logits).all()
    if method in LOGISTIC:  # -log sigma(s): ~0 for s >> 0 and ~|s| for s << 0
        expect = torch.zeros(4) if sign > 0 else -out.logits
        torch.testing.assert_close(out.loss, expect, rtol=1e-5, atol=1e-6)
    out.loss.sum().backward()
    # float16 cannot hold gradients of size ~beta (> 65504); every other dtype must.
    if dtype != torch.float16:
        assert torch.isfinite(p_w.grad).all() and torch.isfinite(p_l.grad).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_outputs_are_float32_whatever_the_input_dtype(method, dtype):
    b = make_batch((3, 2, 2), dtype, seed=1)
    out = run(method, b, beta=10.0)
    for name in PreferenceLoss._fields:
        assert getattr(out, name).dtype == torch.float32, name
        assert getattr(out, name).shape == (3,), name
    assert preference_logits(*list(vars(b).values())[:6], beta=1.0).dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
def test_diagnostics_carry_no_gradient(method):
    b = make_batch((3, 4), torch.float32, seed=2)
    b = Batch(*(x.clone().requires_grad_(True) for x in vars(b).values()))
    out = run(method, b, beta=5.0)
    assert out.loss.requires_grad
    for name in PreferenceLoss._fields[1:]:
        field = getattr(out, name)
        assert not field.requires_grad and field.grad_fn is None, name


@pytest.mark.parametrize("method", METHODS)
def test_reference_errors_are_constants(method):
    """The reference is frozen: e(r_w, y_w) and e(r_l, y_l) carry no gradient. ref_l enters
    only there; ref_w also enters as the winner target (cpp methods) and in DSPO's
    p_w - r_w, so only dpo leaves it without a gradient too."""
    b = make_batch((3, 4), seed=4)
    b.ref_w = b.ref_w.clone().requires_grad_(True)
    b.ref_l = b.ref_l.clone().requires_grad_(True)
    b.pred_w = b.pred_w.clone().requires_grad_(True)
    run(method, b, beta=5.0).loss.sum().backward()
    assert b.ref_l.grad is None
    assert (b.ref_w.grad is None) == (method == "dpo")
    assert b.pred_w.grad is not None


@PROPS
@given(
    method=st.sampled_from(METHODS),
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=st.floats(1e-2, 1e3),
    seed=seeds,
    data=st.data(),
)
def test_loss_weight_multiplies_the_per_sample_loss(method, shape, dtype, beta, seed, data):
    b = make_batch(shape, dtype, seed)
    w = torch.tensor(data.draw(st.lists(st.floats(-10, 10), min_size=shape[0], max_size=shape[0])))
    out, wout = run(method, b, beta=beta), run(method, b, beta=beta, loss_weight=w)
    assert torch.equal(wout.loss, out.loss * w.float())
    for name in PreferenceLoss._fields[1:]:
        assert torch.equal(getattr(wout, name), getattr(out, name)), name


@PROPS
@given(
    method=st.sampled_from(LOGISTIC),
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=st.floats(1e-2, 1e3),
    seed=seeds,
    data=st.data(),
)
def test_logit_weight_multiplies_s(method, shape, dtype, beta, seed, data):
    b = make_batch(shape, dtype, seed)
    lw = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=shape[0], max_size=shape[0])))
    out, wout = run(method, b, beta=beta), run(method, b, beta=beta, logit_weight=lw)
    assert torch.equal(wout.logits, lw.float() * out.logits)
    assert torch.equal(wout.loss, F.softplus(-wout.logits))
    assert torch.equal(wout.implicit_acc, (wout.logits > 0).float())
    y_w, y_l = b.reward_targets(method)
    s = preference_logits(
        b.pred_w, b.pred_l, b.ref_w, b.ref_l, y_w, y_l, beta=beta, logit_weight=lw
    )
    assert torch.equal(s, wout.logits)


@PROPS
@given(
    method=st.sampled_from(METHODS),
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=betas,
    seed=seeds,
)
def test_implicit_acc_is_the_sign_of_the_logit(method, shape, dtype, beta, seed):
    out = run(method, make_batch(shape, dtype, seed), beta=beta)
    assert torch.equal(out.implicit_acc, (out.logits > 0).float())
    y = run(method, make_batch(shape, dtype, seed), beta=beta)
    assert torch.equal(y.loss, out.loss)  # pure function: same inputs, same output


def test_a_hand_computed_example():
    """e(p_w)=.01, e(r_w)=.04, e(p_l)=.04, e(r_l)=.01: s = -0.5*100*(-.03 - .03) = 3."""
    y = torch.zeros(1, 4)
    out = dpo_loss(y + 0.1, y + 0.2, y + 0.2, y + 0.1, y, y, beta=100.0)
    torch.testing.assert_close(out.logits, torch.tensor([3.0]))
    torch.testing.assert_close(out.loss, torch.tensor([math.log1p(math.exp(-3.0))]))
    torch.testing.assert_close(out.gap_w, torch.tensor([-0.03]))
    torch.testing.assert_close(out.gap_l, torch.tensor([0.03]))
    assert out.implicit_acc.item() == 1.0
    # DSPO: residual = 0.1 - 3 * sigma(-3) * 0 ... with r_w = p_w + 0.1 the residual is
    # (p_w - y_w) - beta (1 - sigma(s)) (p_w - r_w) = 0.1 + 0.1 * 0.5 * (1 - sigma(3)).
    ds = dspo_loss(y + 0.1, y + 0.2, y + 0.2, y + 0.1, y, y, beta=0.5, beta_logit=100.0)
    c = 0.5 * (1 - 1 / (1 + math.exp(-3.0)))
    torch.testing.assert_close(ds.loss, torch.tensor([(0.1 + 0.1 * c) ** 2]))
    # DSPO+CPP: reward targets (r_w, r_l^-) = (0.2, 0), regression target y_w = 0.
    # gap_w = e(.1, .2) - 0 = .01, gap_l = e(.2, 0) - e(.1, 0) = .03: s = -50 (.01 - .03) = 1
    # residual = (0.1 - 0) - 0.5 (1 - sigma(1)) (0.1 - 0.2) = 0.1 + 0.05 sigma(-1)
    cpp = dspo_cpp_loss(y + 0.1, y + 0.2, y + 0.2, y + 0.1, y, y, beta=0.5, beta_logit=100.0)
    torch.testing.assert_close(cpp.logits, torch.tensor([1.0]))
    torch.testing.assert_close(cpp.gap_w, torch.tensor([0.01]))
    torch.testing.assert_close(cpp.gap_l, torch.tensor([0.03]))
    sig_m1 = 1 / (1 + math.exp(1.0))
    torch.testing.assert_close(cpp.loss, torch.tensor([(0.1 + 0.05 * sig_m1) ** 2]))


# --------------------------------------------- parity with the reference code
# Transcriptions of the reference implementations, batched as there: winners in the
# first half of the batch, losers in the second, 4-d tensors (B, C, H, W). Their
# ``.float()`` is ``.to(dt)``: the tests evaluate them in float64, so a comparison
# measures only our float32 error. (At beta ~ 3000 the reference code's own float32
# evaluation is the less accurate of the two: model_diff - ref_diff cancels.)


def diffusion_dpo_reference(model_pred, ref_pred, target, beta_dpo, dt=torch.float32):
    """Diffusion-DPO reference training code (Wallace et al.), loss before ``.mean()``."""
    model_losses = (model_pred.to(dt) - target.to(dt)).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.to(dt) - target.to(dt)).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term)
    return loss, inside_term, implicit_acc


def diffusers_dpo_example(model_pred, ref_pred, target, beta_dpo, dt=torch.float32):
    """diffusers' diffusion_dpo example: ``beta_dpo`` there has no 0.5 (2500 <-> 5000)."""
    model_losses = F.mse_loss(model_pred.to(dt), target.to(dt), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_pred.to(dt), target.to(dt), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    return -1 * F.logsigmoid(beta_dpo * logits)


def dspo_official(model_pred, ref_pred, target, beta, beta_logit=None, dt=torch.float32):
    """The official DSPO SD-1.5 loss: score matching on the winner with a DPO-logit weight."""
    model_losses = (model_pred.to(dt) - target.to(dt)).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.to(dt) - target.to(dt)).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside = -0.5 * (beta if beta_logit is None else beta_logit) * (model_diff - ref_diff)
    model_pred_w, _ = model_pred.to(dt).chunk(2)
    ref_pred_w, _ = ref_pred.to(dt).chunk(2)
    target_w, _ = target.to(dt).chunk(2)
    return (
        (
            (model_pred_w - target_w)
            - beta * (1 - torch.sigmoid(inside))[:, None, None, None] * (model_pred_w - ref_pred_w)
        )
        .pow(2)
        .mean(dim=[1, 2, 3])
    )


F64 = torch.float64


def _grad_tol(g_ref: Tensor) -> dict:
    # the gradient is returned in the input dtype: bf16 keeps 8 mantissa bits; where all
    # of it underflows (|s| >> 1) only the float32 subnormals are left, which differ freely
    rtol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}[g_ref.dtype]
    return dict(rtol=rtol, atol=rtol * g_ref.abs().max().item() + torch.finfo(torch.float32).tiny)


def _logit_tol(lam: float, *pairs: tuple[Tensor, Tensor]) -> float:
    """Float32 error bound on s = -0.5 lam (sum of four errors e(x, q)): ~ ulp * lam * max e."""
    return 2e-6 * lam * max(err(x, q).max().item() for x, q in pairs) + 1e-6


shapes4 = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


def _parity_tol(beta, scale):
    # float32 summation order differs (gap_w - gap_l vs model_diff - ref_diff): |ds| ~
    # beta * ulp(e), e ~ scale^2.
    return dict(rtol=1e-4, atol=2e-6 * beta * max(scale, 0.1) ** 2 + 1e-6, check_dtype=False)


@PROPS
@given(
    shape=shapes4,
    dtype=st.sampled_from((torch.float32, torch.float16, torch.bfloat16)),
    beta=st.floats(1.0, 5000.0),
    scale=st.floats(0.01, 1.0),
    seed=seeds,
)
def test_dpo_loss_matches_the_diffusion_dpo_reference(shape, dtype, beta, scale, seed):
    b = make_batch(shape, dtype, seed, scale)
    model_pred = torch.cat([b.pred_w, b.pred_l]).requires_grad_(True)
    ref_pred, target = torch.cat([b.ref_w, b.ref_l]), torch.cat([b.target_w, b.target_l])
    loss, inside, acc = diffusion_dpo_reference(model_pred, ref_pred, target, beta, F64)
    p_w, p_l = model_pred.chunk(2)
    out = dpo_loss(p_w, p_l, b.ref_w, b.ref_l, b.target_w, b.target_l, beta=beta)
    tol = _parity_tol(beta, scale)
    torch.testing.assert_close(out.loss, loss, **tol)
    torch.testing.assert_close(out.logits, inside.detach(), **tol)
    torch.testing.assert_close(out.loss.mean(), loss.mean(), **tol)
    if bool((inside.abs() > 1e-3).all()):  # sign ties aside, the accuracies agree
        assert out.implicit_acc.mean() == acc
    # gradients w.r.t. the policy predictions agree too
    (g_ref,) = torch.autograd.grad(loss.sum(), model_pred)
    (g_ours,) = torch.autograd.grad(out.loss.sum(), model_pred)
    torch.testing.assert_close(g_ours, g_ref, **_grad_tol(g_ref))

    # diffusers' example: beta_dpo there = beta / 2 here
    ex = diffusers_dpo_example(model_pred, ref_pred, target, beta / 2, F64)
    torch.testing.assert_close(out.loss, ex, **tol)


@PROPS
@given(
    shape=shapes4,
    dtype=st.sampled_from((torch.float32, torch.bfloat16)),
    beta=st.floats(0.01, 5000.0),
    beta_logit=st.one_of(st.none(), st.floats(1.0, 5000.0)),
    scale=st.floats(0.01, 1.0),
    seed=seeds,
)
def test_dspo_loss_matches_the_official_dspo_code(shape, dtype, beta, beta_logit, scale, seed):
    b = make_batch(shape, dtype, seed, scale)
    model_pred = torch.cat([b.pred_w, b.pred_l]).requires_grad_(True)
    ref_pred, target = torch.cat([b.ref_w, b.ref_l]), torch.cat([b.target_w, b.target_l])
    loss = dspo_official(model_pred, ref_pred, target, beta, beta_logit, F64)
    p_w, p_l = model_pred.chunk(2)
    out = dspo_loss(
        p_w, p_l, b.ref_w, b.ref_l, b.target_w, b.target_l, beta=beta, beta_logit=beta_logit
    )
    # |loss| ~ (1 + beta)^2 scale^2; the logit enters through a sigmoid (slope <= 1/4)
    bl = beta if beta_logit is None else beta_logit
    atol = 1e-5 * (1 + beta) ** 2 * max(scale, 0.1) ** 2 * (1 + 1e-3 * bl)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=atol, check_dtype=False)
    # the official code does not detach sigma(s): gradients reach the loser prediction
    y_w, y_l = b.target_w, b.target_l
    _, s = dspo_cpp_paper(p_w, p_l, b.ref_w, b.ref_l, y_w, y_l, y_w, beta, bl)  # s in float64
    s_tol = _logit_tol(bl, (p_w, y_w), (b.ref_w, y_w), (p_l, y_l), (b.ref_l, y_l))
    slack = max(_dspo_float32_grad_slack(p_w, p_l, b.ref_w, y_w, s, beta, s_tol))
    (g_ref,) = torch.autograd.grad(loss.sum(), model_pred)
    (g_ours,) = torch.autograd.grad(out.loss.sum(), model_pred)
    tol = _grad_tol(g_ref)
    torch.testing.assert_close(g_ours, g_ref, rtol=tol["rtol"], atol=tol["atol"] + slack)


def dspo_cpp_paper(
    eps_theta_w, eps_theta_l, eps_ref_w, eps_ref_l, eps_star_w, eps_star_l, eps_w, beta, lam
):
    """DDSPO paper Eq. 33 (DSPO) with the reward r_theta redefined in Sec. 3.4, in float64:

        r_theta(x_t) = ||eps_star - eps_theta(x_t)||^2 - ||eps_star - eps_ref(x_t)||^2
        s    = -0.5 lam (r_theta(x_t^w) - r_theta(x_t^l))          (SPEC §2 sign and scale)
        loss = ||(eps_theta^w - eps^w) - beta (1 - sigma(s)) (eps_theta^w - eps_ref^w)||^2

    with every ||.||^2 a mean over the non-batch dims (SPEC §2) and A(t) = 1. For DSPO+CPP
    eps_star^w = eps_ref(x_t^w, c), eps_star^l = eps_ref(x_t^l, c-); eps^w is the
    winner's forward noise. Returns (loss, s), both (B,)."""

    def sq_norm(a, b):  # ||a - b||^2 / (number of non-batch entries)
        d = a.to(F64) - b.to(F64)
        return (d * d).reshape(d.shape[0], -1).sum(1) / d[0].numel()

    with torch.no_grad():  # the reference is frozen
        ref_part_w = sq_norm(eps_star_w, eps_ref_w)
        ref_part_l = sq_norm(eps_star_l, eps_ref_l)
    r_w = sq_norm(eps_star_w, eps_theta_w) - ref_part_w
    r_l = sq_norm(eps_star_l, eps_theta_l) - ref_part_l
    s = -0.5 * lam * (r_w - r_l)
    theta_w = eps_theta_w.to(F64)
    c = (beta * (1 - torch.sigmoid(s))).reshape(-1, *([1] * (theta_w.ndim - 1)))
    resid = (theta_w - eps_w.to(F64)) - c * (theta_w - eps_ref_w.to(F64))
    return sq_norm(resid, torch.zeros_like(resid)), s


@PROPS
@given(
    shape=shapes,
    dtype=st.sampled_from((torch.float32, torch.bfloat16)),
    beta=st.floats(1e-3, 10.0),
    beta_logit=st.one_of(st.none(), st.floats(1e-2, 1e3)),
    scale=st.floats(0.01, 1.0),
    seed=seeds,
    any_pair=st.booleans(),
)
def test_dspo_cpp_loss_matches_a_transcription_of_the_ddspo_paper(
    shape, dtype, beta, beta_logit, scale, seed, any_pair
):
    """dspo_cpp_loss against Eq. 33 with the redefined reward; with ``any_pair``,
    dspo_pair_loss with an arbitrary contrastive pair (q_w, q_l) against the same formula."""
    b = make_batch(shape, dtype, seed, scale)
    p_w = b.pred_w.clone().requires_grad_(True)
    p_l = b.pred_l.clone().requires_grad_(True)
    kw = dict(beta=beta, beta_logit=beta_logit)
    if any_pair:
        g = torch.Generator().manual_seed(seed + 2)
        q_w = (b.target_w.double() + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)
        q_l = (b.target_l.double() + scale * torch.randn(shape, generator=g, dtype=F64)).to(dtype)
        out = dspo_pair_loss(p_w, p_l, b.ref_w, b.ref_l, q_w, q_l, b.target_w, **kw)
    else:
        q_w, q_l = b.ref_w, b.ref_l_neg
        out = dspo_cpp_loss(p_w, p_l, b.ref_w, b.ref_l, b.ref_l_neg, b.target_w, **kw)
    lam = beta if beta_logit is None else beta_logit
    loss, s = dspo_cpp_paper(p_w, p_l, b.ref_w, b.ref_l, q_w, q_l, b.target_w, beta, lam)
    # The four errors in s are ~scale^2 against the forward targets but ~2 against r_l^-
    # (independent of the loser): the float32 error of s is ~ ulp * lam * the largest.
    pairs = ((p_w, q_w), (b.ref_w, q_w), (p_l, q_l), (b.ref_l, q_l))
    s_tol = _logit_tol(lam, *pairs)
    torch.testing.assert_close(out.logits, s.detach(), rtol=1e-4, atol=s_tol, check_dtype=False)
    atol = _dspo_loss_atol(p_w, b.ref_w, b.target_w, s, beta, s_tol, scale)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=atol, check_dtype=False)
    # the gradients agree too, the loser's (through sigma(s) only) included
    slack = _dspo_float32_grad_slack(p_w, p_l, b.ref_w, b.target_w, s, beta, s_tol)
    g_ref = torch.autograd.grad(loss.sum(), (p_w, p_l))
    g_ours = torch.autograd.grad(out.loss.sum(), (p_w, p_l))
    for gr, go, extra in zip(g_ref, g_ours, slack, strict=True):
        tol = _grad_tol(gr)
        torch.testing.assert_close(go, gr, rtol=tol["rtol"], atol=tol["atol"] + extra)


def _dspo_loss_atol(p_w, r_w, y_w, s, beta, s_tol, scale) -> float:
    """Absolute tolerance of a float32 DSPO loss against a float64 one: 1e-5 (1 + beta)^2
    scale^2 for the residual, plus the float32 error of s through the sigmoid, d loss / ds
    = 2 mean(resid (p_w - r_w)) beta sigma'(s)."""
    dims = tuple(range(1, p_w.ndim))
    pw, rw = p_w.detach().to(F64), r_w.to(F64)
    s = s.detach()
    c = (beta * torch.sigmoid(-s)).reshape(-1, *([1] * (pw.ndim - 1)))
    resid = (pw - y_w.to(F64)) - c * (pw - rw)
    dloss_ds = (
        2 * (resid * (pw - rw)).abs().mean(dims) * beta * torch.sigmoid(s) * torch.sigmoid(-s)
    )
    s_err = s_tol + 1e-4 * s.abs()
    return 1e-5 * (1 + beta) ** 2 * max(scale, 0.1) ** 2 + 2 * (dloss_ds * s_err).max().item()


def _dspo_float32_grad_slack(p_w, p_l, r_w, y_w, s, beta, s_tol) -> tuple[float, float]:
    """Bounds on the float32 error of DSPO's gradients beyond a relative tolerance.

    Two float32 roundings are not small relative to the gradient: c = beta sigma(-s)
    is off by ~beta ulp(1), which matters where k = c -> 1 and the winner's regression
    gradient 2/D resid (1 - c) cancels; and sigma'(s) = y (1 - y) is off by ~ulp(1)
    absolutely, which matters where |s| is large and sigma' -> 0 (plus its change with
    the float32 error of s itself). Returns the slack for the p_w and the p_l gradient."""
    ulp = 2.0**-23
    d = p_w[0].numel()
    dims = tuple(range(1, p_w.ndim))
    pw, rw = p_w.detach().to(F64), r_w.to(F64)
    with torch.no_grad():
        c = beta * torch.sigmoid(-s)
        resid = (pw - y_w.to(F64)) - c.reshape(-1, *([1] * (pw.ndim - 1))) * (pw - rw)
    ds_w, ds_l = torch.autograd.grad(s.sum(), (p_w, p_l), retain_graph=True)
    # d loss / d sigma(-s), per sample, without the factor sigma'(s)
    coef = (2 / d * (resid * (pw - rw)).sum(dims) * beta).abs()
    coef = coef.reshape(-1, *([1] * (pw.ndim - 1)))
    sig_prime = (torch.sigmoid(s) * torch.sigmoid(-s)).detach().reshape(coef.shape)
    ds_err = s_tol + 1e-4 * s.detach().abs().reshape(coef.shape)
    m_c = 2 / d * resid.abs() * beta
    m_w, m_l = coef * ds_w.to(F64).abs(), coef * ds_l.to(F64).abs()
    slack_w = 8 * ulp * (m_c + m_w) + m_w * sig_prime * ds_err
    slack_l = 8 * ulp * m_l + m_l * sig_prime * ds_err
    return slack_w.max().item(), slack_l.max().item()


@PROPS
@given(
    shape=shapes4,
    beta=st.floats(0.01, 10.0),
    beta_logit=st.one_of(st.none(), st.floats(1.0, 5000.0)),
    scale=st.floats(0.01, 1.0),
    seed=seeds,
)
def test_dspo_cpp_reduces_to_dspo_when_the_cpp_targets_are_the_forward_targets(
    shape, beta, beta_logit, scale, seed
):
    b = make_batch(shape, torch.float32, seed, scale)
    args, kw = (b.pred_w, b.pred_l, b.ref_w, b.ref_l), dict(beta=beta, beta_logit=beta_logit)
    # forward targets (y_w, y_l) := (r_w, r_l^-): both the logit and the regression agree
    y_w, y_l = b.ref_w.clone(), b.ref_l_neg.clone()
    cpp = dspo_cpp_loss(*args, y_l, y_w, **kw)
    ds = dspo_loss(*args, y_w, y_l, **kw)
    for name in PreferenceLoss._fields:
        assert torch.equal(getattr(cpp, name), getattr(ds, name)), name
    # ... and so both are the official DSPO code with those targets
    model_pred, ref_pred = torch.cat([b.pred_w, b.pred_l]), torch.cat([b.ref_w, b.ref_l])
    loss = dspo_official(model_pred, ref_pred, torch.cat([y_w, y_l]), beta, beta_logit, F64)
    lam = beta if beta_logit is None else beta_logit
    _, s = dspo_cpp_paper(*args, y_w, y_l, y_w, beta, lam)
    s_tol = _logit_tol(lam, (b.pred_w, y_w), (b.ref_w, y_w), (b.pred_l, y_l), (b.ref_l, y_l))
    atol = _dspo_loss_atol(b.pred_w, b.ref_w, y_w, s, beta, s_tol, scale)
    torch.testing.assert_close(cpp.loss, loss, rtol=1e-4, atol=atol, check_dtype=False)
    # With the real forward target y_w != r_w only the logit still agrees: DSPO+CPP does
    # not regress onto r_w (the earlier reading, identically 0 at the reference).
    cpp = dspo_cpp_loss(*args, b.ref_l_neg, b.target_w, **kw)
    old = dspo_loss(*args, b.ref_w, b.ref_l_neg, **kw)
    assert torch.equal(cpp.logits, old.logits)
    at_ref = (b.ref_w.clone(), b.ref_l.clone(), b.ref_w, b.ref_l)
    cpp = dspo_cpp_loss(*at_ref, b.ref_l_neg, b.target_w, **kw)
    old = dspo_loss(*at_ref, b.ref_w, b.ref_l_neg, **kw)
    assert torch.equal(old.loss, torch.zeros(shape[0]))
    torch.testing.assert_close(cpp.loss.double(), err(b.ref_w, b.target_w), rtol=1e-5, atol=0.0)
    assert (cpp.loss > 0).all()


@PROPS
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOAT_DTYPES),
    beta=st.floats(1e-3, 10.0),
    beta_logit=st.one_of(st.none(), betas),
    seed=seeds,
    weighted=st.booleans(),
)
def test_dspo_pair_loss_with_the_forward_targets_is_dspo_loss(
    shape, dtype, beta, beta_logit, seed, weighted
):
    b = make_batch(shape, dtype, seed)
    tw = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) if weighted else None
    args = (b.pred_w, b.pred_l, b.ref_w, b.ref_l)
    kw = dict(beta=beta, beta_logit=beta_logit, loss_weight=tw)
    pair = dspo_pair_loss(*args, b.target_w, b.target_l, b.target_w, **kw)
    ds = dspo_loss(*args, b.target_w, b.target_l, **kw)
    for name in PreferenceLoss._fields:
        assert torch.equal(getattr(pair, name), getattr(ds, name)), name
    # any other pair: the logit is the shared core's with those reward targets and
    # beta_logit, while the regression target stays target_w
    q_w, q_l = b.ref_l_neg, b.ref_w
    other = dspo_pair_loss(*args, q_w, q_l, b.target_w, **kw)
    lam = beta if beta_logit is None else beta_logit
    assert torch.equal(other.logits, preference_logits(*args, q_w, q_l, beta=lam))
    torch.testing.assert_close(other.err_w.double(), err(b.pred_w, q_w), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ validation

DPO_NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "target_w", "target_l")
CPP_NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "ref_l_neg")
PAIR_NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "reward_target_w", "reward_target_l")
FUNCS = {
    "preference_logits": (preference_logits, DPO_NAMES),
    "dpo_loss": (dpo_loss, DPO_NAMES),
    "ddspo_loss": (ddspo_loss, CPP_NAMES),
    "dspo_loss": (dspo_loss, DPO_NAMES),
    "dspo_cpp_loss": (dspo_cpp_loss, CPP_NAMES + ("target_w",)),
    "dspo_pair_loss": (dspo_pair_loss, PAIR_NAMES + ("target_w",)),
    "sft_loss": (sft_loss, ("pred", "target")),
}
POSITIONS = [(f, i) for f, (_, names) in FUNCS.items() for i in range(len(names))]
WITH_BETA = tuple(f for f in FUNCS if f != "sft_loss")
WITH_LOGIT_WEIGHT = ("preference_logits", "dpo_loss", "ddspo_loss")
WITH_LOSS_WEIGHT = tuple(f for f in FUNCS if f != "preference_logits")
WITH_BETA_LOGIT = ("dspo_loss", "dspo_cpp_loss", "dspo_pair_loss")


def _good_args(n: int, shape=(2, 3)) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _named(name: str) -> str:
    return rf"(?<![\w]){name}(?![\w])"  # the argument's name as a whole word


def _call(func: str, args: list, **kw):
    """``FUNCS[func]`` on ``args``, with ``beta=1.0`` unless given (sft_loss has none)."""
    fn, _ = FUNCS[func]
    if func in WITH_BETA:
        kw.setdefault("beta", 1.0)
    return fn(*args, **kw)


@pytest.mark.parametrize("func", FUNCS)
def test_valid_arguments_pass(func):
    _, names = FUNCS[func]
    _call(func, _good_args(len(names)))  # the control for every test below


@pytest.mark.parametrize("bad_shape", [(2, 4), (3, 3), (2, 3, 1), (2,), (1, 3)])
@pytest.mark.parametrize(("func", "pos"), POSITIONS)
def test_shape_mismatch_names_the_argument(func, pos, bad_shape):
    _, names = FUNCS[func]
    args = _good_args(len(names))
    args[pos] = torch.randn(bad_shape)
    with pytest.raises(ValueError, match=_named(names[pos])):
        _call(func, args)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize(("func", "pos"), POSITIONS)
def test_non_float_input_names_the_argument(func, pos, dtype):
    _, names = FUNCS[func]
    args = _good_args(len(names))
    args[pos] = torch.ones((2, 3), dtype=dtype)
    with pytest.raises(ValueError, match=_named(names[pos])):
        _call(func, args)


@pytest.mark.parametrize("make_bad", [lambda: 0.5, lambda: torch.tensor(0.5), lambda: [[0.0]]])
@pytest.mark.parametrize(("func", "pos"), POSITIONS)
def test_scalar_or_non_tensor_input_names_the_argument(func, pos, make_bad):
    _, names = FUNCS[func]
    args = _good_args(len(names))
    args[pos] = make_bad()
    with pytest.raises(ValueError, match=_named(names[pos])):
        _call(func, args)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 2, 2)])
@pytest.mark.parametrize("func", FUNCS)
def test_empty_batch_raises(func, shape):
    _, names = FUNCS[func]
    with pytest.raises(ValueError, match="empty batch"):
        _call(func, _good_args(len(names), shape))


BAD_SCALARS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, -1e-9, "x", None]


@pytest.mark.parametrize("beta", BAD_SCALARS)
@pytest.mark.parametrize("func", WITH_BETA)
def test_bad_beta_raises(func, beta):
    _, names = FUNCS[func]
    with pytest.raises(ValueError, match=_named("beta")):
        _call(func, _good_args(len(names)), beta=beta)


@pytest.mark.parametrize("beta_logit", [v for v in BAD_SCALARS if v is not None])
@pytest.mark.parametrize("func", WITH_BETA_LOGIT)
def test_bad_beta_logit_raises(func, beta_logit):
    _, names = FUNCS[func]
    with pytest.raises(ValueError, match=_named("beta_logit")):
        _call(func, _good_args(len(names)), beta_logit=beta_logit)


BAD_WEIGHTS = [
    lambda: torch.ones(3),  # B + 1
    lambda: torch.ones(1),
    lambda: torch.ones(2, 1),
    lambda: torch.tensor(1.0),
    lambda: torch.ones(2, dtype=torch.long),
    lambda: torch.ones(2, dtype=torch.bool),
    lambda: [1.0, 1.0],
    lambda: 1.0,
]


@pytest.mark.parametrize("make_bad", BAD_WEIGHTS)
@pytest.mark.parametrize("func", WITH_LOGIT_WEIGHT)
def test_bad_logit_weight_raises(func, make_bad):
    _, names = FUNCS[func]
    with pytest.raises(ValueError, match=_named("logit_weight")):
        _call(func, _good_args(len(names)), logit_weight=make_bad())


@pytest.mark.parametrize("make_bad", BAD_WEIGHTS)
@pytest.mark.parametrize("func", WITH_LOSS_WEIGHT)
def test_bad_loss_weight_raises(func, make_bad):
    _, names = FUNCS[func]
    with pytest.raises(ValueError, match=_named("loss_weight")):
        _call(func, _good_args(len(names)), loss_weight=make_bad())


# ---------------------------------------------- DSPO at the reference and its regimes


@pytest.mark.parametrize("beta_logit", [None, 5000.0])
@pytest.mark.parametrize("beta", [1e-3, 0.5, 1.9, 50.0])
def test_dspo_cpp_has_a_nonzero_gradient_at_the_reference(beta, beta_logit):
    """At p == r (a fine-tune's first step) s = 0 and the correction term vanishes: the
    loss is e(r_w, y_w) and its gradient the SFT one scaled by 1 - beta/2 -- not 0, as the
    earlier reading (regression onto r_w) had it."""
    g = torch.Generator().manual_seed(0)
    ref_w, ref_l, ref_l_neg, target_w = (torch.randn(3, 4, 5, generator=g) for _ in range(4))
    p_w, p_l = ref_w.clone().requires_grad_(), ref_l.clone().requires_grad_()
    out = dspo_cpp_loss(
        p_w, p_l, ref_w, ref_l, ref_l_neg, target_w, beta=beta, beta_logit=beta_logit
    )
    out.loss.sum().backward()
    assert torch.equal(out.logits, torch.zeros(3))
    torch.testing.assert_close(out.loss.double(), err(ref_w, target_w), rtol=1e-6, atol=0.0)
    assert (out.loss > 0).all()
    # d/dp_w mean((1 - k) p_w - y_w + k r_w)^2 at p_w = r_w, k = beta/2, D = 20 dims
    expect = 2 * (1 - beta / 2) * (ref_w - target_w) / 20
    torch.testing.assert_close(p_w.grad, expect, rtol=1e-5, atol=1e-7)
    assert p_w.grad.abs().min() > 0
    p = ref_w.clone().requires_grad_()
    sft_loss(p, target_w).loss.sum().backward()
    torch.testing.assert_close(p_w.grad, (1 - beta / 2) * p.grad, rtol=1e-5, atol=1e-7)
    # the loser's only path, through s, is multiplied by p_w - r_w = 0
    assert torch.count_nonzero(p_l.grad) == 0
    # ... while DDSPO, from the same point, moves the loser
    p_l2 = ref_l.clone().requires_grad_()
    ddspo_loss(ref_w.clone(), p_l2, ref_w, ref_l, ref_l_neg, beta=50.0).loss.sum().backward()
    assert p_l2.grad.abs().max().item() > 0.0


FLAT_LOGIT = 1e-8  # beta_logit: |s| < 1e-7, so sigma(s) = 1/2 and k = beta/2 throughout


def _descend(method: str, b: Batch, beta: float, steps: int = 400, lr: float = 1.0) -> Tensor:
    """Plain gradient descent on p_w of the real loss, from the reference, p_l fixed."""
    p = b.ref_w.clone().requires_grad_(True)
    for _ in range(steps):
        out = run(method, b, pred_w=p, beta=beta, beta_logit=FLAT_LOGIT)
        (grad,) = torch.autograd.grad(out.loss.sum(), p)
        with torch.no_grad():
            p -= lr * grad
    assert out.logits.abs().max() < 1e-7
    return p.detach()


@pytest.mark.parametrize("method", ("dspo", "dspo_cpp"))
@pytest.mark.parametrize(("beta", "k"), [(0.2, 0.1), (1.0, 0.5)])
def test_gradient_descent_converges_beyond_the_winner_target_for_k_below_1(method, beta, k):
    """SPEC §3: with k = beta (1 - sigma(s)) < 1 the minimiser is r + (y - r)/(1 - k), y the
    winner's forward target (for dspo_cpp too): just beyond y, on the far side from r."""
    b = make_batch((3, 2, 3), F64, seed=11)
    y, r = b.target_w, b.ref_w
    p = _descend(method, b, beta)
    p_star = r + (y - r) / (1 - k)
    torch.testing.assert_close(p, p_star, rtol=1e-4, atol=1e-4)
    assert ((p_star - y) * (y - r) > 0).all()  # beyond the target ...
    overshoot = (k / (1 - k)) ** 2 * err(y, r)  # ... by k/(1 - k) of |y - r|: not SFT's y
    torch.testing.assert_close(err(p, y), overshoot, rtol=1e-3, atol=0.0)
    assert (overshoot > 1e-3).all()


@pytest.mark.parametrize("method", ("dspo", "dspo_cpp"))
def test_k_of_1_and_above_are_degenerate(method):
    """SPEC §3: k = 1 gives no gradient at all; k > 1 (beta = 4: k = 2) moves the
    stationary point r + (y - r)/(1 - k) = 2r - y to the other side of r from the winner."""
    b = make_batch((3, 2, 3), F64, seed=12)
    y, r = b.target_w, b.ref_w
    # k = 1: the residual (p - y) - (p - r) = r - y does not depend on p
    for pw in (b.pred_w, r, y, 2 * r - y):
        p = pw.clone().requires_grad_(True)
        out = run(method, b, pred_w=p, beta=2.0, beta_logit=FLAT_LOGIT)
        (grad,) = torch.autograd.grad(out.loss.sum(), p)
        assert grad.abs().max() < 1e-6
        torch.testing.assert_close(out.loss.double(), err(r, y), rtol=1e-5, atol=0.0)
    # ... while k = 1/2 does have one there (the control)
    p = b.pred_w.clone().requires_grad_(True)
    out = run(method, b, pred_w=p, beta=1.0, beta_logit=FLAT_LOGIT)
    assert torch.autograd.grad(out.loss.sum(), p)[0].abs().max() > 1e-2
    # k = 2: the stationary point is a minimum (loss 0, gradient 0) on the wrong side of r
    p_star = r + (y - r) / (1 - 2.0)
    p = p_star.clone().requires_grad_(True)
    out = run(method, b, pred_w=p, beta=4.0, beta_logit=FLAT_LOGIT)
    (grad,) = torch.autograd.grad(out.loss.sum(), p)
    assert grad.abs().max() < 1e-5 and out.loss.max() < 1e-10
    assert ((p_star - r) * (y - r) < 0).all()  # opposite side of r from y
    assert (err(p_star, y) > err(r, y)).all()  # farther from the winner than the reference
    # and gradient descent from the reference goes there, away from the winner
    torch.testing.assert_close(_descend(method, b, beta=4.0), p_star, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- SFT


@PROPS
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES), seed=seeds, weighted=st.booleans())
def test_sft_loss_is_the_per_sample_mse_in_a_preference_loss(shape, dtype, seed, weighted):
    b = make_batch(shape, dtype, seed)
    w = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) if weighted else None
    pred = b.pred_w.clone().requires_grad_(True)
    out = sft_loss(pred, b.target_w, loss_weight=w)
    assert isinstance(out, PreferenceLoss)
    for name in PreferenceLoss._fields:
        assert getattr(out, name).dtype == torch.float32, name
        assert getattr(out, name).shape == (shape[0],), name
    mse = err(pred, b.target_w)
    # err_w is the unweighted per-sample MSE; loss is it times loss_weight
    torch.testing.assert_close(out.err_w.double(), mse, rtol=1e-5, atol=1e-7)
    expect = mse if w is None else mse * w.double()
    torch.testing.assert_close(out.loss.double(), expect, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.loss, out.err_w if w is None else out.err_w * w)
    # undefined without a loser and a reference: NaN, not a made-up 0
    for name in ("logits", "implicit_acc", "gap_w", "gap_l", "err_l"):
        assert torch.isnan(getattr(out, name)).all(), name
    for name in PreferenceLoss._fields[1:]:
        assert not getattr(out, name).requires_grad, name
    # gradient toward the target: d/dpred mean (pred - target)^2 = 2 (pred - target) / D
    out.loss.sum().backward()
    n = math.prod(shape[1:])
    scale = 1.0 if w is None else w.double().reshape(-1, *([1] * (len(shape) - 1)))
    expect = 2 * scale * (pred.detach().double() - b.target_w.double()) / n
    gtol = {F64: 1e-5, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    atol = gtol * expect.abs().max().item()
    torch.testing.assert_close(pred.grad.double(), expect, rtol=gtol, atol=atol)


# ------------------------------------------------------------ per-sample strengths


@PROPS
@given(
    method=st.sampled_from(METHODS),
    b=st.integers(1, 70),  # past 32 rows: torch's vectorised exp/log blocks, not just the tail
    values=st.lists(betas, min_size=1, max_size=3),
    logit_values=st.lists(betas, min_size=1, max_size=3),
    seed=seeds,
    data=st.data(),
)
def test_a_beta_tensor_is_a_float_beta_per_sample_bitwise(
    method, b, values, logit_values, seed, data
):
    """``beta`` (and DSPO's ``beta_logit``) as a ``(B,)`` tensor: every sample's loss,
    logit and gradient equal, bit for bit, those of a call on the same batch with that
    sample's values as floats -- what lets a batched sweep put runs of different strengths
    in one call."""
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in values]
    l32 = [float(torch.tensor(v, dtype=torch.float32)) for v in logit_values]
    pick = data.draw(st.lists(st.integers(0, len(f32) - 1), min_size=b, max_size=b))
    pick_l = data.draw(st.lists(st.integers(0, len(l32) - 1), min_size=b, max_size=b))
    batch = make_batch((b, 3), seed=seed, scale=0.05)  # near the reference, like a fine-tune
    dspo = method in ("dspo", "dspo_cpp")

    def call(beta, beta_logit):
        kw = {"beta": beta} | ({"beta_logit": beta_logit} if dspo else {})
        pw = batch.pred_w.clone().requires_grad_(True)
        out = run(method, batch, pred_w=pw, **kw)
        (grad,) = torch.autograd.grad(out.loss.sum(), pw)
        return out.loss.detach(), out.logits, grad

    got = call(torch.tensor([f32[i] for i in pick]), torch.tensor([l32[i] for i in pick_l]))
    for i, v in enumerate(f32):
        for j, vl in enumerate(l32 if dspo else l32[:1]):
            rows = [r for r in range(b) if pick[r] == i and (not dspo or pick_l[r] == j)]
            want = call(v, vl)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g[rows], w[rows])


def test_a_zero_dim_beta_tensor_is_a_number():
    b = make_batch((3, 2))
    for method in METHODS:
        assert torch.equal(
            run(method, b, beta=torch.tensor(400.0)).loss, run(method, b, beta=400.0).loss
        )


@pytest.mark.parametrize(
    "bad, why",
    [
        (torch.tensor([1.0, 2.0]), "shape (3,)"),
        (torch.tensor([1, 2, 3]), "floating point"),
        (torch.tensor([1.0, 0.0, 2.0]), "> 0 in every sample"),
        (torch.tensor([1.0, float("inf"), 2.0]), "> 0 in every sample"),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_a_bad_beta_tensor_is_refused(method, bad, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        run(method, make_batch((3, 2)), beta=bad)
