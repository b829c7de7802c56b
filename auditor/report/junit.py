"""JUnit XML for CI: one test case per artifact concept per layer.

A case fails when any neuron of the layer carries a flag for the artifact; the failure
text lists those neurons with their evidence. An excluded artifact concept is a
skipped case (it could not be checked). CI systems (GitLab, Jenkins, GitHub test
reporters) show these as ordinary test results.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ..results import AuditResult, LayerResult
from .env import fmt_auroc, fmt_pct, fmt_pvalue
from .tables import neuron_tests


def _case_name(artifact: str) -> str:
    return f"no neuron detects artifact '{artifact}'"


# XML 1.0 cannot carry most control characters, even escaped: drop them from user text.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _x(text: object) -> str:
    return _XML_BAD.sub("\ufffd", str(text))


def _evidence(layer: LayerResult, artifact: str) -> tuple[set[int], list[str]]:
    """The neurons flagged for ``artifact`` and one line of evidence per flag."""
    neurons: set[int] = set()
    lines = []
    for n in layer.neurons:
        for f in n.flags:
            if f.artifact != artifact:
                continue
            best = n.best
            if getattr(f, "effect", None) is not None:  # rule 2.x: the stratified artifact test
                parts = [f"neuron {n.index}: {f.direction} ({f.branch} branch)",
                         f"stratified effect={fmt_auroc(f.effect)}",
                         f"adjusted p={fmt_pvalue(f.p_adjusted)}",
                         f"artifact rows={f.n_artifact}"]
                if f.formula:
                    parts.append(f"formula={f.formula}")
                lines.append("; ".join(parts) + (f"\n    {f.reason}" if f.reason else ""))
                neurons.add(n.index)
                continue
            get = lambda key, f=f: getattr(f, key, None)  # noqa: E731 - flag fields differ across rule versions
            parts = [f"neuron {n.index}: {get('formula') or (best.formula if best else '')}"]
            if get("rule"):
                parts.append(f"rule={get('rule')}")
            parts += [f"AUROC={fmt_auroc(get('auroc') if get('auroc') is not None else (best and best.auroc))}",
                      f"adjusted p={fmt_pvalue(get('p_adjusted'))}"]
            if get("artifact_auroc") is not None:
                parts.append(f"artifact alone AUROC={fmt_auroc(get('artifact_auroc'))}")
            if get("auroc_without_artifact") is not None:
                parts.append(f"without artifact AUROC={fmt_auroc(get('auroc_without_artifact'))}")
            if get("margin") is not None:
                parts.append(f"margin={fmt_auroc(get('margin'))}")
            if best is not None:
                parts.append(f"support={best.support} ({fmt_pct(best.fraction)})")
                if best.heldout_auroc is not None:
                    parts.append(f"held-out AUROC={fmt_auroc(best.heldout_auroc)}")
            lines.append("; ".join(parts) + (f"\n    {f.reason}" if f.reason else ""))
            neurons.add(n.index)
    return neurons, lines


def junit_tree(result: AuditResult) -> ET.ElementTree:
    excluded = {c.name: c for c in result.concepts if c.status == "excluded"}
    root = ET.Element("testsuites", name=_x(f"auditor: {result.title}"))
    total = failures = skipped = 0
    for layer in result.layers:
        suite = ET.SubElement(root, "testsuite", name=_x(f"auditor.{layer.name}"), timestamp=_x(result.created))
        props = ET.SubElement(suite, "properties")
        for key, value in (
            ("layer", layer.name),
            ("neurons", str(len(layer.neurons))),
            ("tool", " ".join(str(v) for v in (result.tool or {}).values())),
            *((f"threshold.{k}", str(v)) for k, v in (result.thresholds or {}).items()),
        ):
            ET.SubElement(props, "property", name=_x(key), value=_x(value))
        s_fail = s_skip = 0
        for artifact in result.artifacts:
            case = ET.SubElement(suite, "testcase", classname=_x(f"auditor.{layer.name}"),
                                 name=_x(_case_name(artifact)), time="0")
            flagged, evidence = _evidence(layer, artifact)
            inconclusive = [(n.index, t) for n in layer.neurons
                            if (t := n.test(artifact)) is not None and t.status == "inconclusive"]
            gate_inconclusive = bool((result.config or {}).get("fail_on_inconclusive")) and inconclusive
            if flagged or gate_inconclusive:
                msgs = []
                if flagged:
                    n = len(flagged)
                    msgs.append(f"gate fail_on_flag: {n} neuron{'s' if n != 1 else ''} in {layer.name} "
                                f"flagged for artifact '{artifact}'")
                if gate_inconclusive:
                    msgs.append(f"gate fail_on_inconclusive: {len(inconclusive)} inconclusive test(s) of "
                                f"'{artifact}' in {layer.name}")
                    evidence = evidence + [f"neuron {i}: {t.reason}" for i, t in inconclusive]
                failure = ET.SubElement(case, "failure",
                                        type="ArtifactDetector" if flagged else "InconclusiveArtifactTest",
                                        message=_x("; ".join(msgs)))
                failure.text = _x("\n".join(evidence))
                s_fail += 1
            elif artifact in excluded:
                reason = excluded[artifact].reason or "no reason recorded"
                ET.SubElement(case, "skipped", message=_x(f"artifact concept excluded: {reason}"))
                s_skip += 1
            close = []
            for n in layer.neurons:
                t = neuron_tests(n, result.artifacts, result.thresholds).get(artifact)
                if t is not None and t["status"] in ("near_miss", "inconclusive"):
                    close.append(f"neuron {n.index} ({t['status'].replace('_', ' ')}): {t['reason']}")
            sensitive = [n.index for n in layer.neurons if artifact in (getattr(n, "sensitive", None) or [])]
            if close or sensitive:
                out = ET.SubElement(case, "system-out")
                text = ["near misses and inconclusive neurons (not flagged):", *close] if close else []
                if sensitive:
                    text.append("artifact-sensitive neurons (artifact alone passes the AUROC threshold): "
                                + ", ".join(str(i) for i in sensitive))
                out.text = _x("\n".join(text))
        suite.set("tests", str(len(result.artifacts)))
        suite.set("failures", str(s_fail))
        suite.set("errors", "0")
        suite.set("skipped", str(s_skip))
        total += len(result.artifacts)
        failures += s_fail
        skipped += s_skip
    t, f, sk = _impact_suite(root, result)
    total, failures, skipped = total + t, failures + f, skipped + sk
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", "0")
    root.set("skipped", str(skipped))
    ET.indent(root)
    return ET.ElementTree(root)


def _impact_suite(root: ET.Element, result: AuditResult) -> tuple[int, int, int]:
    """One case per artifact whose impact was measured: fails when its flip rate exceeds
    ``fail_on_impact``; skipped when no threshold was set or the outputs are not class scores."""
    impacts = list(getattr(result, "impact", None) or [])
    if not impacts:
        return 0, 0, 0
    gate = (result.config or {}).get("fail_on_impact")
    suite = ET.SubElement(root, "testsuite", name="auditor.impact", timestamp=_x(result.created))
    fails = skips = 0
    for imp in impacts:
        limit = f"{gate:g}" if isinstance(gate, (int, float)) else "X"
        case = ET.SubElement(suite, "testcase", classname="auditor.impact", time="0",
                             name=_x(f"artifact '{imp.artifact}' flips at most {limit} of predictions"))
        if imp.flip_rate is None:
            ET.SubElement(case, "skipped", message=_x(f"the model's outputs are not class scores: {imp.summary}"))
            skips += 1
        elif not isinstance(gate, (int, float)):
            ET.SubElement(case, "skipped", message=_x(f"no --fail-on-impact threshold set: {imp.summary}"))
            skips += 1
        elif imp.flip_rate > gate:
            failure = ET.SubElement(case, "failure", type="ArtifactImpact",
                                    message=_x(f"flip rate {fmt_pct(imp.flip_rate)} > {fmt_pct(gate)}"))
            failure.text = _x(imp.summary + "\ngenerator: " + str(imp.generator))
            fails += 1
        out = ET.SubElement(case, "system-out")
        out.text = _x(imp.summary)
    suite.set("tests", str(len(impacts)))
    suite.set("failures", str(fails))
    suite.set("errors", "0")
    suite.set("skipped", str(skips))
    return len(impacts), fails, skips


def write_junit(result: AuditResult, path: str | Path) -> Path:
    """Write ``junit.xml``: per layer a suite, per artifact concept a case."""
    path = Path(path)
    junit_tree(result).write(path, encoding="utf-8", xml_declaration=True)
    return path
