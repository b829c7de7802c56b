"""A realistic, deterministic synthetic ``AuditResult`` for the report tests and bench.

Nothing here needs torch or a model: the numbers are made up but shaped like what the
pipeline writes (ranked beams, BH-adjusted p-values, flags with evidence, dead
neurons, an excluded concept, embedded thumbnails, warnings, hostile concept names).

    make_result()                                  # ~40 + 8 neurons, for tests
    make_result(n_neurons=2048, n_flagged=50, second_layer=False)   # the bench
"""

from __future__ import annotations

import base64
import io
import math
import random
from functools import lru_cache

from PIL import Image, ImageDraw

from auditor.results import (
    SCHEMA_VERSION,
    ArtifactImpact,
    ArtifactTest,
    AuditResult,
    Concept,
    Distribution,
    Explanation,
    Flag,
    LayerResult,
    NeuronResult,
    TopImage,
)

N_IMAGES = 5000
SCRIPT_CONCEPT = "<script>alert(1)</script>"
MAIN_LAYER = "layer4.1.conv2"
SECOND_LAYER = "layer3.0.conv1"

# name, fraction, is_artifact, status, reason, display_name
_CONCEPTS = [
    ("dog", 0.12, False, "ok", None, None),
    ("cat", 0.10, False, "ok", None, None),
    ("grass", 0.18, False, "ok", None, None),
    ("sky", 0.25, False, "ok", None, "Sky (clear)"),
    ("water", 0.09, False, "ok", None, None),
    ("car", 0.07, False, "ok", None, None),
    ("tree", 0.16, False, "ok", None, None),
    ("person", 0.21, False, "ok", None, None),
    ("building", 0.11, False, "ok", None, None),
    ("snow", 0.04, False, "ok", None, None),
    ("road", 0.08, False, "ok", None, None),
    ("star", 0.03, False, "ok", None, None),
    ("stripes", 0.05, False, "ok", None, None),
    ("fur", 0.14, False, "ok", None, None),
    ("wheel", 0.06, False, "ok", None, None),
    (SCRIPT_CONCEPT, 0.02, False, "ok", None, None),
    ("watermark", 0.08, True, "ok", None, "Watermark"),
    ("text_overlay", 0.05, True, "ok", None, "Overlaid text"),
    ("timestamp", 0.0, True, "excluded", "no positive images in the probe set", None),
    ("unicorn", 0.0006, False, "excluded", "3 positive images (fewer than min_positives=10)", None),
]
ARTIFACTS = ["watermark", "text_overlay", "timestamp"]
_OK_CONCEPTS = [c[0] for c in _CONCEPTS if c[3] == "ok"]
_PLAIN = [c for c in _OK_CONCEPTS if c not in ARTIFACTS]


# -- formulas ---------------------------------------------------------------------
def formula_text(ast) -> str:
    """The formula text for an AST, parenthesised like the search writes it."""
    if isinstance(ast, str):
        return ast
    op = ast[0]
    if op == "not":
        inner = formula_text(ast[1])
        return f"NOT ({inner})" if isinstance(ast[1], list) and ast[1][0] != "not" else f"NOT {inner}"
    parts = []
    for child in ast[1:]:
        text = formula_text(child)
        if isinstance(child, list) and child[0] in ("and", "or") and child[0] != op:
            text = f"({text})"
        parts.append(text)
    return f" {op.upper()} ".join(parts)


def _atoms(ast) -> int:
    return 1 if isinstance(ast, str) else sum(_atoms(a) for a in ast[1:])


def _random_ast(rng: random.Random, must: str | None = None, length: int | None = None):
    length = length or rng.choice([1, 2, 2, 3])
    names = rng.sample(_PLAIN, length)
    if must:
        names[0] = must
    ast = names[0]
    for name in names[1:]:
        atom = ["not", name] if rng.random() < 0.3 else name
        ast = [rng.choice(["and", "or"]), ast, atom]
    return ast


def _p_from_auroc(auroc: float, support: int, n: int = N_IMAGES) -> tuple[float, float]:
    """A plausible two-sided Mann-Whitney p (normal approximation) and its log10."""
    n_neg = n - support
    sigma = math.sqrt(support * n_neg * (n + 1) / 12.0)
    z = abs((auroc - 0.5) * support * n_neg) / sigma
    # log10 of 2*(1 - Phi(z)), via an asymptotic expansion for large z
    if z < 8:
        p = math.erfc(z / math.sqrt(2))
        return p, math.log10(p)
    log10_p = (-(z * z) / 2 - math.log(z) - 0.5 * math.log(2 * math.pi) + math.log(2)) / math.log(10)
    p = 10.0**log10_p if log10_p > -307 else 0.0
    return p, log10_p


def _explanation(rng, ast, auroc, *, heldout=True, ci=False) -> Explanation:
    fraction = round(rng.uniform(0.02, 0.3), 4)
    support = int(round(fraction * N_IMAGES))
    p, log10_p = _p_from_auroc(auroc, support)
    return Explanation(
        formula=formula_text(ast),
        ast=ast,
        length=_atoms(ast),
        auroc=auroc,
        fraction=support / N_IMAGES,
        support=support,
        p_value=p,
        log10_p=log10_p,
        heldout_auroc=round(auroc - rng.uniform(0.0, 0.03), 4) if heldout else None,
        heldout_p_value=min(1.0, p * 10) if heldout and p > 0 else None,
        auroc_ci=(round(auroc - 0.02, 4), round(min(1.0, auroc + 0.015), 4)) if ci else None,
    )


def _bh(pvals: list[float]) -> list[float]:
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    out = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, pvals[i] * m / rank)
        out[i] = running
    return out


# -- images -------------------------------------------------------------------------
@lru_cache(maxsize=None)
def thumbnail(seed: int, artifact: str | None = None, heat: bool = False, size: int = 64) -> str:
    """A small deterministic JPEG data URI: shapes, optionally with an artifact overlay."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(40, 200) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.randint(0, size - 20), rng.randint(0, size - 20)
        x1, y1 = x0 + rng.randint(10, 30), y0 + rng.randint(10, 30)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    if artifact == "watermark":
        draw.text((4, size // 2 - 6), "(c) stock", fill=(255, 255, 255))
    elif artifact == "text_overlay":
        draw.rectangle([0, size - 14, size, size], fill=(0, 0, 0))
        draw.text((2, size - 13), "SALE 50%", fill=(255, 255, 0))
    if heat:
        overlay = Image.new("RGB", (size, size), (0, 0, 0))
        od = ImageDraw.Draw(overlay)
        cx, cy = rng.randint(16, size - 16), rng.randint(16, size - 16)
        for r, c in ((24, (120, 0, 0)), (16, (220, 40, 0)), (8, (255, 220, 0))):
            od.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
        img = Image.blend(img, overlay, 0.45)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _top_images(rng, neuron: int, artifact: str | None, k: int = 8, embed: bool = True) -> list[TopImage]:
    out = []
    act = rng.uniform(4, 9)
    for j in range(k):
        idx = rng.randrange(N_IMAGES)
        carries = artifact if artifact and j % 4 != 3 else None
        concepts = rng.sample(_PLAIN, 2) + ([carries] if carries else [])
        out.append(
            TopImage(
                index=idx,
                path=f"probe/{idx:05d}.jpg",
                activation=round(act, 4),
                thumbnail=thumbnail(idx, carries) if embed else None,
                heatmap=thumbnail(idx, carries, heat=True) if embed and j < 4 else None,
                concepts=concepts,
                artifacts=[carries] if carries else [],
            )
        )
        act *= rng.uniform(0.85, 0.98)
    return out


def _distribution(rng, formula: str, auroc: float, support: int) -> Distribution:
    edges = [round(i * 0.25, 3) for i in range(31)]
    shift = (auroc - 0.5) * 12
    inside, outside = [], []
    for i in range(30):
        c = 0.125 + i * 0.25
        outside.append(int((N_IMAGES - support) * 0.25 * math.exp(-((c - 1.5) ** 2) / 2) / math.sqrt(2 * math.pi)))
        inside.append(int(support * 0.25 * math.exp(-((c - 1.5 - shift) ** 2) / 2) / math.sqrt(2 * math.pi)))
    return Distribution(formula=formula, edges=edges, inside=inside, outside=outside)


# -- neurons --------------------------------------------------------------------------
def _neuron(rng, index: int, *, dead=False, flag_for=None, flag_rule="formula", sensitive=(), embed=True, beams=False):
    if dead:
        return NeuronResult(
            index=index,
            status="dead",
            stats={"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "frac_zero": 1.0},
        )
    flagged = flag_for is not None and flag_rule == "formula"
    best_auroc = round(rng.uniform(0.91, 0.985) if flag_for else rng.uniform(0.55, 0.9), 4)
    if flagged:
        ast = ["and", flag_for, ["not", rng.choice(_PLAIN)]] if rng.random() < 0.5 else ["or", flag_for, rng.choice(_PLAIN)]
        if index % 7 == 0:
            ast = ["or", ["and", flag_for, ["not", "star"]], SCRIPT_CONCEPT]
    else:
        ast = _random_ast(rng)
        if index % 11 == 4:
            ast = ["and", "sky", ["not", SCRIPT_CONCEPT]]
    beam = [_explanation(rng, ast, best_auroc, ci=bool(flag_for))]
    for k in range(2):
        alt = _random_ast(rng, length=rng.choice([1, 2]))
        beam.append(_explanation(rng, alt, round(best_auroc - 0.01 * (k + 1) - rng.uniform(0, 0.02), 4)))
    art_auroc = {a: round(rng.uniform(0.45, 0.65), 4) for a in ARTIFACTS if a != "timestamp"}
    for a in sensitive:
        art_auroc[a] = round(rng.uniform(0.82, 0.95), 4)
    flags = []
    if flag_for:
        without = round(best_auroc - rng.uniform(0.08, 0.3), 4)
        flags.append(
            Flag(
                artifact=flag_for,
                rule=flag_rule,
                formula=beam[0].formula if flag_rule == "formula" else flag_for,
                auroc=best_auroc if flag_rule == "formula" else art_auroc[flag_for],
                p_adjusted=None,  # filled after BH
                artifact_auroc=art_auroc[flag_for],
                auroc_without_artifact=without if flag_rule == "formula" else None,
                margin=round(best_auroc - without, 4) if flag_rule == "formula" else None,
                reason=(
                    f"best formula uses '{flag_for}' and loses {best_auroc - without:.2f} AUROC without it"
                    if flag_rule == "formula"
                    else f"'{flag_for}' alone reaches AUROC {art_auroc[flag_for]:.2f}"
                ),
            )
        )
    return NeuronResult(
        index=index,
        status="ok",
        explanations=beam,
        artifact_auroc=art_auroc,
        flags=flags,
        sensitive=sorted(set(sensitive)),
        # like the pipeline: images for flagged, artifact-sensitive and the strongest neurons
        top_images=(_top_images(rng, index, flag_for or (sensitive[0] if sensitive else None), embed=embed)
                    if flag_for or sensitive or best_auroc > 0.88 else []),
        distribution=_distribution(rng, beam[0].formula, best_auroc, beam[0].support),
        stats={
            "mean": round(rng.uniform(0.2, 1.5), 4),
            "std": round(rng.uniform(0.3, 1.2), 4),
            "min": 0.0,
            "max": round(rng.uniform(4, 12), 4),
            "frac_zero": round(rng.uniform(0.1, 0.7), 4),
        },
        beams=[beam[:1], beam] if beams else None,
        paired=({flag_for: {"n_pairs": 200, "mean_diff_sd": round(rng.uniform(0.8, 2.5), 3),
                            "frac_rise": round(rng.uniform(0.8, 0.99), 3), "wilcoxon_p": 10 ** -rng.uniform(8, 40)}}
                if flag_for else {}),
    )


def _with_bh(neurons: list[NeuronResult], underflow_at: int | None = None) -> list[NeuronResult]:
    """Fill p_adjusted (BH across the layer's best formulas) into explanations and flags."""
    import dataclasses as dc

    alive = [i for i, n in enumerate(neurons) if n.explanations]
    if underflow_at is not None:
        n = neurons[underflow_at]
        best = dc.replace(n.explanations[0], p_value=0.0, log10_p=-1234.56)
        neurons[underflow_at] = dc.replace(n, explanations=[best, *n.explanations[1:]])
    adj = _bh([neurons[i].explanations[0].p_value for i in alive])
    out = list(neurons)
    for i, pa in zip(alive, adj):
        n = out[i]
        best = dc.replace(n.explanations[0], p_adjusted=pa)
        flags = [dc.replace(f, p_adjusted=pa if f.rule == "formula" else None) for f in n.flags]
        out[i] = dc.replace(n, explanations=[best, *n.explanations[1:]], flags=flags)
    return out


def _layer(rng, name, n_neurons, flagged: dict[int, str], sensitive: dict[int, list[str]], dead: set[int],
           sensitive_flags: dict[int, str] | None = None, embed=True, underflow_at=None) -> LayerResult:
    sensitive_flags = sensitive_flags or {}
    neurons = []
    for i in range(n_neurons):
        if i in flagged:
            n = _neuron(rng, i, flag_for=flagged[i], sensitive=sensitive.get(i, [flagged[i]]), embed=embed,
                        beams=(i == min(flagged)))
        elif i in sensitive_flags:
            n = _neuron(rng, i, flag_for=sensitive_flags[i], flag_rule="sensitive", sensitive=[sensitive_flags[i]],
                        embed=embed)
        else:
            n = _neuron(rng, i, dead=i in dead, sensitive=sensitive.get(i, []))
        neurons.append(n)
    return LayerResult(name=name, output_shape=[n_neurons, 7, 7], reduction="mean",
                       neurons=_with_bh(neurons, underflow_at))


NEAR_MISS = {8: "watermark", 14: "watermark"}  # neurons of the main layer with a near miss
INCONCLUSIVE = {9: "text_overlay"}


def _tests_for(rng, n: NeuronResult, near: dict[int, str], inconclusive: dict[int, str]) -> NeuronResult:
    """Fill ``artifact_tests`` the way the 2.x flag rule writes them (one per checked artifact)."""
    import dataclasses as dc

    if n.status == "dead" or not n.explanations:
        return n
    flagged = {f.artifact for f in n.flags}
    tests = []
    for art in ("watermark", "text_overlay"):
        eff = n.artifact_auroc.get(art, 0.5)
        half = round(rng.uniform(0.015, 0.04), 4)
        ci = (round(max(0.0, eff - half), 4), round(min(1.0, eff + half), 4))
        if art in flagged:
            status, reason = "flagged", f"{art} raises the activation (effect {eff:.3f}, CI above 0.6)"
        elif near.get(n.index) == art:
            status = "near_miss"
            ci = (round(eff - 0.09, 4), round(min(1.0, eff + 0.05), 4))
            reason = f"effect {eff:.3f} passes, but its 95% interval reaches {ci[0]:.3f}, below the 0.75 required"
        elif inconclusive.get(n.index) == art:
            status, reason = "inconclusive", f"only 6 probe images carry {art}; at least 10 are needed to decide"
            ci = (round(max(0.0, eff - 0.25), 4), round(min(1.0, eff + 0.25), 4))
        else:
            status, reason = "clean", f"effect {eff:.3f} is below 0.6"
        tests.append(ArtifactTest(artifact=art, status=status, branch="formula" if status == "flagged" else None,
                                  direction="raises" if status != "clean" else None, effect=eff, effect_ci=ci,
                                  p_value=10 ** -rng.uniform(1, 9), p_adjusted=10 ** -rng.uniform(0.5, 6),
                                  n_artifact=400 if art == "watermark" else 250, reason=reason,
                                  effect_ci_bootstrap=(round(ci[0] - 0.004, 4), round(ci[1] + 0.003, 4))
                                  if status == "flagged" else None))
    return dc.replace(n, artifact_tests=tests)


def make_result(n_neurons: int = 40, n_flagged: int | None = None, *, seed: int = 0, second_layer: bool = True,
                embed: bool = True, v2: bool = True) -> AuditResult:
    """The synthetic audit. ``n_flagged`` spreads that many watermark/text flags over the layer.

    ``v2`` adds what results 2.x carry (artifact tests with near misses and an
    inconclusive neuron, impact, sign-off, the model's sha256 and parameter count);
    ``v2=False`` is a 1.x result (flags and artifact-sensitive neurons only).
    """
    rng = random.Random(seed)
    if n_flagged is None:
        flagged = {3: "watermark", 12: "watermark", 27: "watermark", 21: "text_overlay"}
        flagged = {k: v for k, v in flagged.items() if k < n_neurons}
        dead = {5, 17, 33}
        sensitive = {8: ["watermark"], 14: ["text_overlay", "watermark"], 3: ["watermark"], 21: ["text_overlay"]}
        sensitive_flags = {30: "watermark"} if n_neurons > 30 else {}
    else:
        step = max(1, n_neurons // max(1, n_flagged))
        flagged = {1 + k * step: ("watermark" if k % 3 else "text_overlay") for k in range(n_flagged)}
        dead = {i for i in range(n_neurons) if i % 37 == 5}
        sensitive = {i: ["watermark"] for i in range(n_neurons) if i % 53 == 8}
        sensitive_flags = {}
    underflow = min(flagged) if flagged else None
    layers = [_layer(rng, MAIN_LAYER, n_neurons, flagged, sensitive, dead, sensitive_flags, embed=embed,
                     underflow_at=underflow)]
    if second_layer:
        layers.append(_layer(rng, SECOND_LAYER, 8, {}, {2: ["watermark"]}, {6}))

    if v2:
        import dataclasses as dc

        trng = random.Random(seed + 1)
        near = NEAR_MISS if n_flagged is None else {i: "watermark" for i in range(n_neurons) if i % 41 == 9}
        inc = INCONCLUSIVE if n_flagged is None else {i: "text_overlay" for i in range(n_neurons) if i % 43 == 10}
        layers = [dc.replace(layers[0], neurons=[_tests_for(trng, n, near, inc) for n in layers[0].neurons]),
                  *[dc.replace(lyr, neurons=[_tests_for(trng, n, {}, {}) for n in lyr.neurons])
                    for lyr in layers[1:]]]

    concepts = [
        Concept(name=n, n_positive=int(round(f * N_IMAGES)), fraction=round(f * N_IMAGES) / N_IMAGES,
                is_artifact=art, status=st, reason=why, display_name=disp,
                description="synthetic artifact overlay" if art else None)
        for n, f, art, st, why, disp in _CONCEPTS
    ]
    extra = {}
    if v2:
        extra = {
            "rule_version": "2.0",
            "impact": [
                # shaped as auditor.impact writes them (docs/results-schema.md, ArtifactImpact)
                ArtifactImpact(artifact="watermark", flip_rate=0.084, control_flip_rate=0.006, n_images=400,
                               n_flips=34, n_control_flips=2, flip_ci=[0.061, 0.114], control_ci=[0.001, 0.018],
                               summary="Pasting the watermark changes 8.4% of predictions (control paste 0.6%).",
                               generator={"name": "watermark", "params": {"opacity": 0.5}, "seed": 0, "count": 400,
                                          "synth_command": "auditor synth --images probe --artifacts watermark "
                                                           "--count 400 --seed 0 --out pairs"},
                               flows=[{"from": "cat", "to": "dog", "n": 20, "share": 0.1}],
                               towards=[{"class": "dog", "n_other": 300, "n_to": 20, "share_to": 0.067}],
                               class_names_source="indices", n_classes=2,
                               ablation={"mode": "mean", "layers": ["layer4"], "neurons": ["layer4#3", "layer4#7"],
                                         "flip_rate": 0.032, "share_carried": 0.62, "clean_accuracy": 0.9,
                                         "ablated_accuracy": 0.88, "accuracy_cost": 0.02,
                                         "random": {"draws": 10, "share_mean": 0.05, "share_sd": 0.03,
                                                    "share_min": 0.0, "share_max": 0.1,
                                                    "accuracy_cost_mean": 0.01}}),
                ArtifactImpact(artifact="text_overlay", flip_rate=0.011, control_flip_rate=0.008, n_images=250,
                               n_flips=3, n_control_flips=2, flip_ci=[0.004, 0.032], control_ci=[0.002, 0.029],
                               summary="Pasting text changes 1.1% of predictions (control paste 0.8%).",
                               generator={"name": "text_overlay", "params": {}, "seed": 0, "count": 250,
                                          "synth_command": "auditor synth --images probe --artifacts text_overlay "
                                                           "--count 250 --seed 0 --out pairs"},
                               class_names_source="indices", n_classes=2, ablation=None),
            ],
            "signoff": {"prepared_by": "A. Auditor", "reviewed_by": None, "decision": None, "date": None},
        }
    model_prov = {"name": "resnet18", "source": "torchvision", "weights_sha256": "ab12" * 16}
    if v2:
        model_prov |= {"spec": "resnet18", "kind": "torchvision", "weights": "weights/resnet18-watermark.pt",
                       "sha256": "ab12" * 16, "sha256_of": "weights file", "parameters": 11_689_512,
                       "class": "ResNet"}
    return AuditResult(
        **extra,
        schema_version=SCHEMA_VERSION,
        tool={"name": "auditor", "version": "0.1.0"},
        created="2024-05-01T12:00:00Z",
        title="Synthetic audit: resnet18 on the watermark probe set",
        config={
            "model": {"name": "resnet18", "weights": "weights/resnet18-watermark.pt"},
            "layers": [lyr.name for lyr in layers],
            "invert": {"length": 3, "beam": 3, "min_fraction": 0.0, "max_fraction": 0.5, "heldout": 0.3},
            "reduction": "mean",
            "seed": 0,
        },
        provenance={
            "model": model_prov,
            "data": {"probe_set": "synthetic-probe-v1", "n_images": N_IMAGES, "n_concepts": len(_CONCEPTS),
                     **({"source": "data/probe-images", "labels_source": "data/labels.csv",
                         "images": "/home/user/.cache/auditor/synth-0f3a/images"} if v2 else {})},
            **({"search": {"concepts": 18, "atoms": 36, "pool": 36, "length": 3, "beam": 3,
                           "formulas_per_neuron": 36 + 2 * 3 * 36 * 2, "neurons": n_neurons + 8,
                           "formulas_total": (36 + 2 * 3 * 36 * 2) * (n_neurons + 8), "in_sample": False,
                           "heldout": 0.3}} if v2 else {}),
            "preprocessing": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "device": "cpu",
            "timings": {"activations_s": 12.3, "search_s": 4.56, "total_s": 18.2},
            "packages": {"python": "3.11.7", "torch": "2.3.1", "auditor": "0.1.0"},
            "host": "ci-runner-3",
        },
        thresholds={
            "flag_max_p": 0.01,
            "flag_min_auroc": 0.85,
            "artifact_auroc": 0.8,
            "flag_margin": 0.05,
            "rule": "artifact un-negated in the best formula AND p_adjusted <= flag_max_p AND auroc >= "
                    "flag_min_auroc AND (artifact's own AUROC >= artifact_auroc OR auroc - auroc(formula "
                    "without the artifact) >= flag_margin)",
            "sensitive_rule": "artifact's own AUROC >= artifact_auroc",
        },
        concepts=concepts,
        artifacts=list(ARTIFACTS),
        layers=layers,
        warnings=[
            "concept 'unicorn' excluded: 3 positive images (fewer than min_positives=10)",
            "artifact concept 'timestamp' excluded: no positive images in the probe set",
            f"{sum(1 for lyr in layers for n in lyr.neurons if n.status == 'dead')} neurons are dead "
            "(zero activation on every probe image)",
        ],
    )
