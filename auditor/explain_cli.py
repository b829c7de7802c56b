"""``auditor explain``: INVERT on saved activations, for users who already have them.

Writes the same ``results.json`` / ``neurons.csv`` as ``auditor run`` (and, on
request, the report without images). Rows of the label file are matched to
activation rows by order.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .data import sha256_file
from .errors import DataError


def load_activations(path: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"activations file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            import torch

            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
                if len(tensors) != 1:
                    raise DataError(f"{p} holds a dict with {len(tensors)} tensors; save one N×K tensor")
                obj = tensors[0]
            if not isinstance(obj, torch.Tensor):
                raise DataError(f"{p} holds a {type(obj).__name__}, expected an N×K tensor")
            arr = obj.detach().float().numpy()
        else:
            raise DataError(f"unsupported activations format {suffix!r} for {p}; expected .npy or .pt")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read activations {p}: {exc}") from None
    if arr.ndim != 2:
        raise DataError(f"activations {p} must be 2-D (N images × K neurons), got shape {tuple(arr.shape)}; "
                        "reduce spatial dimensions first (e.g. mean over H, W)")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"activations {p} have dtype {arr.dtype}; expected numbers")
    if not np.isfinite(np.asarray(arr[: min(len(arr), 100000)], dtype=np.float64)).all():
        raise DataError(f"activations {p} contain NaN or infinite values")
    return arr


def run_explain(ns: argparse.Namespace) -> int:
    from . import invert
    from .data import read_label_matrix
    from .errors import ConfigError, did_you_mean
    from .flags import Thresholds
    from .pipeline import neuron_results, package_versions, small_probe_warnings, summarise_concepts, write_outputs
    from .results import SCHEMA_VERSION, AuditResult, LayerResult

    t0 = time.perf_counter()
    A = load_activations(ns.activations)
    paths, concepts, Y = read_label_matrix(ns.labels)
    if Y.shape[0] != A.shape[0]:
        raise DataError(f"labels {ns.labels} have {Y.shape[0]} rows but activations {ns.activations} have "
                        f"{A.shape[0]}; rows are matched by order, so both must describe the same images")
    artifacts = [a.strip() for a in (ns.artifacts or "").split(",") if a.strip()]
    for a in artifacts:
        if a not in concepts:
            raise DataError(f"artifact {a!r} is not a concept in {ns.labels}{did_you_mean(a, concepts)}")
    formats = tuple(f.strip() for f in ns.formats.split(",") if f.strip())
    allowed = {"html", "pdf", "json", "csv", "junit"}
    if set(formats) - allowed:
        raise ConfigError(f"unknown format(s) {sorted(set(formats) - allowed)}; choose from {sorted(allowed)}")
    t_load = time.perf_counter() - t0

    cols, usable, warnings = summarise_concepts(Y, concepts, artifacts)
    for msg in small_probe_warnings(int(A.shape[0]), {a: int(Y[:, concepts.index(a)].sum()) for a in artifacts},
                                    Thresholds(), ns.max_fraction):
        print(f"auditor: warning: {msg}", file=sys.stderr)
        warnings.append(msg)
    names = [concepts[j] for j in usable]
    Yu = Y[:, usable]
    params = invert.InvertParams(length=ns.length, beam=ns.beam, min_fraction=ns.min_fraction,
                                 max_fraction=ns.max_fraction, limit_search=ns.limit_search, mode=ns.mode,
                                 alternative=ns.alternative, heldout=ns.heldout, seed=ns.seed, device=ns.device)
    t = time.perf_counter()
    explained = invert.explain(A, Yu, names, params, progress=not ns.quiet)
    t_explain = time.perf_counter() - t
    art_cols = [concepts.index(a) for a in artifacts]
    Y_art = Y[:, art_cols]
    if hasattr(Y_art, "toarray"):
        Y_art = Y_art.toarray()
    neurons = neuron_results(A, explained, Yu, names, artifacts, Y_art, Thresholds())
    dead = sum(n.status == "dead" for n in neurons)
    if dead:
        warnings.append(f"{dead} neuron(s) have a constant activation (dead) and no explanation")
    timings = {"load_s": round(t_load, 4), "explain_s": round(t_explain, 4),
               "total_s": round(time.perf_counter() - t0, 4)}
    config = {"activations": str(ns.activations), "labels": str(ns.labels), "artifacts": artifacts,
              "length": ns.length, "beam": ns.beam, "min_fraction": ns.min_fraction,
              "max_fraction": ns.max_fraction, "limit_search": ns.limit_search, "mode": ns.mode,
              "alternative": ns.alternative, "heldout": ns.heldout, "seed": ns.seed, "device": ns.device}
    provenance = {"activations": {"path": str(ns.activations), "sha256": sha256_file(Path(ns.activations)),
                                  "shape": list(A.shape)},
                  "data": {"labels_file": str(ns.labels), "labels_sha256": sha256_file(Path(ns.labels)),
                           "n_images": int(A.shape[0]), "n_concepts": len(concepts)},
                  "device": ns.device, "timings": timings, "packages": package_versions()}
    result = AuditResult(schema_version=SCHEMA_VERSION, tool={"name": "auditor", "version": __version__},
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         title=f"INVERT explanations of {Path(ns.activations).name}", config=config,
                         provenance=provenance, thresholds=Thresholds().plain(), concepts=cols,
                         artifacts=artifacts,
                         layers=[LayerResult(name=ns.layer_name, output_shape=[int(A.shape[1])], reduction="given",
                                             neurons=neurons)],
                         warnings=warnings)
    written = write_outputs(result, ns.out, formats)
    for fmt, path in written.items():
        print(f"auditor: {fmt}: {path}", file=sys.stderr)
    print(f"auditor: explained {A.shape[1]} neurons × {len(names)} concepts over {A.shape[0]} images in "
          f"{timings['total_s']:.2f} s (search {t_explain:.2f} s)", file=sys.stderr)
    return 0
