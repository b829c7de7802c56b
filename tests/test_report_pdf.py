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
    # the table of contents (page 2, after the decision page) prints the page each section starts on
    toc = next(t for t in pages_text if "Contents" in t)
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
    assert "0 neurons flagged" in text and "FLAGGED" not in text


# -- page 1 ----------------------------------------------------------------------------------------
def test_page1_holds_the_decision_identity_and_signoff(pages_text, result):
    page1 = _squash(pages_text[0])
    assert _squash("ab12" * 16) in page1  # the weights hash
    assert "recommendedaction" in page1.lower() and "FLAGGED" in page1 and "4flagged·2nearmiss" in page1
    assert "Sign-off" in page1 and "Preparedby" in page1 and "A.Auditor" in page1
    assert "results.jsonsha256" in page1 and "11,689,512" in page1


# -- archival PDF: PDF/A-3b, tags, attachments, metadata ---------------------------------------------
@pytest.fixture(scope="module")
def pike(pdf_path):
    pikepdf = pytest.importorskip("pikepdf")
    with pikepdf.open(str(pdf_path)) as pdf:
        yield pdf


def test_pdfa_identification_and_output_intent(pike):
    with pike.open_metadata() as meta:
        assert meta.get("pdfaid:part") == "3"
        assert meta.get("pdfaid:conformance") == "B"
        assert meta.get("dc:title") == "Synthetic audit: resnet18 on the watermark probe set"
    intents = pike.Root.OutputIntents
    assert len(intents) >= 1
    assert str(intents[0].S) == "/GTS_PDFA1" and "/DestOutputProfile" in intents[0]


def test_pdf_is_tagged(pike):
    assert "/StructTreeRoot" in pike.Root
    assert bool(pike.Root.MarkInfo.Marked)
    assert str(pike.Root.get("/Lang", "")) in ("en", "en-US")


def test_every_font_is_embedded(pike):
    seen = 0
    for page in pike.pages:
        for font in (page.Resources.get("/Font") or {}).values():
            descendants = font.get("/DescendantFonts")
            fonts = list(descendants) if descendants is not None else [font]
            for f in fonts:
                desc = f.get("/FontDescriptor")
                assert desc is not None, f.get("/BaseFont")
                assert any(k in desc for k in ("/FontFile", "/FontFile2", "/FontFile3")), f.get("/BaseFont")
                seen += 1
    assert seen


def test_attachments_equal_results_json_and_config(pike, result, tmp_path):
    import json

    files = {name: bytes(spec.get_file().read_bytes()) for name, spec in pike.attachments.items()}
    assert set(files) == {"results.json", "config.json"}
    saved = tmp_path / "results.json"
    result.save(saved)
    assert files["results.json"] == saved.read_bytes()
    assert json.loads(files["config.json"]) == result.config
    for name in files:  # PDF/A-3 needs the relationship of each embedded file
        assert str(pike.attachments[name].obj.get("/AFRelationship")) == "/Data"


def test_document_metadata(reader):
    meta = reader.metadata
    assert meta.title == "Synthetic audit: resnet18 on the watermark probe set"
    assert meta.author.startswith("auditor") and "neurons flagged" in meta.subject
    assert meta.creation_date is not None and meta.creation_date.year == 2024


# -- pagination -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layout(result):
    """WeasyPrint's page boxes for the print HTML (the same input html_to_pdf lays out)."""
    import weasyprint

    from auditor.report.html import render_html
    from auditor.report.pdf import make_url_fetcher

    html = render_html(result, for_pdf=True)
    return weasyprint.HTML(string=html, base_url=str(report.templates_dir()), url_fetcher=make_url_fetcher()).render()


def _boxes(page):
    return page._page_box.descendants()


def test_no_page_holds_a_single_row_of_a_longer_table(layout):
    from weasyprint.formatting_structure import boxes

    rows_per_table: dict[int, list[int]] = {}
    for number, page in enumerate(layout.pages, start=1):
        for box in _boxes(page):
            if isinstance(box, boxes.TableBox):
                n = sum(1 for group in box.children if isinstance(group, boxes.TableRowGroupBox)
                        and not group.is_header and not group.is_footer
                        for row in group.children if isinstance(row, boxes.TableRowBox))
                key = id(box.element) if box.element is not None else id(box)
                rows_per_table.setdefault(key, []).append((number, n))
    for parts in rows_per_table.values():
        if len(parts) > 1:  # the table spans pages: no fragment may hold a single body row
            assert all(n != 1 for _, n in parts), parts


def test_cards_are_not_split_unless_taller_than_a_page(layout):
    pages_of: dict[str, set[int]] = {}
    for number, page in enumerate(layout.pages, start=1):
        for box in _boxes(page):
            el = box.element
            if el is not None and el.tag == "article" and "card" in (el.get("class") or ""):
                pages_of.setdefault(el.get("id"), set()).add(number)
    assert pages_of
    height = layout.pages[0].height
    split = {k: v for k, v in pages_of.items() if len(v) > 1}
    for anchor in split:
        # a split card must be one that cannot fit: it fills its first page to the bottom
        first = min(split[anchor])
        tops = [b.position_y for b in _boxes(layout.pages[first - 1])
                if b.element is not None and b.element.get("id") == anchor]
        assert tops and min(tops) < 0.2 * height, (anchor, split[anchor])
