"""Training-loop callbacks that audit the model as it trains and append to the history.

- :class:`auditor.integrations.lightning.AuditCallback` (PyTorch Lightning)
- :class:`auditor.integrations.transformers.AuditTrainerCallback` (Hugging Face ``Trainer``)

Each module imports its framework; import the one you use (``auditor.callbacks``
offers both names lazily). The shared work is :class:`PeriodicAuditor`.
"""

from ._core import PeriodicAuditor

__all__ = ["PeriodicAuditor"]
