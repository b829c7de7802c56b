"""SIGTERM and Ctrl-C: one way to stop, with every ``finally`` block run.

The CLI installs :func:`handlers` for the length of a command. SIGTERM then raises
:class:`Terminated` — a ``KeyboardInterrupt`` subclass, so every cleanup path written for
Ctrl-C (staging folders, ``.tmp-*`` files in the cache, DataLoader workers) runs for it
too — and the CLI exits 143 (128 + SIGTERM), as a shell reports a process killed by it.

:func:`critical` defers both signals over a few file-system moves that must not be
cut in the middle (the switch of an output folder); the signal is raised as soon as
the block ends. Without :func:`handlers` (auditor used as a library) it defers nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


_state = {"depth": 0, "pending": None, "installed": False}


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, _frame) -> None:
    if _state["depth"]:
        _state["pending"] = signum
        return
    _raise(signum)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """Route SIGTERM (and SIGINT) through :func:`_handler` for the block; restore after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, _handler)
    _state["installed"] = True
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _state["installed"] = False
        _state["pending"] = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block is done, then act on them."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if not _state["depth"] and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            _raise(signum)
