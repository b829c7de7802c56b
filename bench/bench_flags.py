"""Cost of the flag rule (rule 2.0) next to the INVERT search it follows.

    python bench/bench_flags.py [--n 10000] [--k 512] [--c 60] [--artifacts 4] [--repeats 3]

Synthetic probe set: C independent concepts (prevalence 5-40 %), the first ``artifacts``
of them audited as artifacts; K neurons, most noise, some detectors of a concept or an
artifact. Times (median of ``repeats``, seconds, one process): the positive INVERT search
(what the old rule needed), the negative search, the flag tests without calibration and
with the default 20 calibration runs. The baseline is the positive search, measured in
the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--c", type=int, default=60)
    ap.add_argument("--artifacts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ns = ap.parse_args()

    from auditor import invert
    from auditor.config import make_config
    from auditor.flags import Labels, run_tests
    from auditor.pipeline import rule_of, selection_factor

    rng = np.random.default_rng(0)
    Y = rng.random((ns.n, ns.c)) < rng.uniform(0.05, 0.4, ns.c)
    names = [f"c{i}" for i in range(ns.c)]
    arts = names[: ns.artifacts]
    A = rng.normal(size=(ns.n, ns.k))
    for k in range(0, ns.k, 7):
        A[:, k] += 2.0 * Y[:, k % ns.c]
    cfg = make_config({"artifacts": arts})
    params = invert.InvertParams(length=cfg.length, beam=cfg.beam, min_fraction=cfg.min_fraction,
                                 max_fraction=cfg.max_fraction)

    def timed(fn):
        out = []
        for _ in range(ns.repeats):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    pos = invert.explain(A, Y, names, params)
    neg = invert.explain(A, Y, names, invert.InvertParams(**{**params.__dict__, "mode": "negative"}))
    best = [(p.index, p.status, [(f.text, f.ast) for f in (p.formulas[:1] + q.formulas[:1])])
            for p, q in zip(pos, neg)]
    labels = Labels(Y, names)
    sel = selection_factor(cfg, ns.c)
    rule0 = rule_of(make_config({"artifacts": arts, "calibration_runs": 0}))
    rule20 = rule_of(cfg)
    t_pos = timed(lambda: invert.explain(A, Y, names, params))
    t_neg = timed(lambda: invert.explain(A, Y, names, invert.InvertParams(**{**params.__dict__, "mode": "negative"})))
    t0 = timed(lambda: run_tests([(A, best)], Labels(Y, names), arts, rule0, selection=sel))
    t20 = timed(lambda: run_tests([(A, best)], Labels(Y, names), arts, rule20, selection=sel))
    del labels
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}; N={ns.n} K={ns.k} C={ns.c} artifacts={ns.artifacts}")
    print(f"positive search (baseline)   {t_pos:8.2f} s")
    print(f"negative search              {t_neg:8.2f} s")
    print(f"flag tests, no calibration   {t0:8.2f} s")
    print(f"flag tests, 20 calibrations  {t20:8.2f} s")


if __name__ == "__main__":
    main()
