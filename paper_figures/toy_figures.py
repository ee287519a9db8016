"""Turn a toy sweep folder into the README's table and figures, without retraining.

    python -m paper_figures.toy_figures runs/sweep      # table.md, fig_grid.png, fig_panel.png
    python -m paper_figures.toy_figures runs/ablation   # ablation.md, fig_ablation.png

Reads ``results.csv``, ``samples.npz`` and ``config.json`` written by ``toy2d.sweep``; the
drawing lives in :mod:`toy2d.report`, this is only its command line.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from toy2d.cli import Parser, UsageError, fail
from toy2d.report import SWEEP_FILES, check_sweep_dir, render

PROG = "python -m paper_figures.toy_figures"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(
        prog=PROG,
        description="Redraw a toy sweep's table and figures from its folder, without retraining "
        "(sweep: table.md, fig_grid.png, fig_panel.png; --ablation sweep: ablation.md, "
        "fig_ablation.png).",
    )
    p.add_argument(
        "sweep_dir",
        type=Path,
        metavar="SWEEP_DIR",
        help="a folder written by python -m toy2d.sweep (holds " + ", ".join(SWEEP_FILES) + ")",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        config = check_sweep_dir(args.sweep_dir)
        paths = render(args.sweep_dir, config)
    except UsageError as e:
        fail(PROG, str(e))
    except (KeyError, ValueError, StopIteration, zipfile.BadZipFile, OSError) as e:
        fail(PROG, f"{args.sweep_dir}: cannot redraw ({type(e).__name__}: {e})")
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
