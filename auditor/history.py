"""The audit history: one SQLite row per audit (stdlib ``sqlite3``, one file).

Every audit that ``auditor watch`` or a training callback runs is appended: the
checkpoint (path, name, sha256, mtime), when, the config hash, the probe-set
fingerprint, per-artifact flag counts, impact and strongest neurons, and where the
results and report went. Each write is one ``BEGIN IMMEDIATE … COMMIT`` transaction,
so a crash mid-write leaves the database as it was before that audit (SQLite's
journal rolls the half-written row back on the next open), and two processes never
interleave their writes.

``auditor history [PATH]`` lists it (a table, or ``--json``) with filters.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .results import AuditResult

HISTORY_FILE = "history.sqlite"
SCHEMA_VERSION = 1
#: config keys that do not change what an audit measures (left out of the config hash)
_RUN_KEYS = ("weights", "out", "title", "formats", "cache_dir", "no_cache", "device", "workers", "pin_memory",
             "prefetch_factor", "fail_on_flag", "batch_size", "chunk_size", "decode", "compile", "channels_last")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    audited_at TEXT NOT NULL,
    source TEXT NOT NULL,
    watch_dir TEXT,
    checkpoint TEXT,
    checkpoint_name TEXT,
    checkpoint_sha256 TEXT,
    checkpoint_mtime REAL,
    step TEXT,
    config_hash TEXT,
    probe_fingerprint TEXT,
    model TEXT,
    n_flagged INTEGER NOT NULL,
    artifacts TEXT NOT NULL,
    result_path TEXT,
    report_dir TEXT,
    title TEXT
);
CREATE INDEX IF NOT EXISTS audits_checkpoint ON audits (watch_dir, checkpoint_name, checkpoint_sha256);
"""


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the settings that change what an audit measures (paths and run options left out)."""
    kept = {k: v for k, v in sorted((config or {}).items()) if k not in _RUN_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def artifact_summary(result: AuditResult, strongest: int = 3) -> dict[str, dict[str, Any]]:
    """Per artifact: neuron counts per status (flagged, near miss, inconclusive; ``sensitive`` for 1.x
    files), impact numbers, and the strongest flagged neurons (largest |effect - 0.5| of the flag rule's
    stratified artifact test; the artifact's AUROC alone for 1.x files)."""
    impact: dict[str, Any] = {}
    for item in getattr(result, "impact", None) or []:
        d = item if isinstance(item, dict) else (item.to_dict() if hasattr(item, "to_dict") else vars(item))
        if d.get("artifact"):
            abl = d.get("ablation") or {}
            impact[d["artifact"]] = {"flip_rate": d.get("flip_rate"), "control_flip_rate": d.get("control_flip_rate"),
                                     "share_carried": abl.get("share_carried") if isinstance(abl, dict) else None}
    by_status = result.summary()
    out: dict[str, dict[str, Any]] = {}
    for art in result.artifacts:
        hits = []
        counts = by_status.get(art, {})
        flagged = set(counts.get("flagged", []))
        for lyr in result.layers:
            for n in lyr.neurons:
                f = next((f for f in n.flags if f.artifact == art), None)
                if f is None or (lyr.name, n.index) not in flagged:
                    continue
                effect = getattr(f, "effect", None)
                if isinstance(effect, (int, float)):
                    strength = abs(float(effect) - 0.5)
                else:
                    strength = float(f.artifact_auroc) if isinstance(f.artifact_auroc, (int, float)) else 0.0
                hits.append((strength, lyr.name, n.index, n.best.formula if n.best else f.formula, effect,
                             f.direction if hasattr(f, "direction") else None))
        hits.sort(key=lambda h: (-h[0], h[1], h[2]))
        out[art] = {"flagged": len(hits), "near_miss": len(counts.get("near_miss", [])),
                    "inconclusive": len(counts.get("inconclusive", [])),
                    "sensitive": len(counts.get("sensitive", [])), "impact": impact.get(art),
                    "strongest": [{"layer": lyr, "neuron": i, "strength": round(st, 4), "formula": fm,
                                   "effect": None if eff is None else round(float(eff), 4), "direction": d}
                                  for st, lyr, i, fm, eff, d in hits[:strongest]]}
    return out


class History:
    """The SQLite history file at ``path`` (created on first use)."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ConfigError(f"no audit history at {self.path}; pass --history PATH (the file `auditor watch` "
                              "writes beside its reports)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 30000")
            with self._write():
                for stmt in _SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                                  (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open the audit history {self.path}: {exc} (is it an auditor history "
                              "file?)") from None

    # -- transactions ------------------------------------------------------------------
    class _Tx:
        def __init__(self, conn: sqlite3.Connection, before_commit: Callable[[], None] | None = None):
            self.conn, self.before_commit = conn, before_commit

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                if self.before_commit is not None:
                    self.before_commit()
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
            return False

    def _write(self, before_commit: Callable[[], None] | None = None) -> History._Tx:
        return History._Tx(self.conn, before_commit)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------
    def record(self, result: AuditResult, *, source: str, result_path: str | os.PathLike | None = None,
               report_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               checkpoint_sha256: str | None = None, checkpoint_mtime: float | None = None,
               watch_dir: str | os.PathLike | None = None, step: str | None = None,
               _before_commit: Callable[[], None] | None = None) -> int:
        """Append one audit; returns its row id. One transaction: all of the row or none of it."""
        prov = result.provenance or {}
        model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
        data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
        ckpt = Path(checkpoint) if checkpoint is not None else None
        row = {
            "audited_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
            "source": source,
            "watch_dir": str(Path(watch_dir).resolve()) if watch_dir is not None else None,
            "checkpoint": str(ckpt.resolve()) if ckpt is not None else None,
            "checkpoint_name": ckpt.name if ckpt is not None else None,
            "checkpoint_sha256": checkpoint_sha256 or model.get("weights_sha256"),
            "checkpoint_mtime": checkpoint_mtime,
            "step": step,
            "config_hash": config_hash(result.config),
            "probe_fingerprint": data.get("fingerprint"),
            "model": model.get("spec"),
            "n_flagged": result.n_flagged,
            "artifacts": json.dumps(artifact_summary(result), sort_keys=True),
            "result_path": str(Path(result_path).resolve()) if result_path is not None else None,
            "report_dir": str(Path(report_dir).resolve()) if report_dir is not None else None,
            "title": result.title,
        }
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._write(_before_commit) as conn:
            cur = conn.execute(f"INSERT INTO audits ({cols}) VALUES ({marks})", tuple(row.values()))
            return int(cur.lastrowid)

    # -- reading --------------------------------------------------------------------------
    def has(self, watch_dir: str | os.PathLike, name: str, sha256: str) -> bool:
        cur = self.conn.execute("SELECT 1 FROM audits WHERE watch_dir = ? AND checkpoint_name = ? AND "
                                "checkpoint_sha256 = ? LIMIT 1", (str(Path(watch_dir).resolve()), name, sha256))
        return cur.fetchone() is not None

    def names_recorded(self, watch_dir: str | os.PathLike) -> set[str]:
        cur = self.conn.execute("SELECT DISTINCT checkpoint_name FROM audits WHERE watch_dir = ?",
                                (str(Path(watch_dir).resolve()),))
        return {r[0] for r in cur.fetchall()}

    def rows(self, *, checkpoint: str | None = None, artifact: str | None = None, flagged_only: bool = False,
             since: str | None = None, source: str | None = None, watch_dir: str | os.PathLike | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Audits oldest first, filtered: ``checkpoint`` is a glob on the name or path."""
        sql = "SELECT * FROM audits WHERE 1=1"
        args: list[Any] = []
        if since:
            sql += " AND audited_at >= ?"
            args.append(since)
        if source:
            sql += " AND source = ?"
            args.append(source)
        if watch_dir is not None:
            sql += " AND watch_dir = ?"
            args.append(str(Path(watch_dir).resolve()))
        sql += " ORDER BY id"
        out = []
        for r in self.conn.execute(sql, args).fetchall():
            d = dict(r)
            d["artifacts"] = json.loads(d["artifacts"])
            if checkpoint and not any(fnmatch.fnmatch(str(d.get(k) or ""), checkpoint)
                                      for k in ("checkpoint_name", "checkpoint")):
                continue
            if artifact:
                info = d["artifacts"].get(artifact)
                if info is None or (flagged_only and not info.get("flagged")):
                    continue
            elif flagged_only and not d["n_flagged"]:
                continue
            out.append(d)
        if limit is not None:
            out = out[-limit:]
        return out

    def last(self, watch_dir: str | os.PathLike) -> dict[str, Any] | None:
        rows = self.rows(watch_dir=watch_dir)
        return rows[-1] if rows else None


def resolve_history_path(path: str | os.PathLike | None, default_dir: str | os.PathLike = "reports") -> Path:
    """A history file; or a folder holding ``history.sqlite`` (a reports folder), or holding
    ``reports/history.sqlite`` (a watched folder); default: ``reports/``."""
    p = Path(path) if path is not None else Path(default_dir)
    if path is None or (p.is_dir() and (p / HISTORY_FILE).is_file()):
        return p / HISTORY_FILE
    if p.is_dir() and (p / "reports" / HISTORY_FILE).is_file():
        return p / "reports" / HISTORY_FILE
    return p / HISTORY_FILE if p.is_dir() else p


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    rows = list(rows)
    arts: list[str] = []
    for r in rows:
        for a in r["artifacts"]:
            if a not in arts:
                arts.append(a)
    head = ["id", "audited_at (UTC)", "checkpoint", "sha256", "step", "flagged", *arts, "results"]
    table = [head]
    for r in rows:
        table.append([str(r["id"]), r["audited_at"][:19].replace("T", " "),
                      r["checkpoint_name"] or r["model"] or "—", (r["checkpoint_sha256"] or "—")[:12],
                      r["step"] or "", str(r["n_flagged"]),
                      *(str(r["artifacts"].get(a, {}).get("flagged", "—")) for a in arts),
                      r["result_path"] or "—"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
