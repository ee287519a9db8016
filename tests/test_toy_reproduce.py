"""The published toy tables: the README's class-accuracy table is the sweep's, and (slow) the
default sweep reproduces ``paper_figures/output/table.md`` to its printed precision, at this
CPU's dispatch level and at the forced lower ones (see tests/test_dispatch_levels.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_dispatch_levels import LEVELS, _cpu_has_avx2

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "paper_figures" / "output" / "table.md"


def _accuracy_rows(text: str, after: str) -> list[list[str]]:
    """The cells of the first markdown table after the line containing ``after``
    (the reference's label aside, which the two documents word differently)."""
    lines = text[text.index(after) :].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| method"))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")][1:])
    return rows


def test_readme_accuracy_table_is_the_sweeps():
    """Every number of the README's class-accuracy table is the published sweep's."""
    readme = _accuracy_rows((ROOT / "README.md").read_text(), "Class accuracy (share of")
    table = _accuracy_rows(TABLE.read_text(), "**class accuracy**")
    assert len(readme) == 6 and readme == table
    assert all(re.fullmatch(r"0\.\d{3} ± 0\.\d{3}", c) for row in readme for c in row)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("level", ["native", *LEVELS])
def test_default_sweep_reproduces_the_published_tables(level, tmp_path):
    """``python -m toy2d.sweep`` from an empty reference cache writes the committed
    ``table.md`` (every metric, 3 decimals, the verdicts) -- at this CPU's dispatch and at
    forced AVX2 / default. On 2 cores ~30 s quiet, 6-8 min busy; default dispatch (no vector
    kernels) 2-3x longer."""
    if level == "avx2" and not _cpu_has_avx2():
        pytest.skip("the CPU has no AVX2+FMA")
    env = {**os.environ, "MINDDSPO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    env.update(LEVELS.get(level, {}))
    out = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "toy2d.sweep", "--out", str(out), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "table.md").read_text() == TABLE.read_text()
