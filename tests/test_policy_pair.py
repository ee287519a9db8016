"""DD-CPP, the data-driven policy pair (DDSPO paper Sec. 3.2, official train_lora_target):
sft's loser branch, ``bench/train_policy_pair.py`` in its one-run (joint) and two-run forms,
LoRA outputs as --winner/--loser-policy, and the pair's default beta. Tiny models,
in-process, offline."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import train_policy_pair, train_t2i
from bench.t2i import step
from bench.t2i.config import TrainConfig, UsageError, parse_args, resolve
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.tiny import tiny_backbone
from bench.t2i.weights import LORA_FILE, LORA_STATE, add_lora
from tests.t2i_helpers import one_line, snapshot

SIDES = ("winner", "loser")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:4], out, steps=2, progress=False)
    return out


@pytest.fixture(scope="module")
def pair_run(data, tmp_path_factory) -> Path:
    """``train_policy_pair --tiny --max-steps 2`` (runs in this process)."""
    out = tmp_path_factory.mktemp("pair")
    argv = ["--tiny", "--data", str(data), "--max-steps", "2", "--out", str(out)]
    argv += ["--no-progress", "--batch-size", "2", "--pairs-per-step", "2"]
    assert train_policy_pair.main(argv, run=train_t2i.main) == 0
    return out


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 16, 16)
    x0_w, x0_l = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise_w, noise_l = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([100, 700])
    return x0_w, x0_l, t, noise_w, noise_l


@pytest.mark.parametrize("branch", ["winner", "loser", "loser_neg"])
def test_sft_branch_regresses_its_side_with_its_prompt(spy_method_loss, branch):
    bb = tiny_backbone("sd")
    policy = bb.denoiser.eval()
    cfg = resolve(TrainConfig(tiny=True, method="sft", sft_branch=branch))
    assert cfg.uses_neg == (branch == "loser_neg")  # the trainer encodes c- only when needed
    x0_w, x0_l, t, n_w, n_l = _inputs(bb)
    conds = step.encode_step(
        bb, ["a red cube", "two cats"], ["red", "cats"], need_neg=cfg.uses_neg, need_uncond=False
    )
    c, c_neg, _ = conds
    calls = spy_method_loss(step)
    loss, _ = step.compute_loss(
        step.loss_spec(cfg, bb), bb, policy, None, x0_w, x0_l, conds, t, n_w, n_l
    )
    ((method, kw, out),) = calls
    assert method == "sft" and torch.equal(loss, out.loss)
    with torch.no_grad():
        x_l = bb.noise(x0_l, n_l, t)
        if branch == "loser":  # the official losing model: loser images with c
            want_pred, want_target = bb.forward(policy, x_l, t, c), bb.target(x0_l, n_l, t)
        elif branch == "loser_neg":
            want_pred, want_target = bb.forward(policy, x_l, t, c_neg), bb.target(x0_l, n_l, t)
        else:
            x_w = bb.noise(x0_w, n_w, t)
            want_pred, want_target = bb.forward(policy, x_w, t, c), bb.target(x0_w, n_w, t)
    torch.testing.assert_close(kw["target_w"], want_target, rtol=0, atol=0)
    torch.testing.assert_close(kw["pred_w"].detach(), want_pred, rtol=1e-5, atol=1e-6)
    if branch == "loser_neg":  # c- really is another conditioning than c
        assert not torch.allclose(want_pred, bb.forward(policy, x_l, t, c))


def test_sft_branch_validation():
    assert parse_args(["--tiny", "--method", "sft"]).sft_branch == "winner"
    with pytest.raises(UsageError, match="unknown sft branch"):
        parse_args(["--tiny", "--method", "sft", "--sft-branch", "both"])
    with pytest.raises(UsageError, match="--method sft only"):
        parse_args(["--tiny", "--method", "ddspo", "--sft-branch", "loser"])


def test_default_beta_with_a_policy_pair_is_8000():
    pair = ["--winner-policy", "w", "--loser-policy", "l"]
    ddspo = parse_args(["--tiny", "--method", "ddspo", *pair])
    assert ddspo.beta == 8000 and ddspo.lr == pytest.approx(8000 / 2.048e8)
    assert parse_args(["--tiny", "--method", "ddspo"]).beta == 16000  # TF-CPP: unchanged
    cpp = parse_args(["--tiny", "--method", "dspo_cpp", *pair])
    assert (cpp.beta, cpp.beta_logit) == (0.001, 8000)  # outside beta unchanged, logit 8000
    assert parse_args(["--tiny", "--method", "ddspo", "--beta", "123", *pair]).beta == 123
    sana = parse_args(["--tiny", "--backbone", "sana", "--method", "ddspo", *pair])
    assert sana.beta == 2000  # SANA keeps its own scale (the official pair recipe is SD/SDXL)


def test_policy_pair_command_plan_and_errors(capsys):
    ((side, args),) = train_policy_pair.plan(["--tiny", "--out", "o", "--resume", "latest"])[1]
    cfg = parse_args(args)  # the default: one run of both adapters into OUT
    assert (side, cfg.method, cfg.sft_branch, cfg.out) == ("winner and loser", "sft", "pair", "o")
    assert (cfg.lora, cfg.lr, cfg.max_steps, cfg.lora_init) == (4, 1e-4, 300, "kaiming")
    assert (cfg.resume, cfg.independent_noise, cfg.max_grad_norm) == ("latest", True, 1.0)
    _, runs = train_policy_pair.plan(["--tiny", "--out", "o", "--no-joint"])
    (w_side, w_args), (l_side, l_args) = runs
    assert (w_side, l_side) == ("winner", "loser")
    for args, side in ((w_args, "winner"), (l_args, "loser")):
        cfg = parse_args(args)  # every forwarded flag is the trainer's
        assert (cfg.method, cfg.sft_branch, cfg.out) == ("sft", side, str(Path("o") / side))
        assert (cfg.lora, cfg.lr, cfg.max_steps) == (4, 1e-4, 300)  # the official pair recipe
        assert (cfg.lora_init, cfg.batch_size, cfg.grad_accum) == ("kaiming", 8, 1)  # --tiny
    assert parse_args(l_args).data == str(Path("o") / "winner" / "data")  # same demo pairs
    for form in (["--joint"], ["--no-joint"]):
        argv = ["--tiny", "--batch-size", "4", "--nproc", "2", *form]
        _, runs = train_policy_pair.plan(argv)
        assert (parse_args(runs[0][1]).batch_size, parse_args(runs[0][1]).grad_accum) == (4, 1)
        _, runs = train_policy_pair.plan([*argv, "--pairs-per-step", "2048"])
        assert (parse_args(runs[0][1]).batch_size, parse_args(runs[0][1]).grad_accum) == (4, 256)
        argv = ["--pretrained", "m", "--batch-size", "4", "--nproc", "2", *form]
        args = train_policy_pair.plan(argv)[1][0][1]  # a real model: 2048 pairs per step
        assert args[args.index("--batch-size") + 1 :][:3] == ["4", "--grad-accum", "256"]
    for argv, culprit in (
        (["--tiny", "--method", "dpo"], "--method is set by this command"),
        (["--tiny", "--grad-accum", "2"], "--grad-accum is set by this command"),
        (["--tiny", "--pairs-per-step", "100"], "--pairs-per-step 100 is not a multiple"),
        (["--tiny", "--lora", "0"], "--lora 0 (two full fine-tunes) needs --no-joint"),
        (["--tiny", "--no-joint", "--resume", "latest"], "--resume applies to the one-run"),
    ):
        assert train_policy_pair.main(argv) == 2
        err = capsys.readouterr().err
        assert culprit in err and len(err.strip().splitlines()) == 1


def test_pair_lora_init_is_peft_default_as_the_official_pair():
    """``--lora-init kaiming`` draws exactly what the official pair's
    ``get_peft_model(unet, LoraConfig(r=4, lora_alpha=4, target_modules=[to_q, to_k, to_v,
    to_out.0]))`` draws from the same seed (peft's default: Kaiming-uniform A, B = 0);
    ``gaussian`` (the main trainer's default) is A ~ N(0, 1/r^2)."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = tiny_backbone("sd").denoiser
    torch.manual_seed(0)
    official = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"], lora_dropout=0.0
    ))  # fmt: skip
    want = {n.replace("base_model.model.", ""): p for n, p in official.named_parameters()
            if "lora_" in n}  # fmt: skip
    ours = {}
    for init in ("kaiming", "gaussian"):
        net = copy.deepcopy(base)
        torch.manual_seed(0)
        add_lora(net, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"], init=init)
        ours[init] = {n: p for n, p in net.named_parameters() if "lora_" in n}
    assert want.keys() == ours["kaiming"].keys() and len(want) > 0
    for n, p in want.items():
        assert torch.equal(ours["kaiming"][n], p), n
    a = torch.cat([p.flatten() for n, p in ours["gaussian"].items() if "lora_A" in n])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)  # peft's "gaussian": std 1/r
    assert all(not p.any() for n, p in ours["gaussian"].items() if "lora_B" in n)
    with pytest.raises(ValueError, match="--lora-init"):
        add_lora(copy.deepcopy(base), 4, 4.0, init="uniform")


@pytest.mark.parametrize(
    "flags, msg",
    [(["--lora", "-1"], "--lora must be >= 0, got -1"),
     (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
     (["--nproc", "0"], "--nproc must be >= 1, got 0")],
)  # fmt: skip
def test_policy_pair_range_errors_name_the_flag(capsys, tmp_path, flags, msg):
    assert train_policy_pair.main(["--tiny", "--out", str(tmp_path / "o"), *flags]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    assert not (tmp_path / "o").exists()


def test_dd_cpp_chain_end_to_end(data, pair_run, tmp_path, capsys, monkeypatch):
    win, lose = pair_run / "winner" / "final", pair_run / "loser" / "final"
    assert (win / LORA_FILE).is_file() and (lose / LORA_FILE).is_file()
    cfg = json.loads((pair_run / "config.json").read_text())  # the one run of the pair
    assert (cfg["method"], cfg["sft_branch"], cfg["lora"]) == ("sft", "pair", 4)
    assert sorted(p.name for p in pair_run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "config.json", "loser", "metrics.jsonl", "winner"
    ]  # fmt: skip

    # the pair as the trainer loads it, next to a LoRA policy (whose adapters must not leak in)
    cfg = parse_args(
        ["--tiny", "--method", "ddspo", "--winner-policy", str(win), "--loser-policy", str(lose)]
    )
    bb = tiny_backbone("sd")
    add_lora(bb.denoiser, 4, 0)
    with torch.no_grad():  # a policy that has moved: its LoRA must not end up in the pair
        for n, p in bb.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_()
    f_win, f_lose = train_t2i.load_policy_pair(cfg, bb, torch.device("cpu"), torch.float32)
    assert not any(p.requires_grad for p in [*f_win.parameters(), *f_lose.parameters()])
    assert not f_win.training and not f_lose.training
    base = tiny_backbone("sd")
    x0_w, _, t, noise, _ = _inputs(base)
    x = base.noise(x0_w, noise, t)
    c = base.encode_prompts(["a red cube", "two cats"])
    with torch.no_grad():
        y_base, y_win, y_lose = (base.forward(n, x, t, c) for n in (base.denoiser, f_win, f_lose))
        # loaded the same way bench/sample.py loads a LoRA checkpoint, onto a clean base
        from bench.sample import load_checkpoint

        y_sample = base.forward(load_checkpoint(base, win), x, t, c)
    assert not torch.allclose(y_win, y_base) and not torch.allclose(y_lose, y_base)
    assert not torch.allclose(y_win, y_lose)
    torch.testing.assert_close(y_win, y_sample, rtol=1e-5, atol=1e-6)

    # and the DDSPO run on the pair
    capsys.readouterr()
    out = tmp_path / "ddspo"
    argv = ["--tiny", "--method", "ddspo", "--data", str(data), "--out", str(out)]
    argv += ["--winner-policy", str(win), "--loser-policy", str(lose), "--max-steps", "2"]
    assert train_t2i.main([*argv, "--no-progress", "--batch-size", "2", "--lora", "4"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "end" not in r]
    assert len(steps) == 2 and steps[0]["err_w"] > 0 and steps[0]["loss"] == steps[0]["loss"]
    assert json.loads((out / "config.json").read_text())["beta"] == 8000


def test_policy_pair_prints_the_next_flags(pair_run, capsys):
    # the fixture ran first in this module; re-plan to check the printed line's paths
    calls = []
    assert (
        train_policy_pair.main(
            ["--tiny", "--out", str(pair_run / "again")], run=lambda a: calls.append(a) or 0
        )
        == 0
    )
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == (
        f"--winner-policy {pair_run / 'again' / 'winner' / 'final'} "
        f"--loser-policy {pair_run / 'again' / 'loser' / 'final'}"
    )
    assert [a[a.index("--sft-branch") + 1] for a in calls] == ["pair"]
    calls.clear()
    argv = ["--tiny", "--out", str(pair_run / "again"), "--no-joint"]
    assert train_policy_pair.main(argv, run=lambda a: calls.append(a) or 0) == 0
    assert capsys.readouterr().out.splitlines()[-1] == printed  # the same pair, either form
    assert [a[a.index("--sft-branch") + 1] for a in calls] == ["winner", "loser"]
    rc = train_policy_pair.main(["--tiny", "--out", str(pair_run / "x")], run=lambda a: 3)
    assert rc == 3


def test_a_bad_policy_lora_is_one_usage_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LORA_FILE).write_bytes(b"not safetensors")
    cfg = parse_args(
        ["--tiny", "--method", "ddspo", "--winner-policy", str(bad), "--loser-policy", str(bad)]
    )
    with pytest.raises(UsageError, match="policy"):
        train_t2i.load_policy_pair(cfg, tiny_backbone("sd"), torch.device("cpu"), torch.float32)


# ------------------------------------------------- the one-run (joint) form of the pair


@pytest.fixture(scope="module")
def flow_data(tmp_path_factory):
    """Demo pairs per backbone, built on first use."""
    built = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"pairs-{name}")
            build_pairs(tiny_backbone(name), DEMO_PROMPTS[:4], built[name], steps=2, progress=False)
        return built[name]

    return get


def _pair(data: Path, out: Path, *flags: str, backbone: str = "sd") -> Path:
    argv = ["--tiny", backbone, "--data", str(data), "--out", str(out), "--no-progress"]
    assert train_policy_pair.main([*argv, "--batch-size", "2", *flags], run=train_t2i.main) == 0
    return out


def _adapter(out: Path, side: str) -> dict[str, torch.Tensor]:
    return load_file(out / side / "final" / LORA_STATE)


def _first_record(metrics: Path) -> dict:
    return json.loads(metrics.read_text().splitlines()[0])


@pytest.mark.parametrize("backbone", ["sd", "sdxl", "sd3", "sana", "flux"])
def test_joint_run_takes_the_two_runs_steps_when_no_clip_is_active(
    data, flow_data, tmp_path, backbone
):
    """With the same draws (the two-run form with --independent-noise: one t per pair, its
    own noise per side) and no clipping, one optimizer over both adapters on mse_w + mse_l
    takes, bit for bit, the steps of two runs (AdamW is per-parameter); two steps of two
    accumulated micro-steps each."""
    pairs = data if backbone == "sd" else flow_data(backbone)
    flags = ["--max-steps", "2", "--pairs-per-step", "4", "--max-grad-norm", "0", "--lr", "1e-2"]
    flags += ["--seed", "3"]
    joint = _pair(pairs, tmp_path / "joint", *flags, backbone=backbone)
    two = _pair(pairs, tmp_path / "two", *flags, "--no-joint", "--independent-noise",
                backbone=backbone)  # fmt: skip
    for side in SIDES:
        a, b = _adapter(joint, side), _adapter(two, side)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), side
    w, l_ = _adapter(joint, "winner"), _adapter(joint, "loser")
    assert max((w[k] - l_[k]).abs().max().item() for k in w) > 1e-3  # a swap would show
    recs = [json.loads(x) for x in (joint / "metrics.jsonl").read_text().splitlines()[:2]]
    for i, rec in enumerate(recs):  # each side's loss logged, their sum the loss
        assert rec["loss"] == pytest.approx(rec["loss_winner"] + rec["loss_loser"], rel=1e-6)
        for side in SIDES:
            other = json.loads((two / side / "metrics.jsonl").read_text().splitlines()[i])
            assert rec[f"loss_{side}"] == pytest.approx(other["loss"], rel=1e-6)


def test_joint_clip_is_over_both_adapters(data, tmp_path):
    """One clip over the joint norm: the gradient norm logged is sqrt(|g_w|^2 + |g_l|^2) of
    the two sides' gradients, and BOTH adapters' first steps are the unclipped ones scaled by
    c / that norm, not each by c / its own norm (per-adapter clipping, the two-run form).
    With adam-eps far above every gradient the first AdamW step is linear in the gradient."""
    c = 1e-4
    flags = ["--max-steps", "1", "--lr", "1e3", "--adam-eps", "1e4", "--weight-decay", "0"]
    joint = _pair(data, tmp_path / "joint", *flags, "--max-grad-norm", str(c))
    free = _pair(data, tmp_path / "free", *flags, "--no-joint", "--independent-noise",
                 "--max-grad-norm", "0")  # fmt: skip
    norms = {s: _first_record(free / s / "metrics.jsonl")["grad_norm"] for s in SIDES}
    joint_norm = _first_record(joint / "metrics.jsonl")["grad_norm"]
    assert joint_norm == pytest.approx(math.hypot(*norms.values()), rel=1e-5)
    assert c < min(norms.values())  # the clip is active, per side and jointly
    scale = c / (joint_norm + 1e-6)  # torch's clip_grad_norm_
    for side in SIDES:
        a, b = _adapter(joint, side), _adapter(free, side)
        ups = [k for k in a if "lora_B" in k]  # zero before the step: the step itself
        step_j = torch.cat([a[k].flatten() for k in ups])
        step_free = torch.cat([b[k].flatten() for k in ups])
        moved = step_free.abs() > 0
        assert moved.sum() > 100
        ratio = step_j[moved] / step_free[moved]
        torch.testing.assert_close(ratio, torch.full_like(ratio, scale), rtol=1e-4, atol=0)
        own = c / (norms[side] + 1e-6)  # what clipping this adapter on its own would give
        assert abs(own / scale - 1) > 0.2


def test_joint_run_resumes_bit_exact(data, tmp_path):
    """--resume goes to the one run: 2 steps, then on to 4, equals 4 straight steps (both
    adapters, the optimizer over both, each side's logged loss)."""
    flags = ["--pairs-per-step", "2", "--lr", "1e-2", "--max-grad-norm", "0.01"]
    straight = _pair(data, tmp_path / "straight", *flags, "--max-steps", "4")
    resumed = _pair(data, tmp_path / "resumed", *flags, "--max-steps", "2")
    _pair(data, resumed, *flags, "--max-steps", "4", "--resume", "latest")
    for side in SIDES:
        a, b = _adapter(straight, side), _adapter(resumed, side)
        assert all(torch.equal(a[k], b[k]) for k in a), side
    ra, rb = ([r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "end" not in r] for d in (straight, resumed))  # fmt: skip
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb, strict=True):
        x.pop("samples_per_s"), y.pop("samples_per_s")
        assert x == y
    ckpt = resumed / "checkpoints" / "step-000004"
    for side in SIDES:
        assert (ckpt / side / "lora" / LORA_STATE).is_file()


def test_joint_run_validates_each_side_and_sweeps_its_stale_tmp(data, tmp_path):
    """--validation-every: each side's images in OUT/<side>/samples (the adapters differ, so
    do the images); a staging folder of a final/ killed mid-write goes on resume."""
    out = tmp_path / "pair"
    flags = ["--max-steps", "1", "--lr", "1", "--validation-every", "1", "--validation-steps"]
    _pair(data, out, *flags, "2")
    grids = [out / side / "samples" / "step-1" / "grid.png" for side in SIDES]
    assert all(g.is_file() for g in grids) and grids[0].read_bytes() != grids[1].read_bytes()
    assert not (out / "samples").exists()
    stale = out / "loser" / ".tmp-final-1-x"
    stale.mkdir()
    _pair(data, out, *flags, "2", "--resume", "latest")
    assert not stale.exists() and (out / "loser" / "final" / LORA_FILE).is_file()


def test_joint_run_refuses_bad_input_in_one_line(data, tmp_path, capsys):
    """A joint run into a folder holding the two-run form's pair, --sft-branch pair without
    LoRA: one line, exit 2, nothing written or lost."""
    out = tmp_path / "pair"
    (out / "winner" / "final").mkdir(parents=True)
    (out / "winner" / "final" / LORA_FILE).write_bytes(b"an earlier pair")
    before = snapshot(out)
    capsys.readouterr()
    argv = ["--tiny", "--data", str(data), "--out", str(out), "--no-progress", "--max-steps", "1"]
    assert train_policy_pair.main(argv, run=train_t2i.main) == 2
    assert one_line(capsys) == (
        f"error: {out} holds a run; pass --resume to continue it or choose another --out "
        "(found winner)"
    )
    assert snapshot(out) == before
    bare = tmp_path / "bare"
    argv = ["--tiny", "--method", "sft", "--sft-branch", "pair", "--out", str(bare)]
    assert train_t2i.main(argv) == 2
    assert one_line(capsys) == "error: --sft-branch pair trains two LoRA adapters: give --lora R"
    assert not bare.exists()
    assert train_policy_pair.main(["--tiny", "--out", str(bare), "--lora", "0"]) == 2
    assert one_line(capsys) == (
        "error: --lora 0 (two full fine-tunes) needs --no-joint: the one-run form trains two "
        "LoRA adapters"
    )
    assert not bare.exists()


@pytest.mark.slow  # two gloo ranks: about a minute on a busy 2-core machine
@pytest.mark.timeout(300)  # a hung gloo rank ignores SIGINT
def test_joint_run_on_two_ranks_keeps_both_adapters_in_sync(data, tmp_path):
    """``--nproc 2``: each rank reads other pairs, both adapters' gradients are all-reduced
    (the end record's digest covers both): the ranks end with the same pair."""
    import os
    import subprocess
    import sys

    repo, out, timeout = Path(__file__).resolve().parents[1], tmp_path / "pair", 240
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    cmd = ["timeout", "-s", "KILL", str(timeout), sys.executable,
           str(repo / "bench" / "train_policy_pair.py"), "--tiny", "--data", str(data),
           "--out", str(out), "--nproc", "2", "--batch-size", "1", "--max-steps", "2",
           "--lr", "1e-2", "--no-progress"]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "world 2" in p.stdout
    end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(end["param_sha256"]) == 2 and len(set(end["param_sha256"])) == 1
    w, l_ = _adapter(out, "winner"), _adapter(out, "loser")
    assert max((w[k] - l_[k]).abs().max().item() for k in w) > 1e-4
