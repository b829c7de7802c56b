"""Benchmarks for activation collection (auditor.collect.collect).

    python bench/bench_activations.py throughput [--device cpu|cuda] [--models resnet18,vit_b_16] [--n 256]
    python bench/bench_activations.py rss [--sizes 25000,50000,100000,200000]
    python bench/bench_activations.py precision [--device cuda] [--demo]
    python bench/bench_activations.py all --out bench/results-cpu.json

throughput: images/s of ``collect`` vs the model's bare forward pass on the same
    batches, in the same run (alternating, medians of --reps), at 224×224, from
    in-memory tensors and from JPEG files generated into a temp folder (with
    decode-only throughput, to name the bottleneck). On CUDA, also bf16 +
    channels_last, and JPEG decoding on the GPU (``decode="device"``).
rss: peak resident memory of a process collecting N tiny in-memory images, for
    several N (each in a fresh process), with and without a cache folder.
precision: float32 vs bfloat16/float16 activations (error relative to each
    neuron's spread, rank correlation, top-k overlap); with --demo also the demo
    audit's findings (formulas, flags) under each precision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditor.collect import TensorImages, build_transform, collect, state_hash  # noqa: E402
from auditor.models import Preprocessing  # noqa: E402

LAYERS = {"resnet18": ("layer4", "mean"), "vit_b_16": ("encoder.layers.encoder_layer_11", "cls")}
PRE = Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def hardware(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        model = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = model[0].split(":", 1)[1].strip() if model else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_model(name: str, dev: torch.device):
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval().to(dev)


class Clock:
    """Wall-clock and this process's CPU seconds (CPU time is robust to other processes' load)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


@torch.inference_mode()
def bare_forward(model, batches, dev, precision="float32", channels_last=False) -> tuple[float, float]:
    """(wall, CPU) seconds for the full model's forward pass over ``batches`` (host tensors, copied in)."""
    ctx = torch.autocast(dev.type, dtype=getattr(torch, precision)) if precision in ("bfloat16", "float16") \
        else torch.autocast(dev.type, enabled=False)
    from auditor.collect.device import numerics as _numerics  # the same TF32 settings as collect uses

    sync(dev)
    with Clock() as c, ctx, _numerics(precision, dev):
        for x in batches:
            x = x.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
        sync(dev)
    return c.wall, c.cpu


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 images: upsampled low-frequency noise plus a little grain (JPEG sizes ~ real photos)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 3, h // 16 + 1, w // 16 + 1)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(h, w), mode="bicubic", align_corners=False)
    img = up.numpy() + rng.normal(0, 8, size=(n, 3, h, w)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def make_jpegs(folder: Path, n: int, h: int = 375, w: int = 500):
    """n JPEGs (ImageNet's typical 500×375) and a one-concept labels CSV; returns a ProbeSet."""
    from PIL import Image

    from auditor.data import load_probe_set

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,c"]
    for s in range(0, n, 64):
        for i, arr in enumerate(smooth_images(min(64, n - s), h, w, seed=s)):
            name = f"img_{s + i:06d}.jpg"
            Image.fromarray(arr).save(folder / name, quality=90)
            rows.append(f"{name},{(s + i) % 2}")
    (folder.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return load_probe_set(folder, folder.parent / "labels.csv")


def run_collect(model, layer, reduction, source, transform, dev, batch_size, **kw):
    """(wall, CPU) seconds of a whole ``collect`` call (no cache: arrays go to a temp folder)."""
    with Clock() as c:
        collect(model, [layer], source, transform=transform, transform_desc={"bench": True}, model_hash="bench",
                reduction=reduction, batch_size=batch_size, device=str(dev), top_k=9, progress=False, **kw)
        sync(dev)
    return c.wall, c.cpu


@torch.inference_mode()
def decode_only(probe, transform, workers: int, batch_size: int) -> tuple[float, float]:
    """(wall, CPU of this process) seconds to read, decode and preprocess every image (the data pipeline alone)."""
    from torch.utils.data import DataLoader

    from auditor.collect.load import ProbeImages, collate as _collate
    ds = ProbeImages(probe, transform)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        **({"prefetch_factor": 2} if workers else {}))
    with Clock() as c:
        for _ in loader:
            pass
    return c.wall, c.cpu


def throughput(args) -> dict:
    dev = torch.device(args.device)
    results = {"hardware": hardware(args.device), "device": args.device, "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-activations-"))
    try:
        for name in args.models.split(","):
            layer, reduction = LAYERS[name]
            n = args.n if name == "resnet18" else args.n_vit
            bs = args.batch_size
            model = make_model(name, dev)
            gen = torch.Generator().manual_seed(0)
            data = torch.rand(n, 3, 224, 224, generator=gen)
            data = (data - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(PRE.std).view(1, 3, 1, 1)
            if dev.type == "cuda":
                data = data.pin_memory()
            batches = [data[s:s + bs] for s in range(0, n, bs)]
            source = TensorImages(data, fingerprint=f"bench:{name}:{n}")
            bare_forward(model, batches[:1], dev)  # warm-up
            row: dict = {"n": n, "batch_size": bs, "layer": layer, "reduction": reduction, "memory": {}}
            configs = [("float32", False)]
            if dev.type == "cuda":
                configs.append(("bfloat16", True))
            for precision, cl in configs:
                if cl:
                    model = model.to(memory_format=torch.channels_last)
                bare_forward(model, batches[:1], dev, precision, cl)
                bare, coll = [], []
                for _ in range(args.reps):  # alternating, so both see the same machine
                    if cl:
                        model = model.to(memory_format=torch.channels_last)
                    bare.append(bare_forward(model, batches, dev, precision, cl))
                    coll.append(run_collect(model, layer, reduction, source, None, dev, bs, precision=precision,
                                            channels_last=cl, workers=0))
                key = precision + ("+channels_last" if cl else "")
                wall_ratios = [b[0] / c[0] for b, c in zip(bare, coll)]
                cpu_ratios = [b[1] / c[1] for b, c in zip(bare, coll)]
                row["memory"][key] = {
                    "bare_images_per_s": n / statistics.median(b[0] for b in bare),
                    "collect_images_per_s": n / statistics.median(c[0] for c in coll),
                    "ratio_wall_median_of_pairs": statistics.median(wall_ratios),
                    "ratio_cpu_median_of_pairs": statistics.median(cpu_ratios),
                    "wall_ratios": wall_ratios, "cpu_ratios": cpu_ratios,
                    "bare_wall_cpu_s": bare, "collect_wall_cpu_s": coll}
                if cl:
                    model = model.to(memory_format=torch.contiguous_format)
                m = row["memory"][key]
                print(f"{name} memory {key}: bare {m['bare_images_per_s']:.2f} img/s, collect "
                      f"{m['collect_images_per_s']:.2f} img/s; collect/bare ratio: wall {m['ratio_wall_median_of_pairs']:.3f} "
                      f"{[round(r, 3) for r in wall_ratios]}, CPU {m['ratio_cpu_median_of_pairs']:.3f} "
                      f"{[round(r, 3) for r in cpu_ratios]}", flush=True)
            if not args.no_files:
                nf = min(n, args.n_files)
                probe = make_jpegs(tmp / name / "images", nf)
                _, tf = build_transform(PRE)
                files: dict = {"n": nf, "image_size": "500x375 JPEG q90", "preprocessing": "resize 256, crop 224"}
                fbatches = [data[s:s + bs] for s in range(0, nf, bs)]
                bw, bc = bare_forward(model, fbatches, dev)
                files["bare_images_per_s"] = nf / bw
                files["bare_cpu_ms_per_image"] = 1000 * bc / nf
                for workers in sorted({0, args.workers}):
                    dw, dc = decode_only(probe, tf, workers, bs)
                    cw, cc = run_collect(model, layer, reduction, probe, tf, dev, bs, workers=workers)
                    entry = {"decode_only_images_per_s": nf / dw, "collect_images_per_s": nf / cw,
                             "ratio_to_bare_wall": (nf / cw) / files["bare_images_per_s"]}
                    if workers == 0:
                        entry["decode_cpu_ms_per_image"] = 1000 * dc / nf
                        entry["collect_cpu_ms_per_image"] = 1000 * cc / nf
                    files[f"workers={workers}"] = entry
                    print(f"{name} files workers={workers}: decode-only {nf / dw:.1f} img/s, collect {nf / cw:.2f} "
                          f"img/s (bare forward {files['bare_images_per_s']:.2f} img/s)"
                          + (f"; CPU ms/image: decode {entry['decode_cpu_ms_per_image']:.1f}, forward "
                             f"{files['bare_cpu_ms_per_image']:.1f}, collect {entry['collect_cpu_ms_per_image']:.1f}"
                             if workers == 0 else ""), flush=True)
                if dev.type == "cuda":
                    cw, _ = run_collect(model, layer, reduction, probe, tf, dev, bs, workers=args.workers,
                                        decode="device", preprocessing=PRE, precision="bfloat16", channels_last=True)
                    files["gpu_decode_bf16_channels_last"] = {"collect_images_per_s": nf / cw}
                    print(f"{name} files, nvJPEG + bf16 + channels_last: collect {nf / cw:.1f} img/s", flush=True)
                row["files"] = files
            results["models"][name] = row
            del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# -- peak RSS vs N ------------------------------------------------------------------------

def _tiny(i: int) -> torch.Tensor:
    g = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    return torch.sin(g * (1 + i % 97) * 0.01 + i * 0.001)


def rss_child(n: int, cache: str | None, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU()).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> None:  # resident memory over the run, to show it does not climb
        while not done.wait(0.2):
            with open("/proc/self/statm") as fh:
                samples.append((time.perf_counter(), int(fh.read().split()[1]) * page // 1024))

    sampler = threading.Thread(target=sample, daemon=True)
    t = time.perf_counter()
    sampler.start()
    got = collect(model, ["1"], TensorImages(_tiny, n=n, fingerprint=f"tiny:{n}"), transform=None,
                  transform_desc={}, model_hash=state_hash(model), batch_size=1024, chunk_size=4096,
                  device="cpu", top_k=9, cache_dir=Path(cache) if cache else None, progress=False)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done.set()
    sampler.join()
    values = got.layers["1"].values
    first = [r for ts, r in samples if ts - t <= seconds / 2]
    second = [r for ts, r in samples if ts - t > seconds / 2]
    Path(out).write_text(json.dumps({
        "n": n, "cache": bool(cache), "seconds": seconds, "rss_before_kib": base, "peak_rss_kib": peak,
        "max_rss_first_half_kib": max(first, default=0), "max_rss_second_half_kib": max(second, default=0),
        "values_shape": list(values.shape), "values_mib": values.nbytes / 2**20,
        "memmap": isinstance(values, np.memmap), "checksum": float(np.asarray(values[::997]).sum())}))


def rss(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    out = {"hardware": hardware("cpu"), "model": "Conv2d(3, 64, 3) + ReLU on 3×8×8 in-memory images, K=64",
           "batch_size": 1024, "chunk_size": 4096, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    try:
        for with_cache in (True, False):
            for n in sizes:
                res = tmp / f"r-{n}-{with_cache}.json"
                cache = str(tmp / f"cache-{n}") if with_cache else ""
                subprocess.run([sys.executable, __file__, "_rss_child", str(n), cache, str(res)], check=True)
                r = json.loads(res.read_text())
                out["runs"].append(r)
                print(f"N={n:>7} cache={with_cache!s:5}: peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB; max RSS in "
                      f"the run's 1st half {r['max_rss_first_half_kib'] / 1024:.0f} MiB, 2nd half "
                      f"{r['max_rss_second_half_kib'] / 1024:.0f} MiB "
                      f"(values {r['values_mib']:.0f} MiB on disk, {r['seconds']:.1f} s)", flush=True)
                shutil.rmtree(tmp / f"cache-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- reduced precision: activation error and findings ------------------------------------------------

def precision_check(args) -> dict:
    dev = torch.device(args.device)
    out: dict = {"hardware": hardware(args.device), "device": args.device, "models": {}}
    precisions = ["bfloat16", "float16"]
    for name in args.models.split(","):
        layer, reduction = LAYERS[name]
        model = make_model(name, dev)
        data = torch.rand(args.n_precision, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        src = TensorImages(data, fingerprint=f"prec:{name}")
        ref = collect(model, [layer], src, transform=None, transform_desc={}, model_hash="p", reduction=reduction,
                      device=str(dev), batch_size=args.batch_size, top_k=9, progress=False).layers[layer]
        a = np.asarray(ref.values)
        spread = a.std(axis=0) + 1e-12
        row = {}
        for p in precisions:
            got = collect(model, [layer], src, transform=None, transform_desc={}, model_hash="p",
                          reduction=reduction, device=str(dev), batch_size=args.batch_size, top_k=9,
                          precision=p, progress=False).layers[layer]
            b = np.asarray(got.values)
            err = np.abs(b - a) / spread
            rank_a = a.argsort(0).argsort(0)
            rank_b = b.argsort(0).argsort(0)
            n = a.shape[0]
            rho = 1 - 6 * ((rank_a - rank_b) ** 2).sum(0) / (n * (n * n - 1))
            overlap = [len(set(ref.top_index[:, k]) & set(got.top_index[:, k])) / ref.top_index.shape[0]
                       for k in range(a.shape[1])]
            row[p] = {"max_abs_error_over_neuron_std": float(err.max()),
                      "median_abs_error_over_neuron_std": float(np.median(err)),
                      "spearman_min": float(rho.min()), "spearman_median": float(np.median(rho)),
                      "topk_overlap_mean": float(np.mean(overlap)), "topk_overlap_min": float(np.min(overlap))}
            print(f"{name} {p}: max |err|/std {err.max():.4f}, Spearman min {rho.min():.4f}, "
                  f"top-9 overlap mean {np.mean(overlap):.3f}", flush=True)
        out["models"][name] = {"n": args.n_precision, "layer": layer, "reduction": reduction, **row}
    if args.demo:
        out["demo_findings"] = demo_findings(args.device, precisions)
    return out


def demo_findings(device: str, precisions: list[str]) -> dict:
    """The demo audit under each precision: same formulas and flags as float32?"""
    import functools

    import auditor.collect as acts
    from auditor.demo.run import demo_config
    from auditor.pipeline import run_audit

    tmp = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    original = acts.collect
    results = {}
    try:
        for p in ["float32", *precisions]:
            acts.collect = functools.partial(original, precision=p)
            cfg = demo_config(out=str(tmp / f"out-{p}"), device=device, cache_dir=str(tmp / "cache"))
            res = run_audit(cfg, log=lambda m: None, progress=False)
            results[p] = {f"{layer.name}:{n.index}": {
                "formula": n.explanations[0].formula if n.explanations else None,
                "auroc": round(n.explanations[0].auroc, 4) if n.explanations else None,
                "flags": sorted(f"{f.artifact}:{f.rule}" for f in n.flags)}
                for layer in res.layers for n in layer.neurons}
    finally:
        acts.collect = original
        shutil.rmtree(tmp, ignore_errors=True)
    ref = results["float32"]
    summary = {}
    for p in precisions:
        got = results[p]
        summary[p] = {"neurons": len(ref),
                      "same_formula": sum(ref[k]["formula"] == got[k]["formula"] for k in ref),
                      "same_flags": sum(ref[k]["flags"] == got[k]["flags"] for k in ref),
                      "max_auroc_change": max(abs((ref[k]["auroc"] or 0) - (got[k]["auroc"] or 0)) for k in ref),
                      "differences": {k: {"float32": ref[k], p: got[k]} for k in ref
                                      if ref[k]["formula"] != got[k]["formula"] or ref[k]["flags"] != got[k]["flags"]}}
        print(f"demo {p}: {summary[p]['same_formula']}/{len(ref)} same formula, {summary[p]['same_flags']}/{len(ref)} "
              f"same flags, max AUROC change {summary[p]['max_auroc_change']:.4f}", flush=True)
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_rss_child":
        rss_child(int(sys.argv[2]), sys.argv[3] or None, sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "rss", "precision", "all"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="resnet18,vit_b_16")
    ap.add_argument("--n", type=int, default=256, help="images for resnet18 (in memory)")
    ap.add_argument("--n-vit", type=int, default=64, help="images for vit_b_16 (in memory)")
    ap.add_argument("--n-files", type=int, default=256, help="JPEG files (at most the in-memory count)")
    ap.add_argument("--n-precision", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-files", action="store_true")
    ap.add_argument("--demo", action="store_true", help="precision: also compare the demo audit's findings")
    ap.add_argument("--sizes", default="25000,50000,100000,200000")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {}
    if args.what in ("throughput", "all"):
        res["throughput"] = throughput(args)
    if args.what in ("rss", "all"):
        res["rss"] = rss(args)
    if args.what in ("precision", "all"):
        res["precision"] = precision_check(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    else:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
