"""Output folders that are never half-written: checked before any work, filled atomically.

Shared by the trainer, ``bench/sample.py`` and ``bench/evaluate.py``:

* :func:`check_out_dir` fails early (one line) when ``--out`` is a file or not writable;
* :func:`write_text_atomic` and :func:`publish_dir` put a file or a staged folder in place
  with ``os.replace``, so a crash leaves the old content or the new, never a mix;
* :func:`write_failure` turns a full disk into "no space left on device" whatever library
  was writing (Python ``OSError``, safetensors' ``SafetensorError``, ``torch.save``'s
  ``unexpected pos``);
* :func:`truncate_jsonl` cuts a step log back to a checkpoint's step on resume;
* :func:`run_lock` makes a command the only writer of its output folder for its whole run,
  and :func:`remove_stale_tmp` (leftovers of a killed writer) works only under that lock.

Errors are :class:`OutputError` (a :class:`~bench.t2i.errors.UsageError`); each command reports them as one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.t2i.cli import UsageError

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"  # in an output folder while a command writes into it; removed after
_held: set[Path] = set()  # output folders whose lock this process holds


class OutputError(UsageError):
    """An output path that cannot be written; the message names it (one line)."""


def _probe(folder: Path) -> None:
    """Create and delete a file in ``folder`` (``os.access`` would lie for root and for
    read-only mounts)."""
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=folder)
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):  # swept by the folder's lock holder
        os.unlink(name)


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Fail unless ``path`` is a folder, or can be created as one, that this process can
    write to. Nothing is created: the probe file lives in the nearest existing folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        _probe(existing)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write to {existing} ({_reason(e)})") from None
    return path


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def no_space(e: BaseException) -> bool:
    """Did a write fail because the disk (or quota) is full? Python raises ``OSError``
    ENOSPC; safetensors a ``SafetensorError`` naming "os error 28"; ``torch.save`` a
    ``RuntimeError`` with ``unexpected pos`` or ``file write failed`` and no errno."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return any(
        s in text
        for s in (
            "no space left",
            "os error 28",
            "disk quota",
            "unexpected pos",
            "file write failed",
        )
    )


def write_failure(e: BaseException, what: str | Path) -> OutputError | None:
    """A one-line :class:`OutputError` for a failed write of ``what``, or None when ``e`` is
    not a write failure (a bug: let it raise with its traceback)."""
    if no_space(e):
        return OutputError(f"no space left on device while writing {what}")
    if isinstance(e, OSError) and e.errno is not None:
        return OutputError(f"cannot write {what}: {_reason(e)}")
    return None


@contextmanager
def writing(what: str | Path) -> Iterator[None]:
    """Report a full disk or an unwritable path met inside the block as one
    :class:`OutputError` naming ``what``."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        err = write_failure(e, what)
        if err is None:
            raise
        raise err from e


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``path`` through a temporary sibling and ``os.replace``."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _proc_umask() -> int | None:
    """The ``Umask:`` line of ``/proc/self/status`` (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    mask = os.umask(0)  # briefly 0: only at import, under the import lock
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _proc_umask()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, and a
    moment at 0 would let another thread create world-writable files): from
    ``/proc/self/status`` on Linux, elsewhere the umask this module found at import."""
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def tmp_path_for(final: str | Path, kind: str = "") -> Path:
    """A new, unused hidden name next to ``final`` (``.tmp-[kind-]NAME-PID-RANDOM``): two
    writers never share a temporary file or folder. Created empty, with the mode a plain
    ``open`` would give it (``mkstemp`` makes it private, 0600, and the file that replaces
    ``final`` would keep that); the caller replaces it."""
    final = Path(final)
    fd, name = tempfile.mkstemp(
        prefix=f"{TMP_PREFIX}{kind + '-' if kind else ''}{final.name}-{os.getpid()}-",
        dir=final.parent,
    )
    os.close(fd)
    os.chmod(name, 0o666 & ~umask())  # not os.fchmod: missing on Windows before Python 3.13
    return Path(name)


def stage_dir(final: str | Path) -> Path:
    """A fresh hidden staging folder next to ``final`` (same filesystem: renames are atomic),
    with the mode a plain ``mkdir`` would give it (``mkdtemp`` makes it private, 0700, and the
    published folder would keep that)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(
        tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent)
    )
    os.chmod(stage, 0o777 & ~umask())
    return stage


def publish_dir(stage: Path, final: str | Path) -> Path:
    """Move the staged folder into place. A new ``final`` is one rename; into an existing
    one each staged entry replaces its namesake (other entries are kept)."""
    final = Path(final)
    if not final.exists():
        os.replace(stage, final)
        return final
    for item in sorted(stage.iterdir()):
        dest = final / item.name
        if dest.is_dir() and not dest.is_symlink():
            old = tmp_path_for(dest, "old")
            old.unlink()
            os.replace(dest, old)
            os.replace(item, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, dest)
    stage.rmdir()
    return final


def remove_stale_tmp(*folders: str | Path) -> list[Path]:
    """Delete hidden ``.tmp-*`` leftovers of a killed writer in ``folders``. Only under the
    :func:`run_lock` of a folder holding them (a ``RuntimeError`` otherwise): a ``.tmp-*`` of
    a live run is never removed, because that run holds the lock."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not holds_lock(folder):
            raise RuntimeError(f"remove_stale_tmp({folder}) without holding its run_lock")
        if not folder.is_dir():
            continue
        for p in folder.glob(TMP_PREFIX + "*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Keep the records of a step log with ``step <= step`` (and drop a torn last line):
    a run resumed from a checkpoint at ``step`` logs the later steps again. Returns the
    number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def holds_lock(path: str | Path) -> bool:
    """Is ``path`` inside (or equal to) an output folder whose :func:`run_lock` this
    process holds?"""
    path = Path(path).resolve()
    return any(path == d or d in path.parents for d in _held)


def _holder(lock: Path) -> str:
    """`` (pid N)`` of the process that wrote ``lock``, or ``""`` when unreadable."""
    try:
        pid = lock.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextmanager
def run_lock(out: str | Path, flag: str = "--out") -> Iterator[Path]:
    """Hold the lock of the output folder ``out`` for the block: the one process writing
    into it. Take it before anything else reads or writes ``out``.

    The lock is an operating-system file lock on ``out/.lock`` (``filelock``), freed by the
    system when its process dies, even by ``kill -9``; the file holds the owner's pid. A
    second process is refused at once with an :class:`OutputError` naming ``flag``, the
    folder and that pid, and touches nothing. ``out`` is created if needed; when the block
    ends the lock file is removed, and so is every folder the call created if it is empty
    again, so a refused or failed command leaves no trace."""
    from filelock import FileLock, Timeout

    out = check_out_dir(out, flag)  # a file or an unwritable disk: one line, nothing created
    made = [d for d in (out, *out.parents) if not d.exists()][::-1]  # outermost first
    lock_file = out / LOCK_FILE
    try:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_file))
        try:
            with writing(out):
                lock.acquire(blocking=False)
        except Timeout:
            raise OutputError(
                f"{flag} {out} is in use by another run{_holder(lock_file)}"
            ) from None
        try:
            with contextlib.suppress(OSError):  # only a hint for the message above
                lock_file.write_text(f"{os.getpid()}\n")
            key = out.resolve()
            _held.add(key)
            try:
                yield out
            finally:
                _held.discard(key)
                with contextlib.suppress(OSError):  # while still held: no one waits on it
                    lock_file.unlink()
        finally:
            lock.release()
    finally:
        for d in reversed(made):  # innermost first; a folder with anything in it stays
            with contextlib.suppress(OSError):
                d.rmdir()
