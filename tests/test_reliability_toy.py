"""Reliability, toy side: a damaged or read-only reference cache, sweep resume, panel
validation, the figures command's errors and self-explaining figures."""

from __future__ import annotations

import csv
import os
import stat

import pytest
from toy_helpers import TINY

import toy2d.sweep as sweep_cli
import toy2d.train as tt
from paper_figures import toy_figures

FAST = ["--steps", "3", "--batch", "8", "--n-eval", "8", "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINDDSPO_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def cached():
    """A sound cache entry for seed 0 of the tiny set-up, and its bytes."""
    tt.load_references(TINY, [0])
    p = tt.cache_path(TINY, 0)
    return p, p.read_bytes()


def _tensors(blob: bytes) -> dict:
    from safetensors.torch import load

    return load(blob)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_sound_entry_is_reused_not_retrained(cached, monkeypatch):
    p, blob = cached
    monkeypatch.setattr(tt, "train_references", lambda *a, **k: pytest.fail("retrained"))
    tt.load_references(TINY, [0])
    assert p.read_bytes() == blob


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_a_damaged_entry_is_reported_in_one_line_and_retrained(cached, capsys, damage):
    p, blob = cached
    if damage == "truncated":
        p.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped":  # same size, one data byte changed: only the checksum sees it
        b = bytearray(blob)
        b[-5] ^= 0x40
        p.write_bytes(bytes(b))
    else:
        p.write_bytes(b"not a safetensors file at all")
    capsys.readouterr()
    refs = tt.load_references(TINY, [0])
    line = _one_line(capsys.readouterr().err)
    assert str(p) in line and "damaged" in line
    # retrained deterministically: the same tensors again, and a sound entry
    fresh, why = tt._read_entry(TINY, 0)
    assert why is None and _same(fresh, _tensors(blob))
    assert all(bool(v.isfinite().all()) for v in refs[0].values())


def test_a_read_only_cache_fails_before_any_work(tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        # root ignores directory permissions: make the cache path a file instead
        (tmp_path / "cache").write_text("not a folder")
    else:
        (tmp_path / "cache" / "toy2d").mkdir(parents=True)
        (tmp_path / "cache" / "toy2d").chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setattr(tt, "train_references", lambda *a, **k: pytest.fail("trained first"))
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        sweep_cli.main(
            ["--seeds", "1", "--n-pairs", "2", "--betas", "400", "--out", str(out)] + FAST
        )
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "not writable" in line and "MINDDSPO_CACHE" in line
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".s.")]


def test_sweep_panel_outside_the_grid_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_cli, "run_sweep", lambda *a, **k: pytest.fail("ran"))
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        sweep_cli.main(["--panel", "5,5", "--out", str(out)] + FAST)
    assert e.value.code == 2
    assert "--panel 5,5 is not a cell of the grid" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_finished_sweep_is_resumed_not_retrained(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_cli, "ToySetup", lambda: TINY)
    out = tmp_path / "s"
    argv = ["--seeds", "2", "--n-pairs", "2", "--betas", "400", "--methods", "dpo,ddspo"]
    argv += ["--out", str(out)] + FAST
    assert sweep_cli.main(argv) == 0
    first = (out / "results.csv").read_bytes()
    calls = []
    real = sweep_cli.finetune
    monkeypatch.setattr(sweep_cli, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert sweep_cli.main(argv) == 0
    assert calls == [] and (out / "results.csv").read_bytes() == first
    # another config (one more step) does not reuse the finished seeds
    assert sweep_cli.main([*argv, "--steps", "4"]) == 0
    assert len(calls) == 1  # both seeds in one batched fine-tune (a chunk of seeds)
    # a damaged stored seed is recomputed, with one line naming it
    cells = sorted((out / "cells").glob("seed*.npz"))
    assert len(cells) == 2
    cells[0].write_bytes(b"broken")
    capsys.readouterr()
    assert sweep_cli.main([*argv, "--steps", "4"]) == 0
    assert "damaged cell" in capsys.readouterr().err and len(calls) == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["seed"] for r in rows} == {"0", "1"}


def test_toy_figures_help_missing_and_foreign_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        toy_figures.main(["--help"])
    assert e.value.code == 0 and "SWEEP_DIR" in capsys.readouterr().out
    for folder, msg in ((tmp_path / "nope", "no such folder"), (tmp_path, "not a finished")):
        with pytest.raises(SystemExit) as e:
            toy_figures.main([str(folder)])
        assert e.value.code == 2 and msg in _one_line(capsys.readouterr().err)


def test_scatter_explains_itself(tmp_path):
    """Axes labels, a legend naming the classes and the GT rings, and a caption."""
    import numpy as np

    from toy2d.plots import legend_handles, plt, sample_caption, save_scatter

    captured = {}
    real_close = plt.close

    def keep(fig=None):
        captured["fig"] = fig
        return real_close(fig)

    plt.close = keep
    try:
        x = np.random.default_rng(0).normal(size=(16, 2))
        labels = np.arange(16) % TINY.toy.num_classes
        save_scatter(tmp_path / "s.png", x, labels, TINY.toy, "title", sample_caption(2, "ddim"))
    finally:
        plt.close = real_close
    fig = captured["fig"]
    assert (tmp_path / "s.png").stat().st_size > 0
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    texts = " ".join(t.get_text() for t in fig.texts).lower()
    assert "accuracy" in texts or "nearest" in texts
    names = [h.get_label() for h in legend_handles(TINY.toy)]
    assert len(names) == TINY.toy.num_classes + 1 and any("mode" in n.lower() for n in names)
