"""Reference training, batched preference fine-tuning and sampling for the 2D toy.

Every run is one member of a stacked model (:mod:`toy2d.model`); all members step together
but each draws its batch indices, timesteps and noise from its *own* ``torch.Generator``
(seeded from its run key), has its own data, its own loss function and beta, its own
Adam moments and its own reference. So ``finetune([a, b])`` equals ``finetune([a])`` and
``finetune([b])`` to float tolerance -- the batched sweep and the one-at-a-time loop are
the same computation.

Losses, schedules, timestep samplers/weights and the reference-update rule all come from
:mod:`minddspo`; nothing here re-derives them.

Speed: the network runs through :mod:`toy2d.model`'s kernels (hand-written backward, fused
bias matmuls, reused buffers, one flat Adam buffer); autograd runs through the loss only.
The float32 numbers are those of a plain autograd implementation (``tests/toy_oracle.py``)
to float rounding, bit for bit where both pick the same kernels (tests/test_toy_fast.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from minddspo.methods import METHODS as LOSS_METHODS
from minddspo.methods import method_loss, method_spec
from minddspo.refupdate import ReferenceUpdateRule, divergence_estimate
from minddspo.sampling import ddim_sample, ddpm_sample
from minddspo.schedules import DDPMSchedule, ddpm_schedule
from minddspo.timesteps import sample_timesteps, timestep_weight

from .data import (
    Pairs,
    ToyConfig,
    class_labels,
    generator,
    make_pairs,
    neighbour,
    run_seed,
    sample_train,
)
from .model import (
    FrozenNet,
    MLPConfig,
    Params,
    StackedNet,
    forward_fast,
    init_params,
    select,
    step_denoiser,
)

PAIR_SOURCES = ("ref", "gt")
# DSPO/DSPO+CPP's outside beta on the toy, fixed by `python -m toy2d.beta_search` on seeds
# 100-102 (the evaluation sweep uses 0-2); see toy2d/README or the main README.
BETA_OUT = 0.05
SAMPLERS = ("ddim", "ddpm")
# rows (members x samples) per sampling call: above ~64k the activations (16 MB each) fall
# out of cache and a DDIM step costs ~1.8x as much per row (measured at 138 x 2048 rows)
SAMPLE_ROWS = 65536
METHODS = ("ref", *LOSS_METHODS)  # "ref": the untuned reference, evaluated as a run


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 100  # T
    beta_schedule: str = "linear"  # linspace(beta_start, beta_end, T)
    beta_start: float = 1e-4
    beta_end: float = 0.2  # abar_{T-1} ~ 4.5e-5: x_{T-1} is pure noise to ~0.01

    def build(self) -> DDPMSchedule:
        return ddpm_schedule(
            self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end
        )


@dataclass(frozen=True)
class RefConfig:
    steps: int = 3000  # Adam steps on the noisy training set
    batch: int = 512
    lr: float = 2e-3


@dataclass(frozen=True)
class Strategy:
    """The ablation's training options (reference updates, timestep strategies); the defaults are the paper's plain protocol."""

    timestep_sampler: str = "uniform"  # uniform | geometric | logit_normal
    timestep_weight: str = "none"  # none | lambda | linear
    ref_update: str = "frozen"  # frozen | periodic
    ref_tau: int = 32  # periodic: copy policy -> reference every tau optimizer steps
    ref_delta: float = 0.01  # periodic: freeze once the divergence estimate exceeds this

    def rule(self) -> ReferenceUpdateRule:
        return ReferenceUpdateRule(self.ref_update, self.ref_tau, self.ref_delta)

    def label(self) -> str:
        ts = self.timestep_sampler + (
            "" if self.timestep_weight == "none" else "+" + self.timestep_weight
        )
        return f"{self.ref_update}/{ts}"


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 400  # Adam steps per fine-tune
    batch: int = 128  # preference pairs per step
    lr: float = 1e-4  # learning rate at beta = lr_beta (see lr_rule); 1/20 of the reference lr
    lr_rule: str = "scaled"  # scaled: lr * beta / lr_beta (the paper's lr ∝ beta); constant: lr
    lr_beta: float = 400.0
    beta_out: float = BETA_OUT  # dspo/dspo_cpp: outside beta; the cell's beta is their beta_logit
    n_probe: int = 256  # winner samples for the reference-divergence estimate
    pairs: str = "ref"  # ref: x0_w ~ reference(c), x0_l ~ reference(c-) (the paper's pipeline); gt: both from GT

    def lr_for(self, beta: float) -> float:
        return self.lr * beta / self.lr_beta if self.lr_rule == "scaled" else self.lr


@dataclass(frozen=True)
class Run:
    method: str
    n_pairs: int
    beta: float  # the cell's beta: D-DPO scale (for dspo/dspo_cpp: beta_logit, inside)
    seed: int
    strategy: Strategy = field(default_factory=Strategy)
    beta_out: float | None = None  # dspo/dspo_cpp only: the outside beta; None = FinetuneConfig's

    def __post_init__(self) -> None:
        if self.method == "ref":
            return
        if self.beta_out is not None and not method_spec(self.method).score_matching:
            raise ValueError(f"beta_out applies to dspo and dspo_cpp only, not {self.method}")

    def key(self) -> tuple:
        base = (
            self.seed,
            self.method,
            self.n_pairs,
            float(self.beta),
            *asdict(self.strategy).values(),
        )
        return base if self.beta_out is None else (*base, "beta_out", float(self.beta_out))

    def loss_scales(self, default_beta_out: float) -> tuple[float, float | None]:
        """``(beta, beta_logit)`` for :func:`minddspo.methods.method_loss`: the cell's beta is
        the logit scale; DSPO-family runs take ``beta_out`` (or the default) outside."""
        if not method_spec(self.method).score_matching:
            return self.beta, None
        return (default_beta_out if self.beta_out is None else self.beta_out), self.beta


@dataclass(frozen=True)
class ToySetup:
    """Everything that defines the task and the reference model of a seed."""

    toy: ToyConfig = field(default_factory=ToyConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ref: RefConfig = field(default_factory=RefConfig)

    def __post_init__(self) -> None:
        if self.mlp.num_classes != self.toy.num_classes:
            raise ValueError("mlp.num_classes must equal toy.num_classes")
        if self.mlp.num_train_timesteps != self.schedule.num_train_timesteps:
            raise ValueError("mlp and schedule must agree on T")


def _gather_stack(tensors: list[Tensor], idx: list[Tensor]) -> Tensor:
    return torch.stack([x[i] for x, i in zip(tensors, idx, strict=True)])


class _Rows:
    """Per-member data sets concatenated once, so that ``_gather_stack(sets, idx)`` is one
    gather per step: ``take(X, idx) == _gather_stack([X_0, X_1, ...], idx)``."""

    def __init__(self, sets: list[object]):
        unique: dict[int, int] = {}  # id(set) -> its first row in the concatenation
        self.sets, starts, n = [], [], 0
        for s in sets:
            if id(s) not in unique:
                unique[id(s)] = n
                self.sets.append(s)
                n += _length(s)
            starts.append(unique[id(s)])
        self.start = torch.tensor(starts).unsqueeze(1)

    def cat(self, get: Callable[[object], Tensor]) -> Tensor:
        return torch.cat([get(s) for s in self.sets])

    def rows(self, idx: list[Tensor]) -> Tensor:
        return (torch.stack(idx) + self.start).reshape(-1)

    @staticmethod
    def take(table: Tensor, rows: Tensor, M: int) -> Tensor:
        return table.index_select(0, rows).view(M, -1, *table.shape[1:])


def _length(s: object) -> int:
    return len(s.c) if isinstance(s, Pairs) else len(s[0])


class _Noiser:
    """``sched.add_noise(x0, eps, t)`` for float32 data with the ``a_t, s_t`` tables cast once:
    the same values, without re-deriving the tables in float64 at every call."""

    def __init__(self, sched: DDPMSchedule):
        self.a = sched.alphas_cumprod.sqrt().float()
        self.s = (1 - sched.alphas_cumprod).sqrt().float()

    def __call__(self, t: Tensor, *x0s: Tensor, eps: Tensor) -> list[Tensor]:
        a, s = self.a[t].unsqueeze(-1), self.s[t].unsqueeze(-1)
        s_eps = s * eps
        return [a * x0 + s_eps for x0 in x0s]


def _mean_error_grad(pred: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """``d/d pred`` of ``(pred - target).pow(2).mean(-1).mean(1).sum()`` (members
    independent), with autograd's arithmetic: ``(pred - target) * scale``, ``scale =
    _mean_error_scale(B, D)``."""
    return torch.sub(pred, target).mul_(scale)


def _mean_error_scale(B: int, D: int) -> Tensor:
    """``fl(1/B) / D * 2`` as autograd's MeanBackward x2 and PowBackward compute it; ``/D * 2``
    is exact for the toy's D = 2, so the gradient is autograd's bit for bit."""
    return torch.tensor(1.0 / B, dtype=torch.float32).div_(D).mul_(2)


# ----------------------------------------------------------------- reference model


def train_references(
    setup: ToySetup, seeds: list[int], progress: Callable[[int], None] | None = None
) -> Params:
    """Train one reference per seed on its noisy set, all seeds in one batched loop."""
    sched, T, rc, mlp = (
        setup.schedule.build(),
        setup.schedule.num_train_timesteps,
        setup.ref,
        setup.mlp,
    )
    gens = [generator("ref", s, cache_key(setup, s)) for s in seeds]
    M = len(seeds)
    net = StackedNet(init_params(mlp, gens), torch.full((M,), rc.lr), mlp)
    data = [sample_train(setup.toy, s) for s in seeds]
    src = _Rows(data)
    X, Y = src.cat(lambda d: d[0]), src.cat(lambda d: d[1])
    members, noiser, scale = net.block(), _Noiser(sched), _mean_error_scale(rc.batch, 2)
    for _ in range(rc.steps):
        idx = [
            torch.randint(0, len(x), (rc.batch,), generator=g)
            for (x, _), g in zip(data, gens, strict=False)
        ]
        t = torch.stack([torch.randint(0, T, (rc.batch,), generator=g) for g in gens])
        eps = torch.stack([torch.randn(rc.batch, 2, generator=g) for g in gens])
        rows = src.rows(idx)
        x0, c = src.take(X, rows, M), src.take(Y, rows, M)
        (xt,) = noiser(t, x0, eps=eps)
        pred = members.forward(xt, t, c)
        members.backward(_mean_error_grad(pred, eps, scale))
        net.step()
        if progress:
            progress(1)
    return net.detached_copy()


class CacheError(RuntimeError):
    """The reference cache cannot take a new entry (e.g. read-only): the CLIs print it as one
    line and exit 2 before any training."""


def cache_dir() -> Path:
    root = os.environ.get("MINDDSPO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "minddspo") / "toy2d"


def cache_key(setup: ToySetup, seed: int) -> str:
    blob = json.dumps({"setup": asdict(setup), "seed": seed, "v": 1}, sort_keys=True)
    return f"ref-{run_seed(blob):016x}"


def cache_path(setup: ToySetup, seed: int) -> Path:
    return cache_dir() / f"{cache_key(setup, seed)}.safetensors"


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes, in name order (stored in each entry)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _read_entry(setup: ToySetup, seed: int) -> tuple[dict[str, Tensor] | None, str | None]:
    """``(tensors, None)`` for a sound entry, ``(None, None)`` for none, ``(None, why)`` for a
    damaged one. Entries carry a sha256 of their tensors; older entries without one are
    checked for the expected names, shapes and finite values only."""
    from safetensors import safe_open

    f = cache_path(setup, seed)
    if not f.exists():
        return None, None
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # truncated, or not a safetensors file at all
        return None, f"unreadable: {type(e).__name__}"
    want = {k: tuple(v.shape[1:]) for k, v in init_params(setup.mlp, [torch.Generator()]).items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        return None, "unexpected tensor names or shapes"
    digest = meta.get("sha256")
    if digest is not None and digest != tensors_sha256(tensors):
        return None, "checksum mismatch"
    if not all(bool(v.isfinite().all()) for v in tensors.values()):
        return None, "non-finite values"
    return tensors, None


def missing_references(setup: ToySetup, seeds: list[int]) -> list[int]:
    """Seeds whose reference is not in the cache yet, or whose entry is damaged."""
    return [s for s in seeds if _read_entry(setup, s)[0] is None]


def check_cache_writable() -> None:
    """Raise :class:`CacheError` unless a new entry can be written to :func:`cache_dir`."""
    import tempfile

    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CacheError(
            f"reference cache {d} is not writable ({e.strerror or e}); "
            "point MINDDSPO_CACHE at a writable folder"
        ) from None


def check_reference_cache(setup: ToySetup, seeds: list[int]) -> list[int]:
    """The seeds whose reference must be trained; :class:`CacheError` if it could not be
    saved. Call it before any work so that a read-only cache fails fast."""
    missing = missing_references(setup, seeds)
    if missing:
        check_cache_writable()
    return missing


def load_references(
    setup: ToySetup, seeds: list[int], progress: Callable[[int], None] | None = None
) -> dict[int, Params]:
    """Per-seed reference params ``(1, ...)``, trained (batched) only where not cached.

    A damaged entry (unreadable, wrong checksum, wrong shapes, non-finite) is reported in one
    line on stderr and retrained; :class:`CacheError` before training if the cache is not
    writable.
    """
    import sys

    from safetensors.torch import save

    out, missing = {}, []
    for s in seeds:
        tensors, why = _read_entry(setup, s)
        if why is not None:
            print(
                f"toy2d: damaged reference cache entry {cache_path(setup, s)} ({why}); "
                "retraining it",
                file=sys.stderr,
            )
        if tensors is None:
            missing.append(s)
        else:
            out[s] = {k: v.unsqueeze(0) for k, v in tensors.items()}
    if missing:
        check_cache_writable()
        trained = train_references(setup, missing, progress)
        for i, s in enumerate(missing):
            member = {k: v[i].contiguous() for k, v in trained.items()}
            f = cache_path(setup, s)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            meta = {"setup": json.dumps(asdict(setup)), "seed": str(s)}
            blob = save(member, metadata={**meta, "sha256": tensors_sha256(member)})
            with open(tmp, "wb") as fh:  # the umask's mode (safetensors' save_file: 0600)
                fh.write(blob)
            os.replace(tmp, f)
            out[s] = {k: v.unsqueeze(0) for k, v in member.items()}
    return out


# ---------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneLog:
    divergences: list[list[tuple[int, float]]]  # per member: (step, D) after each copy
    freeze_step: list[int | None]  # per member: step at which the reference froze
    copy_steps: list[list[int]]  # per member: steps at which policy -> reference was copied
    final_loss: list[float]  # per member: mean loss over the last 10% of steps
    final_implicit_acc: list[float]

    def record_copies(self, step, due, d_ref, init_probe, rules, frozen) -> None:
        """After members ``due`` copied policy -> reference at ``step``: log each one's
        divergence estimate (``d_ref[j]`` vs ``init_probe[m]``) and freeze it (in
        ``frozen``) once its rule says so."""
        for j, m in enumerate(due):
            D = float(divergence_estimate(d_ref[j], init_probe[m]))
            self.copy_steps[m].append(step)
            self.divergences[m].append((step, D))
            if rules[m].freezes(D):
                frozen[m] = True
                self.freeze_step[m] = step

    def select(self, members: list[int]) -> FinetuneLog:
        """The log of these members, in this order."""
        return FinetuneLog(
            *([getattr(self, f)[m] for m in members] for f in self.__dataclass_fields__)
        )


def _scatter_members(out: Tensor, members: list[int], M: int) -> Tensor:
    if len(members) == M:
        return out
    full = out.new_zeros(M, *out.shape[1:])  # rows of members that do not use them
    full[members] = out
    return full


@dataclass
class LossGroup:
    """Members that share one :func:`minddspo.methods.method_loss` call: the same method and
    timestep-weight kind. Their strengths differ, so ``beta``/``beta_logit`` are per-row
    tensors ``(G B,)``. A member's numbers do not depend on the group it is in when the batch
    B is a multiple of 32 (its rows then fall in the same lanes of torch's vectorised
    exp/log kernels); otherwise its last bits can (the scalar tail rounds differently)."""

    members: list[int]
    index: Tensor | slice  # the members: a slice when they are consecutive, else a tensor
    method: str
    weight_kind: str
    beta: Tensor
    beta_logit: Tensor | None


def _member_order(runs: list[Run]) -> Callable[[int], tuple]:
    """Sort key of :func:`finetune`'s internal member order: runs whose loss reads the
    loser rows first, then by loss group (in order of first appearance), then as given."""
    first: dict[tuple[str, str], int] = {}
    for r in runs:
        first.setdefault((r.method, r.strategy.timestep_weight), len(first))

    def key(m: int) -> tuple:
        r = runs[m]
        return (not method_spec(r.method).preference, first[r.method, r.strategy.timestep_weight])

    return key


def loss_groups(runs: list[Run], ft: FinetuneConfig, batch: int) -> list[LossGroup]:
    """One :class:`LossGroup` per (method, timestep-weight kind), members in run order."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for m, r in enumerate(runs):
        by_key.setdefault((r.method, r.strategy.timestep_weight), []).append(m)
    groups = []
    for (method, kind), members in by_key.items():
        scales = [runs[m].loss_scales(ft.beta_out) for m in members]

        def rows(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32).repeat_interleave(batch)

        beta_logit = None if scales[0][1] is None else rows([b for _, b in scales])
        consecutive = members == list(range(members[0], members[-1] + 1))
        index = slice(members[0], members[-1] + 1) if consecutive else torch.tensor(members)
        groups.append(
            LossGroup(members, index, method, kind, rows([b for b, _ in scales]), beta_logit)
        )
    return groups


def group_losses(groups, ft, preds, eps, t, T, snr, acc, tail: int) -> Tensor:
    """Sum over members of each one's mean loss: one :func:`method_loss` call per group of
    ``(M, B, ...)`` tensors. ``acc = (loss_acc, iacc_acc)`` adds the last steps' averages."""
    p_w, p_l, r_w, r_l, r_l_neg = preds
    total = p_w.new_zeros(())
    for grp in groups:
        g, g_idx = len(grp.members), grp.index

        def flat(z: Tensor, g_idx: Tensor | slice = g_idx) -> Tensor:
            return z[g_idx].reshape(-1, *z.shape[2:])  # (G B, ...)

        out = method_loss(
            grp.method,
            pred_w=flat(p_w),
            pred_l=flat(p_l),
            ref_w=flat(r_w),
            ref_l=flat(r_l),
            ref_l_neg=flat(r_l_neg),
            target_w=flat(eps),  # winner and loser share the forward noise
            target_l=flat(eps),
            beta=grp.beta,
            beta_logit=grp.beta_logit,
            weight=timestep_weight(grp.weight_kind, flat(t), T, snr),
            weight_kind=grp.weight_kind,
        )
        per_member = out.loss.reshape(g, -1).mean(1)  # (G,)
        total = total + per_member.sum()  # members are independent
        if acc is not None:
            acc[0][g_idx] += per_member.detach() / tail
            if method_spec(grp.method).preference:
                acc[1][g_idx] += out.implicit_acc.reshape(g, -1).mean(1) / tail
    return total


def _probe_set(runs: list[Run], pairs: list[Pairs], n_probe: int, sched: DDPMSchedule):
    """Each member's fixed probe set for the divergence estimate: ``n_probe`` of its winners,
    ``t ~ U``, forward noise -- ``(x_t, t, c)``, each ``(M, n_probe, ...)``."""
    T = sched.num_train_timesteps
    pg = [generator("probe", *r.key()) for r in runs]
    pidx = [
        torch.randint(0, len(p.c), (n_probe,), generator=g) for p, g in zip(pairs, pg, strict=True)
    ]
    probe_t = torch.stack([torch.randint(0, T, (n_probe,), generator=g) for g in pg])
    probe_eps = torch.stack([torch.randn(n_probe, 2, generator=g) for g in pg])
    probe_x0 = _gather_stack([p.x_w for p in pairs], pidx)
    probe_c = _gather_stack([p.c for p in pairs], pidx)
    return sched.add_noise(probe_x0, probe_eps, probe_t), probe_t, probe_c


def _preference_pairs(setup, ft, runs, refs) -> list[Pairs]:
    """Each run's preference pairs: one data set per (seed, N), shared by every method and
    beta."""
    cache: dict[tuple[int, int], Pairs] = {}
    for r in runs:
        if (r.seed, r.n_pairs) not in cache:
            cache[r.seed, r.n_pairs] = make_preference_pairs(
                setup, ft.pairs, r.n_pairs, r.seed, refs[r.seed]
            )
    return [cache[r.seed, r.n_pairs] for r in runs]


class _Probes:
    """Each member's fixed probe set (:func:`_probe_set`) and the initial model's
    predictions on it, for the divergence estimate after a reference copy."""

    def __init__(self, runs, pairs, n_probe: int, sched: DDPMSchedule, init: Params, mlp):
        self.xt, self.t, self.c = _probe_set(runs, pairs, n_probe, sched)
        self.init = forward_fast(init, self.xt, self.t, self.c, mlp)
        self.mlp = mlp

    def predict(self, params: Params, due: list[int]) -> Tensor:
        """The predictions of members ``due`` of ``params`` on their probes."""
        return forward_fast(params, self.xt[due], self.t[due], self.c[due], self.mlp)


class _Reference:
    """The fine-tunes' references: one copy of the initial parameters per member, updated by
    each member's rule (:meth:`update`), evaluated only on the rows a loss reads."""

    def __init__(self, init: Params, runs: list[Run], split: bool, mlp: MLPConfig):
        M, specs = len(runs), [method_spec(r.method) for r in runs]
        self.params = {k: v.clone() for k, v in init.items()}
        self.split, self.M, self.frozen = split, M, [False] * M
        self.rules = [r.strategy.rule() for r in runs]
        self.wl = FrozenNet([m for m in range(M) if specs[m].preference or not split], M, mlp)
        self.neg = FrozenNet([m for m in range(M) if specs[m].cpp and split], M, mlp)

    def forward(self, x2, t2, c2, xt_l, t, c_neg) -> tuple[Tensor, Tensor, Tensor]:
        """``f_ref(x_t^w, c), f_ref(x_t^l, c)`` where a loss reads them, ``f_ref(x_t^l, c-)``
        for CPP; zeros elsewhere. ``x2, t2, c2``: the winner rows then the loser rows."""
        M, B = t.shape
        r_w = r_l = r_l_neg = xt_l.new_zeros(M, B, 2)
        if not self.split:  # an autograd loop's layout: all members, rows (w, l, l-)
            x3, c3 = torch.cat([x2, xt_l], 1), torch.cat([c2, c_neg], 1)
            return self.wl(self.params, x3, t.repeat(1, 3), c3).split(B, dim=1)
        if self.wl.members:
            both = self.wl(self.params, x2, t2, c2)
            r_w, r_l = _scatter_members(both, self.wl.members, M).split(B, dim=1)
        if self.neg.members:
            r_l_neg = self.neg(self.params, xt_l, t, c_neg)
            r_l_neg = _scatter_members(r_l_neg, self.neg.members, M)
        return r_w, r_l, r_l_neg

    def update(self, step: int, policy: Params, probes: _Probes, log: FinetuneLog) -> None:
        """After optimizer step ``step``: copy policy -> reference for the members whose rule
        says so, log their divergence and freeze them once it is above their delta."""
        due = [m for m in range(self.M) if self.rules[m].copy_due(step, self.frozen[m])]
        if not due:
            return
        with torch.no_grad():
            for k in self.params:
                self.params[k][due] = policy[k][due]
            d_ref = probes.predict(select(self.params, due), due)
        self.wl.invalidate(due)
        self.neg.invalidate(due)
        log.record_copies(step, due, d_ref, probes.init, self.rules, self.frozen)


class _Policy:
    """The policy's blocks of a :class:`StackedNet`: members that read the loser rows
    ``[0, n_wl)`` run on ``(x_t^w, c), (x_t^l, c)``, the others (sft) on ``(x_t^w, c)``."""

    def __init__(self, net: StackedNet, specs, split: bool, B: int):
        M = len(specs)
        n_wl = sum(s.preference for s in specs) if split else M
        self.B = B
        self.blocks = [(net.block(lo, hi), slice(lo, hi), n)
                       for lo, hi, n in ((0, n_wl, 2 * B), (n_wl, M, B)) if hi > lo]  # fmt: skip

    def forward(self, x2: Tensor, t2: Tensor, c2: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """``(outs, p_w, p_l)``: each block's output (leaves: autograd runs through the losses
        only), the winner and loser predictions of every member (zeros where not run)."""
        B = self.B
        outs = [
            block.forward(*(z[members, :n].contiguous() for z in (x2, t2, c2))).requires_grad_()
            for block, members, n in self.blocks
        ]
        p_w = torch.cat([o[:, :B] for o in outs])
        p_l = torch.cat([o[:, B:] if o.shape[1] > B else torch.zeros_like(o) for o in outs])
        return outs, p_w, p_l

    def backward(self, grads: tuple[Tensor, ...]) -> None:
        for (block, _, _), g_out in zip(self.blocks, grads, strict=True):
            block.backward(g_out)


def _draw_step(runs, pairs, gens, B: int, T: int) -> tuple[list[Tensor], Tensor, Tensor]:
    """One step's randomness, each member from its own generator in a fixed order: batch
    indices, timesteps, noise -- ``(idx per member, t (M, B), eps (M, B, 2))``."""
    idx, ts, eps = [], [], []
    for r, p, g in zip(runs, pairs, gens, strict=True):
        idx.append(torch.randint(0, len(p.c), (B,), generator=g))
        ts.append(sample_timesteps(r.strategy.timestep_sampler, B, T, g))
        eps.append(torch.randn(B, 2, generator=g))
    return idx, torch.stack(ts), torch.stack(eps)


def finetune(
    setup: ToySetup,
    ft: FinetuneConfig,
    runs: list[Run],
    refs: dict[int, Params],
    progress: Callable[[int], None] | None = None,
) -> tuple[Params, FinetuneLog]:
    """Fine-tune one member per run from its seed's reference; returns stacked params.

    A step: the policy's forward (:class:`toy2d.model.StackedNet`), the reference's
    (:class:`toy2d.model.FrozenNet`), one :func:`minddspo.methods.method_loss` call per
    loss group, autograd through the losses only, the policy's backward, one Adam step.
    One gather per data tensor per step; the reference runs only on the rows a member's
    loss reads: none for ``sft``, ``(x_t^w, c), (x_t^l, c)`` for all others and
    ``(x_t^l, c-)`` for the CPP methods only, with its layer-1 table built once while the
    reference is frozen.
    """
    if any(r.method == "ref" for r in runs):
        raise ValueError("'ref' is not fine-tuned")
    # members whose loss reads the loser rows first, the others (sft) last, and the members
    # of a loss group next to each other: each policy block and each group is then a slice,
    # not a gather (members are independent, so the order changes no number)
    order = sorted(range(len(runs)), key=_member_order(runs))
    if order != list(range(len(runs))):
        params, log = finetune(setup, ft, [runs[m] for m in order], refs, progress)
        back = sorted(range(len(order)), key=order.__getitem__)
        return {k: v[back] for k, v in params.items()}, log.select(back)
    sched, T, mlp = setup.schedule.build(), setup.schedule.num_train_timesteps, setup.mlp
    snr = sched.snr()
    M, B = len(runs), ft.batch
    init = {k: torch.cat([refs[r.seed][k] for r in runs]) for k in refs[runs[0].seed]}
    net = StackedNet(init, torch.tensor([ft.lr_for(r.beta) for r in runs]), mlp)
    noiser = _Noiser(sched)
    pairs = _preference_pairs(setup, ft, runs, refs)
    gens = [generator("finetune", *r.key()) for r in runs]
    src = _Rows(pairs)
    XW, XL = src.cat(lambda p: p.x_w), src.cat(lambda p: p.x_l)
    C, CN = src.cat(lambda p: p.c), src.cat(lambda p: p.c_neg)
    # ATen multiplies matrices of < 400 multiply-adds with its own loop instead of BLAS, and
    # the two round differently; evaluating fewer rows than an autograd loop's 3B is exact
    # only when no product crosses that line (always at the toy's sizes, B=128, H=64)
    split = 2 * mlp.hidden * B >= 400
    reference = _Reference(init, runs, split, mlp)
    policy = _Policy(net, [method_spec(r.method) for r in runs], split, B)
    probes = _Probes(runs, pairs, ft.n_probe, sched, init, mlp)

    log = FinetuneLog([[] for _ in runs], [None] * M, [[] for _ in runs], [0.0] * M, [0.0] * M)
    groups = loss_groups(runs, ft, B)
    tail = max(1, ft.steps // 10)
    loss_acc, iacc_acc = torch.zeros(M), torch.zeros(M)
    for step in range(1, ft.steps + 1):
        idx, t, eps = _draw_step(runs, pairs, gens, B, T)
        rows = src.rows(idx)
        x_w, x_l = src.take(XW, rows, M), src.take(XL, rows, M)
        c, c_neg = src.take(C, rows, M), src.take(CN, rows, M)
        xt_w, xt_l = noiser(t, x_w, x_l, eps=eps)  # winner and loser share t and eps
        x2, t2, c2 = torch.cat([xt_w, xt_l], 1), t.repeat(1, 2), torch.cat([c, c], 1)
        r_w, r_l, r_l_neg = reference.forward(x2, t2, c2, xt_l, t, c_neg)
        outs, p_w, p_l = policy.forward(x2, t2, c2)
        total = group_losses(
            groups, ft, (p_w, p_l, r_w, r_l, r_l_neg), eps, t, T, snr,
            (loss_acc, iacc_acc) if step > ft.steps - tail else None, tail,
        )  # fmt: skip
        policy.backward(torch.autograd.grad(total, outs))
        net.step()
        reference.update(step, net.params, probes, log)
        if progress:
            progress(1)
    log.final_loss = loss_acc.tolist()
    log.final_implicit_acc = iacc_acc.tolist()
    return net.detached_copy(), log


# ------------------------------------------------------------------- sampling


@torch.no_grad()
def denoise(
    setup: ToySetup,
    params: Params,
    x: Tensor,
    c: Tensor,
    gens: list[torch.Generator],
    sampler: str = "ddim",
    ddim_steps: int = 50,
) -> Tensor:
    """Run the reverse process from noise ``x (M, n, 2)`` with classes ``c (M, n)``.

    DDIM (eta = 0, trailing spacing, so it starts at the noisiest step) or DDPM ancestral
    over all T steps, both from :mod:`minddspo.sampling`; DDPM noise from ``gens[m]``.
    At most :data:`SAMPLE_ROWS` rows run at a time (whole members).
    """
    sched, T, mlp = setup.schedule.build(), setup.schedule.num_train_timesteps, setup.mlp
    M, n = c.shape
    per_call = max(1, SAMPLE_ROWS // n)
    if M > per_call:  # members are independent: the same numbers, chunk by chunk
        return torch.cat(
            [
                denoise(setup, select(params, slice(i, i + per_call)), x[i : i + per_call],
                        c[i : i + per_call], gens[i : i + per_call], sampler, ddim_steps)
                for i in range(0, M, per_call)
            ]
        )  # fmt: skip
    eps = step_denoiser(params, c, mlp)  # t (M,): one step for all members

    if sampler == "ddim":
        return ddim_sample(
            eps,
            x,
            sched,
            min(ddim_steps, T),
            spacing="trailing",
            steps_offset=0,
            set_alpha_to_one=True,
            prev_timestep="next",
        )
    if sampler == "ddpm":
        # member m's step noise from its own generator, members in order
        def member_noise(t: int, t_prev: int) -> Tensor:
            return torch.stack([torch.randn(n, 2, generator=g) for g in gens])

        return ddpm_sample(eps, x, sched, None, noise_sampler=member_noise)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def sample(
    setup: ToySetup,
    params: Params,
    seeds: list[int],
    n_per_class: int,
    sampler: str = "ddim",
    ddim_steps: int = 50,
) -> tuple[Tensor, Tensor]:
    """Samples ``(M, K n, 2)`` and labels ``(K n,)``; member m's noise comes from its seed.

    The noise depends on the seed only (not on the method), so all runs of a seed are
    compared on common random numbers.
    """
    labels = class_labels(setup.toy, n_per_class)
    gens = [generator("sample", s, sampler) for s in seeds]
    x = torch.stack([torch.randn(len(labels), 2, generator=g) for g in gens])  # (M, n, 2)
    c = labels.expand(len(seeds), len(labels))
    return denoise(setup, params, x, c, gens, sampler, ddim_steps), labels


def make_preference_pairs(
    setup: ToySetup, source: str, n_pairs: int, seed: int, ref: Params
) -> Pairs:
    """``N`` pairs per class: winner of class ``c``, loser of a neighbouring class ``c-``.

    ``gt``: both drawn from the ground truth (:func:`toy2d.data.make_pairs`).
    ``ref``: both generated by the seed's reference model (DDIM, 50 steps) -- ``x0_w`` from
    condition ``c`` and ``x0_l`` from ``c-`` -- as the paper's pipeline generates the two
    images from a prompt and its perturbed prompt with the model being tuned.
    """
    if source == "gt":
        return make_pairs(setup.toy, n_pairs, seed)
    if source != "ref":
        raise ValueError(f"pair source must be one of {PAIR_SOURCES}, got {source!r}")
    g = generator("ref-pairs", seed, n_pairs, cache_key(setup, seed))
    c = class_labels(setup.toy, n_pairs)
    c_neg = neighbour(c, setup.toy, g)
    z = torch.randn(1, 2 * len(c), 2, generator=g)
    x = denoise(setup, ref, z, torch.cat([c, c_neg]).unsqueeze(0), [g])[0]
    return Pairs(x_w=x[: len(c)], x_l=x[len(c) :], c=c, c_neg=c_neg)
