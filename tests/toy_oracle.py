"""The toy's autograd oracle: the plain implementation that ``toy2d``'s hand-written kernels
are checked against (tests/test_toy_fast.py, and at forced dispatch levels
tests/test_dispatch_levels.py).

Here the stacked MLP is an ordinary differentiable function (:func:`forward`, one ``bmm``
per layer and a bias add), gradients come from ``torch.autograd`` and the optimizer is
:class:`StackedAdam`, ``torch.optim.Adam``'s update written over stacked ``(M, ...)``
parameters with a learning rate per member (``torch.optim.Adam`` itself takes one learning
rate per tensor; ``tests/test_toy_train.py`` checks the two agree). The loops draw the same
randomness in the same order as ``toy2d.train``'s and share its data, loss grouping and
logging helpers, so the two differ only where the network is run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

import toy2d.train as tt
from toy2d.data import generator, sample_train
from toy2d.model import (
    MLPConfig,
    Params,
    backward_train,
    forward_train,
    init_params,
    select,
    time_embedding,
)
from toy2d.train import _gather_stack


def forward(params: Params, x: Tensor, t: Tensor, c: Tensor, cfg: MLPConfig) -> Tensor:
    """eps prediction. Shapes: x (M, B, 2), t (M, B) int, c (M, B) int -> (M, B, 2).

    The first layer acts on ``[x, temb(t), cemb(c)]``; its time and class parts are tabulated
    per member -- ``(M, T, H)`` and ``(M, K, H)`` -- and gathered (the same function as the
    concatenation)."""
    M, B = t.shape
    T, K, H = cfg.num_train_timesteps, cfg.num_classes, cfg.hidden
    w_x, w_t, w_c = params["l1.w"].split([2, cfg.temb, cfg.cemb], dim=1)
    grid = time_embedding(torch.arange(T), cfg.temb, T)  # (T, temb)
    tab_t = torch.matmul(grid, w_t).reshape(M * T, H)  # (M T, H)
    tab_c = (torch.bmm(params["cemb"], w_c) + params["l1.b"]).reshape(M * K, H)  # (M K, H)
    off = torch.arange(M).unsqueeze(1)
    h = torch.bmm(x, w_x)  # (M, B, H)
    h = h + (tab_t[off * T + t] + tab_c[off * K + c])  # (M, B, H)
    for name in ("l2", "l3", "l4"):
        h = torch.bmm(torch.nn.functional.silu(h), params[name + ".w"]) + params[name + ".b"]
    return h


class StackedAdam:
    """Adam (torch.optim.Adam's update order, no weight decay) over stacked params, lr per member."""

    def __init__(self, params: Params, lr: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr = params, lr.to(torch.float32)  # lr: (M,)
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.k = 0

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        self.k += 1
        bc1, bc2 = 1 - self.b1**self.k, 1 - self.b2**self.k
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            step = (self.lr / bc1).reshape(-1, *([1] * (p.ndim - 1)))
            p.addcdiv_(m * step, denom, value=-1.0)


def param_names(cfg: MLPConfig) -> list[str]:
    return list(init_params(cfg, [torch.Generator()]))


class KernelMLP(torch.autograd.Function):
    """``toy2d.model.forward_train`` / ``backward_train`` as an autograd function of the
    parameters, given in :func:`param_names` order -- for gradcheck."""

    @staticmethod
    def forward(ctx, x, t, c, cfg, *values):
        params = dict(zip(param_names(cfg), values, strict=True))
        out, saved = forward_train(params, x, t, c, cfg)
        ctx.cfg, ctx.params, ctx.saved = cfg, params, saved
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = backward_train(ctx.params, ctx.saved, grad_out.contiguous(), ctx.cfg)
        return (None, None, None, None, *(grads[k] for k in param_names(ctx.cfg)))


@contextlib.contextmanager
def autograd_sampler():
    """``toy2d.train``'s samplers (``sample``, ``denoise``, ``make_preference_pairs``) driven
    by :func:`forward` instead of the kernels' ``step_denoiser``, while active."""
    real = tt.step_denoiser

    def step_denoiser(params: Params, c: Tensor, cfg: MLPConfig):
        M, n = c.shape
        return lambda x, t: forward(params, x, t[:, None].expand(M, n), c, cfg)

    tt.step_denoiser = step_denoiser
    try:
        yield
    finally:
        tt.step_denoiser = real


def sample(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`toy2d.train.sample` through :func:`forward`."""
    with autograd_sampler():
        return tt.sample(*args, **kwargs)


def make_preference_pairs(*args, **kwargs) -> tt.Pairs:
    """:func:`toy2d.train.make_preference_pairs` through :func:`forward`."""
    with autograd_sampler():
        return tt.make_preference_pairs(*args, **kwargs)


def train_references(
    setup: tt.ToySetup, seeds: list[int], progress: Callable[[int], None] | None = None
) -> Params:
    """:func:`toy2d.train.train_references` by autograd and :class:`StackedAdam`."""
    sched, T, rc = setup.schedule.build(), setup.schedule.num_train_timesteps, setup.ref
    gens = [generator("ref", s, tt.cache_key(setup, s)) for s in seeds]
    params = init_params(setup.mlp, gens)
    data = [sample_train(setup.toy, s) for s in seeds]
    for p in params.values():
        p.requires_grad_(True)
    opt = StackedAdam(params, torch.full((len(seeds),), rc.lr))
    for _ in range(rc.steps):
        idx = [
            torch.randint(0, len(x), (rc.batch,), generator=g)
            for (x, _), g in zip(data, gens, strict=False)
        ]
        t = torch.stack([torch.randint(0, T, (rc.batch,), generator=g) for g in gens])
        eps = torch.stack([torch.randn(rc.batch, 2, generator=g) for g in gens])
        x0 = _gather_stack([x for x, _ in data], idx)
        c = _gather_stack([y for _, y in data], idx)
        pred = forward(params, sched.add_noise(x0, eps, t), t, c, setup.mlp)
        loss = (pred - eps).pow(2).mean(-1).mean(1).sum()  # members are independent
        opt.step(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
        if progress:
            progress(1)
    return {k: v.detach() for k, v in params.items()}


def finetune(
    setup: tt.ToySetup,
    ft: tt.FinetuneConfig,
    runs: list[tt.Run],
    refs: dict[int, Params],
    progress: Callable[[int], None] | None = None,
) -> tuple[Params, tt.FinetuneLog]:
    """:func:`toy2d.train.finetune` by autograd and :class:`StackedAdam`: every member's
    policy and reference on all rows ``(x_t^w, c), (x_t^l, c), (x_t^l, c-)``, members in
    the order given."""
    if any(r.method == "ref" for r in runs):
        raise ValueError("'ref' is not fine-tuned")
    sched, T, mlp = setup.schedule.build(), setup.schedule.num_train_timesteps, setup.mlp
    snr = sched.snr()
    M, B = len(runs), ft.batch
    init = {k: torch.cat([refs[r.seed][k] for r in runs]) for k in refs[runs[0].seed]}
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    ref = {k: v.clone() for k, v in init.items()}  # per-member reference (periodic updates)
    opt = StackedAdam(params, torch.tensor([ft.lr_for(r.beta) for r in runs]))
    cache: dict[tuple[int, int], tt.Pairs] = {}
    for r in runs:  # one data set per (seed, N), shared by every method and beta
        if (r.seed, r.n_pairs) not in cache:
            cache[r.seed, r.n_pairs] = make_preference_pairs(
                setup, ft.pairs, r.n_pairs, r.seed, refs[r.seed]
            )
    pairs = [cache[r.seed, r.n_pairs] for r in runs]
    gens = [generator("finetune", *r.key()) for r in runs]
    rules = [r.strategy.rule() for r in runs]

    probe_xt, probe_t, probe_c = tt._probe_set(runs, pairs, ft.n_probe, sched)
    with torch.no_grad():
        init_probe = forward(init, probe_xt, probe_t, probe_c, mlp)

    log = tt.FinetuneLog([[] for _ in runs], [None] * M, [[] for _ in runs], [0.0] * M, [0.0] * M)
    frozen = [False] * M
    groups = tt.loss_groups(runs, ft, B)
    tail = max(1, ft.steps // 10)
    loss_acc, iacc_acc = torch.zeros(M), torch.zeros(M)
    for step in range(1, ft.steps + 1):
        idx, t, eps = tt._draw_step(runs, pairs, gens, B, T)
        x_w = _gather_stack([p.x_w for p in pairs], idx)
        x_l = _gather_stack([p.x_l for p in pairs], idx)
        c = _gather_stack([p.c for p in pairs], idx)
        c_neg = _gather_stack([p.c_neg for p in pairs], idx)
        xt_w = sched.add_noise(x_w, eps, t)  # winner and loser share t and eps
        xt_l = sched.add_noise(x_l, eps, t)
        with torch.no_grad():  # f_ref(x_t^w, c), f_ref(x_t^l, c), f_ref(x_t^l, c-)
            r_all = forward(
                ref,
                torch.cat([xt_w, xt_l, xt_l], 1),
                t.repeat(1, 3),
                torch.cat([c, c, c_neg], 1),
                mlp,
            )
        r_w, r_l, r_l_neg = r_all.split(B, dim=1)
        p_all = forward(
            params, torch.cat([xt_w, xt_l], 1), t.repeat(1, 2), torch.cat([c, c], 1), mlp
        )
        p_w, p_l = p_all.split(B, dim=1)
        total = tt.group_losses(
            groups, ft, (p_w, p_l, r_w, r_l, r_l_neg), eps, t, T, snr,
            (loss_acc, iacc_acc) if step > ft.steps - tail else None, tail,
        )  # fmt: skip
        grads = torch.autograd.grad(total, list(params.values()))
        opt.step(dict(zip(params, grads, strict=True)))
        due = [m for m in range(M) if rules[m].copy_due(step, frozen[m])]
        if due:
            with torch.no_grad():
                for k in ref:
                    ref[k][due] = params[k][due].detach()
                d_ref = forward(select(ref, due), probe_xt[due], probe_t[due], probe_c[due], mlp)
            log.record_copies(step, due, d_ref, init_probe, rules, frozen)
        if progress:
            progress(1)
    log.final_loss = loss_acc.tolist()
    log.final_implicit_acc = iacc_acc.tolist()
    return {k: v.detach() for k, v in params.items()}, log
