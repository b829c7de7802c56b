"""Hugging Face ``Trainer``: audit the model every N epochs and/or on each checkpoint save.

    from auditor.integrations.transformers import AuditTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[AuditTrainerCallback(layer="backbone.layer4", images=probe_ds,
                                                      concepts=names, artifacts=["watermark"])])

The audited module is called with the probe images as its first positional argument
(``model(pixel_values)``); pass ``module=lambda m: m.backbone`` to audit a part that
takes images directly. Each audit writes ``out/epoch-0001/`` or
``out/checkpoint-500/`` and appends to ``out/history.sqlite``; on a save the row
records the checkpoint folder. Only the main process audits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ._core import PeriodicAuditor

__all__ = ["AuditTrainerCallback"]


class AuditTrainerCallback(TrainerCallback):
    """``every_n_epochs`` (0 = never) and ``on_save`` (audit each saved checkpoint)."""

    def __init__(self, *, every_n_epochs: int = 1, on_save: bool = False, **kwargs: Any):
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.on_save_checkpoint = on_save
        self.auditor = PeriodicAuditor(**kwargs)
        self.auditor.source = "transformers"

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        epoch = int(round(state.epoch or 0))
        if model is not None and self.every_n_epochs and epoch and epoch % self.every_n_epochs == 0 \
                and state.is_world_process_zero:
            self.auditor.audit(model, f"epoch-{epoch:04d}")

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self.on_save_checkpoint and state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin")
                            if (folder / n).is_file()), None)
            self.auditor.audit(model, f"checkpoint-{state.global_step}", checkpoint=weights)
