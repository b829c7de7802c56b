"""Benchmark the impact stage on the embedded demo: what it adds to an audit.

    python bench/bench_impact.py [--repeats 3] [--device cpu]

Runs the demo audit (`run_audit(demo_config(...))`, no report rendering) with the
impact stage on and off, ``--repeats`` times each, alternating, after one warm-up run
that fills the activation cache (so every timed run reads activations from the cache,
as a re-run does); the impact cache is emptied before every run, so the stage is
computed each time. Prints per run the pipeline's own timings and the medians, plus
the machine's load. The budget (docs/impact.md): the impact stage adds under 30 s
on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGET_S = 30.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from auditor.config import make_config
    from auditor.demo.run import demo_config
    from auditor.pipeline import run_audit

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = demo_config(out=str(Path(tmp) / "out"), device=args.device, cache_dir=str(Path(tmp) / "cache"))

        def run(impact: bool):
            shutil.rmtree(Path(base.cache_path) / "impact", ignore_errors=True)  # time the work, not the cache
            cfg = make_config(base.plain() | {"impact": impact})
            t = time.perf_counter()
            result = run_audit(cfg, log=lambda m: None, progress=False)
            wall = time.perf_counter() - t
            return wall, result

        run(False)  # warm-up: probe set, activation cache, imports
        rows: dict[bool, list[float]] = {True: [], False: []}
        stage: list[float] = []
        for r in range(args.repeats):
            for impact in (False, True):
                wall, result = run(impact)
                rows[impact].append(wall)
                tm = result.provenance["timings"]
                if impact:
                    stage.append(tm["impact_s"])
                    n = {i.artifact: i.n_images for i in result.impact}
                print(f"run {r + 1} impact={'on ' if impact else 'off'}: wall {wall:6.2f} s"
                      + (f"  impact stage {tm['impact_s']:6.2f} s  images {n}" if impact else "")
                      + f"  load {os.getloadavg()[0]:.2f}")
        off, on, st = (statistics.median(rows[False]), statistics.median(rows[True]), statistics.median(stage))
        print(f"median wall: impact off {off:.2f} s, on {on:.2f} s (+{on - off:.2f} s); "
              f"impact stage {st:.2f} s (budget {BUDGET_S:.0f} s)")
        return 0 if st < BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
