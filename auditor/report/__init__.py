"""Report renderers: HTML, PDF, CSV, JUnit and JSON, from an ``AuditResult`` alone.

This package never imports torch (a test checks it): a saved ``results.json`` can be
rendered on any machine. Heavy imports (matplotlib/seaborn, WeasyPrint, pandas) happen
only when a renderer that needs them runs.

    from auditor.report import render
    paths = render(result, out_dir)          # {"html": .../report.html, ...}
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import ReportError, did_you_mean
from ..results import AuditResult
from .env import templates_dir
from .html import render_html, write_html
from .junit import write_junit
from .pdf import write_pdf
from .tables import neurons_table, write_csv

__all__ = [
    "FORMATS",
    "neurons_table",
    "render",
    "render_html",
    "templates_dir",
    "write_csv",
    "write_html",
    "write_junit",
    "write_pdf",
]

#: format name -> file name written by :func:`render`
FORMATS = {
    "html": "report.html",
    "pdf": "report.pdf",
    "json": "results.json",
    "csv": "neurons.csv",
    "junit": "junit.xml",
}


def render(result: AuditResult, out_dir: str | Path,
           formats: Iterable[str] = ("html", "pdf", "json", "csv", "junit")) -> dict[str, Path]:
    """Write the requested report files into ``out_dir`` (which must exist).

    Returns ``{format: path}`` in the order given. Figures are rendered once and
    shared by the HTML and the PDF.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ReportError(
            f"unknown report format {unknown[0]!r}{did_you_mean(unknown[0], FORMATS)}; "
            f"expected some of: {', '.join(FORMATS)}"
        )
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ReportError(f"report folder does not exist: {out_dir}")

    context = None
    if "html" in formats or "pdf" in formats:
        from .context import build_context

        context = build_context(result)

    written: dict[str, Path] = {}
    for fmt in formats:
        path = out_dir / FORMATS[fmt]
        if fmt == "html":
            write_html(context, path)
        elif fmt == "pdf":
            from .html import render_context
            from .pdf import attachments_for, html_to_pdf

            html_to_pdf(render_context(context, for_pdf=True), path, attachments_for(result))
        elif fmt == "json":
            result._save_json(path)
        elif fmt == "csv":
            write_csv(result, path)
        elif fmt == "junit":
            write_junit(result, path)
        written[fmt] = path
    return written
