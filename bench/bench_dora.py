#!/usr/bin/env python
"""Benchmark DORA's s-AMS generation, and measure it on the demo's planted watermark channels.

Modes:

* ``speed`` (CPU, small): s-AMS for K neurons of the demo model's ``features.13``
  at 64², batched over neurons (``auditor.dora.generate``), against a baseline
  measured in the same run: the same generation one neuron per optimisation batch
  (what the DORA reference package does). Neurons per second, median of
  ``--repeats``.
* ``gpu``: the same at 224², 90 steps, a 512-channel layer (torchvision resnet18
  ``layer4``, seeded random weights), on CUDA. Needs a GPU.
* ``demo``: the demo audit with DORA on at its defaults (90 steps, 3 signals, lr 0.05,
  64², LOF on the pairwise EA distance), then, on the same s-AMS, the layer-wise
  distance too. Prints where the planted watermark channels (``DEMO_WATERMARK_CHANNELS``)
  rank among DORA's outliers, side by side with INVERT's flags. Nothing is tuned.

    python bench/bench_dora.py speed --neurons 16 --steps 20
    python bench/bench_dora.py gpu
    python bench/bench_dora.py demo --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(args) -> dict:
    from auditor.demo.model import DEMO_LAYER, load_demo_model
    from auditor.dora import SamsParams, generate

    model = load_demo_model()
    neurons = list(range(args.neurons))
    p = SamsParams(size=64, steps=args.steps, signals=args.signals, batch_size=args.neurons * args.signals)
    batched = _time(lambda: generate(model, DEMO_LAYER, "mean", neurons, p, progress=False), args.repeats)
    one = SamsParams(size=64, steps=args.steps, signals=args.signals, batch_size=args.signals)
    looped = _time(lambda: generate(model, DEMO_LAYER, "mean", neurons, one, progress=False), args.repeats)
    return {"mode": "speed", "size": 64, "steps": args.steps, "signals": args.signals, "neurons": args.neurons,
            "batched_s": batched, "batched_neurons_per_s": args.neurons / batched,
            "one_neuron_per_batch_s": looped, "one_neuron_per_batch_neurons_per_s": args.neurons / looped,
            "speedup": looped / batched, "machine": _machine()}


def gpu(args) -> dict:
    import torchvision

    from auditor.dora import SamsParams, generate

    dev = args.device or "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu mode needs CUDA (--device cpu runs the same code path, e.g. as a smoke test)")
    size, steps, n = args.size or 224, args.steps_gpu or 90, args.neurons_gpu or 512
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    neurons = list(range(n))
    p = SamsParams(size=size, steps=steps, signals=args.signals, batch_size=args.batch_size)
    warm = SamsParams(size=size, steps=2, signals=1, batch_size=args.batch_size)
    generate(model, "layer4", "mean", neurons[:args.batch_size], warm, mean=mean, std=std, device=dev,
             progress=False)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = _time(lambda: generate(model, "layer4", "mean", neurons, p, mean=mean, std=std, device=dev,
                               progress=False), 1)
    return {"mode": "gpu", "device": dev, "size": size, "steps": steps, "signals": args.signals, "neurons": n,
            "batch_size": args.batch_size, "seconds": t, "neurons_per_s": n / t,
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
            "machine": _machine()}


def demo(args) -> dict:
    from auditor.config import DoraSection
    from auditor.demo.model import DEMO_LAYER, DEMO_WATERMARK_CHANNELS
    from auditor.demo.run import demo_config
    from auditor.dora import ea_distance, outlier_scores, representation_matrix, sams_for_layer
    from auditor.dora.generate import activations_on
    from auditor.pipeline import dora_params, run_audit

    cache = args.cache_dir or tempfile.mkdtemp(prefix="dora-bench-")
    cfg = demo_config(out=os.path.join(cache, "out"), device="cpu", cache_dir=cache, formats="json")
    cfg = cfg.model_copy(update={"dora": DoraSection(**({"lr": args.lr} if args.lr else {}))})
    t = time.perf_counter()
    result = run_audit(cfg, progress=False, log=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - t
    layer = result.layers[0]
    dl = result.dora.layers[0]
    rows = {}
    for n in dl.neurons:
        rows[n.index] = {"rank": n.rank, "score": n.score, "outlier": n.outlier}
    flagged = sorted(n.index for n in layer.neurons if n.flags)
    # Same s-AMS (from the cache), the reference package's layer-wise distance.
    from auditor.demo.model import load_demo_model

    model = load_demo_model()
    params = dora_params(cfg, 64)
    sams, neurons, info = sams_for_layer(model, DEMO_LAYER, "mean", params, cache_dir=cache, progress=False)
    K, S = sams.shape[:2]
    A = representation_matrix(activations_on(model, DEMO_LAYER, "mean", sams.reshape(K * S, *sams.shape[2:])), K, S)
    lw = outlier_scores(ea_distance(A, "layerwise"))
    wm = list(DEMO_WATERMARK_CHANNELS)
    D = ea_distance(A, "pairwise")
    off = np.where(np.eye(K, dtype=bool), -np.inf, A).max(axis=0)
    probe_max = np.array([n.stats["max"] for n in layer.neurons])
    near = {c: [int(j) for j in np.argsort(D[c])[1:5]] for c in wm}
    every = {}
    for form in ("pairwise", "layerwise"):
        for meth in ("lof", "iforest", "knn"):
            o = outlier_scores(ea_distance(A, form), meth)
            every[f"{form}/{meth}"] = {"n_outliers": int(o.outlier.sum()),
                                       "watermark_ranks": [int(o.rank[c]) for c in wm]}
    return {
        "every_form_and_method": every,
        "self_beats_probe_max": float(np.mean(np.diag(A) > probe_max)),
        "self_beats_others_sams": float(np.mean(np.diag(A) > off)),
        "inactive": dl.inactive,
        "watermark_4_nearest": near,
        "watermark_neighbours_in_group": float(np.mean([len(set(v) & set(wm)) / 4 for v in near.values()])),
        "mean_ea_within_group": float(D[np.ix_(wm, wm)][np.triu_indices(len(wm), 1)].mean()),
        "mean_ea_layer": float(D[np.triu_indices(K, 1)].mean()),
        "mode": "demo", "seconds_audit_with_dora": seconds, "dora_seconds": result.dora.seconds,
        "params": result.dora.params, "n_neurons": dl.n_neurons, "outliers_pairwise_lof": dl.outliers,
        "watermark_channels": wm,
        "watermark_pairwise_lof": {c: rows[c] for c in wm},
        "watermark_layerwise_lof": {c: {"rank": int(lw.rank[c]), "score": float(lw.scores[c]),
                                        "outlier": bool(lw.outlier[c])} for c in wm},
        "outliers_layerwise_lof": [int(i) for i in np.argsort(lw.rank) if lw.outlier[i]],
        "invert_flagged": flagged,
        "invert_flagged_watermark": sorted(n.index for n in layer.neurons if any(f.artifact == "watermark"
                                                                                 for f in n.flags)),
        "cache": info, "machine": _machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["speed", "gpu", "demo"])
    ap.add_argument("--neurons", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--signals", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--lr", type=float, default=None, help="demo: another Adam learning rate (sensitivity)")
    ap.add_argument("--device", default=None, help="gpu mode: cuda (default) or cpu for a smoke run")
    ap.add_argument("--size", type=int, default=None, help="gpu mode: image side (default 224)")
    ap.add_argument("--steps-gpu", type=int, default=None, help="gpu mode: Adam steps (default 90)")
    ap.add_argument("--neurons-gpu", type=int, default=None, help="gpu mode: neurons of layer4 (default 512)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = {"speed": speed, "gpu": gpu, "demo": demo}[args.mode](args)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
