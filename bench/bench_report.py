"""Benchmark the report renderers on a large synthetic layer.

    python bench/bench_report.py                  # 2,048 neurons, 50 flagged
    python bench/bench_report.py --neurons 512 --flagged 10 --out /tmp/bench --no-pdf

Builds the result with ``tests/report_fixtures.py`` (deterministic, no torch), renders
every format and prints the time and size of each. Exits 1 when the HTML is 10 MB or
more (the budget in docs/report.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

HTML_BUDGET = 10 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=2048)
    ap.add_argument("--flagged", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--no-pdf", action="store_true", help="skip the PDF (the slowest format)")
    args = ap.parse_args(argv)

    from report_fixtures import make_result

    import auditor.report as report
    from auditor.report.context import build_context
    from auditor.report.html import render_context
    from auditor.report.pdf import html_to_pdf

    t0 = time.perf_counter()
    result = make_result(args.neurons, args.flagged, second_layer=False)
    t_build = time.perf_counter() - t0
    print(f"synthetic result: {args.neurons:,} neurons, {result.n_flagged} flagged, "
          f"{sum(len(n.top_images) for n in result.flagged_neurons())} embedded top images "
          f"(built in {t_build:.1f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        timings: dict[str, tuple[float, float]] = {}  # name -> (wall s, CPU s of this process)

        def timed(name, fn):
            w, c = time.perf_counter(), time.process_time()
            value = fn()
            timings[name] = (time.perf_counter() - w, time.process_time() - c)
            return value

        timed("import seaborn/matplotlib", lambda: __import__("seaborn"))
        context = timed("context + figures", lambda: build_context(result))
        timed("html", lambda: (out / "report.html").write_text(render_context(context), encoding="utf-8"))
        if not args.no_pdf:
            timed("pdf", lambda: html_to_pdf(render_context(context, for_pdf=True), out / "report.pdf"))
        timed("json + csv + junit", lambda: report.render(result, out, formats=("json", "csv", "junit")))

        print(f"  {'step':<26} {'wall s':>8} {'CPU s':>8}")
        for name, (wall, cpu) in timings.items():
            print(f"  {name:<26} {wall:8.2f} {cpu:8.2f}")
        print(f"  {'total':<26} {sum(w for w, _ in timings.values()):8.2f} {sum(c for _, c in timings.values()):8.2f}")
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        for name, size in sizes.items():
            print(f"  {name:<26} {size / 1e6:7.2f} MB")
        if not args.no_pdf:
            from pypdf import PdfReader

            print(f"  report.pdf pages           {len(PdfReader(out / 'report.pdf').pages):7d}")
        html_size = sizes.get("report.html", 0)
        if html_size >= HTML_BUDGET:
            print(f"FAIL: report.html is {html_size / 1e6:.1f} MB (budget {HTML_BUDGET / 1e6:.1f} MB)")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
