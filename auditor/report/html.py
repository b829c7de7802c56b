"""The HTML report: one self-contained file (CSS, script and images inlined)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..results import AuditResult
from .env import MAIN_TEMPLATE, environment, static_text

CSS_FILE = "report.css"
JS_FILE = "report.js"


def _script_hash(script: str) -> str:
    """The CSP source for exactly this inline script (so nothing else can run)."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


def render_context(context: dict[str, Any], *, for_pdf: bool = False) -> str:
    """Render the report template from a context built by :func:`build_context`."""
    # The stylesheet and script are our own files, not user data: they go in unescaped.
    css = Markup(static_text(CSS_FILE))
    script = Markup(static_text(JS_FILE))
    template = environment().get_template(MAIN_TEMPLATE)
    return template.render(**context, for_pdf=for_pdf, css=css, script=script, script_hash=_script_hash(script))


def render_html(result: AuditResult, *, for_pdf: bool = False) -> str:
    """The report for ``result`` as one HTML document.

    ``for_pdf`` drops the script and the interactive tools, adds page numbers to the
    table of contents and, for large layers, shortens the neuron table (see
    :data:`auditor.report.context.PDF_TABLE_LIMIT`).
    """
    from .context import build_context

    return render_context(build_context(result), for_pdf=for_pdf)


def write_html(result_or_context: AuditResult | dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    if isinstance(result_or_context, AuditResult):
        html = render_html(result_or_context)
    else:
        html = render_context(result_or_context)
    path.write_text(html, encoding="utf-8")
    return path
