"""Benchmark: loading concept labels at scale (N images × C concepts, sparse formats).

Builds, once, in --workdir (default /tmp/auditor-bench-labels):
  * N empty image files in class folders ``images/<wnid>/<i>.jpg`` (15,000 classes by default),
  * a long CSV and a long Parquet (path, concept): each image's class + 2 of 5,000 attributes
    → C = 20,000 concepts, 3N positives,
  * a COCO instances JSON with the same 20,000 concepts as categories under 200 supercategories,
  * a WordNet-like hierarchy CSV (15,000 leaves under 5,000 internal nodes, 5% with two parents),
then times each reader and the full validated ``load_probe_set``, and prints a Markdown table
(the numbers recorded in docs/data.md).

    python bench/bench_labels.py                 # N = 1,000,000
    python bench/bench_labels.py --n 100000      # quicker
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auditor import formats  # noqa: E402
from auditor.data import load_probe_set  # noqa: E402

N_LEAVES = 15_000
N_INTERNAL = 5_000
N_ATTRS = 5_000
N_SUPER = 200


def wnid(j: int) -> str:
    return f"n{j:08d}"


def build(work: Path, n: int, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / f"built-{n}"
    images = work / "images"
    cls = np.arange(n) % N_LEAVES
    rng.shuffle(cls)
    attrs = rng.integers(0, N_ATTRS, size=(n, 2))
    paths = [f"{wnid(c)}/{i:07d}.jpg" for i, c in enumerate(cls)]
    out = {"images": images, "long_csv": work / "long.csv", "long_parquet": work / "long.parquet",
           "coco": work / "instances.json", "hierarchy": work / "hierarchy.csv"}
    if stamp.exists():
        return out
    t = time.perf_counter()
    if images.exists():
        import shutil

        shutil.rmtree(images)
    for c in range(N_LEAVES):
        (images / wnid(c)).mkdir(parents=True, exist_ok=True)
    for p in paths:
        with open(images / p, "wb"):
            pass
    print(f"# created {n} empty image files in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    concept_cls = [wnid(c) for c in cls]
    a0 = [f"attr{a:04d}" for a in attrs[:, 0]]
    a1 = [f"attr{a:04d}" for a in attrs[:, 1]]
    with open(out["long_csv"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "concept"])
        for p, c, x, y in zip(paths, concept_cls, a0, a1):
            w.writerow([p, c])
            w.writerow([p, x])
            w.writerow([p, y])
    import pyarrow as pa
    import pyarrow.parquet as pq

    rep = np.repeat(np.arange(n), 3)
    concepts = np.empty(3 * n, dtype=object)
    concepts[0::3], concepts[1::3], concepts[2::3] = concept_cls, a0, a1
    pq.write_table(pa.table({"path": pa.array(np.asarray(paths, dtype=object)[rep]),
                             "concept": pa.array(concepts).dictionary_encode()}), out["long_parquet"])

    cat_names = [wnid(c) for c in range(N_LEAVES)] + [f"attr{a:04d}" for a in range(N_ATTRS)]
    cat_id = {name: k + 1 for k, name in enumerate(cat_names)}
    coco = {
        "images": [{"id": i, "file_name": p, "width": 1, "height": 1} for i, p in enumerate(paths)],
        "annotations": [{"id": 3 * i + k, "image_id": i, "category_id": cat_id[c], "iscrowd": 0}
                        for i, (c, x, y) in enumerate(zip(concept_cls, a0, a1)) for k, c in enumerate((c, x, y))],
        "categories": [{"id": cat_id[name], "name": name, "supercategory": f"super{k % N_SUPER:03d}"}
                       for k, name in enumerate(cat_names)],
    }
    with open(out["coco"], "w") as fh:
        json.dump(coco, fh)
    del coco

    with open(out["hierarchy"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["parent", "child", "name", "definition"])
        w.writerow(["", wnid(N_LEAVES), "entity", "that which is perceived to exist"])
        for k in range(1, N_INTERNAL):
            parent = N_LEAVES + int(rng.integers(0, k))
            w.writerow([wnid(parent), wnid(N_LEAVES + k), f"node {k}", f"internal node {k}"])
        for c in range(N_LEAVES):
            parents = {N_LEAVES + int(rng.integers(0, N_INTERNAL))}
            if rng.random() < 0.05:
                parents.add(N_LEAVES + int(rng.integers(0, N_INTERNAL)))
            for p in sorted(parents):
                w.writerow([wnid(p), wnid(c), f"class {c}", f"leaf class {c}"])
    stamp.write_text("ok")
    print(f"# built the inputs in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def timed(label: str, fn, rows: list) -> object:
    gc.collect()
    t = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t
    Y = getattr(res, "labels", None)
    shape = f"{Y.shape[0]:,} × {Y.shape[1]:,}" if Y is not None else ""
    nnz = f"{int(Y.nnz):,}" if Y is not None and hasattr(Y, "nnz") else ""
    rows.append((label, f"{dt:.2f}", shape, nnz))
    print(f"{label}: {dt:.2f} s {shape} nnz={nnz}", file=sys.stderr)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="images (default 1,000,000)")
    ap.add_argument("--workdir", default="/tmp/auditor-bench-labels")
    ap.add_argument("--skip-coco", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.workdir) / f"n{args.n}"
    f = build(work, args.n)
    rows: list = []
    root = f["images"]
    warm = build(Path(args.workdir) / "n2000", 2000)  # import everything once, outside the timings
    load_probe_set(warm["images"], warm["long_csv"])
    load_probe_set(warm["images"], warm["long_parquet"])
    load_probe_set(warm["images"], None, hierarchy=warm["hierarchy"]).fingerprint()
    timed("long CSV → CSR (read only)", lambda: formats.read_long(f["long_csv"]), rows)
    timed("long Parquet → CSR (read only)", lambda: formats.read_long(f["long_parquet"], parquet=True), rows)
    timed("load_probe_set(long CSV): read + path checks", lambda: load_probe_set(root, f["long_csv"]), rows)
    timed("load_probe_set(long Parquet)", lambda: load_probe_set(root, f["long_parquet"]), rows)
    timed("class folders walk (read only)", lambda: formats.read_class_folders(root), rows)
    probe = timed("load_probe_set(class folders + hierarchy)",
                  lambda: load_probe_set(root, None, hierarchy=f["hierarchy"]), rows)
    timed("  … of which hierarchy read + expand",
          lambda: formats.expand(formats.read_class_folders(root), formats.read_hierarchy(f["hierarchy"])), rows)
    rows[-1] = (rows[-1][0], f"{float(rows[-1][1]) - float(rows[4][1]):.2f}", rows[-1][2], rows[-1][3])
    t = time.perf_counter()
    probe.fingerprint()
    rows.append(("ProbeSet.fingerprint() (stat every image)", f"{time.perf_counter() - t:.2f}", "", ""))
    t = time.perf_counter()
    sub = probe.subset(np.arange(len(probe)) % 7 != 0)
    rows.append(("ProbeSet.subset (drop 1/7 rows)", f"{time.perf_counter() - t:.2f}", f"{sub.labels.shape}", ""))
    if not args.skip_coco:
        timed("load_probe_set(COCO JSON, 20k categories, 200 supercategories)",
              lambda: load_probe_set(root, f["coco"]), rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nN = {args.n:,} images · {platform.processor() or platform.machine()} · {os.cpu_count()} CPUs · "
          f"Python {platform.python_version()} · peak RSS {peak:,.0f} MiB\n")
    print("| step | seconds | labels (N × C) | positives |")
    print("| --- | ---: | --- | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
