"""User-facing errors.

Every failure a user can cause is an :class:`AuditorError`. The CLI maps them to
exit code 2 with a one-line message; anything else is a bug in auditor (the CLI
still exits 2 with one line for it; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AuditorError(Exception):
    """Base class: the audit cannot run because of its inputs."""

    exit_code = 2


class ConfigError(AuditorError):
    """A configuration value or key is invalid."""


class ModelError(AuditorError):
    """The model or its weights cannot be loaded."""


class LayerError(AuditorError):
    """The requested layer does not exist or has an unusable output."""


class DataError(AuditorError):
    """Probe images or concept labels are missing, unreadable or invalid."""


class ReportError(AuditorError):
    """A saved result cannot be read or rendered."""


class OutputError(AuditorError):
    """The output folder cannot be written as asked (a file auditor did not write, a lock held)."""


class AuditorWarning(UserWarning):
    """Something the user should know that does not stop the audit (also logged and kept in the results)."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` or an empty string."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"
