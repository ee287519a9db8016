"""A command run without its optional extra: one line naming the extra, exit code 2
(minddspo/extras.py, installed by bench/__init__.py and toy2d/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sample_records import write_sample_record

from bench.t2i.cli import run_command
from minddspo.extras import command_name, missing_extra

ROOT = Path(__file__).resolve().parents[1]


def blocked(modules: list[str], argv: list[str], module: str | None = None):
    """Run a command in a fresh process in which importing ``modules`` fails as if they were
    not installed (``sys.modules[name] = None``)."""
    run = (
        f"runpy.run_module({module!r}, run_name='__main__')"
        if module
        else "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    code = (
        "import runpy, sys\n"
        f"for m in {modules!r}: sys.modules[m] = None\n"
        f"sys.argv = {argv!r}\n"
        f"{run}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


def one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize(
    "modules, argv, extra",
    [
        # diffusers is imported inside the command (when the backbone is opened)
        (["diffusers"], "bench/make_pairs.py --tiny sd --out {out}", "t2i"),
        # PIL at evaluate's module level would fail before any handler: imported where used
        (
            ["PIL"],
            "bench/evaluate.py --images {images} --tiny --out {out} --no-progress",
            "t2i",
        ),
        # safetensors at the module level of the library the trainer imports
        (["safetensors"], "bench/train_t2i.py --tiny --out {out}", "t2i"),
        (
            ["pyarrow"],
            "bench/import_pairs.py --from pickapic {data} --tiny sd --out {out}",
            "import",
        ),  # fmt: skip
    ],
)
def test_bench_command_names_the_missing_extra(tmp_path, modules, argv, extra):
    data = tmp_path / "pickapic"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"PAR1")
    images = tmp_path / "images"  # as bench/sample.py writes them
    (images / "base").mkdir(parents=True)
    (images / "prompts.txt").write_text("a cat\n")
    (images / "base" / "00000.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_sample_record(images / "base", ["a cat"])
    out = tmp_path / "out"
    argv = argv.format(out=out, data=data, images=images).split()
    r = blocked(modules, argv)
    assert r.returncode == 2, r.stderr
    assert one_line(r) == f'error: {argv[0]} needs the {extra!r} extra: pip install -e ".[{extra}]"'
    assert not out.exists()


@pytest.mark.parametrize("modules", [["tqdm"], ["sklearn"]])
def test_digits_names_its_own_extra(tmp_path, modules):
    # tqdm fails at import time, sklearn in the first stage; either way the digits extra
    # (which holds t2i, plot and scikit-learn) is the one to install
    main = str(ROOT / "bench" / "digits" / "__main__.py")  # sys.argv[0] of python -m
    r = blocked(modules, [main, "--preset", "smoke", "--out", str(tmp_path / "d")],
                module="bench.digits")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert one_line(r) == (
        "error: python -m bench.digits needs the 'digits' extra: pip install -e \".[digits]\""
    )


def test_plotting_command_names_the_toy_extra(tmp_path):
    r = blocked(["matplotlib"], ["paper_figures/toy_figures.py", str(tmp_path)])
    assert r.returncode == 2, r.stderr
    assert one_line(r) == (
        "error: paper_figures/toy_figures.py needs the 'toy' extra: pip install -e \".[toy]\""
    )


def test_another_missing_module_keeps_its_traceback(tmp_path):
    # a module no extra provides is a bug (or a broken install): the traceback stays
    r = blocked(["bench.t2i.pairs"], ["bench/make_pairs.py", "--tiny", "sd", "--out",
                                      str(tmp_path / "o")])  # fmt: skip
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ModuleNotFoundError" in r.stderr


def test_run_command_in_process(capsys):
    def body():
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    assert run_command(body) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("""needs the 't2i' extra: pip install -e ".[t2i]\"""")

    def bug():
        raise ModuleNotFoundError("No module named 'nothere'", name="nothere")

    with pytest.raises(ModuleNotFoundError):
        run_command(bug)


def test_missing_extra_reads_the_module_of_the_error(monkeypatch):
    e = ModuleNotFoundError("x", name="pyarrow.parquet")
    assert missing_extra(e, "bench/import_pairs.py") is None  # pyarrow is there: not an extra
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    assert missing_extra(e, "bench/import_pairs.py") == (
        "error: bench/import_pairs.py needs the 'import' extra: pip install -e \".[import]\""
    )
    assert missing_extra(ModuleNotFoundError("x", name="sklearn"), "bench/sample.py").endswith(
        '".[digits]"'
    )
    assert missing_extra(ValueError("diffusers"), "x") is None


def test_command_name(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert command_name(str(ROOT / "bench" / "sample.py")) == "bench/sample.py"
    assert command_name(str(ROOT / "bench" / "digits" / "__main__.py")) == "python -m bench.digits"
    assert command_name(str(tmp_path / "x.py")) == str(tmp_path / "x.py")


def test_a_missing_submodule_of_an_installed_package_keeps_its_traceback(capsys):
    """transformers is installed: ``transformers.models.x`` missing is another version than
    the code expects, not the t2i extra."""

    def mismatch():
        raise ModuleNotFoundError("No module named 'transformers.models.x'",
                                  name="transformers.models.x")  # fmt: skip

    with pytest.raises(ModuleNotFoundError, match="transformers.models.x"):
        run_command(mismatch)
    assert capsys.readouterr().err == ""
    assert missing_extra(ModuleNotFoundError("x", name="transformers"), "bench/sample.py") == (
        "error: bench/sample.py needs the 't2i' extra: pip install -e \".[t2i]\""
    )


def test_the_fallback_hook_runs_the_exit_handlers(tmp_path):
    """An import failing at module level reaches the excepthook: one line, exit 2, and the
    atexit handlers registered before still run."""
    marker = tmp_path / "cleaned"
    code = (
        "import atexit, pathlib, sys\n"
        "sys.modules['peft'] = None\n"
        "import bench\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
        "import peft\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, "x"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: -c needs the 't2i' extra: pip install -e \".[t2i]\"\n"
    assert marker.read_text() == "yes"


def test_the_trainer_called_in_process_names_the_extra(tmp_path, capsys, monkeypatch):
    """``train_t2i.main`` catches the missing package itself (no excepthook in-process):
    one line, exit 2, no run written."""
    from bench import train_t2i

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    out = tmp_path / "run"
    argv = ["--tiny", "--lora", "2", "--max-steps", "1", "--tiny-pairs", "2", "--batch-size",
            "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert train_t2i.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("""needs the 't2i' extra: pip install -e ".[t2i]\"""")
    assert not (out / "config.json").exists() and not (out / "checkpoints").exists()
