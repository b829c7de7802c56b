"""What changed between two audits: per artifact, neurons newly flagged, no longer
flagged and still flagged, with their explanations side by side.

Neurons are matched by index (a fine-tuned checkpoint keeps its channels) or, with
``match="activations"``, by the correlation of their activations over the shared
probe set with an optimal one-to-one assignment (``scipy.optimize.linear_sum_assignment``),
so a retrained model compares too. The activations come from the activation cache
each results.json names (``provenance["cache"]``); when that cache is gone the
comparison stops with an error naming it.

Anything that makes the two audits measure different things (thresholds, the flag
rule's version, the probe set, the artifact list, the search settings) is listed in
:attr:`Comparison.differences`, shown first in every output.

This module needs numpy and scipy, never torch: it works from saved results.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ReportError, did_you_mean
from .results import AuditResult, LayerResult, NeuronResult, _Record

MATCHES = ("index", "activations")
#: config keys that change what the search finds (a difference is reported loudly)
SEARCH_KEYS = ("length", "beam", "min_fraction", "max_fraction", "limit_search", "heldout", "reduction",
               "resize", "crop", "mean", "std", "normalize", "precision", "seed")
#: compare output name -> file written by :meth:`Comparison.save`
COMPARE_FILES = {"html": "compare.html", "pdf": "compare.pdf", "json": "compare.json", "junit": "junit.xml"}


@dataclass(frozen=True)
class NeuronChange(_Record):
    """One neuron's flag for one artifact in the old and the new audit."""

    layer: str
    artifact: str
    change: str  # "new" | "gone" | "still"
    old_index: int | None
    new_index: int | None
    correlation: float | None = None  # activation correlation of the matched pair (match="activations")
    old_formula: str | None = None
    new_formula: str | None = None
    old_auroc: float | None = None
    new_auroc: float | None = None
    auroc_delta: float | None = None
    old_artifact_auroc: float | None = None
    new_artifact_auroc: float | None = None
    artifact_auroc_delta: float | None = None
    formula_changed: bool = False
    old_rule: str | None = None  # the flag's rule (or the artifact test's status when not flagged)
    new_rule: str | None = None
    old_test: str | None = None  # artifact_tests status ("flagged", "near_miss", ...) when recorded
    new_test: str | None = None


@dataclass(frozen=True)
class ArtifactDiff(_Record):
    artifact: str
    old_flagged: int  # flagged neurons in the old audit (layers compared)
    new_flagged: int
    newly_flagged: list[NeuronChange] = field(default_factory=list)
    no_longer_flagged: list[NeuronChange] = field(default_factory=list)
    still_flagged: list[NeuronChange] = field(default_factory=list)
    impact: dict[str, Any] | None = None  # old/new/delta of the impact numbers, when both audits have them
    in_old: bool = True
    in_new: bool = True

    @property
    def verdict(self) -> str:
        if self.newly_flagged:
            return "new"
        if self.no_longer_flagged and not self.still_flagged:
            return "gone"
        if self.no_longer_flagged:
            return "fewer"
        if self.still_flagged:
            return "unchanged"
        return "clean"


@dataclass(frozen=True)
class LayerMatch(_Record):
    layer: str
    method: str  # "index" | "activations"
    n_old: int
    n_new: int
    n_matched: int
    mean_correlation: float | None = None  # activations: mean correlation of the matched pairs
    n_formula_changed: int = 0  # matched neurons whose best formula differs
    cache_old: str | None = None
    cache_new: str | None = None


@dataclass(frozen=True)
class Comparison(_Record):
    old: dict[str, Any]  # title, created, model, weights hash, source path
    new: dict[str, Any]
    match: str
    differences: list[str]  # what makes the audits measure different things: shown first
    artifacts: list[ArtifactDiff]
    layers: list[LayerMatch]

    @property
    def n_new(self) -> int:
        """Neurons newly flagged for some artifact (the ``--fail-on-new`` gate)."""
        return sum(len(a.newly_flagged) for a in self.artifacts)

    @property
    def comparable(self) -> bool:
        return not self.differences

    def summary_lines(self) -> list[str]:
        out = []
        for a in self.artifacts:
            out.append(f"{a.artifact}: {a.old_flagged} -> {a.new_flagged} flagged; {len(a.newly_flagged)} new, "
                       f"{len(a.no_longer_flagged)} no longer, {len(a.still_flagged)} still flagged")
        return out

    def save(self, out: str | os.PathLike, formats: Iterable[str] = ("html", "pdf", "json", "junit")
             ) -> dict[str, Path]:
        """Write the comparison into the folder ``out``: a fresh run folder inside it, switched in at once
        (``out`` is untouched if anything fails; an earlier comparison's other files are gone)."""
        from .report.compare import render_comparison

        formats = [formats] if isinstance(formats, str) else list(formats)
        formats = [f.strip() for part in formats for f in part.split(",") if f.strip()]
        unknown = [f for f in formats if f not in COMPARE_FILES]
        if unknown:
            raise ConfigError(f"unknown compare output {unknown[0]!r}{did_you_mean(unknown[0], COMPARE_FILES)}; "
                              f"expected some of: {', '.join(COMPARE_FILES)}")
        from .outdir import publish

        # Owned and switched at once, like an audit's --out (auditor/outdir.py).
        return publish(out, lambda folder: render_comparison(self, folder, formats), names=COMPARE_FILES)

    def _repr_html_(self) -> str:
        import html as _html

        from .report.compare import comparison_html

        doc = comparison_html(self, for_pdf=False)
        return (f'<iframe sandbox="" style="width:100%;height:520px;border:1px solid #d9dce1" '
                f'srcdoc="{_html.escape(doc, quote=True)}"></iframe>')


# -- helpers ---------------------------------------------------------------------------

def _flag_of(n: NeuronResult | None, artifact: str):
    if n is None:
        return None
    return next((f for f in n.flags if f.artifact == artifact), None)


def _test_status(n: NeuronResult | None, artifact: str) -> str | None:
    tests = getattr(n, "artifact_tests", None) if n is not None else None
    for t in tests or []:
        name = t.get("artifact") if isinstance(t, dict) else getattr(t, "artifact", None)
        if name == artifact:
            return t.get("status") if isinstance(t, dict) else getattr(t, "status", None)
    return None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) else None


def _delta(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else b - a


def _change(layer: str, artifact: str, kind: str, o: NeuronResult | None, n: NeuronResult | None,
            corr: float | None) -> NeuronChange:
    ob, nb = (o.best if o is not None else None), (n.best if n is not None else None)
    oa = o.artifact_auroc.get(artifact) if o is not None else None
    na = n.artifact_auroc.get(artifact) if n is not None else None
    of, nf = _flag_of(o, artifact), _flag_of(n, artifact)
    return NeuronChange(
        layer=layer, artifact=artifact, change=kind,
        old_index=o.index if o is not None else None, new_index=n.index if n is not None else None,
        correlation=corr,
        old_formula=ob.formula if ob else None, new_formula=nb.formula if nb else None,
        old_auroc=ob.auroc if ob else None, new_auroc=nb.auroc if nb else None,
        auroc_delta=_delta(ob.auroc if ob else None, nb.auroc if nb else None),
        old_artifact_auroc=_num(oa), new_artifact_auroc=_num(na), artifact_auroc_delta=_delta(oa, na),
        formula_changed=(ob.formula if ob else None) != (nb.formula if nb else None),
        old_rule=of.rule if of is not None else None, new_rule=nf.rule if nf is not None else None,
        old_test=_test_status(o, artifact), new_test=_test_status(n, artifact))


def _identity(r: AuditResult, source: str | None) -> dict[str, Any]:
    prov = r.provenance or {}
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    return {"title": r.title, "created": r.created, "source": source,
            "model": model.get("spec"), "weights": model.get("weights"),
            "weights_sha256": model.get("weights_sha256") or model.get("sha256"),
            "probe_fingerprint": probe_fingerprint(r), "rule_version": getattr(r, "rule_version", None),
            "n_flagged": r.n_flagged}


def probe_fingerprint(r: AuditResult) -> str | None:
    data = (r.provenance or {}).get("data")
    return data.get("fingerprint") if isinstance(data, dict) else None


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_show(x) for x in v)
    return str(v)


def differences(a: AuditResult, b: AuditResult) -> list[str]:
    """Everything that makes the two audits measure different things, one sentence each."""
    out: list[str] = []
    ta, tb = a.thresholds or {}, b.thresholds or {}
    changed = [k for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)]
    if changed:
        out.append("DIFFERENT THRESHOLDS: " + "; ".join(f"{k} {_show(ta.get(k))} -> {_show(tb.get(k))}"
                                                         for k in changed)
                   + ". Flag changes may come from the thresholds, not the model.")
    ra, rb = getattr(a, "rule_version", None), getattr(b, "rule_version", None)
    if ra != rb:
        out.append(f"DIFFERENT FLAG RULE: version {ra or 'unrecorded'} -> {rb or 'unrecorded'}. "
                   "Flag changes may come from the rule, not the model.")
    fa, fb = probe_fingerprint(a), probe_fingerprint(b)
    if fa != fb:
        out.append(f"DIFFERENT PROBE SETS (fingerprint {str(fa)[:12]} -> {str(fb)[:12]}): the audits saw different "
                   "images or labels, so the numbers are not comparable neuron for neuron.")
    if list(a.artifacts) != list(b.artifacts):
        gone = [x for x in a.artifacts if x not in b.artifacts]
        added = [x for x in b.artifacts if x not in a.artifacts]
        out.append("DIFFERENT ARTIFACT LISTS:" + (f" only in the old audit: {', '.join(gone)};" if gone else "")
                   + (f" only in the new audit: {', '.join(added)};" if added else "")
                   + " those artifacts are compared where both audits checked them only.")
    la, lb = [lyr.name for lyr in a.layers], [lyr.name for lyr in b.layers]
    if la != lb:
        out.append(f"DIFFERENT LAYERS: {', '.join(la)} -> {', '.join(lb)}; only the layers in both are compared.")
    ca, cb = a.config or {}, b.config or {}
    search = [k for k in SEARCH_KEYS if k in ca and k in cb and ca.get(k) != cb.get(k)]
    if search:
        out.append("DIFFERENT SEARCH SETTINGS: " + "; ".join(f"{k} {_show(ca.get(k))} -> {_show(cb.get(k))}"
                                                             for k in search) + ".")
    return out


# -- activations from the cache -----------------------------------------------------------

def cached_activations(r: AuditResult, layer: str, which: str) -> np.ndarray:
    """The (N, K) activations of ``layer`` (memory-mapped) from the cache folder the result names,
    and the (N,) mask of images that were read. Raises ConfigError naming the cache when it is gone."""
    prov = r.provenance or {}
    cache = prov.get("cache") if isinstance(prov.get("cache"), dict) else {}
    layers = list(prov.get("layers") or [lyr.name for lyr in r.layers])
    folder, key = cache.get("dir"), cache.get("key")
    if not folder:
        raise ConfigError(f"--match activations: the {which} audit ({r.title}) records no activation cache "
                          f"(key {key or 'unrecorded'}; it ran with --no-cache); re-run it with a cache, or use "
                          "--match index")
    path = Path(folder) / f"values-{layers.index(layer):03d}.npy"
    if not path.is_file() or not (Path(folder) / "summary.npz").is_file():
        raise ConfigError(f"--match activations: the activation cache of the {which} audit is gone: {folder} "
                          f"(key {key}) has no {path.name}; re-run that audit with the same cache_dir to "
                          "rebuild it, or use --match index")
    try:
        values = np.load(path, mmap_mode="r")
        with np.load(Path(folder) / "summary.npz") as summary:
            ok = summary["ok"].astype(bool)
            commit = str(summary["commit"]) if "commit" in summary else None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--match activations: cannot read the activation cache {folder} of the {which} "
                          f"audit ({exc}); re-run that audit, or use --match index") from None
    if not _matches_commit(Path(folder), path, values, commit):
        raise ConfigError(f"--match activations: {path} in the activation cache of the {which} audit does not "
                          "match the checksum, shape or commit recorded when it was written (changed on disk, or "
                          "written by an older auditor); re-run that audit to rebuild it, or use --match index")
    if len(ok) != len(values):
        raise ConfigError(f"--match activations: the activation cache {folder} of the {which} audit is "
                          "inconsistent (row counts differ); re-run that audit, or use --match index")
    return values, ok


def _matches_commit(folder: Path, path: Path, values: np.ndarray, commit: str | None) -> bool:
    """The array is the one the cache committed: its shape and sha256 as recorded in manifest.json."""
    import hashlib
    import json

    try:
        final = json.loads((folder / "manifest.json").read_text())["final"]
        want = final["arrays"][path.name]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if commit is None or commit != final.get("commit") or list(values.shape) != list(want.get("shape", [])):
        return False
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest() == want.get("sha256")


CHUNK_ROWS = 4096


def correlation_matrix(A: np.ndarray, B: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation of every column of ``A`` with every column of ``B`` over ``rows``
    (0 for constant columns). Streams over row chunks in float64, so memory-mapped (N, K)
    arrays are never copied whole."""
    n = A.shape[0]
    idx = np.arange(n) if rows is None else np.flatnonzero(rows)
    m = len(idx)
    if m < 2:
        return np.zeros((A.shape[1], B.shape[1]))
    sa, sb = np.zeros(A.shape[1]), np.zeros(B.shape[1])
    for start in range(0, m, CHUNK_ROWS):
        sel = idx[start:start + CHUNK_ROWS]
        sa += np.asarray(A[sel], dtype=np.float64).sum(axis=0)
        sb += np.asarray(B[sel], dtype=np.float64).sum(axis=0)
    ma, mb = sa / m, sb / m
    C = np.zeros((A.shape[1], B.shape[1]))
    va, vb = np.zeros(A.shape[1]), np.zeros(B.shape[1])
    for start in range(0, m, CHUNK_ROWS):
        sel = idx[start:start + CHUNK_ROWS]
        a = np.asarray(A[sel], dtype=np.float64) - ma
        b = np.asarray(B[sel], dtype=np.float64) - mb
        C += a.T @ b
        va += (a * a).sum(axis=0)
        vb += (b * b).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = C / np.outer(np.sqrt(va), np.sqrt(vb))
    return np.nan_to_num(C, nan=0.0, posinf=0.0, neginf=0.0)


def match_by_activations(A: np.ndarray, B: np.ndarray, rows: np.ndarray | None = None
                         ) -> list[tuple[int, int, float]]:
    """One-to-one matching of old neurons (columns of A) to new ones (columns of B) that
    maximises the summed activation correlation over ``rows`` (default: all):
    ``[(old, new, correlation)]``."""
    from scipy.optimize import linear_sum_assignment

    C = correlation_matrix(A, B, rows)
    r, c = linear_sum_assignment(C, maximize=True)
    return [(int(i), int(j), float(C[i, j])) for i, j in zip(r, c)]


# -- the comparison ---------------------------------------------------------------------

def _impact_by_artifact(r: AuditResult) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in getattr(r, "impact", None) or []:
        d = item if isinstance(item, dict) else (item.to_dict() if hasattr(item, "to_dict") else vars(item))
        if d.get("artifact"):
            out[d["artifact"]] = d
    return out


def impact_delta(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """Old, new and the change of each impact number both audits recorded for one artifact."""
    if not old and not new:
        return None
    old, new = old or {}, new or {}
    rows = {}
    for key in ("flip_rate", "control_flip_rate"):
        if key in old or key in new:
            rows[key] = {"old": _num(old.get(key)), "new": _num(new.get(key)),
                         "delta": _delta(old.get(key), new.get(key))}
    oa, na = old.get("ablation") or {}, new.get("ablation") or {}
    if "share_carried" in oa or "share_carried" in na:
        rows["share_carried"] = {"old": _num(oa.get("share_carried")), "new": _num(na.get("share_carried")),
                                 "delta": _delta(oa.get("share_carried"), na.get("share_carried"))}
    return {"numbers": rows, "old_summary": old.get("summary"), "new_summary": new.get("summary")}


def compare_results(a: AuditResult, b: AuditResult, *, match: str = "index", old_source: str | None = None,
                    new_source: str | None = None) -> Comparison:
    """Compare audit ``a`` (old) with ``b`` (new)."""
    if match not in MATCHES:
        raise ConfigError(f"unknown --match {match!r}{did_you_mean(match, MATCHES)}; expected index or activations")
    diffs = differences(a, b)
    if match == "activations" and probe_fingerprint(a) != probe_fingerprint(b):
        raise ConfigError("--match activations needs both audits on the same probe set (the probe-set "
                          f"fingerprints differ: {str(probe_fingerprint(a))[:12]} vs {str(probe_fingerprint(b))[:12]}); "
                          "use --match index")
    layers_b = {lyr.name: lyr for lyr in b.layers}
    shared = [lyr for lyr in a.layers if lyr.name in layers_b]
    artifacts = [x for x in a.artifacts if x in b.artifacts]
    changes: dict[str, dict[str, list[NeuronChange]]] = {x: {"new": [], "gone": [], "still": []} for x in artifacts}
    counts: dict[str, list[int]] = {x: [0, 0] for x in artifacts}
    matches: list[LayerMatch] = []
    for la in shared:
        lb = layers_b[la.name]
        pairs, mean_corr, caches = _pairs(a, b, la, lb, match)
        olds = {n.index: n for n in la.neurons}
        news = {n.index: n for n in lb.neurons}
        matched_old = {i for i, _, _ in pairs}
        matched_new = {j for _, j, _ in pairs}
        full = [(olds.get(i), news.get(j), c) for i, j, c in pairs] \
            + [(olds[i], None, None) for i in olds if i not in matched_old] \
            + [(None, news[j], None) for j in news if j not in matched_new]
        n_changed = sum(1 for o, n, _ in full if o is not None and n is not None
                        and (o.best.formula if o.best else None) != (n.best.formula if n.best else None))
        matches.append(LayerMatch(layer=la.name, method=match, n_old=len(la.neurons), n_new=len(lb.neurons),
                                  n_matched=len(pairs), mean_correlation=mean_corr, n_formula_changed=n_changed,
                                  cache_old=caches[0], cache_new=caches[1]))
        for art in artifacts:
            counts[art][0] += sum(1 for n in la.neurons if _flag_of(n, art) is not None)
            counts[art][1] += sum(1 for n in lb.neurons if _flag_of(n, art) is not None)
            for o, n, c in full:
                of, nf = _flag_of(o, art) is not None, _flag_of(n, art) is not None
                kind = "new" if nf and not of else "gone" if of and not nf else "still" if of and nf else None
                if kind:
                    changes[art][kind].append(_change(la.name, art, kind, o, n, c))
    imp_a, imp_b = _impact_by_artifact(a), _impact_by_artifact(b)
    diffs_out: list[ArtifactDiff] = []
    for art in artifacts:
        ch = changes[art]
        ch["new"].sort(key=lambda c: (c.layer, -(c.new_artifact_auroc or 0.0), c.new_index or 0))
        ch["gone"].sort(key=lambda c: (c.layer, -(c.old_artifact_auroc or 0.0), c.old_index or 0))
        ch["still"].sort(key=lambda c: (c.layer, c.new_index or 0))
        diffs_out.append(ArtifactDiff(artifact=art, old_flagged=counts[art][0], new_flagged=counts[art][1],
                                      newly_flagged=ch["new"], no_longer_flagged=ch["gone"], still_flagged=ch["still"],
                                      impact=impact_delta(imp_a.get(art), imp_b.get(art))))
    return Comparison(old=_identity(a, old_source), new=_identity(b, new_source), match=match, differences=diffs,
                      artifacts=diffs_out, layers=matches)


def _pairs(a: AuditResult, b: AuditResult, la: LayerResult, lb: LayerResult, match: str):
    if match == "index":
        ia = {n.index for n in la.neurons}
        return [(i, i, None) for n in lb.neurons if (i := n.index) in ia], None, (None, None)
    A, ok_a = cached_activations(a, la.name, "old")
    B, ok_b = cached_activations(b, lb.name, "new")
    if A.shape[0] != B.shape[0]:
        raise ConfigError(f"--match activations: the cached activations of layer {la.name} cover {A.shape[0]} and "
                          f"{B.shape[0]} images; both audits must use the same probe set")
    pairs = match_by_activations(A, B, ok_a & ok_b)  # images both audits could read
    mean = float(np.mean([c for _, _, c in pairs])) if pairs else None
    ca = (a.provenance.get("cache") or {}).get("dir")
    cb = (b.provenance.get("cache") or {}).get("dir")
    return pairs, mean, (ca, cb)


def load_result(path: str | os.PathLike) -> tuple[AuditResult, str]:
    """A results.json, or an output folder holding one; returns (result, the file's path)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "results.json").is_file():
            raise ReportError(f"{p} is a folder without results.json; pass an audit output folder or its "
                              "results.json")
        p = p / "results.json"
    return AuditResult.load(p), str(p)


# ``auditor.compare`` is both this module and the API function ``auditor.compare(old, new)``:
# importing the submodule rebinds the package attribute, so the module itself is made callable.
class _CallableModule(types.ModuleType):
    def __call__(self, old: Any, new: Any, *, match: str = "index") -> Comparison:
        """``auditor.compare(old, new, match="index")``: see :func:`auditor.api.compare`."""
        from .api import compare

        return compare(old, new, match=match)


sys.modules[__name__].__class__ = _CallableModule
