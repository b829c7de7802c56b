"""The PDF report: text, outline, page footer, fonts, and a rendered look at pages 1-2."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import auditor.report as report
from auditor.report.context import formula_tokens, tokens_text

import report_fixtures  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def result():
    return report_fixtures.make_result()


@pytest.fixture(scope="module")
def pdf_path(result, tmp_path_factory) -> Path:
    return report.render(result, tmp_path_factory.mktemp("pdf"), formats=("pdf",))["pdf"]


@pytest.fixture(scope="module")
def reader(pdf_path):
    pypdf = pytest.importorskip("pypdf")
    return pypdf.PdfReader(str(pdf_path))


@pytest.fixture(scope="module")
def pages_text(reader) -> list[str]:
    return [page.extract_text() or "" for page in reader.pages]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_page_count_is_sane(reader, result):
    n = len(reader.pages)
    assert 6 <= n <= 40, n
    assert reader.pages[0].mediabox.width == pytest.approx(595.3, abs=1)  # A4 portrait
    assert reader.pages[0].mediabox.height == pytest.approx(841.9, abs=1)


def test_flagged_neurons_and_formulas_are_in_the_text(pages_text, result):
    text = _squash("\n".join(pages_text))
    concepts = {c.name: c for c in result.concepts}
    for layer in result.layers:
        for n in result.flagged_neurons(layer):
            assert _squash(f"{layer.name} · neuron {n.index}") in text, n.index
            shown = tokens_text(formula_tokens(n.best, concepts))  # display names
            assert _squash(shown) in text, shown
    assert "<script>alert(1)</script>" in text  # the hostile concept name prints as text


def test_every_page_has_a_numbered_footer(pages_text):
    total = len(pages_text)
    for i, text in enumerate(pages_text, start=1):
        assert f"page {i} of {total}" in text, (i, text[-200:])


def test_outline_and_toc_page_numbers(reader, pages_text):
    def walk(items, depth=0):
        for item in items:
            if isinstance(item, list):
                yield from walk(item, depth + 1)
            else:
                yield depth, item

    outline = list(walk(reader.outline))
    titles = [item.title for _, item in outline]
    for wanted in ("Summary", "Flagged neurons", "Method and caveats", "Configuration and provenance"):
        assert wanted in titles, titles
    assert any(depth == 1 and "neuron 27" in item.title for depth, item in outline)  # cards nested
    # the table of contents on page 1 prints the page each section starts on
    toc = pages_text[0]
    for _, item in outline:
        if item.title in ("Flagged neurons", "Method and caveats"):
            page = reader.get_destination_page_number(item) + 1
            m = re.search(re.escape(item.title) + r"[ .…]*?(\d+)\s*$", toc, re.M)
            assert m, (item.title, toc)
            assert int(m.group(1)) == page, (item.title, m.group(1), page)


def test_only_the_report_fonts_are_embedded(reader):
    fonts: set[str] = set()
    for page in reader.pages:
        resources = page.get("/Resources") or {}
        for font in (resources.get("/Font") or {}).values():
            fonts.add(str(font.get_object().get("/BaseFont")))
    assert fonts, "no fonts found"
    assert all("DejaVu" in f for f in fonts), fonts  # no serif fallback anywhere (footer included)
    assert not any("Serif" in f for f in fonts), fonts


def test_first_pages_render(pdf_path, tmp_path):
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    from PIL import Image, ImageStat

    subprocess.run(["pdftoppm", "-r", "60", "-f", "1", "-l", "2", "-png", str(pdf_path), str(tmp_path / "page")],
                   check=True, capture_output=True, timeout=120)
    pngs = sorted(tmp_path.glob("page-*.png"))
    assert len(pngs) == 2
    for png in pngs:
        with Image.open(png) as img:
            grey = img.convert("L")
            assert grey.size[0] > 400
            # not an empty page: a fair share of non-white pixels
            dark = sum(grey.histogram()[:200]) / (grey.size[0] * grey.size[1])
            assert dark > 0.01, (png.name, dark)
            assert ImageStat.Stat(grey).stddev[0] > 10


def test_write_pdf_on_a_small_clean_result(result, tmp_path):
    import dataclasses

    pypdf = pytest.importorskip("pypdf")
    small = dataclasses.replace(result, layers=result.layers[1:], title="Small clean audit")
    path = report.write_pdf(small, tmp_path / "small.pdf")
    assert path.read_bytes()[:5] == b"%PDF-"
    text = "\n".join(p.extract_text() or "" for p in pypdf.PdfReader(str(path)).pages)
    assert "No neuron flagged" in text
