#!/usr/bin/env bash
# Regenerates the demo's sample report and the README's screenshot of its first page.
# Run from the repository root after `bash .ci/install`.
set -euo pipefail
cd "$(dirname "$0")/.."
# --out is owned by auditor (its outputs are links into .auditor/): audit into a scratch folder
# and copy the files themselves here.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/auditor demo --quiet --device cpu --out "$tmp/out" --cache-dir "$tmp/cache"
for f in report.html report.pdf results.json neurons.csv junit.xml; do
  cp -L "$tmp/out/$f" "sample_reports/$f"
done
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
# Page 1 of the archival PDF as the reviewer prints it (pdftoppm: poppler-utils).
if command -v pdftoppm >/dev/null; then
  pdftoppm -r 60 -f 1 -l 1 -png -singlefile sample_reports/report.pdf sample_reports/report-pdf-page1
fi
echo "wrote sample_reports/"
