"""The toy CLIs: outputs, one-line errors with exit code 2, nothing half-written."""

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from toy_helpers import TINY, fake_cached_reference

from toy2d import run as run_cli
from toy2d import sweep as sweep_cli
from toy2d import train as tt

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


def test_toy_bench_times_the_workload_against_a_baseline_checkout(monkeypatch, capsys, tmp_path):
    """``--baseline DIR`` without ``--sweeps``: the fine-tunes + sampling run from this
    checkout and from DIR, each in a fresh process; the times land on the right side and the
    results are compared. DIR is a copy of this checkout whose fine-tuning is slower and
    whose learning rate is doubled, so both show."""
    import shutil

    import toy2d.bench as tb

    root = Path(__file__).resolve().parent.parent
    base = tmp_path / "base"
    for pkg in ("toy2d", "minddspo"):
        shutil.copytree(root / pkg, base / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    train = base / "toy2d" / "train.py"
    src = train.read_text()
    src = src.replace(
        "    lr: float = 1e-4  # learning rate at", "    lr: float = 2e-4  # learning rate at"
    )
    src = src.replace(
        '    """Fine-tune one member per run',
        '    __import__("time").sleep(3)\n    """Fine-tune one member per run',
        1,
    )
    train.write_text(src)
    monkeypatch.setattr(tb, "SETUP", TINY)
    monkeypatch.setattr(tb, "N_EVAL", 4)
    monkeypatch.setattr(
        tb, "workload", lambda seeds: [tt.Run("dpo", 3, 400.0, 0), tt.Run("ddspo", 2, 200.0, 0)]
    )
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--seeds", "1", "--steps", "3", "--no-flops", "--baseline", str(base)]
    assert tb.main(argv) == 0
    out = capsys.readouterr().out
    this = float(re.search(r"this checkout *: *([\d.]+) s", out).group(1))
    slow = float(re.search(r"baseline checkout: *([\d.]+) s", out).group(1))
    assert slow >= this + 2.5, out  # the sleeping side is the baseline
    assert "baseline / this  :" in out
    assert "this vs baseline (parameters and samples)" in out and "bitwise equal: no" in out
    assert len(list(tmp_path.glob("toy2d-bench-*/*.safetensors"))) == 2
    # DIR's own copy without the changes: the same bits
    train.write_text((root / "toy2d" / "train.py").read_text())
    assert tb.main(argv) == 0
    assert "bitwise equal: yes" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--naive", "--single-run"])
def test_toy_bench_baseline_times_only_the_workload(flag, capsys):
    """``--naive`` / ``--single-run`` time this checkout alone: with ``--baseline``, exit 2
    before any work, naming both flags."""
    import toy2d.bench as tb

    root = Path(__file__).resolve().parent.parent
    with pytest.raises(SystemExit) as e:
        tb.main(["--baseline", str(root), flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--baseline" in err and flag in err.splitlines()[-1]


def test_toy_bench_baseline_must_be_a_checkout(tmp_path, capsys):
    import toy2d.bench as tb

    with pytest.raises(SystemExit) as e:
        tb.main(["--sweeps", "--baseline", str(tmp_path)])
    assert e.value.code == 2 and "not a checkout" in capsys.readouterr().err


# ------------------------------------------------------ one run per folder, umask, bad flags


@pytest.mark.parametrize("cli", ["sweep", "beta_search", "run"])
def test_a_second_run_on_a_locked_out_is_refused(cli, tmp_path, capsys, monkeypatch):
    """Another process holds the folder's lock (as a running sweep does): exit 2, one line
    naming the folder, the folder and its neighbours untouched; once it lets go, the run
    goes through."""
    from toy2d import beta_search as bs_cli
    from toy2d.cli import lock_path

    monkeypatch.setattr(bs_cli, "ToySetup", lambda: TINY)

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("earlier run\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; "
         f"l = FileLock({str(lock_path(out))!r}); l.acquire(); "
         f"open({str(lock_path(out))!r}, 'w').write('4242'); print('held', flush=True); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    main, argv = {
        "sweep": (sweep_cli.main, ["--seeds", "1", "--n-pairs", "2", "--betas", "400",
                                   "--methods", "dpo", "--no-progress", *FAST]),
        "beta_search": (bs_cli.main, ["--seeds", "1", "--seed-offset", "0", "--n-pairs", "2",
                                      "--betas", "400", "--grid", "0.05", "--no-progress",
                                      *FAST]),
        "run": (run_cli.main, ["--method", "dpo", "--n-pairs", "2", *FAST]),
    }[cli]  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(SystemExit) as e:
            main([*argv, "--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err
        assert err.endswith(f"--out {out} is in use by another run (pid 4242)")
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder
        assert [p.name for p in out.iterdir()] == ["results.csv"]
        assert (out / "results.csv").read_text() == "earlier run\n"
    finally:
        holder.communicate("", timeout=60)
    assert main([*argv, "--out", str(out)]) == 0  # released: the run goes through
    written = {"sweep": "table.md", "beta_search": "search.md", "run": "metrics.json"}[cli]
    assert (out / written).is_file()
    assert lock_path(out).name in before  # the holder's lock file; gone after the run:
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        n for n in before if n != lock_path(out).name
    ]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_and_cache_follow_the_umask(umask, tmp_path, monkeypatch):
    """Output folders, their files and new reference-cache entries get the modes the umask
    gives (a staging folder from ``tempfile.mkdtemp`` would leave every output 0700)."""
    from toy2d.train import cache_dir, cache_path

    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "fresh-cache"))  # trains seed 0
    old = os.umask(umask)
    try:
        assert run_cli.main(["--method", "dpo", "--out", str(tmp_path / "r"), *FAST]) == 0
        argv = ["--seeds", "1", "--n-pairs", "2", "--betas", "400", "--methods", "dpo",
                "--no-progress", "--out", str(tmp_path / "s" / "sweep"), *FAST]  # fmt: skip
        assert sweep_cli.main(argv) == 0
    finally:
        os.umask(old)
    dirs = [tmp_path / "r", tmp_path / "s", tmp_path / "s" / "sweep", cache_dir()]
    dirs += [tmp_path / "s" / "sweep" / "cells"]
    files = [tmp_path / "r" / "metrics.json", tmp_path / "r" / "scatter.png"]
    files += [tmp_path / "s" / "sweep" / f for f in ("results.csv", "samples.npz", "table.md")]
    files += list((tmp_path / "s" / "sweep" / "cells").iterdir())
    files += [cache_path(TINY, 0)]
    assert {str(d): oct(d.stat().st_mode & 0o777) for d in dirs} == {
        str(d): oct(0o777 & ~umask) for d in dirs
    }
    assert {str(f): oct(f.stat().st_mode & 0o777) for f in files} == {
        str(f): oct(0o666 & ~umask) for f in files
    }


@pytest.mark.parametrize("cli", ["sweep", "beta_search"])
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--methods", ""], "error: --methods is empty"),
        (["--methods", " , "], "error: --methods is empty"),
        (["--seed-offset", "-1"], "error: --seed-offset must be >= 0, got -1"),
        (["--seeds", "0"], "error: --seeds must be > 0, got 0"),
    ],
)
def test_empty_methods_and_negative_seeds_are_refused(cli, flags, needle, tmp_path, capsys):
    from toy2d import beta_search as bs_cli

    if cli == "beta_search" and flags[0] == "--methods":
        flags, needle = ["--grid", flags[1]], needle.replace("--methods", "--grid")
    main = {"sweep": sweep_cli.main, "beta_search": bs_cli.main}[cli]
    with pytest.raises(SystemExit) as e:
        main([*flags, "--out", str(tmp_path / "o"), "--no-progress", *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]  # nothing written


def test_run_refuses_a_negative_seed(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli.main(["--method", "dpo", "--seed", "-1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error: --seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_says_it_trains_the_reference_and_reports_its_accuracy(tmp_path, monkeypatch, capsys):
    """A cold cache: one stderr line says the reference is being trained and where it is
    cached, then a progress bar (none with --no-progress); the summary line carries the
    reference's class accuracy beside the tuned one's -- the number a ``--method ref`` run
    of the same seed reports. A warm run says nothing about training."""
    from toy2d.train import cache_path

    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cold"))

    def run(method, *flags):
        out = tmp_path / f"{method}{len(flags)}"
        strong = [
            "--steps",
            "30",
            "--batch",
            "16",
            "--n-eval",
            "16",
            "--lr",
            "5e-2",
            "--pairs",
            "gt",
        ]
        assert run_cli.main(["--method", method, "--out", str(out), *flags, *strong]) == 0
        cap = capsys.readouterr()
        assert cap.out.count("\n") == 1
        fields = dict(f.split("=", 1) for f in cap.out.split())
        return fields, cap.err, json.loads((out / "metrics.json").read_text())

    fields, err, metrics = run("sft")
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[0].startswith("python -m toy2d.run: training the reference model of seed 0")
    assert str(cache_path(TINY, 0)) in lines[0] and cache_path(TINY, 0).is_file()
    assert any("100%" in ln and "step" in ln for ln in lines[1:])  # the bar ran to the end
    ref_fields, ref_err, _ = run("ref", "--no-progress")
    assert ref_err == ""  # cached: no message, and no bar
    assert fields["reference_class_accuracy"] == ref_fields["class_accuracy"]
    assert float(fields["class_accuracy"]) == pytest.approx(metrics["class_accuracy"], abs=1e-4)
    assert metrics["reference_class_accuracy"] == pytest.approx(
        float(ref_fields["class_accuracy"]), abs=1e-4
    )
    assert fields["class_accuracy"] != fields["reference_class_accuracy"]  # not the same model
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cold2"))
    _, err, _ = run("sft", "--no-progress")
    assert "training the reference model" in err and "%|" not in err


@pytest.mark.parametrize("cli", ["run", "sweep"])
def test_threads_flag_sets_torch_threads_for_the_run(cli, tmp_path, monkeypatch, capsys):
    """``--threads N``: the run trains with N intra-op threads and gives the old count back;
    ``--threads -1`` is refused in one line; ``toy2d.run`` defaults to 1 thread, and with
    ``--threads 0`` (torch's default, > 1 thread) a cold run's message suggests 1."""
    import torch

    import toy2d.train as tt

    seen = []
    real = tt.load_references
    for mod in (run_cli, sweep_cli):
        monkeypatch.setattr(mod, "load_references", lambda *a, **k: seen.append(
            torch.get_num_threads()) or real(*a, **k))  # fmt: skip
    main = {"run": run_cli.main, "sweep": sweep_cli.main}[cli]
    argv = {"run": ["--method", "dpo"], "sweep": ["--seeds", "1", "--n-pairs", "2", "--betas",
            "400", "--methods", "dpo", "--no-progress"]}[cli]  # fmt: skip
    before = torch.get_num_threads()
    assert main([*argv, "--threads", "2", "--out", str(tmp_path / "a"), *FAST]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    torch.set_num_threads(2)
    try:
        assert main([*argv, "--out", str(tmp_path / "d"), *FAST]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen[1] == (1 if cli == "run" else 2)  # run: 1 thread; sweep: torch's setting
    with pytest.raises(SystemExit) as e:
        main([*argv, "--threads", "-1", "--out", str(tmp_path / "b"), *FAST])
    assert e.value.code == 2 and not (tmp_path / "b").exists()
    assert "error: --threads must be >= 0, got -1" in capsys.readouterr().err
    if cli == "run":
        monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cold"))
        torch.set_num_threads(2)
        try:
            flags = ["--threads", "0", "--no-progress"]
            assert main([*argv, "--out", str(tmp_path / "c"), *flags, *FAST]) == 0
        finally:
            torch.set_num_threads(before)
        assert "; --threads 1 if other processes share the cores)" in capsys.readouterr().err
