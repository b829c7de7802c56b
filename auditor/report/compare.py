"""Renderers for a :class:`~auditor.compare.Comparison`: HTML, PDF, JSON and JUnit.

The same jinja2 environment, stylesheet and PDF writer as the audit report; no torch.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..results import _clean
from .env import environment, fmt_auroc, static_text
from .junit import _x

COMPARE_TEMPLATE = "compare.html.j2"


def _context(cmp) -> dict[str, Any]:
    arts = []
    for a in cmp.artifacts:
        arts.append({"name": a.artifact, "verdict": a.verdict, "old": a.old_flagged, "new": a.new_flagged,
                     "newly": [c.to_dict() for c in a.newly_flagged],
                     "gone": [c.to_dict() for c in a.no_longer_flagged],
                     "still": [c.to_dict() for c in a.still_flagged],
                     "impact": a.impact})
    return {"cmp": cmp, "old": cmp.old, "new": cmp.new, "differences": cmp.differences, "artifacts": arts,
            "layers": [m.to_dict() for m in cmp.layers], "match": cmp.match, "n_new": cmp.n_new,
            "title": f"Audit comparison: {cmp.old.get('title')} → {cmp.new.get('title')}"}


def comparison_html(cmp, *, for_pdf: bool = False) -> str:
    template = environment().get_template(COMPARE_TEMPLATE)
    return template.render(**_context(cmp), for_pdf=for_pdf, css=Markup(static_text("report.css")))


def comparison_json(cmp) -> str:
    data = cmp.to_dict()
    data["n_new"] = cmp.n_new
    data["comparable"] = cmp.comparable  # False: see "differences" (thresholds, rule, probe set, ...)
    return json.dumps(_clean(data), indent=1, allow_nan=False)


def comparison_junit(cmp) -> ET.ElementTree:
    """One case per artifact: it fails when a neuron is newly flagged for that artifact."""
    root = ET.Element("testsuites", name="auditor compare")
    suite = ET.SubElement(root, "testsuite", name="auditor.compare")
    props = ET.SubElement(suite, "properties")
    for key, value in (("old", cmp.old.get("source") or cmp.old.get("title")),
                       ("new", cmp.new.get("source") or cmp.new.get("title")), ("match", cmp.match),
                       *((f"difference.{i}", d) for i, d in enumerate(cmp.differences))):
        ET.SubElement(props, "property", name=_x(key), value=_x(value))
    failures = 0
    for a in cmp.artifacts:
        case = ET.SubElement(suite, "testcase", classname="auditor.compare",
                             name=_x(f"no neuron newly flagged for artifact '{a.artifact}'"), time="0")
        if a.newly_flagged:
            failures += 1
            f = ET.SubElement(case, "failure", type="NewArtifactDetector",
                              message=_x(f"{len(a.newly_flagged)} neuron(s) newly flagged for '{a.artifact}' "
                                         f"({a.old_flagged} -> {a.new_flagged} flagged)"))
            f.text = _x("\n".join(f"{c.layer} neuron {c.new_index}: {c.new_formula} (AUROC {fmt_auroc(c.new_auroc)}, "
                                  f"artifact alone {fmt_auroc(c.new_artifact_auroc)})" for c in a.newly_flagged))
        out = ET.SubElement(case, "system-out")
        out.text = _x(f"{a.old_flagged} -> {a.new_flagged} flagged; no longer flagged: {len(a.no_longer_flagged)}; "
                      f"still flagged: {len(a.still_flagged)}"
                      + ("\n" + "\n".join(cmp.differences) if cmp.differences else ""))
    for el in (suite, root):
        el.set("tests", str(len(cmp.artifacts)))
        el.set("failures", str(failures))
        el.set("errors", "0")
        el.set("skipped", "0")
    ET.indent(root)
    return ET.ElementTree(root)


def render_comparison(cmp, out_dir: str | Path, formats: list[str]) -> dict[str, Path]:
    from ..compare import COMPARE_FILES

    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for fmt in dict.fromkeys(formats):
        path = out_dir / COMPARE_FILES[fmt]
        if fmt == "html":
            path.write_text(comparison_html(cmp), encoding="utf-8")
        elif fmt == "pdf":
            from .pdf import html_to_pdf

            html_to_pdf(comparison_html(cmp, for_pdf=True), path)
        elif fmt == "json":
            path.write_text(comparison_json(cmp), encoding="utf-8")
        elif fmt == "junit":
            comparison_junit(cmp).write(path, encoding="utf-8", xml_declaration=True)
        written[fmt] = path
    return written
