"""The toy CLIs: outputs, one-line errors with exit code 2, nothing half-written."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from toy_helpers import TINY, fake_cached_reference

from toy2d import run as run_cli
from toy2d import sweep as sweep_cli

FAST = ["--steps", "3", "--batch", "8", "--n-eval", "8"]


@pytest.fixture(autouse=True)
def _tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_cli, "ToySetup", lambda: TINY)
    monkeypatch.setattr(sweep_cli, "ToySetup", lambda: TINY)
    for s in (0, 1):
        fake_cached_reference(TINY, s)


def test_run_writes_metrics_and_scatter(tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        run_cli.main(
            [
                "--method",
                "ddspo",
                "--out",
                str(out),
                "--ref-update",
                "periodic",
                "--ref-tau",
                "1",
                *FAST,
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "class_accuracy=" in line
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["class_accuracy"] <= 1 and len(m["per_class"]["class_accuracy"]) == 8
    assert m["ref_update"]["copy_steps"][0] == 1
    assert (out / "scatter.png").stat().st_size > 1000
    assert run_cli.main(["--method", "ref", "--out", str(tmp_path / "ref"), *FAST]) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--method", "bogus"], "ddspo"),  # the error lists the choices
        (["--method", "dpo", "--n-pairs", "0"], "--n-pairs"),
        (["--method", "dpo", "--n-pairs", "-3"], "--n-pairs"),
        (["--method", "dpo", "--beta", "0"], "--beta"),
        (["--method", "dpo", "--beta", "-1"], "--beta"),
    ],
)
def test_run_bad_input(argv, needle, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        run_cli.main([*argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and needle in err
    assert not out.exists() and list(tmp_path.glob(".never*")) == []


def test_unwritable_out_fails_before_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(run_cli, "load_references", lambda *a, **k: pytest.fail("did work"))
    with pytest.raises(SystemExit) as e:
        run_cli.main(["--method", "dpo", "--out", str(blocker / "sub")])
    assert e.value.code == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_cli.main(["--method", "dpo", "--out", str(blocker)])
    assert e.value.code == 2
    assert blocker.read_text() == "x"


def test_sweep_tiny_grid(tmp_path, capsys):
    out = tmp_path / "s"
    argv = [
        "--seeds",
        "2",
        "--n-pairs",
        "2,3",
        "--betas",
        "400",
        "--out",
        str(out),
        "--no-progress",
        "--panel",
        "2,400",
    ]
    assert sweep_cli.main(argv + FAST) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * (1 + 5 * 2)  # seeds x (ref + 5 methods x 2 N)
    assert {r["method"] for r in rows} == {"ref", "sft", "dpo", "dspo", "dspo_cpp", "ddspo"}
    # DSPO-family rows record their outside beta (the default), the others none
    assert {r["beta_out"] for r in rows if r["method"] in ("dspo", "dspo_cpp")} == {"0.05"}
    assert {r["beta_out"] for r in rows if r["method"] not in ("dspo", "dspo_cpp")} == {""}
    assert all(0 <= float(r["class_accuracy"]) <= 1 for r in rows)
    table = (out / "table.md").read_text()
    assert "DDSPO" in table and "±" in table and "seeds won" in table
    for f in ("fig_grid.png", "fig_panel.png", "samples.npz", "config.json"):
        assert (out / f).exists()
    from toy2d.report import render

    (out / "table.md").unlink()
    render(out)  # redraws from the folder alone
    assert (out / "table.md").read_text() == table


def test_sweep_ablation_tiny(tmp_path):
    out = tmp_path / "a"
    argv = [
        "--ablation",
        "--methods",
        "dpo,ddspo",
        "--seeds",
        "1",
        "--n-pairs",
        "2",
        "--betas",
        "400",
        "--ref-tau",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert sweep_cli.main(argv + FAST) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 4
    assert {r["strategy"] for r in rows} == {
        "frozen/uniform",
        "periodic/uniform",
        "frozen/geometric+lambda",
        "periodic/geometric+lambda",
    }
    assert all(int(r["n_copies"]) > 0 for r in rows if r["strategy"].startswith("periodic"))
    assert "periodic/geometric+lambda" in (out / "ablation.md").read_text()
    assert (out / "fig_ablation.png").exists()


def test_sweep_bad_method_lists_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep_cli.main(["--methods", "dpo,nope", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "dspo_cpp" in err and err.count("\n") == 0
    assert not (tmp_path / "x").exists()


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "toy2d.run",
            "--method",
            "dpo",
            "--beta",
            "-1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--beta" in r.stderr
    assert not (tmp_path / "o").exists()


def test_toy_bench_help_both_ways():
    """``python -m toy2d.bench`` and the README's ``python bench/bench_toy.py`` shim."""
    root = Path(__file__).resolve().parents[1]
    for cmd in (["-m", "toy2d.bench"], [str(root / "bench" / "bench_toy.py")]):
        out = subprocess.run(
            [sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=root, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert "--naive-subset" in out.stdout and "--seeds" in out.stdout


@pytest.mark.slow
def test_full_size_ddspo_beats_the_untuned_reference(tmp_path, monkeypatch):
    """The main job at full size (a real 3000-step reference, 400 fine-tuning steps, 256
    samples per class): DDSPO lifts the reference's class accuracy by a wide margin (seed 0,
    N=12, beta=400: 0.60 -> 0.80 when measured). ~15 s on a quiet 2-core machine."""
    from toy2d.train import ToySetup

    monkeypatch.setattr(run_cli, "ToySetup", ToySetup)  # undo the autouse tiny set-up
    acc = {}
    for method in ("ref", "ddspo"):
        out = tmp_path / method
        assert run_cli.main(["--method", method, "--out", str(out)]) == 0
        acc[method] = json.loads((out / "metrics.json").read_text())["class_accuracy"]
    assert 0.55 < acc["ref"] < 0.67  # the noisy training set itself: 0.67
    assert acc["ddspo"] > acc["ref"] + 0.1


def test_toy_bench_sweeps_times_both_checkouts_and_compares_results(monkeypatch, capsys, tmp_path):
    """``--sweeps``: each sweep in a fresh process from each checkout, alternately, its
    printed times parsed, and the results.csv of every run compared (here a one-seed,
    two-step grid, with this checkout as its own baseline)."""
    import toy2d.bench as tb

    root = Path(__file__).resolve().parent.parent
    tiny = ["--seeds", "1", "--steps", "2", "--n-pairs", "2", "--betas", "400",
            "--methods", "dpo", "--n-eval", "4"]  # fmt: skip
    monkeypatch.setattr(tb, "SWEEPS", (("tiny grid, cold", tiny, True, 999),))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert tb.main(["--sweeps", "--repeats", "1", "--baseline", str(root)]) == 0
    out = capsys.readouterr().out
    assert "tiny grid, cold  (target <= 999 s)" in out
    assert out.count("this ") >= 1 and "baseline" in out
    assert "target met, baseline / this =" in out
    assert "results.csv identical across runs and checkouts: True" in out
    assert len(list(tmp_path.glob("toy2d-bench-*/sweep0-*/results.csv"))) == 2


def test_toy_bench_baseline_must_be_a_checkout(tmp_path, capsys):
    import toy2d.bench as tb

    with pytest.raises(SystemExit) as e:
        tb.main(["--sweeps", "--baseline", str(tmp_path)])
    assert e.value.code == 2 and "not a checkout" in capsys.readouterr().err
