#!/usr/bin/env python
"""An audit at 10⁶ probe images × 2,048 units × 20,000 concepts on one machine: time and memory.

    python bench/bench_scale.py data    --dir D [--n 1000000 --k 2048 --c 20000]
    python bench/bench_scale.py explain --dir D [--neurons 0:32] [--json out.json]
    python bench/bench_scale.py run     --dir D [--neurons 0:32] [--json out.json]
    python bench/bench_scale.py collect [--n 1000000 --k 2048] [--json out.json]

data: writes D/activations.npy (float32, written slab by slab: 8 GB at full size) and
    D/labels.npz (CSR parts + concept names): 16,000 one-hot leaf classes (~62 images
    each) and 4,000 hypernyms in a 4-level tree (OR of groups of classes), i.e. 5 label
    entries per image; ReLU-like activations, every third neuron driven by 1-3 concepts.
explain: ``auditor explain`` on D in a child process (``--neurons`` times a subset; the
    rest of the command — loading, NaN checks, fingerprints, statistics, outputs — runs
    in full).
run: ``run_audit`` + ``write_outputs`` in a child process, with the probe set and the
    collection mocked at that size (the collection returns D/activations.npy as the
    layer's memmap, as ``collect`` does); the model is a real one-layer module.
    ``--neurons`` restricts the INVERT call to a subset as above.
collect: the public ``collect`` on a cheap model (Flatten + Linear(12, K) + ReLU on
    3×2×2 synthetic tensors made on the fly), N images, top-9 images per unit, a cache
    folder (chunks of 16,384 images, batches of 2,048).

Memory is sampled from the parent every 50 ms in /proc/PID/status of the child:
RssAnon (anonymous: heap, numpy arrays) separately from RssFile (file-backed pages of
memmaps, which the kernel can drop and re-read). The peak of RssAnon is the figure the
4 GiB bound is about; VmHWM (all resident pages) is reported too. Load averages
before and after each measurement are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LEVELS = (2400, 1000, 450, 150)  # hypernym groups per level (sums to 4,000)


# ------------------------------------------------------------------------------ data

def tree(n_leaf: int, rng) -> list[np.ndarray]:
    """For each level, the group of every leaf (contiguous random cuts of the previous level)."""
    out = []
    node_of_leaf = np.arange(n_leaf)
    n_nodes = n_leaf
    for n_groups in LEVELS:
        cuts = np.sort(rng.choice(np.arange(1, n_nodes), n_groups - 1, replace=False))
        group_of_node = np.zeros(n_nodes, dtype=np.int64)
        group_of_node[cuts] = 1
        group_of_node = np.cumsum(group_of_node)
        node_of_leaf = group_of_node[node_of_leaf]
        out.append(node_of_leaf.copy())
        n_nodes = n_groups
    return out


def make_data(d: Path, N: int, K: int, C: int, seed: int = 0) -> dict:
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_leaf = C - sum(LEVELS)
    if n_leaf <= LEVELS[0]:
        raise SystemExit(f"--c must exceed {sum(LEVELS) + LEVELS[0]} (4,000 hypernyms over more than 2,400 leaves)")
    leaf = np.concatenate([np.repeat(np.arange(n_leaf), N // n_leaf), rng.integers(0, n_leaf, N % n_leaf)])
    rng.shuffle(leaf)
    groups = tree(n_leaf, rng)
    offsets = np.cumsum([n_leaf, *LEVELS])[:-1]
    cols = np.stack([leaf] + [off + g[leaf] for off, g in zip(offsets, groups)], axis=1)  # (N, 5)
    cols.sort(axis=1)
    indptr = np.arange(0, cols.size + 1, cols.shape[1], dtype=np.int64)
    names = np.array([f"class_{i:05d}" for i in range(n_leaf)]
                     + [f"hyper{lvl + 1}_{j:04d}" for lvl, n in enumerate(LEVELS) for j in range(n)])
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "labels.npz", data=np.ones(cols.size, dtype=bool), indices=cols.ravel().astype(np.int32),
             indptr=indptr, format=np.array("csr"), shape=np.array([N, C]), concepts=names)
    Y = sp.csr_matrix((np.ones(cols.size, dtype=bool), cols.ravel(), indptr), shape=(N, C))
    # signal: neuron k (k % 3 == 0) gets +w on the rows of 1-3 random concepts
    drivers = {k: [(int(c), float(rng.uniform(1, 3)) * (1 if rng.random() < 0.8 else -1))
                   for c in rng.choice(C, int(rng.integers(1, 4)), replace=False)] for k in range(0, K, 3)}
    A = np.lib.format.open_memmap(d / "activations.npy", mode="w+", dtype=np.float32, shape=(N, K))
    step = 8192
    for s in range(0, N, step):
        blk = rng.standard_normal((min(step, N - s), K), dtype=np.float32)
        blk -= 0.3
        rows_cols = cols[s : s + step]
        for k, drv in drivers.items():
            for c, w in drv:
                blk[(rows_cols == c).any(axis=1), k] += w
        np.maximum(blk, 0, out=blk)
        A[s : s + step] = blk
    A.flush()
    del A
    return {"N": N, "K": K, "C": C, "leaves": n_leaf, "hypernyms": list(LEVELS), "nnz": int(Y.nnz),
            "activations_bytes": (d / "activations.npy").stat().st_size}


# ------------------------------------------------------------------------------ measuring a child

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; sample its memory every 50 ms; wall and CPU time (children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    trace: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status(proc.pid)
            if s:
                for k in peaks:
                    peaks[k] = max(peaks[k], s.get(k, 0))
                trace.append((round(time.perf_counter() - t0, 2), s.get("RssAnon", 0), s.get("RssFile", 0)))
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_anon_mib": peaks["RssAnon"] / 1024, "peak_rss_file_mib": peaks["RssFile"] / 1024,
            "vmhwm_mib": peaks["VmHWM"] / 1024, "loadavg_before": load0[0], "loadavg_after": os.getloadavg()[0],
            "samples": len(trace), "trace": trace[:: max(1, len(trace) // 40)], "output_tail": out[-3000:]}


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = Path("/proc/meminfo").read_text().splitlines()[0] if Path("/proc/meminfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}


# ------------------------------------------------------------------------------ modes

def explain_cmd(d: Path, out: Path, neurons: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "auditor.cli", "explain", "-q", "--activations", str(d / "activations.npy"),
           "--labels", str(d / "labels.npz"), "--length", "3", "--beam", "3", "--out", str(out),
           "--formats", "json,csv"]
    return cmd + (["--neurons", neurons] if neurons else [])


def run_child(d: Path, out: Path, neurons: str | None) -> None:
    """run_audit with the probe set and the collection mocked at the size of D."""
    import functools

    import scipy.sparse as sp
    import torch

    import auditor.collect as acts
    import auditor.data as data
    from auditor import invert
    from auditor.config import load_config
    from auditor.pipeline import run_audit, write_outputs

    A = np.load(d / "activations.npy", mmap_mode="r")
    N, K = A.shape
    z = np.load(d / "labels.npz")
    Y = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    concepts = [str(c) for c in z["concepts"]]
    artifacts = [concepts[-1], concepts[-2]]  # two hypernyms play the artifacts
    probe = data.ProbeSet(root=d, paths=[f"img/{i:07d}.jpg" for i in range(N)], labels=Y, concepts=concepts,
                          labels_file=str(d / "labels.npz"), labels_sha256="bench")
    (d / "model.py").write_text("import torch\n\ndef make():\n    return torch.nn.Sequential("
                                f"torch.nn.Conv2d(3, {K}, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    (d / "images").mkdir(exist_ok=True)

    def fake_collect(model, layers, probe_, **kw):
        la = acts.LayerActivations(name=layers[0], values=A, output_shape=(K,), top_index=None,
                                   top_values=None, kind="linear", reduction=None)
        return acts.Collected(layers={layers[0]: la}, ok=np.ones(N, dtype=bool), bad=[],
                              cache={"images_fingerprint": "bench"}, seconds=0.0, device="cpu")

    acts.collect = fake_collect
    data.load_probe_set = lambda *a, **k: probe
    if neurons:
        lo, hi = (int(x) for x in neurons.split(":"))
        # the pipeline runs both search directions through explain_modes
        invert.explain = functools.partial(invert.explain, neurons=list(range(lo, hi)))
        invert.explain_modes = functools.partial(invert.explain_modes, neurons=list(range(lo, hi)))
    cfg = load_config(None, {"model": f"{d / 'model.py'}:make", "layer": "2", "images": str(d / "images"),
                             "labels": str(d / "labels.npz"), "artifacts": artifacts, "out": str(out),
                             "length": 3, "beam": 3, "no_cache": True, "device": "cpu",
                             "formats": ["json", "csv", "html"]})
    torch.set_num_threads(1)
    t = time.perf_counter()
    result = run_audit(cfg, log=lambda m: None, progress=False)
    written = write_outputs(result, cfg.out, cfg.formats)
    print(json.dumps({"seconds": time.perf_counter() - t, "timings": result.provenance["timings"],
                      "neurons": sum(len(layer.neurons) for layer in result.layers), "written": sorted(written)}))


def collect_child(N: int, K: int, cache: Path) -> None:
    import torch

    from auditor.collect import TensorImages, collect, state_hash

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # a linear layer to K units (no spatial maps to keep for the top images)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, K), torch.nn.ReLU()).eval()
    g = torch.linspace(0, 1, 12).view(3, 2, 2)

    def image(i: int) -> torch.Tensor:
        return torch.sin(g * (1 + i % 89) + i * 1e-3)

    t = time.perf_counter()
    got = collect(model, ["2"], TensorImages(image, n=N, fingerprint=f"scale:{N}"), transform=None,
                  transform_desc={}, model_hash=state_hash(model), batch_size=2048, chunk_size=16384,
                  device="cpu", top_k=9, cache_dir=cache, progress=False)
    la = got.layers["2"]
    print(json.dumps({"seconds": time.perf_counter() - t, "values_shape": list(la.values.shape),
                      "memmap": isinstance(la.values, np.memmap), "top_index_shape": list(la.top_index.shape),
                      "images_fingerprint": got.cache.get("images_fingerprint"),
                      "images_per_second": got.images_per_second}))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_run_child":
        run_child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] or None)
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_collect_child":
        collect_child(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["data", "explain", "run", "collect"])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "auditor-scale")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--c", type=int, default=20_000)
    ap.add_argument("--neurons", default="0:32", help="start:stop subset to explain ('' = all)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res: dict = {"machine": machine(), "what": args.what, "command": " ".join(sys.argv)}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.what == "data":
        t = time.perf_counter()
        res["data"] = make_data(args.dir, args.n, args.k, args.c)
        res["seconds"] = time.perf_counter() - t
    elif args.what == "explain":
        out = Path(tempfile.mkdtemp(prefix="scale-explain-"))
        m = measure(explain_cmd(args.dir, out, args.neurons or None), env)
        res["explain"] = m
        if m["rc"] == 0:
            r = json.loads((out / "results.json").read_text())
            res["timings"] = r["provenance"]["timings"]
            res["neurons_explained"] = len(r["layers"][0]["neurons"])
    elif args.what == "run":
        out = Path(tempfile.mkdtemp(prefix="scale-run-"))
        m = measure([sys.executable, __file__, "_run_child", str(args.dir), str(out), args.neurons or ""], env)
        res["run"] = m
        if m["rc"] == 0:
            res["result"] = json.loads(m["output_tail"].strip().splitlines()[-1])
    else:
        cache = Path(tempfile.mkdtemp(prefix="scale-collect-"))
        try:
            m = measure([sys.executable, __file__, "_collect_child", str(args.n), str(args.k), str(cache)], env)
        finally:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        res["collect"] = m
        if m["rc"] == 0:
            res["result"] = json.loads(m["output_tail"].strip().splitlines()[-1])
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text if args.what == "data" else json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
