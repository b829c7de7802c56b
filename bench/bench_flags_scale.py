"""The flag tests (rule 2.0, with calibration) at the scale of bench_scale.py, without the search.

    python bench/bench_flags_scale.py [--n 1000000] [--c 20000] [--neurons 4] [--repeats 3] [--profile]

Labels as ``bench_scale.py data`` builds them (one-hot leaf classes + 4,000 hypernyms in a
4-level tree, CSR), in memory; the two last hypernyms are the artifacts (as in
``bench_scale.py run``). ``--neurons`` float32 activations, ReLU-like, each driven by one
artifact or a concept; each neuron's best formulas are ``artifact AND NOT class`` (positive)
and a plain concept (negative), so every pair has an all-rows test and one region test.
Times ``run_tests`` (median of ``repeats``); ``--profile`` prints a pyinstrument profile of one run;
``--delong`` times the DeLong intervals of the artifact AUROCs instead (as ``neuron_results``);
``--dump`` pickles the decision (to compare two versions of the code: ``PYTHONPATH=old/checkout``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def build(N: int, C: int, K: int, seed: int = 0):
    import scipy.sparse as sp

    from bench_scale import LEVELS, tree

    rng = np.random.default_rng(seed)
    n_leaf = C - sum(LEVELS)
    leaf = np.concatenate([np.repeat(np.arange(n_leaf), N // n_leaf), rng.integers(0, n_leaf, N % n_leaf)])
    rng.shuffle(leaf)
    groups = tree(n_leaf, rng)
    offsets = np.cumsum([n_leaf, *LEVELS])[:-1]
    cols = np.stack([leaf] + [off + g[leaf] for off, g in zip(offsets, groups)], axis=1)
    cols.sort(axis=1)
    indptr = np.arange(0, cols.size + 1, cols.shape[1], dtype=np.int64)
    names = [f"class_{i:05d}" for i in range(n_leaf)] + [f"hyper{lvl + 1}_{j:04d}" for lvl, n in enumerate(LEVELS)
                                                          for j in range(n)]
    Y = sp.csr_matrix((np.ones(cols.size, dtype=bool), cols.ravel(), indptr), shape=(N, C))
    arts = [names[-1], names[-2]]
    A = rng.standard_normal((N, K), dtype=np.float32) - 0.3
    Yc = Y.tocsc()
    best = []
    for k in range(K):
        art = arts[k % 2]
        other = names[int(rng.integers(0, n_leaf))]
        hit = np.asarray(Yc[:, names.index(art)].toarray()).ravel() != 0
        A[hit, k] += 1.0 if k % 3 else 0.1
        A[:, k] = np.round(np.maximum(A[:, k], 0), 2)  # ties (ReLU zeros and rounding)
        best.append((k, "ok", [(f"({art} AND NOT {other})", ("and", art, ("not", other))), (other, other)]))
    return A, Y, names, arts, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--c", type=int, default=20_000)
    ap.add_argument("--neurons", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--delong", action="store_true",
                    help="time instead the DeLong intervals of the artifact AUROCs (pipeline.neuron_results)")
    ap.add_argument("--dump", help="write the decision (every ArtifactTest and the calibration) to this pickle")
    ns = ap.parse_args()

    import auditor
    from auditor.flags import Labels, Rule, run_tests

    t = time.perf_counter()
    A, Y, names, arts, best = build(ns.n, ns.c, ns.neurons)
    print(f"data built in {time.perf_counter() - t:.1f} s", flush=True)
    rule = Rule()

    def once():
        return run_tests([(A, best)], Labels(Y, names), arts, rule, selection=1.0)

    if ns.delong:
        from auditor.delong import delong_ci

        lab = Labels(Y, names)
        block = A.astype(np.float64)

        def once():  # noqa: F811 - what neuron_results does per block of neurons
            return [delong_ci(block, lab(art)) for art in arts]

    if ns.profile:
        from pyinstrument import Profiler

        prof = Profiler()
        prof.start()
        once()
        prof.stop()
        print(prof.output_text(unicode=False, color=False, show_all=False))
        return
    times = []
    for _ in range(ns.repeats):
        t = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t)
    if ns.dump:
        import dataclasses
        import pickle

        with open(ns.dump, "wb") as f:
            pickle.dump(out if ns.delong else ({k: [dataclasses.asdict(x) for x in v] for k, v in out.tests.items()},
                                               out.calibration), f)
    med = statistics.median(times)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}; auditor from {Path(auditor.__file__).parent}; N={ns.n} C={ns.c} neurons={ns.neurons} artifacts=2 calibration=20")
    print(f"{'delong_ci' if ns.delong else 'run_tests'} median of {ns.repeats}: {med:.2f} s ({', '.join(f'{x:.2f}' for x in times)}); "
          f"{med / ns.neurons:.2f} s per neuron")


if __name__ == "__main__":
    main()
