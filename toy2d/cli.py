"""Shared command-line plumbing: argument validation and all-or-nothing output folders."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from contextlib import contextmanager, suppress
from dataclasses import fields
from pathlib import Path

from minddspo.methods import dspo_beta_warning
from minddspo.refupdate import REF_UPDATES
from minddspo.timesteps import SAMPLERS as TS_SAMPLERS
from minddspo.timesteps import WEIGHTS

from .train import PAIR_SOURCES, SAMPLERS, FinetuneConfig, Strategy


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def fail(prog: str, msg: str) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        fail(self.prog, message)


def add_training_args(p: argparse.ArgumentParser, threads: int = 0) -> None:
    """The fine-tuning, evaluation and strategy flags every toy command shares, and
    ``--threads`` (default ``threads``)."""
    d, s = FinetuneConfig(), Strategy()
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="evaluation sampler")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning Adam steps")
    p.add_argument("--batch", type=int, default=d.batch, help="preference pairs per step")
    p.add_argument("--lr", type=float, default=d.lr, help="lr at beta = 400 (see --lr-rule)")
    p.add_argument("--lr-rule", choices=("scaled", "constant"), default=d.lr_rule,
                   help="scaled: lr x beta / 400 (the paper's lr ∝ beta); constant: --lr")  # fmt: skip
    p.add_argument(
        "--beta-out",
        type=float,
        default=d.beta_out,
        help="dspo/dspo_cpp: outside beta (official scale 0.001-0.05; the cell's --beta is "
        "their beta_logit); default from the documented search (toy2d.beta_search)",
    )
    p.add_argument("--pairs", choices=PAIR_SOURCES, default=d.pairs, help="preference data source")
    p.add_argument("--n-eval", type=int, default=256, help="evaluation samples per class")
    p.add_argument("--ref-update", choices=REF_UPDATES, default=s.ref_update,
                   help="frozen reference, or periodic copies (Kang et al.)")  # fmt: skip
    p.add_argument("--ref-tau", type=int, default=s.ref_tau,
                   help="periodic: copy the policy into the reference every tau steps")  # fmt: skip
    p.add_argument("--ref-delta", type=float, default=s.ref_delta,
                   help="periodic: freeze once the divergence estimate exceeds delta")  # fmt: skip
    p.add_argument("--timestep-sampler", choices=TS_SAMPLERS, default=s.timestep_sampler,
                   help="training timestep distribution")  # fmt: skip
    p.add_argument("--timestep-weight", choices=WEIGHTS, default=s.timestep_weight,
                   help="none, lambda (logit weight) or linear (loss weight)")  # fmt: skip
    add_threads_arg(p, threads)


def add_threads_arg(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=default,
        help=f"torch intra-op threads (0: torch's default, one per core; default {default}). "
        "On a machine other processes share, 1 is much faster: idle OpenMP workers spin and "
        "wait for a busy core (bench/RESULTS.md)",
    )


@contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` for the block (n = 0: leave torch's default)."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_training_args(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0) < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    for name in ("steps", "batch", "n_eval", "ref_tau"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("lr", "ref_delta", "beta_out"):
        v = getattr(args, name)
        if not (v > 0 and v < float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} must be finite and > 0, got {v}")
    warning = dspo_beta_warning("dspo", args.beta_out)
    if warning:
        print(warning.replace("dspo with outside beta", "--beta-out"), file=sys.stderr)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        lr_rule=args.lr_rule,
        pairs=args.pairs,
        beta_out=args.beta_out,
    )


def strategy(args: argparse.Namespace) -> Strategy:
    names = {f.name for f in fields(Strategy)}
    return Strategy(**{k: v for k, v in vars(args).items() if k in names})


def lock_path(out: Path) -> Path:
    """The lock file of output folder ``out``: ``.NAME.lock`` beside it (it outlives the
    staging folder's move into place; two spellings of one folder share it). It holds the
    owner's pid and is removed when the lock is let go."""
    target = Path(os.path.abspath(out))
    target = target.parent.resolve() / target.name
    return target.parent / f".{target.name}.lock"


class Staging:
    """Write into a temp folder beside ``out``; move into place only on success.

    Creating the temp folder up front is the writability check, so an unwritable
    ``--out`` fails before any work and leaves nothing behind. For the life of the run
    (until :meth:`unlock`) it holds an exclusive lock on ``out`` (:func:`lock_path`): a
    second run on the same folder fails at once instead of mixing its files in. Folders
    are made with the process's umask, like every file written into them.
    """

    def __init__(self, out: Path):
        from filelock import FileLock, Timeout

        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a directory")
        parent = self.out.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"--out {self.out}: {parent} is not a directory")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(lock_path(self.out)))
            self._lock.acquire(blocking=False)
        except Timeout:
            raise UsageError(
                f"--out {self.out} is in use by another run{_holder(lock_path(self.out))}"
            ) from None
        except OSError as e:
            raise UsageError(f"--out {self.out} is not writable ({e.strerror})") from None
        with suppress(OSError):  # only a hint for the message above
            lock_path(self.out).write_text(f"{os.getpid()}\n")
        try:
            self.tmp = _mkdir_unique(self.out.parent, f".{self.out.name}.tmp-")
        except OSError as e:
            self.unlock()
            raise UsageError(f"--out {self.out} is not writable ({e.strerror})") from None

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        for f in self.tmp.iterdir():
            dst = self.out / f.name
            if dst.is_dir() and not f.is_dir():
                shutil.rmtree(dst)
            os.replace(f, dst)
        self.tmp.rmdir()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.unlock()

    def unlock(self) -> None:
        """Let go of the lock and remove its file (while still held: no one waits on it;
        filelock >= 3.30 never grants a lock on a removed file), so nothing is left beside
        ``out``. Calling it again does nothing."""
        if self._lock.is_locked:
            with suppress(OSError):
                lock_path(self.out).unlink()
            self._lock.release()


def _holder(lock: Path) -> str:
    """`` (pid N)`` of the process that wrote ``lock``, or ``""`` when unreadable."""
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new folder ``parent/PREFIX<random>`` made with the umask (``tempfile.mkdtemp``
    would make it 0700, and it becomes the output folder)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name {prefix}* in {parent}")
