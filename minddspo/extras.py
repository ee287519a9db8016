"""A missing optional dependency, reported as the extra that installs it (standard library only).

The core needs torch and numpy; the commands around it need the distribution's extras
(``pyproject.toml``: ``toy``, ``t2i``, ``plot``, ``import``, ``digits``). A command run
without its extra would end in a ``ModuleNotFoundError`` traceback; :func:`missing_extra`
turns that into one line naming the extra and the install command, e.g.::

    error: bench/make_pairs.py needs the 't2i' extra: pip install -e ".[t2i]"

``bench`` and ``toy2d`` call :func:`install` when imported (each with its own module -> extra
table), so an import that fails anywhere in a command, at module level or inside a function,
exits with code 2 and that line; their ``run_command``-style wrappers call
:func:`missing_extra` for a command called in-process. Only a top-level module that cannot be
found names an extra: a missing submodule of an installed package keeps its traceback.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

#: module -> extra, and command -> extra (a command whose extra holds all it needs), per side
_TABLES: list[tuple[Mapping[str, str], Mapping[str, str]]] = []
_installed = False


def command_name(argv0: str | None = None) -> str:
    """How the running command was started: ``bench/make_pairs.py`` (relative to the current
    folder when inside it) or ``python -m bench.digits`` (a package's ``__main__.py``)."""
    path = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv else ""))
    if path.name == "__main__.py":
        parts, folder = [], path.resolve().parent
        while (folder / "__init__.py").is_file():
            parts.insert(0, folder.name)
            folder = folder.parent
        if parts:
            return "python -m " + ".".join(parts)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def missing_extra(exc: BaseException, command: str | None = None) -> str | None:
    """The one-line ``error:`` message for ``exc`` when it is a ``ModuleNotFoundError`` of a
    module an extra provides (None otherwise: a bug, keep its traceback)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    if exc.name != module and _installed_module(module):  # a submodule missing from an
        return None  # installed package: another version than the code expects, not an extra
    command = command or command_name()
    for modules, commands in _TABLES:
        if module in modules:
            extra = commands.get(command, modules[module])
            return f'error: {command} needs the {extra!r} extra: pip install -e ".[{extra}]"'
    return None


def _installed_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-imported package: let the caller say
        return True


def install(modules: Mapping[str, str], commands: Mapping[str, str] | None = None) -> None:
    """Report an uncaught ``ModuleNotFoundError`` of one of ``modules`` (module -> extra) as
    :func:`missing_extra`'s line and exit code 2; ``commands`` maps a command (as
    :func:`command_name` spells it) to the one extra that installs everything it needs."""
    global _installed
    _TABLES.append((dict(modules), dict(commands or {})))
    if _installed:
        return
    _installed = True
    previous = sys.excepthook

    def hook(kind, exc, tb):
        line = None if hasattr(sys, "ps1") else missing_extra(exc)  # never end a REPL
        if line is None:
            return previous(kind, exc, tb)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        print(line, file=sys.stderr, flush=True)
        # An excepthook cannot choose the exit code except by ending the process itself; the
        # interpreter's own exit would follow with code 1. The atexit handlers run first (as a
        # normal exit would run them; os._exit skips them), and the streams are flushed above.
        atexit._run_exitfuncs()
        os._exit(2)

    sys.excepthook = hook
