"""How long the demo probe set takes to write (formerly a timed unit test).

    python bench/bench_demo_data.py [--n 200] [--reps 5]

Prints the median seconds of ``make_probe_set(n)`` and, as a baseline measured in
the same run, of writing the same number of blank PNGs of the same size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from auditor.demo.data import make_probe_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-data-"))
    try:
        probe, blank = [], []
        for r in range(args.reps):
            t = time.perf_counter()
            make_probe_set(tmp / f"p{r}", n=args.n, seed=r)
            probe.append(time.perf_counter() - t)
            t = time.perf_counter()
            (tmp / f"b{r}").mkdir()
            for i in range(args.n):
                Image.new("RGB", (64, 64)).save(tmp / f"b{r}" / f"{i:04d}.png")
            blank.append(time.perf_counter() - t)
        print(f"make_probe_set n={args.n}: median {statistics.median(probe):.3f} s over {args.reps} runs; "
              f"baseline (blank PNGs): {statistics.median(blank):.3f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
