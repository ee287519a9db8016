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
