#!/usr/bin/env python
"""Benchmark the INVERT engine on paper-scale synthetic data.

Data (scale "paper"): N = 50,000 probe images; C = 1,481 concepts = 1,000 one-hot
leaf classes (50 images each) + 481 hypernyms, each the OR of a group of classes
(a 4-level tree: 300 + 120 + 50 + 11 groups); K = 512 ReLU-like neurons (float32,
about 60% exact zeros), a third of them driven by one to three concepts.
Search: L = 3, B = 3, all 2C atoms in the pool (the reference's paper setting).

Measured, in one run:
* engine: ``auditor.invert.explain`` on the whole layer, wall time (median of
  ``--repeats``), peak resident memory of the process during the call (VmHWM after
  resetting it through /proc/self/clear_refs; else ru_maxrss);
* baselines, on a sample of real candidate formulas of a few neurons, extrapolated to
  the ~38,500 candidates per neuron and to the layer:
  - "per-candidate sort": each candidate's labeling built with numpy booleans and
    scored by an AUROC that sorts the activations (the reference implementation's
    method, without its float32 sigmoid);
  - "per-candidate ranks": the same with ranks computed once per neuron (a
    dot product per candidate) -- a stronger baseline.

    python bench/bench_invert.py                       # full scale, CPU
    python bench/bench_invert.py --scale small         # quick
    python bench/bench_invert.py --device cuda --json out.json
    python bench/bench_invert.py --save-dir /tmp/inv   # also write labels.npz / activations.npy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALES = {
    # N, leaves, hypernym groups per level, K
    "paper": (50_000, 1000, (300, 120, 50, 11), 512),
    "small": (5_000, 100, (30, 12, 5, 1), 64),
}


# ------------------------------------------------------------------------------ data


def make_data(scale: str, seed: int = 0):
    N, n_leaf, levels, K = SCALES[scale]
    rng = np.random.default_rng(seed)
    leaf = np.repeat(np.arange(n_leaf), N // n_leaf)
    leaf = np.concatenate([leaf, rng.integers(0, n_leaf, N - len(leaf))])
    rng.shuffle(leaf)
    rows = [np.arange(N)]
    cols = [leaf]
    names = [f"class_{i:04d}" for i in range(n_leaf)]
    # a tree: each level groups the previous level's nodes into contiguous random-size groups
    members = [np.array([i]) for i in range(n_leaf)]  # leaves under each node of the current level
    for lvl, n_groups in enumerate(levels, start=1):
        cuts = np.sort(rng.choice(np.arange(1, len(members)), n_groups - 1, replace=False))
        groups = np.split(np.arange(len(members)), cuts)
        new_members = []
        for g in groups:
            leaves = np.concatenate([members[i] for i in g])
            new_members.append(leaves)
            c = len(names)
            names.append(f"hyper{lvl}_{len(new_members) - 1:03d}")
            r = np.flatnonzero(np.isin(leaf, leaves))
            rows.append(r)
            cols.append(np.full(len(r), c))
        members = new_members
    C = len(names)
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    Y = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(N, C))
    # activations: ReLU(noise + signal), signal from 1-3 concepts for a third of the neurons
    A = rng.normal(-0.3, 1.0, size=(N, K)).astype(np.float32)
    Yc = Y.tocsc()
    for k in range(K):
        if k % 3:
            continue
        for cc in rng.choice(C, int(rng.integers(1, 4)), replace=False):
            idx = Yc.indices[Yc.indptr[cc] : Yc.indptr[cc + 1]]
            A[idx, k] += rng.uniform(1.0, 3.0) * (1 if rng.random() < 0.8 else -1)
    np.maximum(A, 0, out=A)
    return A, Y, names


# ------------------------------------------------------------------------------ memory


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm / 1024


def rss_mb() -> float:
    v = _status_kb("VmRSS")
    return (v or 0) / 1024


# ------------------------------------------------------------------------------ baselines


def sort_auroc(a: np.ndarray, y: np.ndarray) -> float:
    """AUROC by sorting the scores (ties handled as in sklearn's roc_auc_score)."""
    order = np.argsort(-a, kind="stable")
    s, t = a[order], y[order]
    distinct = np.flatnonzero(np.diff(s)) if len(s) > 1 else np.array([], dtype=np.int64)
    thr = np.r_[distinct, len(s) - 1]
    tps = np.cumsum(t)[thr]
    fps = (thr + 1) - tps
    tpr = np.r_[0, tps] / tps[-1]
    fpr = np.r_[0, fps] / fps[-1]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def baseline(A, Y, names, results, neurons, n_cand, rng):
    """Per-candidate scoring of real length-3 candidates of the given neurons."""
    from auditor.invert import evaluate
    from auditor.invert._ranks import rank2_numpy

    Yc = Y.tocsc()
    N, C = Y.shape

    def col(c):
        y = np.zeros(N, bool)
        y[Yc.indices[Yc.indptr[c] : Yc.indptr[c + 1]]] = True
        return y

    t_sort, t_rank, checked = [], [], 0
    for k in neurons:
        beam = results[k].beams[1] if results[k].beams and len(results[k].beams) > 1 else results[k].formulas
        if not beam:
            continue
        a = A[:, k].astype(np.float64)
        f_labs = [evaluate(f.ast_columns, Y, names) for f in beam]
        cands = [(int(rng.integers(len(beam))), int(rng.integers(C)), int(rng.integers(2)), int(rng.integers(2)))
                 for _ in range(n_cand)]
        # sort-based: build the labeling, sort the activations, integrate the ROC
        t0 = time.perf_counter()
        aucs = []
        for b, c, neg, op in cands:
            y = col(c)
            if neg:
                y = ~y
            lab = (f_labs[b] & y) if op == 0 else (f_labs[b] | y)
            if 0 < lab.sum() < N:
                aucs.append(sort_auroc(a, lab))
            else:
                aucs.append(np.nan)
        t_sort.append((time.perf_counter() - t0) / n_cand)
        # rank-based: ranks once, then one masked sum per candidate
        t0 = time.perf_counter()
        r2 = rank2_numpy(a[None])[0][0]
        aucs2 = []
        for b, c, neg, op in cands:
            y = col(c)
            if neg:
                y = ~y
            lab = (f_labs[b] & y) if op == 0 else (f_labs[b] | y)
            n = lab.sum()
            aucs2.append((r2[lab].sum() - n * (n + 1)) / (2 * n * (N - n)) if 0 < n < N else np.nan)
        t_rank.append((time.perf_counter() - t0) / n_cand)
        ok = ~np.isnan(aucs)
        assert np.allclose(np.array(aucs)[ok], np.array(aucs2)[ok], atol=1e-9), "baseline AUROCs disagree"
        checked += int(ok.sum())
    return statistics.median(t_sort), statistics.median(t_rank), checked


# ------------------------------------------------------------------------------ main


def hardware() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": __import__("scipy").__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="paper")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--length", type=int, default=3)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--baseline-neurons", type=int, default=3)
    ap.add_argument("--baseline-candidates", type=int, default=200)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--save-dir", type=Path, help="write labels.npz and activations.npy here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from auditor.invert import InvertParams, explain
    from auditor.invert._ranks import rank2_numpy

    t0 = time.perf_counter()
    A, Y, names = make_data(args.scale, args.seed)
    t_data = time.perf_counter() - t0
    N, K = A.shape
    C = Y.shape[1]
    print(f"data: N={N} C={C} K={K} nnz={Y.nnz} zeros={np.mean(A == 0):.0%} ({t_data:.1f} s)", file=sys.stderr)
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        np.save(args.save_dir / "activations.npy", A)
        # scipy.sparse.save_npz layout (load_npz reads it) plus the concept names
        np.savez_compressed(
            args.save_dir / "labels.npz",
            data=Y.data, indices=Y.indices, indptr=Y.indptr, format=np.array("csr"),
            shape=np.array(Y.shape), concepts=np.array(names),
        )
        print(f"wrote {args.save_dir}/activations.npy and labels.npz", file=sys.stderr)

    params = InvertParams(length=args.length, beam=args.beam, device=args.device, all_lengths=True)
    if args.device.startswith("cuda"):
        # warm-up: CUDA context, kernels (not counted)
        explain(A[:2000, :8], Y[:2000], names, params)
        torch.cuda.synchronize()

    base_rss = rss_mb()
    load_before = os.getloadavg()
    times, cpus, peaks = [], [], []
    results = None
    for _ in range(args.repeats):
        reset = _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        results = explain(A, Y, names, params)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        peaks.append(peak_mb() if reset else float("nan"))
        print(f"engine: {times[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU, peak RSS {peaks[-1]:.0f} MB", file=sys.stderr)
    t_engine = statistics.median(times)
    load_after = os.getloadavg()
    gpu_peak = None
    if args.device.startswith("cuda"):
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20

    # one piece of the engine on its own: the ranks of the whole layer
    t0 = time.perf_counter()
    for s in range(0, K, 64):
        rank2_numpy(np.ascontiguousarray(A[:, s : s + 64].T))
    t_ranks = time.perf_counter() - t0

    # candidates per neuron, as the reference enumerates them
    n_atoms = 2 * C
    cand_per_neuron = n_atoms + (args.length - 1) * args.beam * n_atoms * 2
    rng = np.random.default_rng(1)
    live = [r.index for r in results if r.status == "ok"]
    sample = [live[i] for i in rng.choice(len(live), min(args.baseline_neurons, len(live)), replace=False)]
    t_sort, t_rank, checked = baseline(A, Y, names, {r.index: r for r in results}, sample,
                                       args.baseline_candidates, rng)
    layer_sort = t_sort * cand_per_neuron * K
    layer_rank = t_rank * cand_per_neuron * K

    ok = sum(r.status == "ok" for r in results)
    best = sorted((r for r in results if r.formulas), key=lambda r: -r.formulas[0].auroc)[:3]
    out = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "hardware": hardware(),
        "sizes": {"N": N, "C": C, "K": K, "nnz": int(Y.nnz), "L": args.length, "B": args.beam,
                  "candidates_per_neuron": cand_per_neuron},
        "device": args.device,
        "engine_s": t_engine,
        "engine_runs_s": times,
        "engine_cpu_s": statistics.median(cpus),
        "engine_cpu_runs_s": cpus,
        "loadavg_before_after": [load_before[0], load_after[0]],
        "engine_per_neuron_ms": 1000 * t_engine / K,
        "ranks_s": t_ranks,
        "peak_rss_mb": max(peaks),
        "rss_before_mb": base_rss,
        "gpu_peak_mb": gpu_peak,
        "baseline_sort_per_candidate_ms": 1000 * t_sort,
        "baseline_sort_per_neuron_s": t_sort * cand_per_neuron,
        "baseline_sort_layer_s": layer_sort,
        "baseline_rank_per_candidate_ms": 1000 * t_rank,
        "baseline_rank_layer_s": layer_rank,
        "speedup_vs_sort": layer_sort / t_engine,
        "speedup_vs_rank": layer_rank / t_engine,
        "baseline_candidates_checked": checked,
        "ok_neurons": ok,
        "dead_neurons": K - ok,
        "examples": [f"neuron {r.index}: {r.formulas[0].text} (AUROC {r.formulas[0].auroc:.4f}, "
                     f"log10 p {r.formulas[0].log10_p:.1f})" for r in best],
    }
    rows = [
        ("sizes", f"N={N:,}, C={C:,} (nnz {Y.nnz:,}), K={K}, L={args.length}, B={args.beam}"),
        ("device", f"{args.device} ({out['hardware'].get('gpu', out['hardware']['cpu'])}, "
                   f"{out['hardware']['cores']} cores)"),
        ("engine, whole layer (median)", f"{t_engine:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times)})"),
        ("engine CPU time (user+sys, median)", f"{statistics.median(cpus):.2f} s"),
        ("machine load (1-min avg, before/after)", f"{load_before[0]:.1f} / {load_after[0]:.1f}"),
        ("engine per neuron", f"{1000 * t_engine / K:.1f} ms"),
        ("  of which: ranks of the layer", f"{t_ranks:.2f} s"),
        ("peak RSS during engine", f"{max(peaks):.0f} MB (process RSS before: {base_rss:.0f} MB)"),
    ]
    if gpu_peak is not None:
        rows.append(("peak GPU memory", f"{gpu_peak:.0f} MB"))
    rows += [
        ("baseline: per-candidate sort", f"{1000 * t_sort:.2f} ms/candidate -> {t_sort * cand_per_neuron:.0f} s/neuron"
                                         f" -> {layer_sort / 3600:.1f} h/layer"),
        ("baseline: per-candidate ranks", f"{1000 * t_rank:.3f} ms/candidate -> {layer_rank / 60:.1f} min/layer"),
        ("speed-up vs sort baseline", f"{layer_sort / t_engine:,.0f}x"),
        ("speed-up vs rank baseline", f"{layer_rank / t_engine:,.0f}x"),
    ]
    print("| measure | value |\n| --- | --- |")
    for k_, v in rows:
        print(f"| {k_} | {v} |")
    for e in out["examples"]:
        print(f"- {e}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
