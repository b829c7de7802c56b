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
from .columns import check_finite
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
    check_finite(arr, f"activations {p}")  # in slabs of rows: a memmap is never copied whole
    return arr


def parse_neurons(spec: str | None, K: int) -> list[int] | None:
    """``--neurons``: indices and half-open ranges, e.g. ``0:64,100,200:210``; None = all."""
    if spec is None or not spec.strip():
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, hi = part.split(":", 1)
                lo_i, hi_i = int(lo or 0), int(hi) if hi else K
                if lo_i < 0 or hi_i > K or lo_i >= hi_i:
                    raise ValueError
                out.extend(range(lo_i, hi_i))
            else:
                i = int(part)
                if not 0 <= i < K:
                    raise ValueError
                out.append(i)
        except ValueError:
            raise DataError(f"--neurons {spec!r}: {part!r} is not a neuron index or range (start:stop) "
                            f"within 0..{K}") from None
    return sorted(set(out))


EXPLAIN_KEYS = ("length", "beam", "min_fraction", "max_fraction", "limit_search", "heldout", "seed", "hierarchy",
                "flag_max_p", "flag_min_effect", "flag_strong_effect", "flag_min_artifact_rows", "flag_strata",
                "calibration_runs", "fail_on_flag", "fail_on_inconclusive")


def explain_config(ns: argparse.Namespace):
    """The explain flags as an :class:`AuditConfig`: the same defaults and validation as ``run``."""
    from .config import make_config
    from .flags import REPLACED_KEYS

    values = {k: getattr(ns, k) for k in EXPLAIN_KEYS if getattr(ns, k, None) is not None}
    for old in REPLACED_KEYS:
        if getattr(ns, old, None) is not None:
            values[old] = getattr(ns, old)
    values["artifacts"] = [a.strip() for a in (ns.artifacts or "").split(",") if a.strip()]
    values["out"] = ns.out
    values["formats"] = ns.formats
    return make_config(values, "the command line")


def _expand_hierarchy(path: str, label_file: str, paths, concepts, Y):
    from .formats import LabelTable, expand, read_hierarchy

    table = LabelTable(paths=list(paths) if paths is not None else [f"row {i}" for i in range(Y.shape[0])],
                       concepts=list(concepts), labels=Y, format="explain", file=str(label_file))
    table = expand(table, read_hierarchy(path))
    return table.concepts, table.labels, table.warnings


def run_explain(ns: argparse.Namespace) -> int:
    from .cli import finish
    from .data import read_label_matrix
    from .errors import did_you_mean
    from .pipeline import (explain_layers, hierarchy_ancestors, package_versions, rule_of, small_probe_warnings,
                           summarise_concepts, thresholds_plain, write_outputs)
    from .results import SCHEMA_VERSION, AuditResult, LayerResult
    from .flags import RULE_VERSION

    t0 = time.perf_counter()
    cfg = explain_config(ns)
    A = load_activations(ns.activations)
    paths, concepts, Y = read_label_matrix(ns.labels)
    if Y.shape[0] != A.shape[0]:
        raise DataError(f"labels {ns.labels} have {Y.shape[0]} rows but activations {ns.activations} have "
                        f"{A.shape[0]}; rows are matched by order, so both must describe the same images")
    warnings: list[str] = []
    if cfg.hierarchy:
        concepts, Y, hw = _expand_hierarchy(cfg.hierarchy, ns.labels, paths, concepts, Y)
        warnings.extend(hw)
    artifacts = list(cfg.artifacts)
    for a in artifacts:
        if a not in concepts:
            raise DataError(f"artifact {a!r} is not a concept in {ns.labels}{did_you_mean(a, concepts)}")
    t_load = time.perf_counter() - t0

    cols, usable, excluded = summarise_concepts(Y, concepts, artifacts)
    warnings.extend(excluded)
    for msg in small_probe_warnings(int(A.shape[0]), {a: int(Y[:, concepts.index(a)].sum()) for a in artifacts},
                                    rule_of(cfg), cfg.max_fraction):
        print(f"auditor: warning: {msg}", file=sys.stderr)
        warnings.append(msg)
    names = [concepts[j] for j in usable]
    Yu = Y[:, usable]
    which = parse_neurons(getattr(ns, "neurons", None), A.shape[1])
    t = time.perf_counter()
    ancestors = hierarchy_ancestors(cfg.hierarchy, artifacts) if cfg.hierarchy else {}
    # A as loaded (a float32 memmap for .npy): the engine and the statistics read it in blocks
    (neurons,), calibration = explain_layers([(ns.layer_name, A)], Yu, names,
                                             artifacts, cfg, device=ns.device, ancestors=ancestors,
                                             progress=not ns.quiet, subset=which)
    t_explain = time.perf_counter() - t
    dead = sum(n.status == "dead" for n in neurons)
    if dead:
        warnings.append(f"{dead} neuron(s) have a constant activation (dead) and no explanation")
    timings = {"load_s": round(t_load, 4), "explain_s": round(t_explain, 4),
               "total_s": round(time.perf_counter() - t0, 4)}
    config = {"activations": str(ns.activations), "labels": str(ns.labels), "device": ns.device} | cfg.plain()
    for key in ("model", "weights", "layer", "images", "labels_format", "synth", "cache_dir", "no_cache"):
        config.pop(key, None)
    if which is not None:
        config["neurons"] = ns.neurons
    provenance = {"activations": {"path": str(ns.activations), "sha256": sha256_file(Path(ns.activations)),
                                  "shape": list(A.shape)},
                  "data": {"labels_file": str(ns.labels), "labels_sha256": sha256_file(Path(ns.labels)),
                           "n_images": int(A.shape[0]), "n_concepts": len(concepts)},
                  "device": ns.device, "timings": timings, "packages": package_versions()}
    result = AuditResult(schema_version=SCHEMA_VERSION, tool={"name": "auditor", "version": __version__},
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         title=f"INVERT explanations of {Path(ns.activations).name}", config=config,
                         provenance=provenance, thresholds=thresholds_plain(cfg, len(names)), concepts=cols,
                         artifacts=artifacts,
                         layers=[LayerResult(name=ns.layer_name, output_shape=[int(A.shape[1])], reduction="given",
                                             neurons=neurons)],
                         warnings=warnings, rule_version=RULE_VERSION, calibration=calibration)
    written = write_outputs(result, ns.out, cfg.formats)
    print(f"auditor: explained {len(neurons)} neurons × {len(names)} concepts over {A.shape[0]} images in "
          f"{timings['total_s']:.2f} s (search {t_explain:.2f} s)", file=sys.stderr)
    return finish(result, written, cfg.fail_on_flag, cfg.fail_on_inconclusive)
