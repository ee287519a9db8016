"""The fast toy path (hand-written backward, fused matmuls, reused buffers, flat Adam, cached
tables) computes what the autograd oracle (tests/toy_oracle.py) computes.

Two kinds of assertion. Where the same ops run in the same order (a fast variant against
another, a run against itself, flat vs stacked Adam on the same gradients, thread counts,
chunks): bit for bit. Fast path against the autograd oracle: different kernels, so equal
to a few float32 ulps (``toy_helpers.ONE_PASS_ULPS`` / ``FINETUNE_ULPS``; bit for bit only
on some CPUs). ``tests/test_dispatch_levels.py`` reruns this file at forced dispatch levels."""

import numpy as np
import pytest
import torch
import toy_oracle as oracle
from toy_helpers import (
    FINETUNE_ULPS,
    ONE_PASS_ULPS,
    TINY,
    assert_close_f32,
    max_ulps,
    printed_close,
)
from toy_oracle import KernelMLP, StackedAdam, forward, param_names

import toy2d.sweep as sweep_cli
import toy2d.train as tt
from toy2d.bench import MatmulLog, bmm_rate
from toy2d.model import (
    FlatAdam,
    FlatParams,
    MLPConfig,
    Workspace,
    backward_train,
    forward_fast,
    forward_train,
    init_params,
    joint_table,
    step_denoiser,
)
from toy2d.sweep import run_name
from toy2d.train import FinetuneConfig, Run, Strategy

CFG = TINY.mlp  # hidden 16, temb 8, cemb 8, T 20, K 8
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes; a busy 2-core machine


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))


def _inputs(cfg: MLPConfig, M: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = init_params(cfg, [torch.Generator().manual_seed(seed + m) for m in range(M)])
    x = torch.randn(M, N, 2, generator=g)
    t = torch.randint(0, cfg.num_train_timesteps, (M, N), generator=g)
    c = torch.randint(0, cfg.num_classes, (M, N), generator=g)
    return params, x, t, c


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fast_forwards_equal_forward():
    """Every fast forward is one function bit for bit (the same fused kernels), and the
    autograd forward's function to a few ulps."""
    params, x, t, c = _inputs(CFG, 3, 37)
    want = forward(params, x, t, c, CFG)
    ws = Workspace()
    fast = forward_fast(params, x, t, c, CFG)
    assert_close_f32(fast, want, ONE_PASS_ULPS)
    assert torch.equal(forward_fast(params, x, t, c, CFG, joint_table(params, CFG), ws), fast)
    assert torch.equal(forward_fast(params, x, t, c, CFG, ws=ws), fast)  # buffers reused
    assert torch.equal(forward_train(params, x, t, c, CFG, ws)[0], fast)
    # the sampler's denoiser: one timestep per member, fixed classes
    ts = torch.tensor([0, 7, 19])
    eps = step_denoiser(params, c, CFG)(x, ts)
    per_row = ts[:, None].expand(3, 37)
    assert torch.equal(eps, forward_fast(params, x, per_row, c, CFG))
    assert_close_f32(eps, forward(params, x, per_row, c, CFG), ONE_PASS_ULPS)
    assert max_ulps(eps, forward(params, x, t, c, CFG)) > 1e4  # sees which timesteps


@pytest.mark.parametrize("M, N", [(1, 5), (3, 37)])
def test_backward_train_equals_autograd(M, N):
    params, x, t, c = _inputs(CFG, M, N, seed=M)
    g_out = torch.randn(M, N, 2, generator=torch.Generator().manual_seed(9))
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out = forward(leaves, x, t, c, CFG)
    want = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), g_out), strict=True))
    ws = Workspace()
    pred, saved = forward_train(params, x, t, c, CFG, ws)
    assert_close_f32(pred, out.detach(), ONE_PASS_ULPS)
    first = {k: v.clone() for k, v in backward_train(params, saved, g_out, CFG).items()}
    assert_close_f32(first, want, ONE_PASS_ULPS)
    pred, saved = forward_train(params, x, t, c, CFG, ws)  # reuses every buffer
    assert _equal(backward_train(params, saved, g_out, CFG), first)
    fp = FlatParams(params)
    pred, saved = forward_train(fp.params, x, t, c, CFG, ws)
    backward_train(fp.params, saved, g_out, CFG, fp.grads)  # into the flat buffer
    assert _equal(fp.grads, first)
    other = backward_train(params, saved, -g_out, CFG)
    assert all(max_ulps(other[k], want[k]) > 1e4 for k in want)  # sees the output gradient


def test_stacked_mlp_gradcheck_float64():
    cfg = MLPConfig(num_classes=3, hidden=4, temb=4, cemb=2, num_train_timesteps=5)
    params, x, t, c = _inputs(cfg, 2, 4)
    values = tuple(params[k].double().requires_grad_(True) for k in param_names(cfg))
    x = x.double()
    assert torch.autograd.gradcheck(
        lambda *v: KernelMLP.apply(x, t, c, cfg, *v), values, eps=1e-6, atol=1e-6
    )


def test_flat_adam_equals_stacked_adam_bitwise():
    """On the same gradients the flat and the per-tensor Adam run the same elementwise ops
    in the same order on every element: bit for bit (4 steps, a member's lr each)."""
    params, x, t, c = _inputs(CFG, 3, 16)
    lr = torch.tensor([1e-3, 3e-2, 5e-4])
    plain = {k: v.clone() for k, v in params.items()}
    opt_a, fp = StackedAdam(plain, lr), FlatParams(params)
    opt_b = FlatAdam(fp, lr)
    for _ in range(4):
        pred, saved = forward_train(fp.params, x, t, c, CFG)
        backward_train(fp.params, saved, 2 * pred, CFG, out=fp.grads)  # d sum(p^2) / dp
        opt_a.step({k: v.clone() for k, v in fp.grads.items()})
        opt_b.step()
    assert _equal(plain, fp.params)
    assert not _equal(plain, params)


def test_fast_adam_steps_equal_autograd_adam():
    """Gradients by autograd + StackedAdam vs by hand + FlatAdam, 4 steps: a few ulps."""
    params, x, t, c = _inputs(CFG, 3, 16)
    lr = torch.tensor([1e-3, 3e-2, 5e-4])
    plain = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt_a, fp = StackedAdam(plain, lr), FlatParams(params)
    opt_b = FlatAdam(fp, lr)
    for _ in range(4):
        la = forward(plain, x, t, c, CFG).pow(2).sum()
        opt_a.step(dict(zip(plain, torch.autograd.grad(la, list(plain.values())), strict=True)))
        pred, saved = forward_train(fp.params, x, t, c, CFG)
        backward_train(fp.params, saved, 2 * pred, CFG, out=fp.grads)
        opt_b.step()
    assert_close_f32(fp.params, {k: v.detach() for k, v in plain.items()}, FINETUNE_ULPS)


RUNS = [
    Run("dpo", 3, 400.0, 0),
    Run("ddspo", 5, 200.0, 1),
    Run("dspo", 3, 800.0, 0),
    Run("sft", 2, 400.0, 1),
    Run("dspo_cpp", 2, 400.0, 0, Strategy(timestep_sampler="geometric", timestep_weight="lambda")),
    Run("ddspo", 3, 400.0, 1, Strategy(ref_update="periodic", ref_tau=2, timestep_weight="linear")),
    Run("dspo", 3, 400.0, 1, Strategy(ref_update="periodic", ref_tau=3), beta_out=0.1),
]


@pytest.mark.parametrize(
    "runs",
    [RUNS, [RUNS[1], RUNS[5]], [RUNS[3]], [RUNS[0]]],
    ids=["all-methods", "cpp-only", "sft-only", "dpo-only"],
)
@pytest.mark.parametrize("batch", [16, 8])  # 8: below ATen's small-matrix line, 3B rows
def test_finetune_equals_autograd_path(runs, batch):
    refs = tt.load_references(TINY, [0, 1])
    ft = FinetuneConfig(steps=7, batch=batch, n_probe=16, lr=3e-3)
    new, nlog = tt.finetune(TINY, ft, runs, refs)
    old, olog = oracle.finetune(TINY, ft, runs, refs)
    assert_close_f32(new, old, FINETUNE_ULPS)
    # the fine-tune moved every tensor by far more than the tolerance
    init = {k: torch.cat([refs[r.seed][k] for r in runs]) for k in new}
    assert min(max_ulps(init[k], old[k]) for k in new) > 100 * FINETUNE_ULPS
    # copies and freezes exactly; losses and divergences to float rounding: a loss's logit
    # is beta (up to 800) times a difference of squared errors, which scales an ulp of the
    # errors up (measured <= 2.2e-5 relative); implicit accuracies to one pair for a frozen
    # reference (a logit within rounding of 0 may flip on another CPU) -- right after a copy
    # policy == reference, every logit is rounding noise around 0, so periodic runs are skipped
    assert nlog.copy_steps == olog.copy_steps and nlog.freeze_step == olog.freeze_step
    assert nlog.final_loss == pytest.approx(olog.final_loss, rel=1e-4)
    for r, a, b in zip(runs, nlog.final_implicit_acc, olog.final_implicit_acc, strict=True):
        assert abs(a - b) <= 1 / batch + 1e-6 or r.strategy.ref_update == "periodic"
    for a, b in zip(nlog.divergences, olog.divergences, strict=True):
        assert [s for s, _ in a] == [s for s, _ in b]
        assert [d for _, d in a] == pytest.approx([d for _, d in b], rel=1e-4)


def test_references_equal_autograd_path():
    new = tt.train_references(TINY, [0, 2])
    assert_close_f32(new, oracle.train_references(TINY, [0, 2]), ONE_PASS_ULPS)
    assert _equal(tt.train_references(TINY, [0, 2]), new)  # deterministic


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_and_pairs_equal_old_path(sampler):
    params = init_params(CFG, [torch.Generator().manual_seed(s) for s in range(3)])
    new, labels = tt.sample(TINY, params, [0, 1, 0], 3, sampler, ddim_steps=7)
    old, labels_old = oracle.sample(TINY, params, [0, 1, 0], 3, sampler, ddim_steps=7)
    assert_close_f32(new, old, ONE_PASS_ULPS)
    assert torch.equal(labels, labels_old)
    assert max_ulps(new[[1, 0, 2]], old) > 1e4  # members stay in order
    one = {k: v[:1] for k, v in params.items()}
    a = tt.make_preference_pairs(TINY, "ref", 4, 0, one)
    b = oracle.make_preference_pairs(TINY, "ref", 4, 0, one)
    assert torch.equal(a.c, b.c) and torch.equal(a.c_neg, b.c_neg)
    assert_close_f32(a.x_w, b.x_w, ONE_PASS_ULPS)
    assert_close_f32(a.x_l, b.x_l, ONE_PASS_ULPS)
    assert max_ulps(a.x_w, b.x_l) > 1e4


def test_sweep_results_equal_old_path(monkeypatch):
    """The sweep's CSV rows (every metric, loss, accuracy, divergence) on a reduced grid, to
    their printed precision plus float rounding; the samples to a few ulps."""

    def rows():
        ft = FinetuneConfig(steps=4, batch=8, n_probe=8)
        args = (["ref", "sft", "dpo", "dspo", "dspo_cpp", "ddspo"], [2, 3], [200.0, 400.0])
        strategies = [Strategy(), Strategy(ref_update="periodic", ref_tau=2)]
        out, samples, _ = sweep_cli.run_sweep(
            TINY, ft, *args, [0, 1], strategies, 6, "ddim", progress=False
        )
        return out, samples

    new_rows, new_samples = rows()
    monkeypatch.setattr(sweep_cli, "finetune", oracle.finetune)
    with oracle.autograd_sampler():
        old_rows, old_samples = rows()
    assert [r.keys() for r in new_rows] == [r.keys() for r in old_rows]
    for a, b in zip(new_rows, old_rows, strict=True):
        bad = {k: (a[k], b[k]) for k in a if not printed_close(str(a[k]), str(b[k]))}
        assert not bad, (run_name(a), bad)
    assert new_samples.keys() == old_samples.keys()
    for k in new_samples:
        got, want = torch.from_numpy(new_samples[k]), torch.from_numpy(old_samples[k])
        assert_close_f32(got, want, FINETUNE_ULPS)


def test_matmul_log_counts_products():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with MatmulLog() as log:
        torch.bmm(a, b)
        torch.baddbmm(torch.zeros(2, 1, 5), a, b)
        torch.matmul(torch.randn(3, 4), b)  # lowers to bmm/mm
        a.sum()
    assert log.shapes[:2] == [(2, 3, 4, 5), (2, 3, 4, 5)] and len(log.shapes) == 3
    assert log.flops == 3 * 2 * 2 * 3 * 4 * 5
    assert bmm_rate(log.shapes, repeats=1) > 0


def test_backward_train_reproducible_with_threads():
    """torch's parallel index_put_(accumulate=True) adds colliding rows in a varying order;
    the layer-1 table gradients go through index_add_, which adds them in index order at
    any thread count, so two threads give the one-thread result, every time (full-size
    widths, where the kernels do go parallel)."""
    cfg, threads = MLPConfig(), torch.get_num_threads()
    params, x, t, c = _inputs(cfg, 81, 128)
    g = torch.randn(81, 128, 2, generator=torch.Generator().manual_seed(3))
    try:
        torch.set_num_threads(1)
        want = backward_train(params, forward_train(params, x, t, c, cfg)[1], g, cfg)
        torch.set_num_threads(2)
        for _ in range(3):
            got = backward_train(params, forward_train(params, x, t, c, cfg)[1], g, cfg)
            assert _equal(got, want)
            assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)


def test_accumulate_rows_is_serial_index_put():
    """index_add_ adds the rows autograd's index_put_(accumulate=True) adds, in the same
    (index) order: equal bit for bit to the one-thread index_put_, with colliding rows of
    very different magnitudes (where the order shows)."""
    from toy2d.model import _accumulate_rows

    g = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 7, (4000,), generator=g)
    src = torch.randn(4000, 64, generator=g) * torch.rand(4000, 1, generator=g).pow(8) * 1e6
    want = torch.zeros(7, 64).index_put_((rows,), src, accumulate=True)
    got = _accumulate_rows(torch.zeros(7, 64), rows, src)
    assert torch.equal(got, want)
    sums = torch.zeros(7, 64, dtype=torch.float64).index_add_(0, rows, src.double())
    assert not torch.equal(got.double(), sums)  # float32 order matters here: the test can see it


def test_seed_chunks():
    assert sweep_cli.seed_chunks([0, 1, 2], 27, 160) == [[0, 1, 2]]
    assert sweep_cli.seed_chunks([0, 1, 2], 45, 100) == [[0, 1], [2]]
    assert sweep_cli.seed_chunks([3, 4], 144, 100) == [[3], [4]]  # a seed is never split
    assert sweep_cli.seed_chunks([], 10, 100) == []


@pytest.mark.parametrize("batch", [32, 8])
def test_sweep_chunking_does_not_change_a_number(batch):
    """Seeds batched together or one by one: the same rows and samples -- bit for bit when
    the batch is a multiple of 32 (every member's loss rows then sit in the same lanes of
    torch's vectorised exp/log kernels, whatever the group size), to float rounding
    otherwise (a member's rows can move between a vector block and the scalar tail)."""
    ft = FinetuneConfig(steps=4, batch=batch, n_probe=8)
    args = (["ref", "dpo", "dspo_cpp", "ddspo"], [2, 3], [200.0, 400.0])

    def rows(max_members):
        return sweep_cli.run_sweep(
            TINY, ft, *args, [0, 1, 2], [Strategy()], 6, "ddim", progress=False,
            max_members=max_members,
        )[:2]  # fmt: skip

    (a, sa), (b, sb) = rows(1000), rows(1)
    assert [r["method"] for r in a] == [r["method"] for r in b] and sa.keys() == sb.keys()
    if batch % 32 == 0:
        assert a == b
        assert all((sa[k] == sb[k]).all() for k in sa)
    else:
        assert all(np.allclose(sa[k], sb[k], rtol=0, atol=1e-5) for k in sa)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_in_member_chunks_is_exact(monkeypatch, sampler):
    """The fast sampler runs at most SAMPLE_ROWS rows per call (whole members): the same
    samples, bit for bit, as one call over every member (each draws from its own seed)."""
    params = init_params(TINY.mlp, [torch.Generator().manual_seed(i) for i in range(5)])
    seeds = [0, 1, 1, 2, 0]
    whole, labels = tt.sample(TINY, params, seeds, 6, sampler, ddim_steps=5)
    monkeypatch.setattr(tt, "SAMPLE_ROWS", 2 * len(labels))  # chunks of 2 members
    calls = []
    real = tt.step_denoiser
    monkeypatch.setattr(
        tt, "step_denoiser", lambda p, c, cfg: calls.append(len(c)) or real(p, c, cfg)
    )
    chunked, _ = tt.sample(TINY, params, seeds, 6, sampler, ddim_steps=5)
    assert calls == [2, 2, 1]
    assert torch.equal(chunked, whole)


def test_bench_reports_the_largest_difference_not_a_claim():
    """``toy2d.bench --baseline`` prints how far this checkout's results are from the
    baseline's (ulps of the tensor's magnitude, the worst tensor named) and whether they are
    bitwise equal, as information."""
    from toy2d.bench import compare_line

    a = {"w": torch.tensor([1.0, -4.0, 2.0]), "samples": torch.tensor([[3.0, 0.5]])}
    assert "max difference 0.0 float32 ulps" in compare_line(a, dict(a))
    assert "bitwise equal: yes" in compare_line(a, dict(a))
    b = {**a, "w": torch.tensor([1.0, -4.0, 2.0]).nextafter(torch.tensor(9.0))}  # 1 ulp up
    line = compare_line(a, b)
    # each moves one ulp towards 9: 1 by eps, -4 and 2 by 2 eps (spacing in [2, 4)); of
    # max |w| = 4 that is 2 eps / 4 eps = 0.5 ulps of the magnitude
    assert "max difference 0.5 float32 ulps of the tensor's magnitude (w)" in line
    assert "bitwise equal: no" in line
