#!/usr/bin/env bash
# Regenerates the demo's sample report and the README's screenshot of its first page.
# Run from the repository root after `bash .ci/install`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/auditor demo --quiet --device cpu --out sample_reports
.venv/bin/python - <<'PY'
from pathlib import Path
from playwright.sync_api import sync_playwright

html = Path("sample_reports/report.html").resolve()
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = browser.new_page(viewport={"width": 1100, "height": 1300})
    page.goto(html.as_uri())
    page.screenshot(path="sample_reports/report-page1.png")
    browser.close()
PY
echo "wrote sample_reports/"
