"""The index page of ``auditor watch``: every audited checkpoint, and a timeline per artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from markupsafe import Markup

from .env import environment, static_text

INDEX_TEMPLATE = "watch_index.html.j2"


def _link(path: str | None, reports: Path, name: str) -> str | None:
    if not path:
        return None
    target = Path(path) / name
    if not target.is_file():
        return None
    return os.path.relpath(target, reports).replace(os.sep, "/")


def index_context(rows: list[dict[str, Any]], *, folder: str, reports: Path) -> dict[str, Any]:
    audits = []
    artifacts: list[str] = []
    for r in rows:
        for a in r["artifacts"]:
            if a not in artifacts:
                artifacts.append(a)
        audits.append({"id": r["id"], "name": r["checkpoint_name"] or r["title"], "sha": (r["checkpoint_sha256"] or "")[:12],
                       "time": (r["audited_at"] or "")[:19].replace("T", " "), "n_flagged": r["n_flagged"],
                       "report": _link(r["report_dir"], reports, "report.html"),
                       "results": _link(r["report_dir"], reports, "results.json"),
                       "compare": _link(str(Path(r["report_dir"]) / "compare") if r["report_dir"] else None, reports,
                                        "compare.html"),
                       "artifacts": r["artifacts"]})
    timelines = []
    for art in artifacts:
        points = []
        prev = None
        peak = max((a["artifacts"].get(art, {}).get("flagged") or 0 for a in audits), default=0) or 1
        for a in audits:
            info = a["artifacts"].get(art)
            if info is None:
                continue
            n = info.get("flagged") or 0
            impact = info.get("impact") or {}
            points.append({"audit": a, "flagged": n, "near_miss": info.get("near_miss") or 0,
                           "delta": None if prev is None else n - prev, "share": round(100 * n / peak, 1),
                           "flip_rate": impact.get("flip_rate"), "share_carried": impact.get("share_carried"),
                           "strongest": info.get("strongest") or []})
            prev = n
        timelines.append({"artifact": art, "points": points})
    return {"folder": folder, "audits": audits, "timelines": timelines, "n": len(audits)}


def render_index(rows: list[dict[str, Any]], *, folder: str, reports: Path) -> str:
    template = environment().get_template(INDEX_TEMPLATE)
    return template.render(**index_context(rows, folder=folder, reports=Path(reports)),
                           css=Markup(static_text("report.css")))
