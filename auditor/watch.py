"""``auditor watch DIR --config audit.yaml``: audit every new checkpoint that appears in DIR.

Each pass lists ``*.pt``, ``*.pth`` and ``*.safetensors`` in DIR (not recursive), in
mtime-then-name order, and audits each complete one that the history does not hold
yet (same name, same sha256): ``reports/<checkpoint>/`` gets the full report, and
``reports/<checkpoint>/compare/`` its comparison with the previously audited
checkpoint. ``reports/index.html`` shows a timeline per artifact.

Complete files only. A checkpoint still being written is left for a later pass:
- ``.safetensors``: the 8-byte header length, the JSON header and the tensors' data
  offsets must account for the file's size exactly;
- ``.pt``/``.pth`` (``torch.save``'s zip format): the zip end-of-central-directory
  record must be there and the central directory must read;
- any file with a sentinel ``<name>.done`` beside it counts as complete (the way to
  mark a legacy, non-zip ``torch.save`` file, or any writer's own protocol).
The file's size and mtime must also be the same before and after hashing it.

Restart-safe: the history (SQLite) is the ledger. A checkpoint is recorded only
after its report is in place; a restart skips what the history holds, and a report
already in place for the same sha256 (a crash between the two) is recorded without
auditing again. Nothing is audited twice and nothing is skipped: the ledger is a
set of (name, sha256), not a high-water mark, so a checkpoint copied in later with
an old mtime is audited too. Two watchers of one folder are kept apart by a lock
file beside the history (``filelock``): the second one waits ``--lock-timeout``
seconds, then gives up (``--once``: exit 0, the other watcher does the work).

The probe set is read (and synthesised, with ``synth``) once per watcher; each
checkpoint's activations go to the activation cache, so an interrupted audit resumes
from its completed chunks.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AuditConfig
from .data import sha256_file
from .errors import AuditorError, ConfigError
from .history import History

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
SENTINEL_SUFFIX = ".done"
LOCK_SUFFIX = ".lock"
INDEX_FILE = "index.html"

Log = Callable[[str], None]


# -- complete files ---------------------------------------------------------------------

def safetensors_complete(path: Path) -> tuple[bool, str]:
    """Whether the header of a ``.safetensors`` file accounts for exactly the file's size."""
    size = path.stat().st_size
    if size < 8:
        return False, f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100_000_000 or 8 + n > size:
            return False, f"header says {n} bytes, only {size - 8} there"
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False, "header is not complete JSON yet"
    if not isinstance(header, dict):
        return False, "header is not a JSON object"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return False, f"{size} of {need} bytes written"
    if size > need:
        return False, f"{size} bytes, {size - need} more than the header accounts for"
    return True, "complete"


def zip_complete(path: Path) -> tuple[bool, str]:
    """Whether a ``torch.save`` (zip) checkpoint has its central directory (written last)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False, ("no zip central directory yet (or a legacy non-zip torch.save file: mark it complete "
                       f"with a sentinel {path.name}{SENTINEL_SUFFIX})")
    except OSError as exc:
        return False, f"unreadable: {exc}"
    if not names:
        return False, "empty zip archive"
    return True, "complete"


def is_complete(path: str | os.PathLike) -> tuple[bool, str]:
    """``(complete, reason)`` for a checkpoint file (see the module docs)."""
    p = Path(path)
    if p.with_name(p.name + SENTINEL_SUFFIX).is_file():
        return True, "sentinel"
    try:
        if p.suffix == ".safetensors":
            return safetensors_complete(p)
        return zip_complete(p)
    except OSError as exc:
        return False, f"unreadable: {exc}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest mtime first, then by name."""
    found = []
    for p in folder.iterdir():
        if p.suffix in CHECKPOINT_SUFFIXES and p.is_file() and not p.name.startswith("."):
            try:
                found.append((p.stat().st_mtime_ns, p.name, p))
            except FileNotFoundError:  # removed while listing
                continue
    return [p for _, _, p in sorted(found)]


# -- the watcher -------------------------------------------------------------------------

@dataclass
class Audited:
    checkpoint: Path
    report_dir: Path
    n_flagged: int
    n_new: int | None  # newly flagged vs. the previous checkpoint (None: first, or not comparable)
    recovered: bool = False  # the report was already in place: recorded without auditing again


class Watcher:
    """Audits the checkpoints of ``folder`` with ``cfg`` (its ``weights`` and ``out`` are set per checkpoint)."""

    def __init__(self, folder: str | os.PathLike, cfg: AuditConfig, *, reports: str | os.PathLike | None = None,
                 history: str | os.PathLike | None = None, formats: tuple[str, ...] | None = None,
                 log: Log = lambda m: None, progress: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"watch folder not found: {self.folder}")
        if not cfg.model:
            raise ConfigError("the watch config needs model: the architecture the checkpoints belong to "
                              "(a torchvision or timm:NAME name, or package.module:callable)")
        self.cfg = cfg
        self.reports = Path(reports) if reports is not None else self.folder / "reports"
        self.history_path = Path(history) if history is not None else self.reports / "history.sqlite"
        self.formats = tuple(formats) if formats else tuple(cfg.formats)
        if "json" not in self.formats:
            self.formats = (*self.formats, "json")  # the history and the comparisons read results.json
        self.log, self.progress = log, progress
        self._probe: tuple[Any, Any] | None = None
        self._waiting: dict[str, str] = {}

    @property
    def lock_path(self) -> Path:
        return self.history_path.with_name(self.history_path.name + LOCK_SUFFIX)

    def lock(self, timeout: float = 0.0):
        from filelock import FileLock

        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=timeout)

    def probe(self):
        if self._probe is None:
            from .pipeline import load_probe

            self._probe = load_probe(self.cfg, log=self.log, progress=self.progress)
        return self._probe

    # -- one pass ---------------------------------------------------------------------------
    def pending(self, history: History) -> list[tuple[Path, str, float]]:
        """Complete checkpoints the history does not hold: ``(path, sha256, mtime)`` in audit order."""
        out = []
        for path in list_checkpoints(self.folder):
            ok, why = is_complete(path)
            if not ok:
                if self._waiting.get(path.name) != why:
                    self.log(f"waiting for {path.name}: {why}")
                    self._waiting[path.name] = why
                continue
            try:
                before = path.stat()
                sha = sha256_file(path)
                after = path.stat()
            except FileNotFoundError:
                continue
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                self.log(f"waiting for {path.name}: it changed while being hashed")
                continue
            self._waiting.pop(path.name, None)
            if not history.has(self.folder, path.name, sha):
                out.append((path, sha, after.st_mtime))
        return out

    def run_once(self) -> list[Audited]:
        """Audit everything pending, in order; returns what was audited (or recovered)."""
        done: list[Audited] = []
        errors: list[str] = []
        with History(self.history_path) as history:
            for path, sha, mtime in self.pending(history):
                try:
                    done.append(self._one(history, path, sha, mtime))
                except AuditorError as exc:
                    errors.append(f"{path.name}: {exc}")
                    self.log(f"error: {path.name} could not be audited: {exc}")
            self.write_index(history)
        if errors:
            raise WatchErrors(errors, done)
        return done

    def _report_dir(self, history: History, path: Path, sha: str) -> Path:
        name = path.name
        if name in history.names_recorded(self.folder):  # same name, new content: keep the old report
            name = f"{path.name}-{sha[:12]}"
        return self.reports / name

    def _one(self, history: History, path: Path, sha: str, mtime: float) -> Audited:
        from .api import audit_config
        from .compare import compare_results
        from .results import AuditResult

        report_dir = self._report_dir(history, path, sha)
        results_path = report_dir / "results.json"
        previous = history.last(self.folder)
        result = None
        recovered = False
        if results_path.is_file():
            try:
                old = AuditResult.load(results_path)
                if (old.provenance.get("model") or {}).get("weights_sha256") == sha:
                    result, recovered = old, True
                    self.log(f"{path.name}: report already in place (an earlier run stopped before recording it)")
                    from .report import FORMATS

                    if any(not (report_dir / FORMATS[f]).is_file() for f in self.formats):
                        result.save(report_dir, formats=self.formats)  # re-rendered from results.json, not re-audited
            except AuditorError:
                result = None
        if result is None:
            self.log(f"auditing {path.name} (sha256 {sha[:12]}) -> {report_dir}")
            cfg = self.cfg.model_copy(update={"weights": str(path), "out": str(report_dir),
                                              "title": self.cfg.title or f"Audit of {path.name}"})
            probe, synth_info = self.probe()
            from .pipeline import run_audit

            result = run_audit(cfg, log=self.log, progress=self.progress, probe=probe, synth_info=synth_info)
            if result is None:  # pragma: no cover - torchrun worker
                raise ConfigError("auditor watch does not run under torchrun")
            result.save(report_dir, formats=self.formats)
        n_new = None
        if previous and previous.get("result_path") and Path(previous["result_path"]).is_file():
            try:
                prev = AuditResult.load(previous["result_path"])
                cmp = compare_results(prev, result, old_source=previous["result_path"], new_source=str(results_path))
                cmp.save(report_dir / "compare", formats=("html", "json"))
                n_new = cmp.n_new
                for line in cmp.differences:
                    self.log(f"WARNING ({path.name} vs {previous['checkpoint_name']}): {line}")
                self.log(f"{path.name} vs {previous['checkpoint_name']}: " + "; ".join(cmp.summary_lines()))
            except AuditorError as exc:
                self.log(f"{path.name}: no comparison with {previous['checkpoint_name']}: {exc}")
        history.record(result, source="watch", result_path=results_path, report_dir=report_dir, checkpoint=path,
                       checkpoint_sha256=sha, checkpoint_mtime=mtime, watch_dir=self.folder)
        self.log(f"{path.name}: {result.n_flagged} neuron(s) flagged; report {report_dir}")
        return Audited(checkpoint=path, report_dir=report_dir, n_flagged=result.n_flagged, n_new=n_new,
                       recovered=recovered)

    # -- the index page ------------------------------------------------------------------------
    def write_index(self, history: History) -> Path:
        from .report.watch import render_index

        rows = history.rows(watch_dir=self.folder)
        self.reports.mkdir(parents=True, exist_ok=True)
        html = render_index(rows, folder=str(self.folder), reports=self.reports)
        target = self.reports / INDEX_FILE
        fd, tmp = tempfile.mkstemp(dir=self.reports, prefix=".index-", suffix=".html")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(html)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def run(self, interval: float = 60.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Pass after pass until ``stop()`` (or Ctrl-C); errors of one checkpoint do not stop the watch."""
        while not stop():
            try:
                self.run_once()
            except WatchErrors:
                pass  # logged; those checkpoints are retried on the next pass
            time.sleep(interval)


class WatchErrors(AuditorError):
    """Some checkpoints could not be audited (the others were)."""

    def __init__(self, errors: list[str], done: list[Audited]):
        super().__init__(f"{len(errors)} checkpoint(s) could not be audited: " + "; ".join(errors))
        self.errors, self.done = errors, done
