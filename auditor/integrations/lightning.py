"""PyTorch Lightning: audit the model every N epochs and/or whenever a checkpoint is saved.

    from auditor.integrations.lightning import AuditCallback

    trainer = L.Trainer(callbacks=[AuditCallback(layer="net.features.13", images=probe_ds,
                                                 concepts=names, artifacts=["watermark"],
                                                 every_n_epochs=1, out="audits")])

Each audit writes ``out/epoch-0001/`` (``json`` and ``html`` by default) and appends a
row to ``out/history.sqlite`` (``auditor history out``). Only rank 0 audits.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from ._core import PeriodicAuditor

__all__ = ["AuditCallback"]


class AuditCallback(Callback):
    """Lightning callback: ``every_n_epochs`` (0 = never) and ``on_checkpoint`` (audit when one is saved).

    Other keyword arguments go to :class:`~auditor.integrations.PeriodicAuditor`
    (``layer``, ``images``, ``labels``/``concepts``, ``artifacts``, ``out``, ``history``, …).
    """

    def __init__(self, *, every_n_epochs: int = 1, on_checkpoint: bool = False, **kwargs: Any):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.on_checkpoint = on_checkpoint
        self.auditor = PeriodicAuditor(**kwargs)
        self.auditor.source = "lightning"

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and trainer.is_global_zero:
            self.auditor.audit(pl_module, f"epoch-{epoch:04d}")

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.on_checkpoint and trainer.is_global_zero:
            self.auditor.audit(pl_module, f"step-{trainer.global_step:07d}")
