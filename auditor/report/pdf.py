"""The PDF report: the HTML report (print variant) laid out by WeasyPrint.

Nothing is fetched from the network: the URL fetcher serves ``data:`` URLs and local
files under :func:`templates_dir` and refuses everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import ReportError
from ..results import AuditResult
from .env import templates_dir

log = logging.getLogger(__name__)


class RefusedURL(ValueError):
    """A resource URL the report renderer will not fetch."""


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_url(url: str, root: Path) -> None:
    """Raise :class:`RefusedURL` unless ``url`` is ``data:`` or a local file under ``root``."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RefusedURL(f"refusing remote file URL {url!r}")
        if _is_under(Path(unquote(parts.path)), root):
            return
        raise RefusedURL(f"refusing local file outside the templates folder: {url!r}")
    raise RefusedURL(f"refusing to fetch {url!r}: reports only embed data: URLs and their own templates")


def make_url_fetcher(root: Path | None = None):
    """A WeasyPrint URL fetcher limited to ``data:`` and ``file:`` URLs under ``root``.

    The fetcher records refused URLs in its ``refused`` list.
    """
    import weasyprint.urls as wurls

    root = Path(root) if root is not None else templates_dir()
    base = getattr(wurls, "URLFetcher", None)
    if base is not None:  # WeasyPrint >= 68: a class whose fetch() returns a response

        class SafeURLFetcher(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__(allowed_protocols=("data", "file"), allow_redirects=False, timeout=5)
                self.root = root
                self.refused: list[str] = []

            def fetch(self, url: str, headers: Any = None):
                try:
                    check_url(url, self.root)
                except RefusedURL:
                    self.refused.append(url)
                    raise
                return super().fetch(url, headers)

        return SafeURLFetcher()

    # Older WeasyPrint: a plain function returning a dict.
    refused: list[str] = []

    def fetcher(url: str, *args: Any, **kwargs: Any):
        try:
            check_url(url, root)
        except RefusedURL:
            refused.append(url)
            raise
        return wurls.default_url_fetcher(url, *args, **kwargs)

    fetcher.refused = refused  # type: ignore[attr-defined]
    fetcher.root = root  # type: ignore[attr-defined]
    return fetcher


#: The archival profile: PDF/A-3b (attachments allowed) with a tagged structure tree (PDF/UA).
PDF_VARIANT = "pdf/a-3b"


def attachments_for(result: AuditResult) -> list[tuple[str, bytes, str]]:
    """``(file name, bytes, description)`` embedded in the PDF: results.json and the config.

    ``results.json`` holds exactly the bytes :meth:`AuditResult.save` writes (and whose
    sha256 page 1 prints); ``config.json`` is the run configuration as canonical JSON
    (keys sorted), whose sha256 page 1 prints as the config hash.
    """
    import json

    config = json.dumps(result.config or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return [("results.json", result.to_json().encode("utf-8"), "The audit results (auditor results schema)"),
            ("config.json", config.encode("utf-8"), "The run configuration (canonical JSON)")]


def html_to_pdf(html: str, path: str | Path, attachments: list[tuple[str, bytes, str]] | None = None) -> Path:
    """Lay out ``html`` (the print variant of the report) into the archival PDF file ``path``.

    PDF/A-3b with ``attachments`` embedded (relationship "Data"), tagged for
    accessibility; title, subject, author and creation date come from the
    document's ``<title>`` and ``<meta>`` tags.
    """
    try:
        import weasyprint
    except ImportError as exc:  # pragma: no cover - weasyprint is a dependency
        raise ReportError(f"PDF output needs WeasyPrint, which failed to import: {exc}") from None
    path = Path(path)
    root = templates_dir()
    fetcher = make_url_fetcher(root)
    document = weasyprint.HTML(string=html, base_url=str(root), url_fetcher=fetcher)
    files = [weasyprint.Attachment(string=data, name=name, description=desc, relationship="Data")
             for name, data, desc in attachments or []]
    try:
        document.write_pdf(str(path), pdf_variant=PDF_VARIANT, pdf_tags=True, attachments=files,
                           uncompressed_pdf=False)
    except OSError as exc:
        raise ReportError(f"cannot write PDF report {path}: {exc}") from None
    if fetcher.refused:
        log.warning("PDF report: refused %d external resource(s), e.g. %s", len(fetcher.refused), fetcher.refused[0])
    return path


def write_pdf(result: AuditResult, path: str | Path) -> Path:
    """Write the PDF report for ``result`` to ``path``."""
    from .html import render_html

    return html_to_pdf(render_html(result, for_pdf=True), path, attachments_for(result))
