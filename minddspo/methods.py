"""The method table: one place that turns a method name into targets, weights and a loss.

The toy (:mod:`toy2d.train`) and the trainer (``bench/train_t2i.py``) both call
:func:`method_loss` with the predictions of one step; neither decides on its own which
tensors a method compares, which reference rows it needs or where a timestep weight goes.

Rows of the reference forward (SPEC §2), named as in :data:`REF_ROWS`::

    "w"     f_ref(x_t^w, t, c)
    "l"     f_ref(x_t^l, t, c)
    "l_neg" f_ref(x_t^l, t, c-)     (the prompt-perturbed losing policy)

| method   | loss                | logit targets (q_w, q_l)        | regression target | lambda(t) |
|----------|---------------------|---------------------------------|-------------------|-----------|
| sft      | ``sft_loss``        | --                              | y_w               | loss      |
| dpo      | ``dpo_loss``        | (y_w, y_l) forward process      | --                | logit     |
| dspo     | ``dspo_loss``       | (y_w, y_l) forward process      | y_w               | loss      |
| dspo_cpp | ``dspo_cpp_loss``   | (r_w, f_ref(x_t^l, c-)) or pair | y_w               | loss      |
| ddspo    | ``ddspo_loss``      | (r_w, f_ref(x_t^l, c-)) or pair | --                | logit     |

``y_w, y_l`` are the forward-process targets (eps / v / flow). A contrastive policy pair
``(pair_w, pair_l)`` -- guided reference targets or a winner/loser fine-tune -- replaces the
CPP targets of ``dspo_cpp`` and ``ddspo`` (then ``l_neg`` is not needed). Kang et al.'s
``lambda(t)`` multiplies the logit where the loss is a logistic one (dpo, ddspo); DSPO's
loss and SFT are regressions, so there (and for the ``linear`` weight everywhere) the
weight multiplies the per-sample loss. That placement is our choice (SPEC §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .losses import (
    PreferenceLoss,
    ddspo_loss,
    dpo_loss,
    dspo_cpp_loss,
    dspo_loss,
    dspo_pair_loss,
    sft_loss,
)

REF_ROWS = ("w", "l", "l_neg")


#: the three loss families; the family fixes which scalars a loss takes and where
#: Kang et al.'s lambda(t) goes (inside the logit of a logistic loss, else on the loss)
LOGISTIC, SCORE_MATCHING, REGRESSION = "logistic", "score_matching", "regression"
_SCALARS = {
    LOGISTIC: ("beta", "logit_weight", "loss_weight"),
    SCORE_MATCHING: ("beta", "beta_logit", "loss_weight"),
    REGRESSION: ("loss_weight",),
}
_FORWARD = ("pred_w", "pred_l", "ref_w", "ref_l", "target_w", "target_l")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table: a loss and the tensors it reads, in its argument order.

    ``inputs`` name :func:`method_loss`'s keyword tensors; ``pair_loss`` / ``pair_inputs``
    are the same method fed a contrastive policy pair ``(pair_w, pair_l)`` instead of the
    reference's ``c-`` row (the CPP methods only). A new method is one row here plus its
    loss in :mod:`minddspo.losses`.
    """

    name: str
    family: str  # LOGISTIC, SCORE_MATCHING or REGRESSION
    loss: Callable[..., PreferenceLoss]
    inputs: tuple[str, ...]
    pair_loss: Callable[..., PreferenceLoss] | None = None
    pair_inputs: tuple[str, ...] = ()

    @property
    def preference(self) -> bool:  # has a logit (and diagnostics); False for sft
        return self.family != REGRESSION

    @property
    def cpp(self) -> bool:  # losing target from the contrastive policy pair
        return self.pair_loss is not None

    @property
    def score_matching(self) -> bool:  # DSPO family: beta outside, beta_logit inside
        return self.family == SCORE_MATCHING

    @property
    def lambda_in_logit(self) -> bool:  # lambda(t) weights the logit (else the loss)
        return self.family == LOGISTIC

    def roles(
        self, policy_pair: bool = False
    ) -> tuple[Callable[..., PreferenceLoss], tuple[str, ...]]:
        """The loss and the tensors it reads, with or without a policy pair."""
        if policy_pair:
            return self.pair_loss, self.pair_inputs  # type: ignore[return-value]
        return self.loss, self.inputs

    def ref_rows(self, policy_pair: bool = False) -> tuple[str, ...]:
        """Reference rows this method needs, in :data:`REF_ROWS` order."""
        inputs = self.roles(policy_pair and self.cpp)[1]
        return tuple(r for r in REF_ROWS if f"ref_{r}" in inputs)


METHOD_TABLE: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec("sft", REGRESSION, sft_loss, ("pred_w", "target_w")),
        MethodSpec("dpo", LOGISTIC, dpo_loss, _FORWARD),
        MethodSpec("dspo", SCORE_MATCHING, dspo_loss, _FORWARD),
        MethodSpec(
            "dspo_cpp", SCORE_MATCHING, dspo_cpp_loss,
            ("pred_w", "pred_l", "ref_w", "ref_l", "ref_l_neg", "target_w"),
            dspo_pair_loss, ("pred_w", "pred_l", "ref_w", "ref_l", "pair_w", "pair_l", "target_w"),
        ),
        MethodSpec(
            "ddspo", LOGISTIC, ddspo_loss, ("pred_w", "pred_l", "ref_w", "ref_l", "ref_l_neg"),
            dpo_loss, ("pred_w", "pred_l", "ref_w", "ref_l", "pair_w", "pair_l"),
        ),
    )
}  # fmt: skip
METHODS = tuple(METHOD_TABLE)
CPP_METHODS = tuple(m for m, s in METHOD_TABLE.items() if s.cpp)
SCORE_MATCHING_METHODS = tuple(m for m, s in METHOD_TABLE.items() if s.score_matching)


def method_spec(method: str) -> MethodSpec:
    try:
        return METHOD_TABLE[method]
    except KeyError:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}") from None


def route_weight(
    method: str, weight: Tensor | None, kind: str
) -> tuple[Tensor | None, Tensor | None]:
    """``(logit_weight, loss_weight)`` for a timestep weight of kind ``none|lambda|linear``."""
    if weight is None or kind == "none":
        return None, None
    if kind == "lambda" and method_spec(method).lambda_in_logit:
        return weight, None
    return None, weight


def method_loss(
    method: str,
    *,
    pred_w: Tensor,
    pred_l: Tensor | None = None,
    ref_w: Tensor | None = None,
    ref_l: Tensor | None = None,
    ref_l_neg: Tensor | None = None,
    target_w: Tensor | None = None,
    target_l: Tensor | None = None,
    pair_w: Tensor | None = None,
    pair_l: Tensor | None = None,
    beta: float | Tensor = 1.0,
    beta_logit: float | Tensor | None = None,
    weight: Tensor | None = None,
    weight_kind: str = "none",
) -> PreferenceLoss:
    """The per-sample loss of ``method`` for one step's tensors (all ``(B, ...)``).

    ``target_w/target_l`` are the forward-process targets; ``pair_w/pair_l`` an optional
    contrastive policy pair for the CPP methods (both or neither). ``beta`` is the method's
    strength (for dspo/dspo_cpp the *outside* scale; ``beta_logit`` the inside one, which
    only they take); either may be a ``(B,)`` tensor, one value per sample (see
    :mod:`minddspo.losses`). ``weight`` ``(B,)`` is a timestep weight of kind ``weight_kind``.
    Unused inputs may be None (``ddspo`` needs no forward-process target); a needed one
    that is None raises ``ValueError`` naming it.
    """
    spec = method_spec(method)
    if (pair_w is None) != (pair_l is None):
        raise ValueError("give both pair_w and pair_l, or neither")
    policy_pair = pair_w is not None
    if policy_pair and not spec.cpp:
        raise ValueError(f"a contrastive policy pair applies to {CPP_METHODS} only, not {method!r}")
    if beta_logit is not None and not spec.score_matching:
        raise ValueError(f"beta_logit applies to {SCORE_MATCHING_METHODS} only, not {method!r}")
    tensors = {
        "pred_w": pred_w, "pred_l": pred_l, "ref_w": ref_w, "ref_l": ref_l,
        "ref_l_neg": ref_l_neg, "target_w": target_w, "target_l": target_l,
        "pair_w": pair_w, "pair_l": pair_l,
    }  # fmt: skip
    loss, inputs = spec.roles(policy_pair)
    missing = [k for k in inputs if tensors[k] is None]
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(missing)}")
    logit_w, loss_w = route_weight(method, weight, weight_kind)
    scalars = {
        "beta": beta,
        "beta_logit": beta_logit,
        "logit_weight": logit_w,
        "loss_weight": loss_w,
    }
    return loss(*(tensors[k] for k in inputs), **{k: scalars[k] for k in _SCALARS[spec.family]})


#: the outside DSPO beta at or above which the policy is pinned near the reference
DSPO_DEGENERATE_BETA = 2.0


def dspo_beta_warning(method: str, beta: float) -> str | None:
    """A one-line warning when a DSPO-family ``beta`` is in the degenerate regime, else None."""
    if method_spec(method).score_matching and beta >= DSPO_DEGENERATE_BETA:
        return (
            f"warning: {method} with outside beta {beta:g} >= {DSPO_DEGENERATE_BETA:g}: "
            "k = beta(1 - sigma(s)) > 1 pins the policy near the reference and pushes it "
            "away from the winner; the official scale is 0.001-0.05 (put the D-DPO-scale "
            "value in beta_logit)"
        )
    return None
