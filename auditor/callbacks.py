"""Training-loop callbacks (see :mod:`auditor.integrations`), importable by one name:

    from auditor.callbacks import AuditCallback          # needs lightning
    from auditor.callbacks import AuditTrainerCallback   # needs transformers

Each framework is imported only when its callback is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditCallback", "AuditTrainerCallback", "PeriodicAuditor"]


def __getattr__(name: str) -> Any:
    if name == "AuditCallback":
        from .integrations.lightning import AuditCallback

        return AuditCallback
    if name == "AuditTrainerCallback":
        from .integrations.transformers import AuditTrainerCallback

        return AuditTrainerCallback
    if name == "PeriodicAuditor":
        from .integrations import PeriodicAuditor

        return PeriodicAuditor
    raise AttributeError(f"module 'auditor.callbacks' has no attribute {name!r}")
