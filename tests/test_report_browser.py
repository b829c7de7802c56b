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
    assert header.get_attribute("aria-sort") == "ascending"
    live = sorted((n for n in layer.neurons if n.best), key=lambda n: (n.best.auroc, n.index))
    dead = [n for n in layer.neurons if not n.best]
    expected = [str(n.index) for n in live] + [str(n.index) for n in dead]  # missing values last
    assert _column(page, "neurons-0", 0) == expected
    header.locator("button").click()
    assert header.get_attribute("aria-sort") == "descending"
    live_desc = sorted((n for n in layer.neurons if n.best), key=lambda n: (-n.best.auroc, n.index))
    assert _column(page, "neurons-0", 0)[: len(live_desc)] == [str(n.index) for n in live_desc]
    # text columns sort too
    page.locator("#neurons-0 thead th").nth(1).locator("button").click()
    statuses = _column(page, "neurons-0", 1)
    assert statuses == sorted(statuses)


def test_filter_hides_non_matching_rows(page, result):
    page, _ = page
    tools = page.locator('.table-tools[data-table="neurons-0"]')
    assert tools.is_visible()
    box = tools.locator("input")
    box.fill("watermark")
    shown = _column(page, "neurons-0", 0)
    layer = result.layers[0]
    expected = [str(n.index) for n in layer.neurons
                if "watermark" in ((n.best.formula if n.best else "") + " ".join(f.artifact for f in n.flags)
                                   + " ".join(n.sensitive)).lower()]
    assert shown == expected
    assert 0 < len(shown) < len(layer.neurons)
    assert tools.locator(".count").inner_text() == f"{len(shown)} of {len(layer.neurons)} neurons"
    hidden_row = page.locator("#neurons-0 tbody tr").nth(0)  # neuron 0 has no watermark
    assert not hidden_row.is_visible()
    box.fill("")
    assert len(_column(page, "neurons-0", 0)) == len(layer.neurons)


def test_readable_without_javascript(browser, report_url, result):
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(report_url)
        banner = page.locator(".banner")
        assert banner.is_visible() and "Artifact detectors found" in banner.inner_text()
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
