"""The audit result: frozen dataclasses that round-trip through JSON.

``AuditResult`` is the contract between the pipeline (which needs torch, the model
and the data) and the renderers (which need none of them). Everything a report
shows must be in here. This module must not import torch.

The JSON schema is documented in ``docs/results-schema.md``; bump
``SCHEMA_VERSION`` on any incompatible change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ReportError

SCHEMA_VERSION = "2.0"
READABLE_MAJORS = ("1", "2")  # render reads results written by auditor 1.x too


def _clean(value: Any) -> Any:
    """Plain JSON data: NaN/inf become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# -- plausibility of numbers read back (render of an edited or damaged file) --------------------

_UNIT_NAMES = {  # name -> what it is; value must lie in [0, 1]
    **dict.fromkeys(("auroc", "effect", "auroc_ci", "effect_ci", "artifact_auroc"), "an AUROC"),
    **dict.fromkeys(("p_value", "p_adjusted", "heldout_p_value", "conditional_p", "wilcoxon_p", "flag_max_p"),
                    "a p-value"),
    **dict.fromkeys(("fraction", "frac_zero", "frac_rise", "flip_rate", "control_flip_rate"), "a fraction"),
}
_COUNT_NAMES = {"support", "inside", "outside", "index", "neuron", "output_shape", "length"}
_MAX_COUNT = 2 ** 53
#: No number auditor writes is larger: activations are float32, counts fit int64.
_MAX_FLOAT = 3.4028234663852886e38
_MAX_INT = 2 ** 63


def _unit_kind(name: str) -> str | None:
    if name in _UNIT_NAMES:
        return _UNIT_NAMES[name]
    if name.endswith("_auroc"):
        return "an AUROC"
    if name.endswith("_p_value"):
        return "a p-value"
    if name.endswith("_fraction") or name.endswith("_rate"):
        return "a fraction"
    return None


def _path_text(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def check_values(data: Any, path: list[str | int] | None = None) -> None:
    """Raise :class:`ReportError` naming the first impossible number in plain results data.

    NaN and infinities (auditor writes ``null`` for an undefined value), AUROCs,
    p-values and fractions outside [0, 1], negative or fractional counts, a positive
    log10 p-value, and magnitudes no audit can produce (beyond float32 / int64).
    """
    path = path or []
    if isinstance(data, dict):
        for k, v in data.items():
            check_values(v, path + [str(k)])
        return
    if isinstance(data, list):
        for i, v in enumerate(data):
            check_values(v, path + [i])
        return
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        return
    names = [p for p in path if isinstance(p, str)]
    name = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""

    def bad(why: str) -> ReportError:
        shown = repr(data) if not isinstance(data, int) or abs(data) < 10 ** 20 else f"a {len(str(abs(data)))}-digit number"
        return ReportError(f"{_path_text(path)} = {shown} {why}; the file is damaged or was edited — "
                           "re-run the audit (or restore the file) and render again")

    if isinstance(data, float) and not math.isfinite(data):
        raise bad("is not a finite number")
    if abs(data) > (_MAX_INT if isinstance(data, int) else _MAX_FLOAT):
        raise bad("is larger than any value an audit produces")
    kind = _unit_kind(name) or (_unit_kind(parent) if parent == "artifact_auroc" else None)
    if kind and not 0.0 <= data <= 1.0:
        raise bad(f"is outside [0, 1] ({kind})")
    if "log10_p" in name and data > 0:
        raise bad("is positive (a log10 p-value is at most 0)")
    if (name in _COUNT_NAMES or name.startswith("n_")) and not (0 <= data <= _MAX_COUNT and data == int(data)):
        raise bad("is not a count (a whole number from 0 to 2**53)")


class _Record:
    """Mixin: ``to_dict`` / ``from_dict`` driven by the dataclass fields."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ReportError(f"expected an object for {cls.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                kwargs[f.name] = _from_plain(hints[f.name], data[f.name])
        unknown = set(data) - names
        if unknown:
            # Newer minor versions may add keys: keep reading, but do not invent fields.
            pass
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ReportError(f"invalid {cls.__name__} in results: {exc}") from None


def _to_plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _from_plain(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        non_none = [a for a in args if a is not type(None)]
        return _from_plain(non_none[0], value) if len(non_none) == 1 else value
    if origin in (tuple,):
        inner = args[0] if args else Any
        return tuple(_from_plain(inner, v) for v in value)
    if origin in (list,):
        inner = args[0] if args else Any
        return [_from_plain(inner, v) for v in value]
    if isinstance(tp, type) and issubclass(tp, _Record):
        return tp.from_dict(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


@dataclass(frozen=True)
class Explanation(_Record):
    """One formula in a neuron's final beam."""

    formula: str  # e.g. "(watermark AND NOT star) OR text"
    ast: Any  # nested lists: "c" | ["not", x] | ["and", x, y] | ["or", x, y]
    length: int  # number of atoms
    auroc: float  # AUROC of the activation against the formula (search split)
    fraction: float  # support / N
    support: int  # images where the formula holds
    p_value: float  # Mann-Whitney U p-value (may underflow to 0.0; see log10_p)
    log10_p: float  # log10 of p_value, finite even when p_value underflows
    p_adjusted: float | None = None  # Benjamini-Hochberg across neurons (best formula)
    heldout_auroc: float | None = None  # AUROC on the held-out split, when enabled
    heldout_p_value: float | None = None
    heldout_log10_p: float | None = None
    auroc_ci: tuple[float, float] | None = None  # bootstrap confidence interval


@dataclass(frozen=True)
class ArtifactTest(_Record):
    """The flag rule's test of one (neuron, artifact) pair (schema 2.x; see README "How flags work")."""

    artifact: str
    status: str  # "flagged" | "near_miss" | "inconclusive" | "clean"
    branch: str | None = None  # "formula" | "strong" (flagged only)
    direction: str | None = None  # "raises" | "lowers" (flagged and near misses)
    effect: float | None = None  # stratified AUROC of artifact vs no artifact (0.5 = no effect)
    effect_ci: tuple[float, float] | None = None  # 95 % normal interval (Hanley-McNeil variance per stratum)
    p_value: float | None = None  # two-sided van Elteren p
    p_adjusted: float | None = None  # Benjamini-Hochberg over every test of the audit
    n_artifact: int = 0  # artifact rows in the strata that contribute
    reason: str = ""  # one plain sentence: why flagged / the failed condition and its number
    n_region: int | None = None  # rows tested (the region, on the test split)
    n_strata: int | None = None  # strata where the artifact varies
    strata: list[str] = field(default_factory=list)  # concepts whose combinations form the strata
    named_by: list[str] = field(default_factory=list)  # best formulas naming the artifact or a container
    heldout: bool = False  # tested on the held-out rows only
    region: str | None = None  # "all rows" or where the reported test ran (a naming formula's flip region)
    all_rows: dict[str, Any] | None = None  # the all-rows test when the reported one is a region's
    region_p_value: float | None = None  # the region test's own p (p_value: the formula branch's combined p)
    outside_p_value: float | None = None  # the test over the rows outside the region (part of the combined p)
    effect_ci_bootstrap: tuple[float, float] | None = None  # flagged neurons: percentile bootstrap interval


@dataclass(frozen=True)
class Flag(_Record):
    """A flagged artifact of a neuron (schema 2.x: the ``ArtifactTest`` numbers; 1.x: the old rule's)."""

    artifact: str
    rule: str = ""  # 2.x: the branch ("formula" | "strong"); 1.x: "formula" | "sensitive"
    formula: str | None = None  # the best formula naming the artifact (else the best formula)
    auroc: float | None = None  # that formula's AUROC
    p_adjusted: float | None = None  # 2.x: the artifact test's BH-adjusted p
    artifact_auroc: float | None = None  # AUROC of the artifact alone (information, not a criterion in 2.x)
    auroc_without_artifact: float | None = None  # 1.x only
    margin: float | None = None  # 1.x only
    reason: str = ""  # one plain sentence
    conditional_auroc: float | None = None  # 1.x only
    conditional_p: float | None = None  # 1.x only
    branch: str | None = None  # "formula" | "strong"
    direction: str | None = None  # "raises" | "lowers"
    effect: float | None = None  # stratified AUROC of artifact vs no artifact
    effect_ci: tuple[float, float] | None = None
    p_value: float | None = None
    n_artifact: int | None = None


@dataclass(frozen=True)
class TopImage(_Record):
    """A top-activating probe image, as an embedded thumbnail."""

    index: int  # row in the probe set
    path: str
    activation: float
    thumbnail: str | None = None  # data: URI (JPEG/PNG)
    heatmap: str | None = None  # data: URI of the image with the activation map overlaid
    concepts: list[str] = field(default_factory=list)  # the image's positive concepts
    artifacts: list[str] = field(default_factory=list)  # artifact concepts it carries


@dataclass(frozen=True)
class Distribution(_Record):
    """Histogram of a neuron's activation inside and outside a formula's support."""

    formula: str
    edges: list[float]
    inside: list[int]
    outside: list[int]


@dataclass(frozen=True)
class NeuronResult(_Record):
    index: int  # 0-based channel
    status: str  # "ok" | "dead"
    explanations: list[Explanation] = field(default_factory=list)  # ranked, best first
    artifact_auroc: dict[str, float] = field(default_factory=dict)
    flags: list[Flag] = field(default_factory=list)
    sensitive: list[str] = field(default_factory=list)  # 1.x only: artifacts whose AUROC alone passed
    top_images: list[TopImage] = field(default_factory=list)
    distribution: Distribution | None = None
    stats: dict[str, float] = field(default_factory=dict)  # mean, std, min, max, frac_zero
    beams: list[list[Explanation]] | None = None  # the beam at every length, on request
    # Paired with/without-artifact effect (synthesised artifacts): per artifact
    # {"n_pairs", "mean_diff_sd", "frac_rise", "wilcoxon_p"}.
    paired: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per artifact: analytic (DeLong) 95% interval of ``artifact_auroc``, for every neuron.
    artifact_auroc_ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Per flagged artifact: percentile bootstrap 95% interval of ``artifact_auroc``.
    artifact_auroc_ci_bootstrap: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Schema 2.x: the flag rule's test of every artifact, and the negative (lowest-AUROC) search's formulas.
    artifact_tests: list[ArtifactTest] = field(default_factory=list)
    negative_explanations: list[Explanation] = field(default_factory=list)

    def test(self, artifact: str) -> ArtifactTest | None:
        return next((t for t in self.artifact_tests if t.artifact == artifact), None)

    @property
    def best(self) -> Explanation | None:
        return self.explanations[0] if self.explanations else None

    @property
    def flagged(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class LayerResult(_Record):
    name: str
    output_shape: list[int]  # per-sample output shape, e.g. [64, 8, 8]
    reduction: str
    neurons: list[NeuronResult]


@dataclass(frozen=True)
class Concept(_Record):
    name: str
    n_positive: int
    fraction: float
    is_artifact: bool = False
    status: str = "ok"  # "ok" | "excluded"
    reason: str | None = None  # why excluded
    display_name: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class DoraNeuron(_Record):
    """One neuron in DORA's representation analysis (numbers for every neuron; images for a few)."""

    index: int
    score: float  # outlier score (higher = more outlying; LOF: the local outlier factor)
    rank: int  # 1 = the most outlying neuron of the layer
    outlier: bool
    x: float  # 2-D map (MDS of the EA distances)
    y: float
    self_activation: float  # A[i, i]: the neuron's value on its own s-AMS (mean over signals)
    max_other: float | None = None  # max over j != i of A[j, i]: its value on other neurons' s-AMS
    sams: list[str] = field(default_factory=list)  # PNG data URIs, kept for flagged and outlier neurons only


@dataclass(frozen=True)
class DoraLayer(_Record):
    name: str
    reduction: str
    n_neurons: int
    outliers: list[int]  # outlier neurons, most outlying first
    neurons: list[DoraNeuron]
    threshold: float | None = None  # score above which a neuron is an outlier (None: by contamination)
    n_neighbors: int | None = None
    inactive: list[int] = field(default_factory=list)  # neurons silent on every s-AMS (A row of zeros)
    cache: dict[str, Any] = field(default_factory=dict)  # status ("hit" | "miss" | "off"), key, dir
    seconds: float = 0.0


@dataclass(frozen=True)
class DoraResult(_Record):
    """DORA (Bykov et al., TMLR 2023): s-AMS per neuron, EA distances, outlier neurons. See docs/dora.md."""

    distance: str  # "pairwise" (paper) | "layerwise" (reference package)
    method: str  # outlier scores: "lof" | "iforest" | "knn"
    params: dict[str, Any]  # s-AMS generation parameters
    layers: list[DoraLayer]
    contamination: float | None = None
    device: str = "cpu"
    seconds: float = 0.0

    def layer(self, name: str) -> DoraLayer | None:
        return next((lyr for lyr in self.layers if lyr.name == name), None)


@dataclass(frozen=True)
class ArtifactImpact(_Record):
    """What pasting one artifact on clean probe images does to the model's outputs (auditor.impact).

    Class outputs fill the flip rates, flows and score changes; embedding outputs
    ``output_change`` (cosine distance per head). All shares are fractions in [0, 1].
    """

    artifact: str
    flip_rate: float | None  # share of pasted images whose top-1 class changed (None: not class outputs)
    control_flip_rate: float | None  # the same for the occlusion control patch
    summary: str  # one sentence for page 1
    ablation: dict[str, Any] | None = None  # flagged-neuron ablation: share_carried, random draws, accuracy cost
    generator: dict[str, Any] = field(default_factory=dict)  # name, params, seed, count, synth_command
    n_images: int = 0  # M: images the artifact was pasted on
    output_kind: str = "classes"  # "classes" | "embedding"
    class_head: str | None = None
    n_flips: int | None = None
    n_control_flips: int | None = None
    flip_ci: list[float] | None = None  # Wilson 95% interval
    control_ci: list[float] | None = None
    flows: list[dict[str, Any]] = field(default_factory=list)  # {"from", "to", "n", "share"}
    control_flows: list[dict[str, Any]] = field(default_factory=list)
    towards: list[dict[str, Any]] = field(default_factory=list)  # per class: share of other images that become it
    score_kind: str | None = None
    score_change: list[dict[str, Any]] = field(default_factory=list)  # per class: mean, ci, p_wilcoxon
    output_change: dict[str, Any] | None = None  # per head: mean_cosine_distance, ci, median
    control_output_change: dict[str, Any] | None = None
    class_names_source: str | None = None
    n_classes: int | None = None
    clean_accuracy: float | None = None  # on the test images whose labels name a class
    pasted_accuracy: float | None = None
    n_labelled: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # flagged neurons: clean/pasted pairs
    seconds: float | None = None


@dataclass(frozen=True)
class AuditResult(_Record):
    schema_version: str
    tool: dict[str, str]  # name, version
    created: str  # ISO 8601 UTC
    title: str
    config: dict[str, Any]  # the resolved run configuration
    provenance: dict[str, Any]  # model, weights hash, preprocessing, data, packages, device, timings
    thresholds: dict[str, Any]  # flagging thresholds used
    concepts: list[Concept]
    artifacts: list[str]
    layers: list[LayerResult]
    warnings: list[str] = field(default_factory=list)
    rule_version: str | None = None  # version of the flag rule that produced the flags
    calibration: dict[str, Any] | None = None  # the flag rule's calibration, when run
    impact: list[ArtifactImpact] = field(default_factory=list)  # per artifact, when measured
    dora: DoraResult | None = None  # DORA outlier analysis, when run (auditor.dora)
    signoff: dict[str, Any] | None = None  # prepared_by, reviewed_by, decision, date (config `signoff:`)

    # -- convenience -------------------------------------------------------
    def flagged_neurons(self, layer: LayerResult | None = None) -> list[NeuronResult]:
        layers = [layer] if layer is not None else self.layers
        return [n for lyr in layers for n in lyr.neurons if n.flags]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per artifact concept: (layer, neuron) lists by status (``sensitive``: 1.x files only)."""
        out: dict[str, dict[str, Any]] = {}
        for art in self.artifacts:
            got: dict[str, list] = {"flagged": [], "near_miss": [], "inconclusive": [], "sensitive": []}
            for lyr in self.layers:
                for n in lyr.neurons:
                    t = n.test(art)
                    if any(f.artifact == art and f.rule != "sensitive" for f in n.flags):
                        got["flagged"].append((lyr.name, n.index))
                    elif t is not None and t.status in ("near_miss", "inconclusive"):
                        got[t.status].append((lyr.name, n.index))
                    if art in n.sensitive:
                        got["sensitive"].append((lyr.name, n.index))
            out[art] = got
        return out

    @property
    def n_flagged(self) -> int:
        return len(self.flagged_neurons())

    # -- persistence -------------------------------------------------------
    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(_clean(self.to_dict()), indent=indent, allow_nan=False)

    def save(self, path: str | os.PathLike, formats: typing.Iterable[str] | None = None) -> dict[str, Path]:
        """Write this result.

        ``save("results.json")`` (a ``.json`` path, no ``formats``) writes the JSON
        file alone. Any other path is an output folder: the report files are written
        exactly as ``auditor run`` writes them (into a fresh run folder, switched in at once), by
        default ``html, pdf, json, csv, junit``. Returns ``{format: path}``.
        """
        path = Path(path)
        if formats is None and path.suffix.lower() == ".json":
            self._save_json(path)
            return {"json": path}
        from .pipeline import write_outputs

        chosen = tuple(formats) if formats is not None else ("html", "pdf", "json", "csv", "junit")
        if isinstance(formats, str):
            chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
        return write_outputs(self, path, chosen)

    def _repr_html_(self) -> str:
        """Jupyter: the verdict per artifact and the flagged neurons' cards (an isolated frame)."""
        from .report.notebook import notebook_html

        return notebook_html(self)

    def compare(self, newer: AuditResult, match: str = "index"):
        """What changed from this audit to ``newer`` (see :mod:`auditor.compare`)."""
        from .compare import compare_results

        return compare_results(self, newer, match=match)

    def _save_json(self, path: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are as readable as the reports
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> AuditResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(f"results file not found: {path}") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ReportError(f"cannot read results file {path}: {' '.join(str(exc).split())[:300]}") from None
        if not isinstance(data, dict) or "schema_version" not in data:
            raise ReportError(f"{path} is not an auditor results file (no 'schema_version')")
        major = str(data["schema_version"]).split(".")[0]
        if major not in READABLE_MAJORS:
            raise ReportError(
                f"{path} has schema_version {data['schema_version']!r}; this auditor reads "
                f"{' and '.join(m + '.x' for m in READABLE_MAJORS)} — re-run the audit or use a matching "
                "auditor version"
            )
        try:
            check_values(data)
        except ReportError as exc:
            raise ReportError(f"{path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except ReportError as exc:
            raise ReportError(f"{path}: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ReportError(f"{path} does not follow the results schema {SCHEMA_VERSION} "
                              f"({type(exc).__name__}: {exc}); see docs/results-schema.md") from None
