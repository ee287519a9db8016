"""No wrong result without a word: the base model a checkpoint was trained on, the settings
of every sampled folder, truthful pair counts, and one-line errors for an ``--out`` that is a
file and for damaged checkpoints."""

import contextlib
import importlib
import io
import json
from pathlib import Path

import pytest
import torch
from sample_records import write_sample_record

from bench import evaluate, sample, train_t2i
from bench.t2i.models import open_backbone
from bench.t2i.provenance import SAMPLE_FILE, base_record

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ --out is an existing file

#: every command with --out, and the smallest arguments that reach its --out check
OUT_COMMANDS = {
    "make_pairs": ["--tiny", "sd", "--steps", "1", "--no-progress"],
    "import_pairs": ["--from", "ddspo", "{tmp}", "--backbone", "sd", "--no-progress"],
    "train_t2i": ["--tiny", "--max-steps", "1", "--no-progress"],
    "train_policy_pair": ["--tiny", "--max-steps", "1"],
    "sample": ["--tiny", "sd", "--steps", "1", "--no-progress"],
    "evaluate": ["--images", "{tmp}", "--tiny", "--no-progress"],
}


def test_every_command_with_out_is_in_the_list(capsys):
    """A new command with --out joins OUT_COMMANDS (and so the test below)."""
    with_out = set()
    for path in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py")):
        if path.stem == "__init__":  # the package
            continue
        module = importlib.import_module(f"bench.{path.stem}")
        with pytest.raises(SystemExit):
            module.main(["--help"])
        if "--out " in capsys.readouterr().out:
            with_out.add(path.stem)
    assert with_out == set(OUT_COMMANDS)


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_that_is_a_file_is_one_line_exit_2(command, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("keep me\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in OUT_COMMANDS[command]]
    module = importlib.import_module(f"bench.{command}")
    capsys.readouterr()
    rc = module.main([*argv, "--out", str(target)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(target) in lines[0], err
    assert "--out" in lines[0]
    assert target.read_text() == "keep me\n"  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]  # nothing written


# ------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(kind)``: a fresh copy of a full (``unet/``) or a LoRA (``lora/``) checkpoint
    of the tiny SD, and the weights file in it."""
    import shutil

    from bench.t2i.tiny import tiny_backbone
    from bench.t2i.weights import LORA_FILE, add_lora, save_lora

    root = tmp_path_factory.mktemp("saved")
    bb = tiny_backbone("sd")
    bb.denoiser.save_pretrained(root / "full" / "unet")
    add_lora(bb.denoiser, 4, None)
    save_lora(bb, bb.denoiser, root / "lora" / "lora")
    files = {
        "full": "unet/diffusion_pytorch_model.safetensors",
        "lora": f"lora/{LORA_FILE}",
    }

    def get(kind: str, dest):
        shutil.copytree(root / kind, dest)
        return dest, dest / files[kind]

    return get


def damage(file, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sample_damaged_checkpoint_one_line(saved, kind, how, tmp_path, capsys):
    from bench import sample

    ckpt, weights = saved(kind, tmp_path / "ckpt")
    damage(weights, how)
    out = tmp_path / "samples"
    argv = ["--tiny", "sd", "--steps", "1", "--max-prompts", "1", "--no-progress"]
    rc = sample.main([*argv, "--checkpoint", f"ft={ckpt}", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert weights.name in lines[0] and str(ckpt) in lines[0], err
    assert not out.exists()  # refused before anything was sampled


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_policy_pair_damaged_checkpoint_one_line(saved, kind, how, tmp_path):
    import torch

    from bench import train_t2i
    from bench.t2i.cli import UsageError
    from bench.t2i.tiny import tiny_backbone

    good, _ = saved("full", tmp_path / "good")
    bad, weights = saved(kind, tmp_path / "bad")
    damage(weights, how)
    cfg = train_t2i.parse_args(
        ["--tiny", "--method", "ddspo", "--winner-policy", str(good), "--loser-policy", str(bad)]
    )
    with pytest.raises(UsageError) as e:
        train_t2i.load_policy_pair(cfg, tiny_backbone("sd"), torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and weights.name in msg, msg


# ------------------------------------------------------------------ the base model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run of train_t2i with --seed 3 on --tiny sd, and the base it loaded (its
    state as loaded, before training) and its trained policy."""
    from bench.t2i.pairs import build_pairs
    from bench.t2i.prompts import DEMO_PROMPTS
    from bench.t2i.tiny import tiny_backbone

    root = tmp_path_factory.mktemp("trained")
    other = base_record(tiny_backbone("sd", seed=5), tiny="sd")  # as if from another base
    build_pairs(tiny_backbone("sd"), DEMO_PROMPTS[:2], root / "data", steps=1, progress=False,
                base=other)  # fmt: skip
    seen = {}
    real = train_t2i.load_model

    def spy(cfg):
        bb = real(cfg)
        seen["state"] = {k: v.clone() for k, v in bb.denoiser.state_dict().items()}
        seen["backbone"] = bb
        return bb

    train_t2i.load_model = spy
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = train_t2i.main(["--tiny", "--data", str(root / "data"), "--out",
                                 str(root / "run"), "--method", "dpo", "--lora", "4", "--seed",
                                 "3", "--max-steps", "1", "--batch-size", "2", "--lr", "0.05",
                                 "--no-progress"])  # fmt: skip
    finally:
        train_t2i.load_model = real
    assert rc == 0, err.getvalue()
    return {"run": root / "run", "stderr": err.getvalue(), **seen}


def test_train_seed_does_not_change_the_tiny_base(trained):
    fresh = open_backbone(tiny="sd")
    want = fresh.denoiser.state_dict()
    assert trained["state"].keys() == want.keys()
    assert all(torch.equal(trained["state"][k], want[k]) for k in want)  # bit for bit
    # the LoRA'd model sample.py builds is the one the trainer trained
    net = sample.load_checkpoint(fresh, trained["run"] / "final")
    bb = trained["backbone"]
    cond = fresh.encode_prompts(["a red cube", "two cats"])
    x, t = (
        torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
        torch.tensor([9, 600]),
    )
    with torch.no_grad():
        got, moved = fresh.forward(net, x, t, cond), fresh.forward(fresh.denoiser, x, t, cond)
        torch.testing.assert_close(got, bb.forward(bb.denoiser.eval(), x, t, cond))
    assert not torch.allclose(got, moved)  # the LoRA did train: the check above means something


def test_checkpoints_record_their_base(trained):
    want = base_record(open_backbone(tiny="sd"), tiny="sd")
    assert want["base"] == "--tiny sd"
    # the pairs came from another base: said, not refused
    assert (
        f"{trained['run'].parent / 'data'} was built from another base model" in trained["stderr"]
    )
    for folder in (trained["run"] / "final", *sorted((trained["run"] / "checkpoints").iterdir())):
        assert json.loads((folder / "base.json").read_text()) == want, folder


def test_checkpoint_on_another_base_is_refused(trained, tmp_path, capsys):
    from bench.t2i.backbones import load_backbone
    from bench.t2i.tiny import save_tiny_pipeline

    other = save_tiny_pipeline("sd", tmp_path / "other-sd", seed=5)  # same shapes, other weights
    final = trained["run"] / "final"
    out = tmp_path / "samples"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    rc = sample.main(["--pretrained", str(other), "--checkpoint", f"ft={final}", "--out", str(out),
                      "--prompts", str(prompts), "--steps", "1", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(final) in lines[0], err
    # names the base it was trained on first, then the one it was to be loaded onto
    assert lines[0].index("--tiny sd") < lines[0].index(f"--pretrained {other.resolve()}"), err
    assert not out.exists()
    # the trainer's --winner-policy/--loser-policy: the same check
    bb = load_backbone(other)
    cfg = train_t2i.parse_args(["--pretrained", str(other), "--data", "x", "--method", "ddspo",
                                "--winner-policy", str(final), "--loser-policy", str(final)])  # fmt: skip
    from bench.t2i.cli import UsageError

    with pytest.raises(UsageError, match="another base model: --tiny sd"):
        train_t2i.load_policy_pair(cfg, bb, torch.device("cpu"), torch.float32,
                                   base_record(bb, pretrained=other))  # fmt: skip
    # and on its own base it loads
    f_win, _ = train_t2i.load_policy_pair(cfg, open_backbone(tiny="sd"), torch.device("cpu"),
                                          torch.float32, base_record(open_backbone(tiny="sd"), tiny="sd"))  # fmt: skip
    assert f_win is not None


# ------------------------------------------------------------------ sampling settings

SAMPLE = ["--tiny", "sd", "--steps", "1", "--max-prompts", "1", "--no-progress"]


def snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_sample_records_settings_and_refuses_to_mix_them(saved, tmp_path, capsys):
    ckpt, _ = saved("full", tmp_path / "ft")
    out = tmp_path / "samples"
    assert sample.main([*SAMPLE, "--checkpoint", f"a={ckpt}", "--out", str(out)]) == 0
    rec = json.loads((out / "a" / SAMPLE_FILE).read_text())
    assert rec == json.loads((out / "base" / SAMPLE_FILE).read_text())
    assert (rec["base"], rec["seed"], rec["steps"], rec["guidance"], rec["sampler"]) == (
        "--tiny sd",
        0,
        1,
        7.5,
        "ddim",
    )
    assert rec["denoiser"] == base_record(open_backbone(tiny="sd"), tiny="sd")["denoiser"]
    before = snapshot(out)
    for flags, key, was, now in [
        (["--seed", "3"], "seed", "0", "3"),
        (["--guidance", "2"], "guidance", "7.5", "2.0"),
        (["--sampler", "ddpm"], "sampler", "'ddim'", "'ddpm'"),
        (["--negative-prompt", "blurry"], "negative_prompt", "''", "'blurry'"),
    ]:
        rc = sample.main([*SAMPLE, *flags, "--checkpoint", f"b={ckpt}", "--out", str(out)])
        assert rc == 2
        line = one_line(capsys)
        assert f"holds a/ sampled with {key} {was}, this run has {now}" in line, line
        assert snapshot(out) == before  # nothing lost, nothing added
    # the same settings: another model joins, the first one is kept
    assert sample.main([*SAMPLE, "--checkpoint", f"b={ckpt}", "--out", str(out)]) == 0
    after = snapshot(out)
    assert after["a/00000.png"] == before["a/00000.png"] and after["b/00000.png"]
    assert json.loads(after["b/sample.json"]) == rec


def test_sample_refuses_an_out_with_unrecorded_folders(tmp_path, capsys):
    out = tmp_path / "samples"
    (out / "old").mkdir(parents=True)
    (out / "old" / "00000.png").write_bytes(b"an image of unknown settings")
    before = snapshot(out)
    assert sample.main([*SAMPLE, "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "old/ with no sample.json" in line and str(out) in line, line
    assert snapshot(out) == before


def _images(root: Path, prompts: list[str], models: dict[str, dict]) -> Path:
    """A sample.py-like folder: prompts.txt and one PNG per prompt for each model, with its
    record changed by ``models[name]`` (None: no record)."""
    import numpy as np
    from PIL import Image

    root.mkdir()
    (root / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    for k, (name, changes) in enumerate(models.items()):
        (root / name).mkdir()
        for i in range(len(prompts)):
            px = np.random.default_rng([k, i]).integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / name / f"{i:05d}.png")
        if changes is not None:
            write_sample_record(root / name, prompts, **changes)
    return root


PROMPTS = ["a red cube", "two cats"]


@pytest.mark.parametrize(
    "changes, key, a, b",
    [
        ({"seed": 3}, "seed", "0", "3"),
        ({"steps": 25}, "steps", "2", "25"),
        ({"sampler": "ddpm"}, "sampler", "'ddim'", "'ddpm'"),
        (
            {"denoiser": "f" * 64},
            "denoiser",
            "'--tiny sd (denoiser " + "0" * 12 + ")'",
            "'--tiny sd (denoiser " + "f" * 12 + ")'",
        ),
    ],
)
def test_evaluate_refuses_folders_of_other_settings(tmp_path, capsys, changes, key, a, b):
    images = _images(tmp_path / "samples", PROMPTS, {"base": {}, "ft": changes})
    out = tmp_path / "eval"
    assert (
        evaluate.main(["--images", str(images), "--tiny", "--out", str(out), "--no-progress"]) == 2
    )
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "models 'base' and 'ft'" in line, line
    assert f"different {key}: {a}" in line and f"{b}" in line.split(" in ")[1], line
    assert line.index(str(images / "base" / SAMPLE_FILE)) < line.index(
        str(images / "ft" / SAMPLE_FILE)
    )
    assert not out.exists()


def test_evaluate_refuses_records_of_other_prompts(tmp_path, capsys):
    images = _images(tmp_path / "samples", PROMPTS, {"base": {}, "ft": {}})
    write_sample_record(images / "base", ["a red cube", "two dogs"])
    write_sample_record(images / "ft", ["a red cube", "two dogs"])
    assert evaluate.main(["--images", str(images), "--tiny", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "other prompts" in line and str(images / "base") in line, line


def test_evaluate_unrecorded_folders_need_the_flag(tmp_path, capsys):
    images = _images(tmp_path / "samples", PROMPTS, {"base": {}, "ft": None})
    out = tmp_path / "eval"
    argv = ["--images", str(images), "--tiny", "--out", str(out), "--no-progress"]
    assert evaluate.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "model 'ft'" in line and "--allow-unrecorded" in line and "\n" not in line, line
    assert not out.exists()
    assert evaluate.main([*argv, "--allow-unrecorded"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["unrecorded"] == ["ft"] and res["sample_settings"]["seed"] == 0
    assert "ft: no sample.json" in capsys.readouterr().err


def test_evaluate_accepts_what_sample_wrote(saved, tmp_path, capsys):
    ckpt, _ = saved("full", tmp_path / "ft")
    images = tmp_path / "samples"
    assert sample.main([*SAMPLE, "--checkpoint", f"ft={ckpt}", "--out", str(images)]) == 0
    out = tmp_path / "eval"
    assert (
        evaluate.main(["--images", str(images), "--tiny", "--out", str(out), "--no-progress"]) == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["unrecorded"] == [] and res["sample_settings"]["steps"] == 1


# ------------------------------------------------------------------ pair counts


def test_make_pairs_counts_pairs_not_prompts(tmp_path, capsys):
    from bench import make_pairs

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\ncat\ntwo cats on a sofa\n")  # "cat" cannot be degraded
    out = tmp_path / "ds"
    argv = ["--tiny", "sd", "--steps", "1", "--no-progress", "--prompts", str(prompts)]
    assert make_pairs.main([*argv, "--out", str(out)]) == 0
    assert f"wrote 2 pairs from 3 prompts to {out}" in capsys.readouterr().out
    info = json.loads((out / "info.json").read_text())
    assert info["num_pairs"] == 2
    assert info["base"] == base_record(open_backbone(tiny="sd"), tiny="sd")


@pytest.mark.parametrize("existing", [False, True])
def test_make_pairs_with_no_pairs_is_an_error(tmp_path, capsys, existing):
    from bench import make_pairs

    prompts = tmp_path / "p.txt"
    prompts.write_text("cat\n🐱\n")
    out = tmp_path / "ds"
    if existing:
        out.mkdir()
    argv = ["--tiny", "sd", "--steps", "1", "--no-progress", "--prompts", str(prompts)]
    assert make_pairs.main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no pairs: all 2 prompts"), captured.err
    assert str(out) in lines[0] and "wrote" not in captured.out
    # nothing left behind: no empty dataset a trainer would open, the user's folder kept
    assert (sorted(out.iterdir()) == []) if existing else not out.exists()


def test_make_pairs_degrades_unspaced_prompts(tmp_path, capsys):
    from bench import make_pairs
    from bench.t2i.pairdata import PairDataset

    prompts = tmp_path / "p.txt"
    prompts.write_text("一只红色的猫坐在沙发上\n赤いキューブ\n")
    out = tmp_path / "ds"
    argv = ["--tiny", "sd", "--steps", "1", "--no-progress", "--prompts", str(prompts)]
    assert make_pairs.main([*argv, "--out", str(out)]) == 0
    assert "wrote 2 pairs from 2 prompts" in capsys.readouterr().out
    recs = PairDataset(out).records
    for r in recs:
        assert r["neg_prompt"] != r["prompt"] and set(r["neg_prompt"]) <= set(r["prompt"])


def test_resume_onto_another_base_is_refused(trained, tmp_path, capsys):
    """The same --pretrained path now holding other weights: --resume says so, one line."""
    import shutil

    from bench.t2i.checkpoint import latest_checkpoint
    from bench.t2i.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sd", tmp_path / "sd")
    run = tmp_path / "run"
    argv = ["--pretrained", str(model), "--data", str(trained["run"].parent / "data"),
            "--out", str(run), "--method", "dpo", "--lora", "4", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    assert train_t2i.main([*argv, "--max-steps", "1"]) == 0
    ckpt = latest_checkpoint(run / "checkpoints")
    assert json.loads((ckpt / "base.json").read_text())["base"] == f"--pretrained {model.resolve()}"
    shutil.rmtree(model)
    save_tiny_pipeline("sd", model, seed=5)
    capsys.readouterr()
    assert train_t2i.main([*argv, "--max-steps", "2", "--resume", "latest"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt} was trained on another base"), (
        lines
    )
    assert latest_checkpoint(run / "checkpoints") == ckpt  # nothing trained, nothing lost
