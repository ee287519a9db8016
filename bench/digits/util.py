"""Small helpers: atomic directories, done markers, subprocess runs, timing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench.t2i.outdir import stage_dir, write_text_atomic

REPO = Path(__file__).resolve().parents[2]
MARKER = "DONE.json"


class StageError(RuntimeError):
    """A project command failed; the message names the command and its last output."""


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory; rename it to ``final`` when the block succeeds."""
    final = Path(final)
    tmp = stage_dir(final)  # per process; a killed run's is swept under the folder's lock
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def done(stage_dir: Path) -> bool:
    """Has this stage finished (its marker exists)?"""
    return (Path(stage_dir) / MARKER).is_file()


def mark_done(stage_dir: Path, info: dict) -> None:
    """Write the stage's marker (atomically), with ``info`` in it."""
    write_json(Path(stage_dir) / MARKER, info)


def read_marker(stage_dir: Path) -> dict:
    return json.loads((Path(stage_dir) / MARKER).read_text())


def command(script: str, *args: str) -> list[str]:
    """The command line of one of the project's own ``bench/`` scripts."""
    return [sys.executable, str(REPO / "bench" / script), *map(str, args)]


def run_command(cmd: list[str], log: Path, threads: int | None = None) -> float:
    """Run ``cmd`` from the repo root with its output in ``log`` (and ``threads`` torch
    threads, default: inherited); seconds taken. Raises ``StageError`` with the last lines
    of the log when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("DIFFUSERS_VERBOSITY", "error")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise StageError(f"{Path(cmd[1]).name} exited {rc}: {' | '.join(tail)} (log: {log})")
    return time.perf_counter() - t0
