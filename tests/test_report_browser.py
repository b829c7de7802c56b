"""The HTML report in a real browser (Playwright driving Debian's Chromium).

Skipped when Playwright or a Chromium binary is missing. Set AUDITOR_CHROMIUM to use
another binary.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import auditor.report as report

import report_fixtures  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    for candidate in (os.environ.get("AUDITOR_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def result():
    return report_fixtures.make_result()


@pytest.fixture(scope="module")
def report_url(result, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("browser")
    return report.render(result, out, formats=("html",))["html"].resolve().as_uri()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium binary found (set AUDITOR_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - a broken browser install is a skip, not a failure
            pytest.skip(f"Chromium at {exe} does not start under Playwright: {exc}")
        yield browser
        browser.close()


class _Watch:
    """Everything the page reports that would mean a broken or leaky report."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        page.on("request", lambda r: self.requests.append(r.url))


@pytest.fixture()
def page(browser, report_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = _Watch(page)
    page.goto(report_url)
    page.wait_for_load_state("load")
    yield page, watch
    context.close()


def _column(page, table: str, col: int) -> list[str]:
    return page.eval_on_selector_all(
        f"#{table} tbody tr", f"rows => rows.filter(r => !r.hidden).map(r => r.cells[{col}].textContent.trim())"
    )


def test_loads_clean_and_offline(page):
    page, watch = page
    assert watch.errors == []
    assert watch.failed == []
    assert all(u.startswith(("file:", "data:")) for u in watch.requests), watch.requests


def test_every_image_decodes(page):
    page, _ = page
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.src.slice(0, 30), ok: e.complete && e.naturalWidth > 0}))"
    )
    assert len(images) > 20
    assert [i for i in images if not i["ok"]] == []


def test_sorting_reorders_rows(page, result):
    page, _ = page
    layer = result.layers[0]
    before = _column(page, "neurons-0", 0)
    assert before == [str(n.index) for n in layer.neurons]
    header = page.locator("#neurons-0 thead th").nth(3)  # AUROC
    header.locator("button").click()
    # the first click on a number column sorts largest first
    assert header.get_attribute("aria-sort") == "descending"
    live_desc = sorted((n for n in layer.neurons if n.best), key=lambda n: (-n.best.auroc, n.index))
    dead = [n for n in layer.neurons if not n.best]
    assert _column(page, "neurons-0", 0) == [str(n.index) for n in live_desc] + [str(n.index) for n in dead]
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "ascending"
    live = sorted((n for n in layer.neurons if n.best), key=lambda n: (n.best.auroc, n.index))
    assert _column(page, "neurons-0", 0) == [str(n.index) for n in live] + [str(n.index) for n in dead]  # missing last
    # the verdict column sorts by severity: flagged first
    page.locator("#neurons-0 thead th").nth(1).locator("button").click()
    verdicts = _column(page, "neurons-0", 1)
    order = ["flagged", "near miss", "inconclusive", "clean", "dead"]
    assert verdicts == sorted(verdicts, key=order.index) and verdicts[0] == "flagged"
    # text columns sort A to Z on the first click
    page.locator("#neurons-0 thead th").nth(2).locator("button").click()
    formulas = [f.lower() for f in _column(page, "neurons-0", 2)]
    assert formulas == sorted(formulas)


def _uses(ast, name, negated=False):
    """(un-negated use, negated use) of concept ``name`` in a formula tree."""
    if isinstance(ast, str):
        return (ast == name and not negated, ast == name and negated)
    if ast[0] == "not":
        return _uses(ast[1], name, not negated)
    parts = [_uses(a, name, negated) for a in ast[1:]]
    return (any(p[0] for p in parts), any(p[1] for p in parts))


def test_filter_respects_negation(page, result):
    page, _ = page
    tools = page.locator('.table-tools[data-table="neurons-0"]')
    assert tools.is_visible()
    box = tools.locator("input")
    layer = result.layers[0]
    box.fill("watermark")
    shown = _column(page, "neurons-0", 0)
    expected = [str(n.index) for n in layer.neurons if n.best and _uses(n.best.ast, "watermark")[0]]
    assert shown == expected and 0 < len(shown) < len(layer.neurons)
    assert tools.locator(".count").inner_text() == f"{len(shown)} of {len(layer.neurons)} neurons"
    # "NOT <script>…" is used negated by some neurons: the plain term must skip them, "not …" finds them
    neg = [str(n.index) for n in layer.neurons if n.best and _uses(n.best.ast, report_fixtures.SCRIPT_CONCEPT)[1]
           and not _uses(n.best.ast, report_fixtures.SCRIPT_CONCEPT)[0]]
    assert neg
    box.fill("<script>alert(1)</script>")
    assert not set(neg) & set(_column(page, "neurons-0", 0))
    box.fill("not <script>alert(1)</script>")
    assert set(neg) <= set(_column(page, "neurons-0", 0))
    box.fill("")
    assert len(_column(page, "neurons-0", 0)) == len(layer.neurons)


@pytest.mark.parametrize("status,label", [("flagged", "flagged"), ("near_miss", "near miss"),
                                          ("inconclusive", "inconclusive"), ("dead", "dead")])
def test_status_filters(page, result, status, label):
    page, _ = page
    layer = result.layers[0]
    page.locator(f'.table-tools[data-table="neurons-0"] button[data-status="{status}"]').click()
    shown = _column(page, "neurons-0", 0)
    if status == "dead":
        expected = [str(n.index) for n in layer.neurons if n.status == "dead"]
    else:
        expected = [str(n.index) for n in layer.neurons if any(t.status == status for t in n.artifact_tests)]
    assert shown == expected and shown
    page.locator('.table-tools[data-table="neurons-0"] button[data-status=""]').click()
    assert len(_column(page, "neurons-0", 0)) == len(layer.neurons)


_LAYOUT_JS = """() => {
  const W = document.documentElement.clientWidth;
  const scroll = document.scrollingElement.scrollWidth;
  const groups = ['main > section > *', '.identity > *', '.two-col > *', '.card-body > *', 'dl.metrics > div',
                  'dl.signoff-fields > div', '.thumbs > *', 'dl.id > *', '.decision > *', '.card-head > *'];
  const overlaps = [];
  for (const sel of groups) {
    const byParent = new Map();
    for (const el of document.querySelectorAll(sel)) {
      const r = el.getBoundingClientRect();
      if (r.width === 0 || r.height === 0 || el.closest('details:not([open]) > :not(summary)')) continue;
      if (!byParent.has(el.parentElement)) byParent.set(el.parentElement, []);
      byParent.get(el.parentElement).push([el, r]);
    }
    for (const items of byParent.values()) {
      for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) {
        const a = items[i][1], b = items[j][1];
        const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
        const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
        if (w > 1 && h > 1) overlaps.push(sel + ': ' + items[i][0].className + ' / ' + items[j][0].className);
      }
    }
  }
  // anything wider than the viewport must sit inside a box that scrolls on its own
  const wide = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= W + 1) continue;
    let a = el.parentElement, clipped = false;
    while (a && a !== document.body) { if (getComputedStyle(a).overflowX !== 'visible') { clipped = true; break; }
      a = a.parentElement; }
    if (!clipped) wide.push(el.tagName + '.' + el.className);
  }
  return {W, scroll, overlaps: overlaps.slice(0, 10), wide: wide.slice(0, 10)};
}"""


@pytest.mark.parametrize("width", [1400, 390])
def test_no_horizontal_scroll_and_no_overlapping_boxes(browser, report_url, width, tmp_path):
    context = browser.new_context(viewport={"width": width, "height": 900})
    try:
        page = context.new_page()
        page.goto(report_url)
        out = page.evaluate(_LAYOUT_JS)
        assert out["scroll"] <= out["W"], out
        assert out["wide"] == [], out
        assert out["overlaps"] == [], out
        page.screenshot(path=str(tmp_path / f"report-{width}.png"))
    finally:
        context.close()


def test_large_layer_stays_usable(browser, tmp_path):
    """2,048 neurons: cards collapsed beyond the first few, the table one click away, the nav sticky."""
    from auditor.report.context import CARDS_OPEN, build_context
    from auditor.report.html import render_context

    big = report_fixtures.make_result(2048, 50, second_layer=False, embed=False)
    path = tmp_path / "big.html"
    path.write_text(render_context(build_context(big, render_figures=False)), encoding="utf-8")
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.goto(path.resolve().as_uri())
        assert page.locator("article.card details[open]").count() == CARDS_OPEN + 3  # + 3 reference cards
        assert page.locator("article.card details:not([open])").count() == 50 - CARDS_OPEN
        top = page.evaluate("document.getElementById('triage').getBoundingClientRect().top + window.scrollY")
        assert top < 8000, top  # right after page 1 and the near misses, not below 50 cards
        page.locator("nav.sections a[href='#triage']").click()
        page.wait_for_function("Math.abs(document.getElementById('triage').getBoundingClientRect().top) < 120")
        assert page.evaluate("document.querySelector('nav.sections').getBoundingClientRect().top") == 0  # sticky
        assert page.locator("#neurons-0 tbody tr").count() == 2048
        page.locator('.table-tools[data-table="neurons-0"] button[data-status="flagged"]').click()
        assert len(_column(page, "neurons-0", 0)) == 50
        # a collapsed card opens with one click on its title
        # printing from the browser opens every card, and closes them again afterwards
        page.evaluate("window.dispatchEvent(new Event('beforeprint'))")
        assert page.locator("article.card details:not([open])").count() == 0
        page.evaluate("window.dispatchEvent(new Event('afterprint'))")
        assert page.locator("article.card details:not([open])").count() == 50 - CARDS_OPEN
        anchor = page.locator("article.card:has(details:not([open]))").first.get_attribute("id")
        card = page.locator(f"article#{anchor} details")
        assert card.get_attribute("open") is None
        card.locator("summary").click()
        assert card.get_attribute("open") is not None
    finally:
        context.close()


def test_readable_without_javascript(browser, report_url, result):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(report_url)
        banner = page.locator(".decision")
        assert banner.is_visible() and "Block the release" in banner.inner_text()
        assert page.locator("table.verdict").is_visible()
        for n in result.flagged_neurons():
            card = page.locator(f"#L0-n{n.index}")
            assert card.is_visible()
            assert f"neuron {n.index}" in card.locator("h3").inner_text()
        # the full table is there, the JS-only tools are not
        assert page.locator("#neurons-0 tbody tr").count() == len(result.layers[0].neurons)
        assert not page.locator('.table-tools[data-table="neurons-0"]').is_visible()
    finally:
        context.close()


def test_script_payload_is_inert(page):
    """The concept named <script>alert(1)</script> shows as text and never runs."""
    page, watch = page
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.reload()
    assert dialogs == []
    assert page.get_by_text("<script>alert(1)</script>").first.is_visible()
