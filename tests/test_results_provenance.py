"""No wrong result without a word: the base model a checkpoint was trained on, the settings
of every sampled folder, truthful pair counts, and one-line errors for an ``--out`` that is a
file and for damaged checkpoints."""

import importlib

import pytest

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
