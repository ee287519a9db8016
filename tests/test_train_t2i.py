"""The trainer (bench/train_t2i.py) on tiny CPU models: every method and backbone, resume,
faults, bad input, saved weights, and two torchrun launches with gloo."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from t2i_helpers import LOG2, LOG2_TOL, pairs_cache

from bench import train_t2i
from bench.t2i import weights
from bench.t2i.checkpoint import STATE_FILE, latest_checkpoint, load_state
from bench.t2i.pairdata import PairDataset, shard_path, write_shard
from bench.t2i.pairs import build_pairs
from bench.t2i.prompts import DEMO_PROMPTS
from bench.t2i.step import drop_prompts
from bench.t2i.tiny import save_tiny_pipeline, tiny_backbone, tiny_components
from bench.t2i.weights import LORA_STATE, param_digest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # tiny models: one thread is as fast and never oversubscribes
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 pairs of 4x16x16 latents (two shards), built once with the make_pairs code."""
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:8], out, steps=2, shard_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def data_for(data, tmp_path_factory):
    """``data_for(backbone)``: pairs built with that tiny backbone, once per module."""
    return pairs_cache(tmp_path_factory, {"sd": data})


def run(data: Path, out: Path, *flags: str) -> int:
    argv = ["--tiny", "--data", str(data), "--out", str(out), "--no-progress", "--batch-size", "2"]
    return train_t2i.main([*argv, *flags])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_records(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "end" not in r]


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_equal(x, y) -> bool:
    """Deep bit-exact equality of nested checkpoint state."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(state_equal(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(state_equal(a, b) for a, b in zip(x, y, strict=True))
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy arrays (RNG state)
        return bool((x == y).all())
    return x == y


# --------------------------------------------------------------------- methods/backbones


@pytest.mark.parametrize("method", ["sft", "dpo", "dspo", "dspo_cpp", "ddspo"])
def test_every_method_trains_on_sd(data, tmp_path, method):
    assert run(data, tmp_path, "--method", method, "--max-steps", "2") == 0
    recs = step_records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in recs)  # finite
    assert all(r["grad_norm"] > 0 for r in recs)  # every method leaves the reference
    if method != "sft":
        assert {"implicit_acc", "gap_w", "gap_l", "samples_per_s", "lr"} <= recs[0].keys()
        # step 1: policy == reference, so the logit is 0 and the loss log 2 (logistic forms)
        if method in ("dpo", "ddspo"):
            assert recs[0]["loss"] == pytest.approx(LOG2, abs=LOG2_TOL)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step-000002"
    assert (ckpt / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "final" / "model_index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["method"] == method and cfg["beta"] > 0 and cfg["timestep_sampler"] == "uniform"


@pytest.mark.parametrize(
    "backbone,flags",
    [
        ("sdxl", ["--method", "ddspo", "--target-guidance", "3.0"]),
        ("sana", ["--method", "ddspo", "--timestep-weight", "lambda"]),
        ("sana", ["--method", "dspo_cpp", "--lora", "4", "--independent-noise"]),
        ("sd", ["--method", "dspo_cpp", "--target-guidance", "2.0", "--timestep-weight", "linear",
                "--timestep-sampler", "geometric", "--optimizer", "adafactor"]),
        ("sd", ["--method", "dpo", "--timestep-weight", "lambda", "--timestep-sampler",
                "logit_normal", "--dtype", "bf16", "--gradient-checkpointing"]),
    ],
)  # fmt: skip
def test_backbones_and_options(data_for, tmp_path, backbone, flags):
    assert (
        run(data_for(backbone), tmp_path, "--backbone", backbone, "--max-steps", "2", *flags) == 0
    )
    recs = step_records(tmp_path)
    assert len(recs) == 2 and all(r["loss"] == r["loss"] for r in recs)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["backbone"] == backbone
    if backbone == "sana":
        assert cfg["timestep_sampler"] == "uniform"  # the official SANA script and the paper
        if "dspo_cpp" in flags:  # the official outside beta, DDSPO's SANA beta inside
            assert cfg["beta"] == 0.001 and cfg["beta_logit"] == 2000
        else:
            assert cfg["beta"] == 2000 and cfg["beta_logit"] is None
        assert cfg["lr"] == 2000 / 2.048e8  # from the logit scale
    sub = "lora" if "--lora" in flags else ("transformer" if backbone == "sana" else "unet")
    assert (latest_checkpoint(tmp_path / "checkpoints") / sub).is_dir()


def test_pretrained_v_prediction_and_policy_pair(data, tmp_path):
    """Real loading code (--pretrained), v-prediction, and a contrastive policy pair."""
    pipe = save_tiny_pipeline("sd", tmp_path / "pipe", prediction_type="v_prediction")
    tiny_backbone("sd", seed=1).denoiser.save_pretrained(tmp_path / "win" / "unet")
    tiny_backbone("sd", seed=2).denoiser.save_pretrained(tmp_path / "lose")
    base = ["--data", str(data), "--no-progress", "--batch-size", "2", "--max-steps", "2"]
    out = tmp_path / "run"
    argv = ["--pretrained", str(pipe), "--method", "ddspo", "--out", str(out), *base]
    argv += ["--winner-policy", str(tmp_path / "win"), "--loser-policy", str(tmp_path / "lose")]
    assert train_t2i.main(argv) == 0
    recs = step_records(out)
    # y_w, y_l come from other networks, so even step 1 has non-zero error gaps
    assert recs[0]["err_w"] > 0 and recs[0]["loss"] == recs[0]["loss"]
    final = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert final["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------ resume, bit for bit


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "dpo", "--grad-accum", "2", "--ref-update", "periodic", "--ref-tau", "2",
         "--optimizer", "adafactor", "--warmup-steps", "3"],
        ["--method", "ddspo", "--lora", "4", "--ref-update", "periodic", "--ref-tau", "1",
         "--independent-noise"],
    ],
    ids=["full-periodic-accum", "lora-periodic"],
)  # fmt: skip
def test_resume_is_bit_exact(data, tmp_path, flags):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert run(data, a, *flags, "--max-steps", "4", "--ckpt-every", "2", "--keep-last", "5") == 0
    assert run(data, b, *flags, "--max-steps", "2") == 0
    assert run(data, b, *flags, "--max-steps", "4", "--resume", "latest") == 0
    ca, cb = a / "checkpoints" / "step-000004", b / "checkpoints" / "step-000004"
    if "--lora" in flags:
        assert tensors_equal(
            load_file(ca / "lora" / LORA_STATE), load_file(cb / "lora" / LORA_STATE)
        )
        ref = "lora_reference.safetensors"
    else:
        f = "unet/diffusion_pytorch_model.safetensors"
        assert tensors_equal(load_file(ca / f), load_file(cb / f))
        ref = "diffusion_pytorch_model.safetensors"
    assert tensors_equal(load_file(ca / "reference" / ref), load_file(cb / "reference" / ref))
    sa, sb = load_state(ca), load_state(cb)
    for key in ("optimizer", "scheduler", "counters"):
        assert state_equal(sa[key], sb[key]), key
    ra, rb = step_records(a), step_records(b)
    assert len(ra) == len(rb) == 4
    for x, y in zip(ra, rb, strict=True):
        x.pop("samples_per_s"), y.pop("samples_per_s")
        assert x == y  # loss, grad norm, lr, divergence estimates: identical floats
    assert any("ref_divergence" in r for r in ra[2:])  # a reference update after the resume


def test_periodic_reference_freezes(data, tmp_path):
    assert run(data, tmp_path, "--method", "ddspo", "--ref-update", "periodic", "--ref-tau", "1",
               "--ref-delta", "1e-12", "--max-steps", "3", "--lr", "1e-3") == 0  # fmt: skip
    recs = step_records(tmp_path)
    frozen = [r["step"] for r in recs if r.get("ref_frozen")]
    assert len(frozen) == 1  # frozen once, and no update after it
    assert not any(r.get("ref_updated") for r in recs if r["step"] > frozen[0])
    assert load_state(latest_checkpoint(tmp_path / "checkpoints"))["counters"]["frozen"] is True


# --------------------------------------------------------------------- checkpoints, weights


def test_interrupted_checkpoint_write_keeps_previous(data, tmp_path, monkeypatch):
    real = weights.save_policy
    calls = []

    def flaky(backbone, policy, out, lora):
        calls.append(out)
        real(backbone, policy, out, lora)
        if len(calls) == 2:  # the second checkpoint dies after writing its weights
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(weights, "save_policy", flaky)
    with pytest.raises(OSError, match="simulated"):
        run(data, tmp_path, "--method", "dpo", "--max-steps", "3", "--ckpt-every", "1")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no .tmp left, no step 2
    # a hard crash leaves a temporary directory behind: it is never taken as the latest
    shutil.copytree(root / "step-000001", root / ".tmp-step-000002")
    (root / ".tmp-step-000002" / STATE_FILE).unlink()
    ckpt = latest_checkpoint(root)
    assert ckpt.name == "step-000001"
    assert load_state(ckpt)["counters"]["step"] == 1
    tiny_backbone("sd").load_denoiser(ckpt)  # weights load
    monkeypatch.undo()
    assert run(data, tmp_path, "--method", "dpo", "--max-steps", "2", "--resume", "latest") == 0
    assert latest_checkpoint(root).name == "step-000002"
    assert not list(root.glob(".tmp-*"))


def test_keep_last_k(data, tmp_path):
    assert run(data, tmp_path, "--method", "sft", "--max-steps", "4", "--ckpt-every", "1",
               "--keep-last", "2") == 0  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]


def test_final_weights_load_into_diffusers_pipeline_and_sample(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert run(data, tmp_path, "--method", "ddspo", "--max-steps", "1") == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "final", local_files_only=True)
    assert param_digest(pipe.unet) == metrics(tmp_path)[-1]["param_sha256"][0]
    before = dict(tiny_backbone("sd").denoiser.state_dict())
    assert not tensors_equal(before, dict(pipe.unet.state_dict()))  # it trained
    img = pipe(
        "a red fox", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert img.shape == (1, 32, 32, 3) and (img == img).all()


def test_lora_reference_is_base_and_weights_load(data, tmp_path):
    from diffusers import StableDiffusionPipeline

    assert run(data, tmp_path, "--method", "ddspo", "--lora", "4", "--max-steps", "2") == 0
    recs = step_records(tmp_path)
    assert recs[0]["loss"] == pytest.approx(LOG2, abs=LOG2_TOL)  # lora_B = 0: policy = ref
    assert recs[1]["gap_w"] != 0  # the adapters moved the policy away from the base reference
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    lora = load_file(ckpt / "lora" / LORA_STATE)
    assert lora and all("lora" in k for k in lora)
    n_opt = len(load_state(ckpt)["optimizer"]["state"])
    assert n_opt == len(lora)  # only the adapters are optimised: base weights cannot change
    pipe = StableDiffusionPipeline(
        **tiny_components("sd"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    base = pipe("a red fox", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    pipe.load_lora_weights(tmp_path / "final")
    tuned = pipe("a red fox", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert tuned.shape == base.shape and not (tuned == base).all()


# --------------------------------------------------------------------------- faults


def test_nonfinite_step_is_skipped_and_counted(data, tmp_path):
    assert run(data, tmp_path, "--method", "dpo", "--max-steps", "3", "--debug-nan-steps", "2") == 0
    recs = step_records(tmp_path)
    assert recs[1].get("skipped") and recs[1]["nonfinite_total"] == 1
    assert not recs[2].get("skipped") and recs[2]["nonfinite_total"] == 1
    counters = load_state(latest_checkpoint(tmp_path / "checkpoints"))["counters"]
    assert counters["step"] == 3 and counters["opt_step"] == 2 and counters["nonfinite_total"] == 1


def test_nonfinite_aborts_after_m_in_a_row(data, tmp_path, capsys):
    rc = run(data, tmp_path, "--method", "dpo", "--max-steps", "5", "--debug-nan-steps", "2,3,4",
             "--max-nonfinite", "3")  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: loss or gradient non-finite for 3 steps in a row" in err
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()


def _copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _bad_shapes(data, tmp_path):
    d = _copy(data, tmp_path / "bad_shapes")
    write_shard(d, 1, torch.zeros(4, 4, 8, 8), torch.zeros(4, 4, 8, 8), [{}] * 4)
    return ["--data", str(d)]


def _count_mismatch(data, tmp_path):
    d = _copy(data, tmp_path / "mismatch")
    x = torch.zeros(3, 4, 16, 16)
    write_shard(d, 1, x, x, [{}] * 3)  # metadata.jsonl still lists 4 pairs in shard 1
    return ["--data", str(d)]


def _empty(data, tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--data", str(tmp_path / "empty")]


def _not_diffusers(data, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0")
    return ["--pretrained", str(tmp_path / "model"), "--data", str(data)]


BAD_INPUTS = {
    "missing dataset": (lambda d, t: ["--data", str(t / "nope")], "not found"),
    "empty dataset": (_empty, "empty"),
    "shard shapes": (_bad_shapes, "shape"),
    "count mismatch": (_count_mismatch, "lists 4 pairs in shard-00001.safetensors, which holds 3"),
    "unknown backbone": (lambda d, t: ["--data", str(d), "--backbone", "sd3"], "backbone"),
    "unknown method": (lambda d, t: ["--data", str(d), "--method", "kto"], "method"),
    "not diffusers": (_not_diffusers, "model_index.json"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_checkpoint(data, tmp_path, capsys, case):
    make, needle = BAD_INPUTS[case]
    flags = make(data, tmp_path)
    out = tmp_path / "out"
    src = [] if "--pretrained" in flags else ["--tiny"]
    rc = train_t2i.main([*src, *flags, "--out", str(out), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert not (out / "checkpoints").exists()


def test_dataset_validation_is_pairdata(data):
    assert len(PairDataset(data)) == 8 and shard_path(data, 1).is_file()


# ------------------------------------------------------------------------- torchrun


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = ["timeout", "-s", "KILL", str(timeout), sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc_per_node=2", str(REPO / "bench" / "train_t2i.py"), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)


@pytest.mark.timeout(300)
def test_torchrun_a_damaged_shard_stops_both_ranks_before_step_1(data, tmp_path):
    """Only rank 0 reads the shards in full; rank 1 stops with rank 0's line all the same."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    shard = shard_path(d, 1)
    blob = bytearray(shard.read_bytes())
    blob[-40] ^= 0x10
    shard.write_bytes(bytes(blob))
    out = tmp_path / "run"
    p = torchrun("--tiny", "--data", str(d), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--no-progress", "--method", "dpo")  # fmt: skip
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error:")]
    assert p.returncode != 0 and re.search(r"exitcode\s*: 2 ", p.stderr), p.stderr[-3000:]
    assert errors == [f"error: {shard}: checksum mismatch (the file changed after it was "
                      "written); rebuild the dataset"]  # fmt: skip
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "ddspo", "--target-guidance", "3.0", "--independent-noise"],
        ["--method", "dpo", "--grad-accum", "2", "--ref-update", "periodic", "--ref-tau", "1"],
    ],
    ids=["ddspo-guided", "dpo-accum-periodic"],
)
def test_torchrun_two_ranks_stay_identical(data, tmp_path, flags):
    out = tmp_path / "run"
    p = torchrun("--tiny", "--data", str(data), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--no-progress", *flags)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    end = metrics(out)[-1]
    digests = end["param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # one sha256 per rank
    unet = tiny_backbone("sd").load_denoiser(latest_checkpoint(out / "checkpoints"))
    assert param_digest(unet) == digests[0]
    assert load_state(latest_checkpoint(out / "checkpoints"))["world"] == 2
    assert re.search(r"world 2", p.stdout)


# ------------------------------------------------------------------- config, data order


def test_config_flags_json_and_resolution(tmp_path):
    from bench.t2i.config import UsageError, parse_args

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"method": "dpo", "batch_size": 4, "beta": 5000}))
    cfg = parse_args(["--tiny", "--config", str(cfg_file), "--batch-size", "3"])
    assert (cfg.method, cfg.batch_size, cfg.beta) == ("dpo", 3, 5000.0)  # flags beat the file
    assert cfg.lr == pytest.approx(5000 / 2.048e8)  # DDSPO App. E: lr = beta / 2.048e8
    sana = parse_args(["--tiny", "--backbone", "sana", "--method", "ddspo"])
    assert (sana.beta, sana.timestep_sampler) == (2000.0, "uniform")
    assert parse_args(["--tiny", "--no-progress"]).progress is False
    for bad, msg in [
        (["--tiny", "--method", "kto"], "unknown method"),
        (["--tiny", "--pretrained", "x"], "exactly one"),
        (["--tiny", "--method", "dpo", "--target-guidance", "2"], "ddspo and dspo_cpp"),
        (["--tiny", "--winner-policy", "a"], "both"),
        (["--tiny", "--batch-size", "0"], ">= 1"),
        (["--tiny", "--bogus"], "unrecognized"),
        (["--tiny", "--config", str(tmp_path / "none.json")], "not found"),
    ]:
        with pytest.raises(UsageError, match=msg):
            parse_args(bad)
    cfg_file.write_text(json.dumps({"nope": 1}))
    with pytest.raises(UsageError, match="unknown field"):
        parse_args(["--tiny", "--config", str(cfg_file)])


@pytest.mark.parametrize(
    "flag, value, low",
    [("--lora", "-1", 0), ("--warmup-steps", "-3", 0), ("--ckpt-every", "-2", 0),
     ("--validation-every", "-1", 0), ("--log-every", "0", 1), ("--ref-tau", "0", 1),
     ("--ref-probe", "-1", 1), ("--keep-last", "0", 1), ("--validation-steps", "-2", 1),
     ("--tiny-pairs", "0", 1)],
)  # fmt: skip
def test_each_range_error_names_its_flag_and_value(flag, value, low):
    from bench.t2i.config import UsageError, parse_args

    with pytest.raises(UsageError) as e:
        parse_args(["--tiny", flag, value])
    assert str(e.value) == f"{flag} must be >= {low}, got {value}"


def test_tiny_pairs_is_checked_only_where_pairs_are_built():
    from bench.t2i.config import parse_args

    assert parse_args(["--tiny", "--data", "DIR", "--tiny-pairs", "0"]).tiny_pairs == 0


def test_data_order_shards_epochs_across_ranks():
    from bench.t2i.data import batch_indices, batch_positions

    def idx(step, rank, world=2, accum=2, micro=0, batch=1):
        pos = batch_positions(step=step, micro=micro, accum=accum, rank=rank, world=world,
                              batch=batch)  # fmt: skip
        return batch_indices(10, seed=0, positions=pos)

    # one epoch of 10 = 2 steps x 2 micro x 2 ranks x 1 ... + 2 more: a permutation, no repeats
    first = [idx(s, r, micro=m)[0] for s in range(2) for m in range(2) for r in range(2)]
    assert len(set(first)) == 8
    assert idx(1, 1) == idx(1, 1)  # a pure function of the step: nothing to save for resume
    epoch0 = [idx(s, 0, world=1, accum=1, batch=5) for s in range(2)]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10))
    # a step's pairs are the same however they are split into ranks and micro-steps
    for step in range(3):
        one = idx(step, 0, world=1, accum=1, batch=4)
        assert [i for r in range(2) for i in idx(step, r, world=2, accum=1, batch=2)] == one
        assert [
            i for m in range(2) for i in idx(step, 0, world=1, accum=2, micro=m, batch=2)
        ] == one
        assert [i for m in range(2) for r in range(2) for i in idx(step, r, micro=m)] == one


def test_each_pair_position_draws_from_its_own_stream():
    """Row p's draws depend on the seed and p only: not on the rows drawn beside it."""
    from bench.t2i.data import row_generators

    def first_draws(seed, positions):
        return [torch.rand(2, generator=g).tolist() for g in row_generators(seed, positions)]

    assert first_draws(0, [5, 6]) == first_draws(0, range(7))[5:]
    assert first_draws(0, [5]) != first_draws(0, [6])  # neighbours differ
    assert first_draws(0, [5]) != first_draws(1, [5])  # so do seeds
    draws = first_draws(3, range(1000))
    assert len({tuple(d) for d in draws}) == 1000


def test_lora_with_alpha_not_rank_loads_at_the_trained_scale(data, tmp_path):
    """A LoRA trained with alpha != rank predicts the same after diffusers'
    load_lora_weights (and our sample.py loader) as the trained network did."""
    from diffusers import StableDiffusionPipeline

    from bench.sample import load_checkpoint
    from bench.t2i.tiny import tiny_backbone
    from bench.t2i.weights import add_lora

    flags = ("--method", "dpo", "--lora", "4", "--lora-alpha", "16", "--max-steps", "3")
    assert run(data, tmp_path, *flags, "--lr", "1e-2") == 0
    # the trained network: the tiny base + the exact trained adapters at alpha 16
    bb = tiny_backbone("sd", seed=0)
    trained = bb.denoiser
    add_lora(trained, 4, 16.0)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    weights.load_policy(bb, trained, ckpt, lora=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    cond = bb.encode_prompts(["a red fox", "two cats"])
    with torch.no_grad():
        want = bb.forward(trained, x, t, cond)
        trained.disable_adapters()
        base = bb.forward(trained, x, t, cond)
    assert (want - base).abs().max() > 1e-3  # the adapters matter at this scale
    pipe = StableDiffusionPipeline(
        **tiny_components("sd"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(tmp_path / "final")
    with torch.no_grad():
        got = bb.forward(pipe.unet, x, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    net = load_checkpoint(tiny_backbone("sd", seed=0), tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(bb.forward(net, x, t, cond), want, rtol=1e-4, atol=1e-5)


def test_final_copies_untouched_components_and_writes_only_the_denoiser(data, tmp_path):
    """A bf16 run from --pretrained: text encoder, tokenizer and VAE in final/ are the
    pretrained files byte for byte; the denoiser is the trained one, in float32."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = save_tiny_pipeline("sd", tmp_path / "pipe")
    out = tmp_path / "run"
    argv = ["--pretrained", str(pipe), "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--method", "dpo", "--max-steps", "2", "--dtype", "bf16", "--lr", "1e-3"]
    assert train_t2i.main(argv) == 0
    final = out / "final"
    for comp in ("text_encoder", "tokenizer", "vae"):
        src = sorted(p.relative_to(pipe) for p in (pipe / comp).rglob("*") if p.is_file())
        dst = sorted(p.relative_to(final) for p in (final / comp).rglob("*") if p.is_file())
        assert src == dst, comp  # every file (vocab, merges, ...) is there
        for rel in src:
            assert (pipe / rel).read_bytes() == (final / rel).read_bytes(), rel
    unet = UNet2DConditionModel.from_pretrained(final / "unet", local_files_only=True)
    trained = UNet2DConditionModel.from_pretrained(
        latest_checkpoint(out / "checkpoints") / "unet", local_files_only=True
    )
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert tensors_equal(unet.state_dict(), trained.state_dict())
    base = UNet2DConditionModel.from_pretrained(pipe / "unet", local_files_only=True)
    assert not tensors_equal(unet.state_dict(), base.state_dict())
    StableDiffusionPipeline.from_pretrained(final, local_files_only=True, safety_checker=None)


def test_proportion_empty_prompts_drops_whole_pairs_reproducibly():
    from bench.t2i.config import TrainConfig, UsageError, resolve
    from bench.t2i.data import row_generators

    cfg = resolve(TrainConfig(tiny=True, proportion_empty_prompts=0.5))
    prompts, negs = [f"prompt {i}" for i in range(400)], [f"neg {i}" for i in range(400)]
    p1, n1 = drop_prompts(cfg, row_generators(0, range(400)), prompts, negs)
    p2, _ = drop_prompts(cfg, row_generators(0, range(400)), prompts, negs)
    assert p1 == p2  # from the rows' generators: reproducible, and resumable
    tail, _ = drop_prompts(cfg, row_generators(0, range(200, 400)), prompts[200:], negs[200:])
    assert tail == p1[200:]  # a row's draw is its own
    dropped = [i for i, p in enumerate(p1) if p == ""]
    assert dropped == [i for i, n in enumerate(n1) if n == ""]  # prompt and c- together
    assert 150 < len(dropped) < 250
    assert all(p1[i] == prompts[i] and n1[i] == negs[i] for i in set(range(400)) - set(dropped))
    # p = 0 leaves everything and draws nothing
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    none = resolve(TrainConfig(tiny=True))
    assert drop_prompts(none, [g] * 400, prompts, negs) == (prompts, negs)
    assert torch.equal(g.get_state(), state)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UsageError, match="proportion-empty-prompts"):
            resolve(TrainConfig(tiny=True, proportion_empty_prompts=bad))


def test_proportion_empty_prompts_trains(data, tmp_path):
    assert run(data, tmp_path, "--method", "ddspo", "--max-steps", "2",
               "--proportion-empty-prompts", "0.5") == 0  # fmt: skip
    assert json.loads((tmp_path / "config.json").read_text())["proportion_empty_prompts"] == 0.5
