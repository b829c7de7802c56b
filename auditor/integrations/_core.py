"""What the callbacks share: one audit configuration, the probe set read once, an
audit of the live module per epoch or checkpoint, its report and a history row."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import FIELDS, make_config
from ..errors import ConfigError, did_you_mean
from ..history import History
from ..results import AuditResult


class PeriodicAuditor:
    """Audits a live ``nn.Module`` on a fixed probe set and records each audit.

    Args:
        layer: layer name(s) of the audited module.
        images: a folder of probe images (with ``labels``) or a torch ``Dataset`` of
            ``(image, concept_vector)`` (with ``concepts``), as :func:`auditor.audit` takes.
        artifacts: artifact concept names.
        out: folder for the reports (``out/<step>/``) and, by default, the history.
        history: history database (default ``out/history.sqlite``).
        formats: report formats per audit (default ``json`` and ``html``).
        module: a function picking the module to audit from the one the framework
            passes (e.g. ``lambda m: m.net``); default: that module itself.
        log: progress messages (default: stderr).
        **options: any ``auditor run`` setting by its config name.
    """

    source = "api"

    def __init__(self, *, layer: str | Sequence[str], images: Any, labels: str | os.PathLike | None = None,
                 artifacts: Sequence[str] = (), concepts: Sequence[str] | None = None,
                 out: str | os.PathLike = "audits", history: str | os.PathLike | None = None,
                 formats: Sequence[str] = ("json", "html"), module: Callable[[Any], Any] | None = None,
                 log: Callable[[str], None] | None = None, **options: Any):
        unknown = [k for k in options if k not in FIELDS]
        if unknown:
            raise ConfigError(f"unknown audit option {unknown[0]!r}{did_you_mean(unknown[0], FIELDS)}")
        values: dict[str, Any] = dict(options)
        values["layer"] = layer if isinstance(layer, str) else ",".join(layer)
        values["artifacts"] = tuple(artifacts)
        self._dataset = None
        if isinstance(images, (str, os.PathLike)):
            values["images"] = str(images)
            if labels is not None:
                values["labels"] = str(labels)
        else:
            self._dataset, self._concepts = images, concepts
        values.setdefault("out", str(out))
        self.cfg = make_config(values, "the audit callback")
        self.out = Path(out)
        self.history_path = Path(history) if history is not None else self.out / "history.sqlite"
        self.formats = tuple(formats) if "json" in formats else (*formats, "json")
        self.pick = module
        self.log = log
        self._probe: tuple[Any, Any] | None = None
        self.results: list[tuple[str, AuditResult]] = []

    def probe(self) -> tuple[Any, Any]:
        if self._probe is None:
            if self._dataset is not None:
                from ..api import dataset_probe

                self._probe = (dataset_probe(self._dataset, self._concepts), None)
            else:
                from ..pipeline import load_probe

                self._probe = load_probe(self.cfg, progress=False)
        return self._probe

    def audit(self, module: Any, step: str, checkpoint: str | os.PathLike | None = None) -> AuditResult:
        """Audit ``module`` now: report in ``out/<step>/``, a row in the history; returns the result."""
        from ..api import audit_config, in_memory_model

        target = self.pick(module) if self.pick is not None else module
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", step)
        report_dir = self.out / safe
        cfg = self.cfg.model_copy(update={"out": str(report_dir),
                                          "title": self.cfg.title or f"Audit at {step}"})
        probe, _ = self.probe()
        result = audit_config(cfg, model=in_memory_model(target, spec=f"{type(target).__name__} at {step}"),
                              probe=probe, log=self.log, progress=False)
        assert result is not None
        written = result.save(report_dir, formats=self.formats)
        ckpt = Path(checkpoint) if checkpoint is not None else None
        sha = None
        if ckpt is not None and ckpt.is_file():
            from ..data import sha256_file

            sha = sha256_file(ckpt)
        with History(self.history_path) as h:
            h.record(result, source=self.source, result_path=written["json"], report_dir=report_dir,
                     checkpoint=ckpt, checkpoint_sha256=sha, step=step)
        self.results.append((step, result))
        return result
