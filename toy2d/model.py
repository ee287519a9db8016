"""A stack of M small class-conditional epsilon-denoisers, written with a leading model dim,
and the kernels that run them.

Every parameter has shape ``(M, ...)``; member ``m`` is an independent MLP

    [x (2), sinusoidal(t) (temb), class embedding (cemb)] -> H -> H -> H -> eps (2),  SiLU

so one ``bmm`` per layer runs all M fine-tunes of a sweep at once, and ``M = 1`` is the
one-model-at-a-time path (same code, same arithmetic per member). Training goes through
:class:`StackedNet` (forward, hand-written backward, Adam with a learning rate per member),
a frozen reference through :class:`FrozenNet`, sampling through :func:`step_denoiser`.
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


def select(params: Params, idx: list[int] | slice) -> Params:
    return {k: v[idx] for k, v in params.items()}


def time_embedding(t: Tensor, dim: int, T: int) -> Tensor:
    """Transformer-style sinusoidal embedding of ``t / T`` (any shape -> shape + (dim,))."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = (t.float() / T * 1000.0).unsqueeze(-1) * freqs  # (..., half)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


# ------------------------------------------------------------------------------------------
# The network's kernels. There is no autograd graph: the forward runs in reused buffers, the
# backward is written out by hand with the ops autograd would run for the plain stacked MLP
# (``grad.bmm(W^T)``, ``a^T.bmm(grad)``, ``silu_backward``, the bias ``sum`` and
# ``index_put_``-with-accumulation for the gathered layer-1 tables), so the float32 results
# are those of an autograd implementation to the last bit where both pick the same kernels
# (tests/toy_oracle.py is that implementation; tests/test_toy_fast.py compares them):
#
# * the bias add is fused into the matmul (``baddbmm(b, a, W)`` == ``bmm(a, W) + b``);
# * activations and gradients go to a :class:`Workspace` of buffers reused from step to
#   step: the stacked activations are MBs, and fresh ones cost a page fault per 4 KiB;
# * constant layer-1 tables (a frozen reference, one sampling call) are built once;
# * parameters, gradients and Adam moments each live in one flat buffer.
#
# A training loop uses :class:`StackedNet` (forward, backward, Adam step) and
# :class:`FrozenNet` (a reference's forward); sampling uses :func:`step_denoiser`.
# ------------------------------------------------------------------------------------------

_silu_backward = torch.ops.aten.silu_backward.grad_input
_silu = torch.ops.aten.silu.out


class Workspace:
    """What one loop reuses from call to call: named buffers (reallocated only when a shape
    changes), the time-embedding grid and the per-member row offsets of the layer-1 tables."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self._grids: dict[tuple, Tensor] = {}
        self._offsets: dict[tuple[int, int], Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype=torch.float32) -> Tensor:
        b = self._bufs.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = self._bufs[name] = torch.empty(shape, dtype=dtype)
        return b

    def grid(self, cfg: MLPConfig, dtype: torch.dtype) -> Tensor:
        """``time_embedding(arange(T))`` in ``dtype`` (float64 only for gradcheck)."""
        key = (cfg.temb, cfg.num_train_timesteps, dtype)
        if key not in self._grids:
            T = cfg.num_train_timesteps
            self._grids[key] = time_embedding(torch.arange(T), cfg.temb, T).to(dtype)
        return self._grids[key]

    def rows(self, idx: Tensor, n_rows: int) -> Tensor:
        """Flat row indices ``m * n_rows + idx[m, b]`` into a ``(M n_rows, H)`` table."""
        key = (idx.shape[0], n_rows)
        if key not in self._offsets:
            self._offsets[key] = torch.arange(idx.shape[0]).unsqueeze(1) * n_rows
        return (idx + self._offsets[key]).reshape(-1)


def layer1_tables(
    params: Params, cfg: MLPConfig, ws: Workspace | None = None
) -> tuple[Tensor, Tensor]:
    """``(tab_t (M, T, H), tab_c (M, K, H))``: the time and class parts of layer 1 (whose
    input is ``[x, temb(t), cemb(c)]``; t and c are discrete, so their parts are tabulated
    per member and gathered), with the layer-1 bias in ``tab_c``."""
    ws = Workspace() if ws is None else ws
    _, w_t, w_c = params["l1.w"].split([2, cfg.temb, cfg.cemb], dim=1)
    tab_t = torch.matmul(ws.grid(cfg, w_t.dtype), w_t)
    tab_c = torch.bmm(params["cemb"], w_c) + params["l1.b"]
    return tab_t, tab_c


def joint_table(params: Params, cfg: MLPConfig) -> Tensor:
    """``tab_t[t] + tab_c[c]`` for every ``(t, c)``: ``(M, T K, H)``, row ``t K + c``."""
    tab_t, tab_c = layer1_tables(params, cfg)
    M, T, H = tab_t.shape
    return (tab_t.unsqueeze(2) + tab_c.unsqueeze(1)).reshape(M, T * cfg.num_classes, H)


def _gather(table: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """``out[m, b] = table[m, idx[m, b]]`` for ``table (M, R, H)``, ``rows = ws.rows(idx, R)``."""
    M, R, H = table.shape
    torch.index_select(table.reshape(M * R, H), 0, rows, out=out.view(-1, H))
    return out


def _layer1(params, x, t, c, cfg, ws: Workspace, joint=None, tag=""):
    """Layer 1's pre-activation ``bmm(x, w_x) + (tab_t[t] + tab_c[c])`` in a workspace buffer;
    also returns the flat table rows of ``t`` and ``c`` (None with ``joint``)."""
    M, N, _ = x.shape
    h = ws(tag + "h1", (M, N, cfg.hidden), x.dtype)
    if joint is not None:
        _gather(joint, ws.rows(t * cfg.num_classes + c, joint.shape[1]), h)
        rows = None
    else:
        tab_t, tab_c = layer1_tables(params, cfg, ws)
        rows = ws.rows(t, tab_t.shape[1]), ws.rows(c, tab_c.shape[1])
        _gather(tab_t, rows[0], h)
        h.add_(_gather(tab_c, rows[1], ws(tag + "a1", h.shape, x.dtype)))
    return h.baddbmm_(x, params["l1.w"][:, :2]), rows


def _trunk(params: Params, h: Tensor, ws: Workspace, tag: str = "") -> Tensor:
    """Layers 2-4 after the layer-1 pre-activation ``h``, in place."""
    for i, name in enumerate(("l2", "l3")):
        out = ws(f"{tag}h{i % 2}", h.shape, h.dtype)
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
    """eps prediction ``(M, B, 2)`` of ``x (M, B, 2)``, ``t (M, B)``, ``c (M, B)``, no
    gradients. ``joint``: :func:`joint_table` of ``params`` when the caller reuses it across
    calls; ``ws``: buffers to reuse."""
    ws = Workspace() if ws is None else ws
    h, _ = _layer1(params, x, t, c, cfg, ws, joint, "f")
    return _trunk(params, h, ws, "f")


def step_denoiser(params: Params, c: Tensor, cfg: MLPConfig):
    """``eps(x (M, n, 2), t (M,)) -> (M, n, 2)`` for a sampler that calls it with one
    timestep per member and fixed classes ``c (M, n)``: the tables and class rows are built
    once, so a step is one row add and four fused matmuls in reused buffers. Same values as
    ``forward_fast(params, x, t[:, None].expand(M, n), c, cfg)``."""
    ws = Workspace()
    with torch.no_grad():
        tab_t, tab_c = layer1_tables(params, cfg, ws)
        g_c = _gather(tab_c, ws.rows(c, tab_c.shape[1]), torch.empty(*c.shape, cfg.hidden))
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
    """:func:`forward_fast` (same values) and what :func:`backward_train` needs. With ``ws``
    the activations live in its buffers until the next call."""
    ws = Workspace() if ws is None else ws
    with torch.no_grad():
        h, rows = _layer1(params, x, t, c, cfg, ws)
        hs, acts = [h], []
        for i, name in enumerate(("l2", "l3", "l4")):
            a = _silu(h, out=ws(f"a{i + 1}", h.shape, h.dtype))
            acts.append(a)
            if name == "l4":
                h = torch.baddbmm(params[name + ".b"], a, params[name + ".w"])
            else:
                out = ws(f"h{i + 2}", h.shape, h.dtype)
                h = torch.baddbmm(params[name + ".b"], a, params[name + ".w"], out=out)
                hs.append(h)
    return h, (x, rows, hs, acts, ws)


def backward_train(
    params: Params, saved: tuple, grad_out: Tensor, cfg: MLPConfig, out: Params | None = None
) -> Params:
    """Gradients of ``sum(grad_out * forward(params, x, t, c))`` w.r.t. every parameter,
    op for op what autograd computes for the plain stacked MLP; ``saved`` comes from
    :func:`forward_train` (its workspace too); written into ``out`` if given (e.g.
    :attr:`FlatParams.grads`)."""
    x, (rows_t, rows_c), hs, acts, ws = saved
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
                           out=ws(f"g{i % 2}", hs[i].shape, g.dtype))  # fmt: skip
            g = _silu_backward(da, hs[i], grad_input=da)
        # layer 1: h1 = bmm(x, w_x) + (tab_t[t] + tab_c[c])
        _, w_t, w_c = params["l1.w"].split([2, cfg.temb, cfg.cemb], dim=1)
        g_wx = x.transpose(1, 2).bmm(g)
        flat_g = g.reshape(-1, H)
        # autograd's IndexBackward: index_put_(accumulate=True) into zeros, rows added in
        # index order (see _accumulate_rows)
        g_tt = _accumulate_rows(ws("g_tt", (M * T, H), g.dtype).zero_(), rows_t, flat_g)
        g_tc = _accumulate_rows(ws("g_tc", (M * K, H), g.dtype).zero_(), rows_c, flat_g)
        g_tt, g_tc = g_tt.view(M, T, H), g_tc.view(M, K, H)
        g_wt = torch.matmul(ws.grid(cfg, w_t.dtype).t(), g_tt)
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
    """``torch.optim.Adam`` (no weight decay, no amsgrad; its update order) over a
    :class:`FlatParams` buffer with a learning rate per member, in a handful of kernels and
    no temporaries."""

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


class StackedNet:
    """M stacked MLPs being trained, each with its own learning rate: parameters, gradients
    and Adam moments in flat buffers. A step is ``out = block.forward(x, t, c)`` for each
    :meth:`block` of members, the loss's gradient w.r.t. ``out`` into ``block.backward``,
    then :meth:`step`."""

    def __init__(self, params: Params, lr: Tensor, cfg: MLPConfig):
        self.cfg, self.fp = cfg, FlatParams(params)
        self.params = self.fp.params
        self.opt = FlatAdam(self.fp, lr)

    def block(self, lo: int = 0, hi: int | None = None) -> Block:
        """Members ``[lo, hi)`` (default: all), with their own workspace."""
        return Block(self, lo, self.fp.shapes["cemb"][0] if hi is None else hi)

    def step(self) -> None:
        """One Adam step of every member on the gradients the blocks wrote."""
        self.opt.step()

    def detached_copy(self) -> Params:
        return self.fp.detached_copy()


class Block:
    """Forward and backward of members ``[lo, hi)`` of a :class:`StackedNet`: parameters
    and gradients are slices of its flat buffers, activations live in the block's workspace
    from :meth:`forward` to :meth:`backward`."""

    def __init__(self, net: StackedNet, lo: int, hi: int):
        self.cfg, self.lo, self.hi = net.cfg, lo, hi
        self.params = {k: v[lo:hi] for k, v in net.fp.params.items()}
        self.grads = {k: v[lo:hi] for k, v in net.fp.grads.items()}
        self.ws, self.saved = Workspace(), None

    def __bool__(self) -> bool:
        return self.hi > self.lo

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        out, self.saved = forward_train(self.params, x, t, c, self.cfg, self.ws)
        return out

    def backward(self, grad_out: Tensor) -> None:
        backward_train(self.params, self.saved, grad_out, self.cfg, self.grads)


class FrozenNet:
    """The forward of some members of a reference that changes rarely, with its layer-1
    table built once and rebuilt only after :meth:`invalidate` names one of them."""

    def __init__(self, members: list[int], M: int, cfg: MLPConfig):
        self.members, self.whole, self.cfg = members, members == list(range(M)), cfg
        self.params: Params | None = None
        self.joint: Tensor | None = None
        self.ws = Workspace()

    def invalidate(self, due: list[int]) -> None:
        if set(due) & set(self.members):
            self.params = self.joint = None

    def __call__(self, ref: Params, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        if self.params is None:
            self.params = ref if self.whole else select(ref, self.members)
            self.joint = joint_table(self.params, self.cfg)
        if not self.whole:
            x, t, c = x[self.members], t[self.members], c[self.members]
        return forward_fast(self.params, x, t, c, self.cfg, self.joint, self.ws)
