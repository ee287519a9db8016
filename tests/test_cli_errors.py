"""Which errors a command turns into one ``error:`` line and exit 2: bad input from the user
(:class:`bench.t2i.errors.UsageError` and its subclasses) only. Any other exception, a plain
``ValueError`` from a bug in the math included, keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from t2i_helpers import one_line, snapshot

import minddspo.process
from bench import bench_step, make_pairs, sample, train_t2i
from bench.t2i.cli import UsageError, run_command
from bench.t2i.outdir import OutputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _raise(e: BaseException):
    def body() -> int:
        raise e

    return body


@pytest.mark.parametrize("error", [UsageError("--steps: bad"), OutputError("--out x: a file")])
def test_run_command_reports_the_usage_family_in_one_line(error, capsys):
    assert run_command(_raise(error)) == 2
    assert one_line(capsys) == f"error: {error}"


@pytest.mark.parametrize("error", [ValueError("shape (2, 3) vs (2, 4)"), KeyError("unet")])
def test_run_command_lets_other_errors_through(error, capsys):
    with pytest.raises(type(error)) as e:
        run_command(_raise(error))
    assert e.value is error
    assert capsys.readouterr().err == ""


@pytest.fixture
def math_bug(monkeypatch):
    """A bug in the core: its DDIM sampler and its noising raise a plain ValueError."""

    def boom(*args, **kwargs):
        raise ValueError("shape bug in minddspo")

    monkeypatch.setattr(minddspo.process, "ddim_sample", boom)
    monkeypatch.setattr(minddspo.process.DDPMProcess, "add_noise", boom)


def _commands(tmp_path):
    out = str(tmp_path / "out")
    return {
        "make_pairs": (make_pairs.main, ["--tiny", "sd", "--out", out, "--max-prompts", "2",
                                         "--steps", "2", "--no-progress"]),
        "sample": (sample.main, ["--tiny", "sd", "--out", out, "--max-prompts", "1",
                                 "--steps", "2", "--no-progress"]),
        "bench_step": (bench_step.main, ["--tiny", "--batch", "1", "--reps", "1", "--warmup",
                                         "0", "--methods", "dpo", "--sampling-reps", "0"]),
        "train_t2i": (train_t2i.main, ["--tiny", "--out", out, "--tiny-pairs", "2",
                                       "--max-steps", "1", "--no-progress"]),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["make_pairs", "sample", "bench_step", "train_t2i"])
def test_a_bug_in_the_core_keeps_its_traceback(command, math_bug, tmp_path, capsys):
    main, argv = _commands(tmp_path)[command]
    with pytest.raises(ValueError, match="shape bug in minddspo"):
        main(argv)
    assert "error:" not in capsys.readouterr().err


def test_a_bug_in_the_core_exits_1_with_a_traceback(tmp_path):
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import sys
        import minddspo.process

        def boom(*args, **kwargs):
            raise ValueError("shape bug in minddspo")

        minddspo.process.ddim_sample = boom
        from bench.make_pairs import main
        sys.exit(main(["--tiny", "sd", "--out", {str(out)!r}, "--max-prompts", "2",
                       "--steps", "2", "--no-progress"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "ValueError: shape bug in minddspo"
    assert not (out / "info.json").exists()


def test_bad_input_met_deep_in_the_library_is_still_one_line(tmp_path, capsys):
    """A checkpoint that is no checkpoint: refused by bench.t2i (not the command) as a
    UsageError, before anything is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = snapshot(out)
    empty = tmp_path / "ckpt"
    empty.mkdir()
    argv = ["--tiny", "sd", "--out", str(out), "--checkpoint", f"mine={empty}", "--no-progress"]
    assert sample.main(argv) == 2
    assert one_line(capsys) == (
        f"error: {empty}: neither unet weights (config.json) nor pytorch_lora_weights.safetensors"
    )
    assert snapshot(out) == before


def test_a_checkpoint_with_a_broken_config_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    ckpt = tmp_path / "ckpt" / "unet"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text('{"_class_name": "UNet2DConditionModel",')
    save_file({"w": torch.zeros(1)}, str(ckpt / "diffusion_pytorch_model.safetensors"))
    argv = ["--tiny", "sd", "--out", str(out), "--checkpoint", f"mine={ckpt.parent}"]
    assert sample.main([*argv, "--no-progress"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"error: {ckpt / 'config.json'}: not valid JSON (")
    assert not out.exists()


def test_an_llm_folder_that_is_no_model_is_one_line(tmp_path, capsys):
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")
    out = tmp_path / "out"
    argv = ["--tiny", "sd", "--out", str(out), "--perturb", "llm", "--llm", str(llm)]
    assert make_pairs.main([*argv, "--max-prompts", "2", "--no-progress"]) == 2
    assert one_line(capsys).startswith(f"error: {llm}: cannot load a causal language model (")
    assert not (out / "info.json").exists()
