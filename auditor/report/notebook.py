"""The Jupyter view of an ``AuditResult``: the verdict per artifact and the flagged
neurons' cards, in an isolated frame so the report's stylesheet leaves the notebook alone."""

from __future__ import annotations

import html as _html

from markupsafe import Markup

from ..results import AuditResult
from .env import environment, static_text

NOTEBOOK_TEMPLATE = "notebook.html.j2"
MAX_NOTEBOOK_CARDS = 12


def notebook_document(result: AuditResult) -> str:
    """A small standalone HTML document: summary table and up to a dozen flagged cards."""
    from .context import build_context

    context = build_context(result, render_figures=False)
    context["cards"] = context["cards"][:MAX_NOTEBOOK_CARDS]
    template = environment().get_template(NOTEBOOK_TEMPLATE)
    return template.render(**context, css=Markup(static_text("report.css")), max_notebook_cards=MAX_NOTEBOOK_CARDS)


def notebook_html(result: AuditResult, height: int = 560) -> str:
    """``_repr_html_``: the document in an ``<iframe srcdoc>`` (scripts off, styles contained)."""
    doc = notebook_document(result)
    return (f'<iframe sandbox="" style="width:100%;height:{int(height)}px;border:1px solid #d9dce1" '
            f'title="{_html.escape(result.title)}" srcdoc="{_html.escape(doc, quote=True)}"></iframe>')
