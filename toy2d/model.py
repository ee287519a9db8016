"""A stack of M small class-conditional epsilon-denoisers, written with a leading model dim.

Every parameter has shape ``(M, ...)``; member ``m`` is an independent MLP

    [x (2), sinusoidal(t) (temb), class embedding (cemb)] -> H -> H -> H -> eps (2),  SiLU

so one ``bmm`` per layer runs all M fine-tunes of a sweep at once, and ``M = 1`` is the
one-model-at-a-time path (same code, same arithmetic per member). :class:`StackedAdam`
is ``torch.optim.Adam`` (no weight decay, no amsgrad) applied member-wise with a
per-member learning rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass(frozen=True)
class MLPConfig:
    num_classes: int = 8  # K
    hidden: int = 64  # width of the three hidden layers
    temb: int = 16  # sinusoidal time-embedding size
    cemb: int = 16  # learned class-embedding size
    num_train_timesteps: int = 100  # T, to scale the time embedding

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_shapes(cfg: MLPConfig) -> list[tuple[str, tuple[int, int]]]:
    d_in, h = 2 + cfg.temb + cfg.cemb, cfg.hidden
    return [("l1", (d_in, h)), ("l2", (h, h)), ("l3", (h, h)), ("l4", (h, 2))]


def init_params(cfg: MLPConfig, generators: list[torch.Generator]) -> Params:
    """One member per generator; each drawn like ``nn.Linear``/``nn.Embedding`` would."""
    members = []
    for g in generators:
        p = {"cemb": torch.randn(cfg.num_classes, cfg.cemb, generator=g)}
        for name, (fan_in, fan_out) in _layer_shapes(cfg):
            bound = 1.0 / math.sqrt(fan_in)
            p[name + ".w"] = (torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound
            p[name + ".b"] = (torch.rand(1, fan_out, generator=g) * 2 - 1) * bound
        members.append(p)
    return stack(members)


def stack(members: list[Params]) -> Params:
    return {k: torch.stack([m[k] for m in members]) for k in members[0]}


def unstack(params: Params) -> list[Params]:
    n = next(iter(params.values())).shape[0]
    return [{k: v[i].clone() for k, v in params.items()} for i in range(n)]


def select(params: Params, idx: list[int] | slice) -> Params:
    return {k: v[idx] for k, v in params.items()}


def time_embedding(t: Tensor, dim: int, T: int) -> Tensor:
    """Transformer-style sinusoidal embedding of ``t / T`` (any shape -> shape + (dim,))."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = (t.float() / T * 1000.0).unsqueeze(-1) * freqs  # (..., half)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def forward(params: Params, x: Tensor, t: Tensor, c: Tensor, cfg: MLPConfig) -> Tensor:
    """eps prediction. Shapes: x (M, B, 2), t (M, B) int, c (M, B) int -> (M, B, 2).

    The first layer acts on ``[x, temb(t), cemb(c)]``; since t and c are discrete, their
    parts of it are tabulated per member -- ``(M, T, H)`` and ``(M, K, H)`` -- and gathered,
    which is the same function as the concatenation but moves far less memory.
    """
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
    """Adam (Kingma & Ba; torch.optim.Adam's update order) over stacked params, lr per member."""

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


# ------------------------------------------------------------------------------------------
# The fast path: the same function and the same float32 arithmetic as :func:`forward` with
# autograd and :class:`StackedAdam` -- bit for bit (tests/test_toy_fast.py) -- in fewer passes
# over memory and without an autograd graph:
#
# * the bias add is fused into the matmul (``baddbmm(b, a, W)`` == ``bmm(a, W) + b``);
# * the backward of the stacked MLP is written out by hand with the ops autograd runs for
#   :func:`forward` (``grad.bmm(W^T)``, ``a^T.bmm(grad)``, ``silu_backward``, the bias
#   ``sum`` and ``index_put_`` with accumulation for the gathered layer-1 tables);
# * activations and gradients go to a :class:`Workspace` of buffers reused from step to
#   step: the stacked activations are MBs, and fresh ones cost a page fault per 4 KiB;
# * constant layer-1 tables (a frozen reference, one sampling call) are built once;
# * parameters, gradients and Adam moments each live in one flat buffer.
# ------------------------------------------------------------------------------------------

_silu_backward = torch.ops.aten.silu_backward.grad_input
_silu = torch.ops.aten.silu.out


class Workspace:
    """Named buffers reused across calls; a buffer is reallocated only when its shape changes."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype=torch.float32) -> Tensor:
        b = self._bufs.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = self._bufs[name] = torch.empty(shape, dtype=dtype)
        return b


def _buf(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype) if ws is None else ws(name, shape, like.dtype)


_GRIDS: dict[tuple, Tensor] = {}


def _grid(cfg: MLPConfig, like: Tensor) -> Tensor:
    """``time_embedding(arange(T))``, built once per size (float64 only for gradcheck)."""
    key = (cfg.temb, cfg.num_train_timesteps, like.dtype)
    if key not in _GRIDS:
        T = cfg.num_train_timesteps
        _GRIDS[key] = time_embedding(torch.arange(T), cfg.temb, T).to(like.dtype)
    return _GRIDS[key]


def layer1_tables(params: Params, cfg: MLPConfig) -> tuple[Tensor, Tensor]:
    """``(tab_t (M, T, H), tab_c (M, K, H))``: the time and class parts of layer 1, with the
    layer-1 bias in ``tab_c`` -- computed exactly as :func:`forward` does."""
    _, w_t, w_c = params["l1.w"].split([2, cfg.temb, cfg.cemb], dim=1)
    tab_t = torch.matmul(_grid(cfg, w_t), w_t)
    tab_c = torch.bmm(params["cemb"], w_c) + params["l1.b"]
    return tab_t, tab_c


def joint_table(params: Params, cfg: MLPConfig) -> Tensor:
    """``tab_t[t] + tab_c[c]`` for every ``(t, c)``: ``(M, T K, H)``, row ``t K + c``."""
    tab_t, tab_c = layer1_tables(params, cfg)
    M, T, H = tab_t.shape
    return (tab_t.unsqueeze(2) + tab_c.unsqueeze(1)).reshape(M, T * cfg.num_classes, H)


_OFFSETS: dict[tuple[int, int], Tensor] = {}


def _rows(idx: Tensor, n_rows: int) -> Tensor:
    """Flat row indices ``m * n_rows + idx[m, b]`` into a ``(M n_rows, H)`` table."""
    key = (idx.shape[0], n_rows)
    if key not in _OFFSETS:  # m * n_rows, built once per shape
        _OFFSETS[key] = torch.arange(idx.shape[0]).unsqueeze(1) * n_rows
    return (idx + _OFFSETS[key]).reshape(-1)


def _gather(table: Tensor, idx: Tensor, out: Tensor, rows: Tensor | None = None) -> Tensor:
    """``out[m, b] = table[m, idx[m, b]]`` for ``table (M, R, H)``, ``idx (M, B)``
    (``rows``: ``_rows(idx, R)`` if the caller has it)."""
    M, R, H = table.shape
    rows = _rows(idx, R) if rows is None else rows
    torch.index_select(table.reshape(M * R, H), 0, rows, out=out.view(-1, H))
    return out


def _layer1(params, x, t, c, cfg, ws, joint=None, tag=""):
    """Layer 1's pre-activation ``bmm(x, w_x) + (tab_t[t] + tab_c[c])`` in a workspace buffer;
    also returns the flat table rows of ``t`` and ``c`` (None with ``joint``)."""
    M, N, _ = x.shape
    h = _buf(ws, tag + "h1", (M, N, cfg.hidden), x)
    if joint is not None:
        _gather(joint, t * cfg.num_classes + c, h)
        rows = None
    else:
        tab_t, tab_c = layer1_tables(params, cfg)
        rows = _rows(t, tab_t.shape[1]), _rows(c, tab_c.shape[1])
        _gather(tab_t, t, h, rows[0])
        h.add_(_gather(tab_c, c, _buf(ws, tag + "a1", h.shape, x), rows[1]))
    return h.baddbmm_(x, params["l1.w"][:, :2]), rows


def _trunk(params: Params, h: Tensor, ws: Workspace | None, tag: str = "") -> Tensor:
    """Layers 2-4 after the layer-1 pre-activation ``h``, in place (no autograd)."""
    for i, name in enumerate(("l2", "l3")):
        out = _buf(ws, f"{tag}h{i % 2}", h.shape, h)
        a = torch.nn.functional.silu(h, inplace=True)
        h = torch.baddbmm(params[name + ".b"], a, params[name + ".w"], out=out)
    return torch.baddbmm(params["l4.b"], torch.nn.functional.silu(h, inplace=True), params["l4.w"])


@torch.no_grad()
def forward_fast(
    params: Params,
    x: Tensor,
    t: Tensor,
    c: Tensor,
    cfg: MLPConfig,
    joint: Tensor | None = None,
    ws: Workspace | None = None,
) -> Tensor:
    """:func:`forward` without autograd (same values). ``joint``: :func:`joint_table` of
    ``params`` when the caller reuses it across calls; ``ws``: buffers to reuse."""
    h, _ = _layer1(params, x, t, c, cfg, ws, joint, "f")
    return _trunk(params, h, ws, "f")


def step_denoiser(params: Params, c: Tensor, cfg: MLPConfig):
    """``eps(x (M, n, 2), t (M,)) -> (M, n, 2)`` for a sampler that calls it with one
    timestep per member and fixed classes ``c (M, n)``: the tables and class rows are built
    once, so a step is one row add and four fused matmuls in reused buffers. Same values as
    ``forward(params, x, t[:, None].expand(M, n), c, cfg)``."""
    ws = Workspace()
    with torch.no_grad():
        tab_t, tab_c = layer1_tables(params, cfg)
        g_c = _gather(tab_c, c, torch.empty(*c.shape, cfg.hidden))
        w_x = params["l1.w"][:, :2]
        members = torch.arange(c.shape[0])

    @torch.no_grad()
    def eps(x: Tensor, t: Tensor) -> Tensor:
        h = ws("h1", g_c.shape)
        torch.add(tab_t[members, t].unsqueeze(1), g_c, out=h)  # tab_t[t] + tab_c[c]
        return _trunk(params, h.baddbmm_(x, w_x), ws)

    return eps


def forward_train(
    params: Params, x: Tensor, t: Tensor, c: Tensor, cfg: MLPConfig, ws: Workspace | None = None
) -> tuple[Tensor, tuple]:
    """:func:`forward` (same values) and what :func:`backward_train` needs; no autograd.
    With ``ws`` the activations live in its buffers until the next call."""
    with torch.no_grad():
        h, rows = _layer1(params, x, t, c, cfg, ws)
        hs, acts = [h], []
        for i, name in enumerate(("l2", "l3", "l4")):
            a = _silu(h, out=_buf(ws, f"a{i + 1}", h.shape, h))
            acts.append(a)
            if name == "l4":
                h = torch.baddbmm(params[name + ".b"], a, params[name + ".w"])
            else:
                out = _buf(ws, f"h{i + 2}", h.shape, h)
                h = torch.baddbmm(params[name + ".b"], a, params[name + ".w"], out=out)
                hs.append(h)
    return h, (x, rows, hs, acts)


def backward_train(
    params: Params,
    saved: tuple,
    grad_out: Tensor,
    cfg: MLPConfig,
    ws: Workspace | None = None,
    out: Params | None = None,
) -> Params:
    """Gradients of ``sum(grad_out * forward(params, x, t, c))`` w.r.t. every parameter,
    op for op what autograd computes for :func:`forward`; written into ``out`` if given
    (e.g. :attr:`FlatParams.grads`)."""
    x, (rows_t, rows_c), hs, acts = saved
    T, K, H = cfg.num_train_timesteps, cfg.num_classes, cfg.hidden
    M = x.shape[0]

    grads = {k: torch.empty_like(v) for k, v in params.items()} if out is None else out
    dst = grads.__getitem__

    with torch.no_grad():
        g = grad_out
        for i, name in ((2, "l4"), (1, "l3"), (0, "l2")):
            torch.sum(g, 1, keepdim=True, out=dst(name + ".b"))
            torch.bmm(acts[i].transpose(1, 2), g, out=dst(name + ".w"))
            da = torch.bmm(g, params[name + ".w"].transpose(1, 2),
                           out=_buf(ws, f"g{i % 2}", hs[i].shape, g))  # fmt: skip
            g = _silu_backward(da, hs[i], grad_input=da)
        # layer 1: h1 = bmm(x, w_x) + (tab_t[t] + tab_c[c])
        _, w_t, w_c = params["l1.w"].split([2, cfg.temb, cfg.cemb], dim=1)
        g_wx = x.transpose(1, 2).bmm(g)
        flat_g = g.reshape(-1, H)
        # autograd's IndexBackward: index_put_(accumulate=True) into zeros, rows added in
        # index order (see _accumulate_rows)
        g_tt = _accumulate_rows(_buf(ws, "g_tt", (M * T, H), g).zero_(), rows_t, flat_g)
        g_tc = _accumulate_rows(_buf(ws, "g_tc", (M * K, H), g).zero_(), rows_c, flat_g)
        g_tt, g_tc = g_tt.view(M, T, H), g_tc.view(M, K, H)
        g_wt = torch.matmul(_grid(cfg, w_t).t(), g_tt)
        g_wc = params["cemb"].transpose(1, 2).bmm(g_tc)
        torch.bmm(g_tc, w_c.transpose(1, 2), out=dst("cemb"))
        torch.sum(g_tc, 1, keepdim=True, out=dst("l1.b"))
        torch.cat([g_wx, g_wt, g_wc], dim=1, out=grads["l1.w"])
    return grads


def _accumulate_rows(out: Tensor, rows: Tensor, src: Tensor) -> Tensor:
    """``out.index_put_((rows,), src, accumulate=True)``, the op autograd runs for a gather,
    as ``index_add_``: the same sums in the same order (row by row, in index order, at any
    thread count; tests/test_toy_fast.py), 2-3x faster on this toy's shapes, and
    reproducible with several threads, where torch 2.x's parallel ``index_put_`` is not.
    """
    return out.index_add_(0, rows, src)


def param_names(cfg: MLPConfig) -> list[str]:
    return ["cemb"] + [f"{n}.{s}" for n, _ in _layer_shapes(cfg) for s in ("w", "b")]


class StackedMLP(torch.autograd.Function):
    """:func:`forward_train` / :func:`backward_train` as an autograd function of the
    parameters, given in :func:`param_names` order -- for gradcheck and mixed use."""

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


class FlatParams:
    """Stacked parameters as contiguous views of one flat buffer (``params``), with a
    gradient buffer of the same layout (``grads``)."""

    def __init__(self, params: Params):
        self.names = list(params)
        self.shapes = {k: tuple(v.shape) for k, v in params.items()}
        self.flat = torch.cat([v.detach().reshape(-1) for v in params.values()])
        self.grad = torch.zeros_like(self.flat)
        self.params = self._views(self.flat)
        self.grads = self._views(self.grad)

    def _views(self, buf: Tensor) -> Params:
        out, o = {}, 0
        for k in self.names:
            n = math.prod(self.shapes[k])
            out[k] = buf[o : o + n].view(self.shapes[k])
            o += n
        return out

    def member_vector(self, per_member: Tensor) -> Tensor:
        """A per-member ``(M,)`` value spread over the flat layout."""
        return torch.cat(
            [per_member.repeat_interleave(math.prod(self.shapes[k][1:])) for k in self.names]
        )

    def detached_copy(self) -> Params:
        return {k: v.clone() for k, v in self.params.items()}


class FlatAdam:
    """:class:`StackedAdam` over a :class:`FlatParams` buffer: the same update, element for
    element, in a handful of kernels and no temporaries."""

    def __init__(self, fp: FlatParams, lr: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.fp, self.lr = fp, fp.member_vector(lr.to(torch.float32))
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m, self.v = torch.zeros_like(fp.flat), torch.zeros_like(fp.flat)
        self._denom, self._step = torch.empty_like(fp.flat), torch.empty_like(fp.flat)
        self.k = 0

    @torch.no_grad()
    def step(self) -> None:
        self.k += 1
        bc1, bc2 = 1 - self.b1**self.k, 1 - self.b2**self.k
        g, m, v = self.fp.grad, self.m, self.v
        m.lerp_(g, 1 - self.b1)
        v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        denom = torch.sqrt(v, out=self._denom).div_(math.sqrt(bc2)).add_(self.eps)
        step = torch.div(self.lr, bc1, out=self._step).mul_(m)  # m * (lr / bc1)
        self.fp.flat.addcdiv_(step, denom, value=-1.0)
