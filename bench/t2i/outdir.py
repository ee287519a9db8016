"""Output folders that are never half-written: checked before any work, filled atomically.

Shared by the trainer, ``bench/sample.py`` and ``bench/evaluate.py``:

* :func:`check_out_dir` fails early (one line) when ``--out`` is a file or not writable;
* :func:`write_text_atomic` and :func:`publish_dir` put a file or a staged folder in place
  with ``os.replace``, so a crash leaves the old content or the new, never a mix;
* :func:`write_failure` turns a full disk into "no space left on device" whatever library
  was writing (Python ``OSError``, safetensors' ``SafetensorError``, ``torch.save``'s
  ``unexpected pos``);
* :func:`truncate_jsonl` cuts a step log back to a checkpoint's step on resume.

Errors are :class:`OutputError` (a ``ValueError``); each command reports them as one line.
"""

from __future__ import annotations

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


class OutputError(UsageError):
    """An output path that cannot be written; the message names it (one line)."""


def _probe(folder: Path) -> None:
    """Create and delete a file in ``folder`` (``os.access`` would lie for root and for
    read-only mounts)."""
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=folder)
    os.close(fd)
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
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def stage_dir(final: str | Path) -> Path:
    """A fresh hidden staging folder next to ``final`` (same filesystem: renames are atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))


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
            old = final / f"{TMP_PREFIX}old-{item.name}-{os.getpid()}"
            os.replace(dest, old)
            os.replace(item, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(item, dest)
    stage.rmdir()
    return final


def remove_stale_tmp(*folders: str | Path) -> list[Path]:
    """Delete hidden ``.tmp-*`` leftovers of a killed writer in ``folders``."""
    removed = []
    for folder in folders:
        folder = Path(folder)
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
