"""The method table (minddspo.methods): which tensors each method compares and regresses,
which reference rows it requests, and where the timestep weights go.

Every input is a stub with its own distinct values, and every expected value below is a
float64 transcription of SPEC §2-§4 written here, not a call of minddspo.losses; so routing
any input to the wrong argument, or a weight to the wrong place, fails a test
(``test_every_input_that_a_method_reads_changes_its_loss`` shows that each one is read).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from minddspo.methods import (
    CPP_METHODS,
    METHOD_TABLE,
    METHODS,
    dspo_beta_warning,
    method_loss,
    method_spec,
    route_weight,
)

B, SHAPE = 3, (3, 2, 5)
NAMES = ("pred_w", "pred_l", "ref_w", "ref_l", "ref_l_neg", "target_w", "target_l")
PAIR = ("pair_w", "pair_l")


def stubs(seed: int = 0) -> dict[str, torch.Tensor]:
    """All distinct: each tensor has its own offset and its own noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (0.3 * i + torch.randn(SHAPE, generator=g, dtype=torch.float64)).float()
        for i, n in enumerate(NAMES + PAIR)
    }


def e(a, b):  # SPEC §1, float64
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def logit(x, qw, ql, beta, lw=None):
    s = (
        -0.5
        * beta
        * ((e(x["pred_w"], qw) - e(x["ref_w"], qw)) - (e(x["pred_l"], ql) - e(x["ref_l"], ql)))
    )
    return s if lw is None else lw.double() * s


def logistic(s):
    return torch.nn.functional.softplus(-s)


def dspo_form(x, qw, ql, beta, beta_logit):
    s = logit(x, qw, ql, beta_logit)
    k = (beta * torch.sigmoid(-s)).reshape(-1, 1, 1)
    p = x["pred_w"].double()
    resid = (p - x["target_w"].double()) - k * (p - x["ref_w"].double())
    return resid.pow(2).flatten(1).mean(1), s


def expected(method, x, beta, beta_logit=None, lam=None, lin=None, pair=False):
    """(loss, logit) of SPEC §2-§4 with lambda(t) ``lam`` and linear weight ``lin``."""
    qw, ql = (x["pair_w"], x["pair_l"]) if pair else (x["ref_w"], x["ref_l_neg"])
    w_loss = lin if lin is not None else None
    if method == "sft":
        loss, s = e(x["pred_w"], x["target_w"]), None
        w_loss = lam if lam is not None else lin
    elif method == "dpo":
        s = logit(x, x["target_w"], x["target_l"], beta, lam)
        loss = logistic(s)
    elif method == "ddspo":
        s = logit(x, qw, ql, beta, lam)
        loss = logistic(s)
    elif method == "dspo":
        loss, s = dspo_form(x, x["target_w"], x["target_l"], beta, beta_logit)
        w_loss = lam if lam is not None else lin
    else:  # dspo_cpp
        loss, s = dspo_form(x, qw, ql, beta, beta_logit)
        w_loss = lam if lam is not None else lin
    if w_loss is not None:
        loss = loss * w_loss.double()
    return loss, s


def call(method, x, beta, beta_logit=None, weight=None, kind="none", pair=False):
    kw = {n: x[n] for n in NAMES}
    if pair:
        kw |= {"pair_w": x["pair_w"], "pair_l": x["pair_l"]}
    return method_loss(
        method, **kw, beta=beta, beta_logit=beta_logit, weight=weight, weight_kind=kind
    )


def scales(method):
    return (0.3, 7.0) if method_spec(method).score_matching else (7.0, None)


def check(out, method, x, beta, beta_logit, **kw):
    loss, s = expected(method, x, beta, beta_logit, **kw)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-7)
    if s is not None:
        torch.testing.assert_close(out.logits.double(), s, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the table itself


def test_the_table_lists_exactly_the_five_methods():
    assert METHODS == ("sft", "dpo", "dspo", "dspo_cpp", "ddspo")
    assert CPP_METHODS == ("dspo_cpp", "ddspo")
    assert [m for m in METHODS if METHOD_TABLE[m].score_matching] == ["dspo", "dspo_cpp"]
    assert [m for m in METHODS if METHOD_TABLE[m].lambda_in_logit] == ["dpo", "ddspo"]


@pytest.mark.parametrize(
    "method, rows, rows_with_pair",
    [
        ("sft", (), ()),
        ("dpo", ("w", "l"), ("w", "l")),
        ("dspo", ("w", "l"), ("w", "l")),
        ("dspo_cpp", ("w", "l", "l_neg"), ("w", "l")),
        ("ddspo", ("w", "l", "l_neg"), ("w", "l")),
    ],
)
def test_reference_rows_each_method_requests(method, rows, rows_with_pair):
    assert method_spec(method).ref_rows() == rows
    assert method_spec(method).ref_rows(policy_pair=True) == rows_with_pair


# ------------------------------------------------------------- values and routing


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_method_compares_and_regresses_the_right_tensors(method, seed):
    x = stubs(seed)
    beta, beta_logit = scales(method)
    check(call(method, x, beta, beta_logit), method, x, beta, beta_logit)


@pytest.mark.parametrize("method", CPP_METHODS)
def test_a_policy_pair_replaces_the_cpp_targets(method):
    x = stubs(2)
    beta, beta_logit = scales(method)
    out = call(method, x, beta, beta_logit, pair=True)
    check(out, method, x, beta, beta_logit, pair=True)
    # and it is not the prompt-perturbed reference any more
    assert not torch.allclose(out.loss, call(method, x, beta, beta_logit).loss)


@pytest.mark.parametrize("method", METHODS)
def test_lambda_goes_into_the_logit_or_the_loss(method):
    x = stubs(3)
    beta, beta_logit = scales(method)
    lam = torch.tensor([1.0, 1.5, 2.0])
    out = call(method, x, beta, beta_logit, weight=lam, kind="lambda")
    check(out, method, x, beta, beta_logit, lam=lam)
    logit_w, loss_w = route_weight(method, lam, "lambda")
    if method in ("dpo", "ddspo"):
        assert logit_w is lam and loss_w is None
    else:
        assert logit_w is None and loss_w is lam


@pytest.mark.parametrize("method", METHODS)
def test_linear_weight_always_multiplies_the_loss(method):
    x = stubs(4)
    beta, beta_logit = scales(method)
    lin = torch.tensor([0.1, 0.5, 0.9])
    out = call(method, x, beta, beta_logit, weight=lin, kind="linear")
    check(out, method, x, beta, beta_logit, lin=lin)
    assert route_weight(method, lin, "linear") == (None, lin)
    assert route_weight(method, lin, "none") == (None, None)


@pytest.mark.parametrize("method", ["dspo", "dspo_cpp"])
def test_dspo_family_beta_outside_and_beta_logit_inside(method):
    x = stubs(5)
    out = call(method, x, 0.3, 7.0)
    swapped = call(method, x, 7.0, 0.3)
    check(out, method, x, 0.3, 7.0)
    assert not torch.allclose(out.loss, swapped.loss)


def _reads(method, pair):
    """The inputs a method's value depends on."""
    spec = method_spec(method)
    if not spec.preference:
        return ("pred_w", "target_w")
    base = ["pred_w", "pred_l", "ref_w", "ref_l"]
    if not spec.cpp:
        base += ["target_w", "target_l"]
    elif pair:
        base += ["pair_w", "pair_l"]
    else:
        base += ["ref_l_neg"]
    if spec.score_matching and spec.cpp:
        base += ["target_w"]
    return tuple(base)


# The only swaps that leave value AND gradient unchanged, by the math itself: a squared
# error is symmetric, so SFT's e(p_w, y_w) and DDSPO's distillation term e(p_w, r_w) (its
# target IS r_w, and e(r_w, r_w) = 0) cannot tell their two tensors apart.
SYMMETRIC = {"sft": {("pred_w", "target_w")}, "ddspo": {("pred_w", "ref_w")}}


@pytest.mark.parametrize(
    "method, pair", [(m, False) for m in METHODS] + [(m, True) for m in CPP_METHODS]
)
def test_every_input_that_a_method_reads_changes_its_loss(method, pair):
    """Swapping any two inputs a method reads changes its value -- and the expected value
    above moves with it, so a wiring mistake cannot hide behind a symmetric formula."""
    x = stubs(6)
    beta, beta_logit = scales(method)
    base = call(method, x, beta, beta_logit, pair=pair).loss
    for a, b in itertools.combinations(_reads(method, pair), 2):
        if (a, b) in SYMMETRIC.get(method, ()) and not pair:
            continue
        y = dict(x)
        y[a], y[b] = x[b], x[a]
        swapped = call(method, y, beta, beta_logit, pair=pair).loss
        assert not torch.allclose(swapped, base, rtol=1e-6, atol=0), (a, b)
    # inputs it does not read do not matter
    unread = set(NAMES + (PAIR if pair else ())) - set(_reads(method, pair))
    for n in unread:
        y = dict(x)
        y[n] = x[n] + 10.0
        torch.testing.assert_close(call(method, y, beta, beta_logit, pair=pair).loss, base)


def test_sft_has_no_logit():
    out = call("sft", stubs(7), 1.0)
    assert torch.isnan(out.logits).all() and torch.isnan(out.implicit_acc).all()
    assert not method_spec("sft").preference


# ------------------------------------------------------------------------ errors


def test_missing_inputs_are_named():
    x = stubs(8)
    with pytest.raises(ValueError, match="ref_l_neg"):
        method_loss("ddspo", **{n: x[n] for n in NAMES if n != "ref_l_neg"}, beta=1.0)
    with pytest.raises(ValueError, match="target_l"):
        method_loss("dspo", **{n: x[n] for n in NAMES if n != "target_l"}, beta=1.0)
    with pytest.raises(ValueError, match="target_w"):
        method_loss("dspo_cpp", **{n: x[n] for n in NAMES if n != "target_w"}, beta=1.0)
    # ddspo never needs the forward-process targets, and a pair needs no ref_l_neg
    kw = {n: x[n] for n in ("pred_w", "pred_l", "ref_w", "ref_l")}
    method_loss("ddspo", **kw, ref_l_neg=x["ref_l_neg"], beta=1.0)
    method_loss("ddspo", **kw, pair_w=x["pair_w"], pair_l=x["pair_l"], beta=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "ipo"}, "method must be one of"),
        ({"method": "dpo", "beta_logit": 2.0}, "beta_logit applies to"),
        ({"method": "dpo", "pair": True}, "policy pair applies to"),
        ({"method": "ddspo", "half_pair": True}, "both pair_w and pair_l"),
    ],
)
def test_bad_routing_requests_raise(kwargs, match):
    x = stubs(9)
    kw = {n: x[n] for n in NAMES}
    if kwargs.get("pair"):
        kw |= {"pair_w": x["pair_w"], "pair_l": x["pair_l"]}
    if kwargs.get("half_pair"):
        kw |= {"pair_w": x["pair_w"]}
    with pytest.raises(ValueError, match=match):
        method_loss(kwargs["method"], **kw, beta=1.0, beta_logit=kwargs.get("beta_logit"))


@pytest.mark.parametrize(
    "method, beta, warns",
    [
        ("dspo", 2.0, True),
        ("dspo_cpp", 8000.0, True),
        ("dspo", 0.05, False),
        ("dpo", 8000.0, False),
    ],
)
def test_degenerate_dspo_beta_warning(method, beta, warns):
    w = dspo_beta_warning(method, beta)
    assert (w is not None) == warns
    if warns:
        assert "\n" not in w and method in w


# ------------------------------------------------------------------ table as data


def test_a_new_method_is_one_row(monkeypatch):
    """A row added to the table is dispatched by method_loss with no other change: its loss
    gets exactly the tensors its row names, in that order, and its family's scalars; the
    reference rows and the lambda(t) placement follow from the row."""
    from minddspo.methods import LOGISTIC, MethodSpec

    seen = {}

    def hinge(pred_w, ref_l, target_l, *, beta, logit_weight, loss_weight):
        seen.update(args=(pred_w, ref_l, target_l), beta=beta, logit=logit_weight, loss=loss_weight)
        return method_loss("sft", pred_w=pred_w, target_w=target_l)

    row = MethodSpec("hinge", LOGISTIC, hinge, ("pred_w", "ref_l", "target_l"))
    monkeypatch.setitem(METHOD_TABLE, "hinge", row)
    x, w = stubs(11), torch.tensor([1.0, 2.0, 3.0])
    method_loss("hinge", **{n: x[n] for n in NAMES}, beta=7.0, weight=w, weight_kind="lambda")
    assert all(
        a is x[n] for a, n in zip(seen["args"], ("pred_w", "ref_l", "target_l"), strict=True)
    )
    assert seen["beta"] == 7.0 and seen["logit"] is w and seen["loss"] is None
    assert row.ref_rows() == ("l",) and not row.cpp and row.lambda_in_logit
    with pytest.raises(ValueError, match="needs ref_l"):
        method_loss("hinge", pred_w=x["pred_w"], target_l=x["target_l"], beta=1.0)
