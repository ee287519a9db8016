"""Ctrl-C and SIGTERM as one exception, with short critical sections that finish first.

Inside :func:`handle_signals` both SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the
main thread (Python's default does so for SIGINT only; SIGTERM would kill the process
without unwinding, leaving temporary folders and a torn log line). Inside :func:`critical`
(the two renames that put a finished checkpoint or ``final/`` in place) a signal is held
back and raised when the block ends, so an interrupt never leaves a folder half-renamed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"depth": 0, "pending": False, "signum": None}


def _handler(signum, frame) -> None:
    _state["signum"] = signum
    if _state["depth"]:
        _state["pending"] = True
        return
    raise KeyboardInterrupt


@contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for the block (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.update(signum=None, pending=False)
    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block is done, then raise ``KeyboardInterrupt``."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if not _state["depth"] and _state["pending"]:  # only after a normal exit of the block
        _state["pending"] = False
        raise KeyboardInterrupt


def exit_code() -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(_state["signum"] or signal.SIGINT)
