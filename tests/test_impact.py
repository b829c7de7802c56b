"""The impact test (auditor.impact): hand-computed flips on a hand-set model, the statistics
against scipy and direct formulas, synth --count giving the very same images, and the gate."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torch import nn

from auditor import impact as imp
from auditor.data import load_probe_set
from auditor.errors import ConfigError
from auditor.results import AuditResult, ArtifactImpact, Flag, LayerResult, NeuronResult
from auditor.synth import clean_mask, pick_clean, synthesise

# --------------------------------------------------------------------------- pure functions


def test_flips_flows_and_towards_by_hand():
    names = ["cat", "dog", "star"]
    clean = np.array([0, 0, 0, 1, 1, 2, 2, 0, 1, 1])
    pasted = np.array([2, 2, 0, 2, 1, 2, 0, 1, 2, 1])
    f = imp.flips(clean, pasted)
    assert f.tolist() == [True, True, False, True, False, False, True, True, True, False]
    flows = imp.class_flows(clean, pasted, names)
    # cat->star 2 (of 4 cats), dog->star 2 (of 4 dogs), cat->dog 1, star->cat 1
    assert flows[:2] == [{"from": "cat", "to": "star", "n": 2, "share": 0.5},
                         {"from": "dog", "to": "star", "n": 2, "share": 0.5}]
    assert {(x["from"], x["to"], x["n"]) for x in flows[2:]} == {("cat", "dog", 1), ("star", "cat", 1)}
    tw = {t["class"]: t for t in imp.towards(clean, pasted, names)}
    # star: 8 images not star on clean, 4 of them become star
    assert (tw["star"]["n_other"], tw["star"]["n_to"], tw["star"]["share_to"]) == (8, 4, 0.5)
    assert (tw["star"]["n_own"], tw["star"]["n_away"]) == (2, 1)
    assert imp.towards(clean, pasted, names)[0]["class"] == "star"
    assert imp.class_flows(clean, clean, names) == []


def test_proportion_ci_is_wilson():
    k, n, z = 31, 100, stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = imp.proportion_ci(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)
    assert imp.proportion_ci(0, 0) is None


def test_score_changes_against_scipy():
    rng = np.random.default_rng(0)
    pc = rng.dirichlet(np.ones(4), size=80)
    pp = np.clip(pc + rng.normal(0, 0.05, pc.shape) + np.array([0, 0, 0, 0.08]), 0, None)
    rows = imp.score_changes(pc, pp, ["a", "b", "c", "d"])
    d = pp - pc
    assert rows[0]["class"] == "d"
    for r in rows:
        c = "abcd".index(r["class"])
        assert r["mean"] == pytest.approx(d[:, c].mean(), abs=1e-12)
        ci = stats.t.interval(0.95, len(d) - 1, loc=d[:, c].mean(), scale=stats.sem(d[:, c]))
        assert r["ci"] == pytest.approx(list(ci), abs=1e-12)
        assert r["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d[:, c]).pvalue, rel=1e-9)


def test_cosine_distance_and_output_changes():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [-1.0, 0.0]])
    assert imp.cosine_distance(a, b).tolist() == pytest.approx([1.0, 0.0, 0.0, 2.0])
    ch = imp.output_changes({"emb": a}, {"emb": b})
    assert ch["emb"]["mean_cosine_distance"] == pytest.approx(0.75) and ch["emb"]["median"] == pytest.approx(0.5)


def test_share_carried():
    assert imp.share_carried(0.4, 0.1) == pytest.approx(0.75)
    assert imp.share_carried(0.4, 0.6) == pytest.approx(-0.5)
    assert imp.share_carried(0.0, 0.0) is None


def test_occlusion_control_fills_the_footprint_with_blurred_pixels():
    rng = np.random.default_rng(1)
    clean = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pasted = np.asarray(clean).copy()
    pasted[10:20, 5:30] = (255, 0, 255)
    pasted = Image.fromarray(pasted)
    ctrl = np.asarray(imp.occlusion_control(clean, pasted))
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:20, 5:30] = True
    mask &= (np.abs(np.asarray(clean, dtype=int) - np.asarray(pasted, dtype=int)) > imp.MASK_THRESHOLD).any(2)
    blurred = np.asarray(clean.filter(ImageFilter.GaussianBlur(2.0)))
    assert (ctrl[~mask] == np.asarray(clean)[~mask]).all()
    assert (ctrl[mask] == blurred[mask]).all()
    assert imp.footprint(clean, pasted).sum() == mask.sum()


def test_heads_and_class_head():
    t = torch.zeros(2, 5)
    assert list(imp.heads_of(t)) == ["output"]
    assert list(imp.heads_of((t, torch.zeros(2, 3), "x"))) == ["0", "1"]
    assert list(imp.heads_of({"logits": t, "emb": t, "n": 3})) == ["logits", "emb"]
    assert imp.class_head({"output": (2, 5)}, "auto") == "output"
    assert imp.class_head({"output": (2, 1)}, "auto") is None
    assert imp.class_head({"output": (2, 7, 7)}, "auto") is None
    assert imp.class_head({"0": (2, 5), "1": (2, 3)}, "auto") is None  # two heads: not a guess
    assert imp.class_head({"logits": (2, 5), "emb": (2, 3)}, "auto") == "logits"
    assert imp.class_head({"output": (2, 5)}, "embedding") is None
    assert imp.class_head({"0": (2, 5), "1": (2, 3)}, "classes") == "0"
    with pytest.raises(ConfigError, match="output: classes"):
        imp.class_head({"output": (2, 16, 4)}, "classes")


def test_read_class_names(tmp_path):
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    assert imp.read_class_names(tmp_path / "c.txt") == ["cat", "dog"]
    (tmp_path / "c.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert imp.read_class_names(tmp_path / "c.json") == ["cat", "dog"]
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(ConfigError, match="lists no class"):
        imp.read_class_names(tmp_path / "e.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        imp.read_class_names(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- a hand-set model

SIDE = 20
WIDTH = 0.1  # border: 2 px of 20 -> 144 of 400 pixels are frame
RED = (255, 0, 0)


class MeanRG(nn.Module):
    """logits = [mean R − mean G, mean G − mean R] over [0, 1] RGB; ``feat`` is (B, 3) channel means."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat = nn.Flatten()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]))
            self.head.bias.zero_()
        self.class_names = ["reddish", "greenish"]

    def forward(self, x):
        return self.head(self.feat(self.pool(x)))


# (r, g) of uniform images and whether a 2-px red frame flips the class by hand:
# frame share s = 144/400 = 0.36: r' = 0.64 r + 0.36*255 = 0.64 r + 91.8, g' = 0.64 g.
COLOURS = [
    ((100, 150), True),   # r' 155.8 > g' 96: greenish -> reddish
    ((0, 250), False),    # r' 91.8 < g' 160
    ((50, 200), False),   # r' 123.8 < g' 128
    ((200, 100), False),  # reddish stays reddish
    ((120, 240), True),   # r' 168.6 > g' 153.6
    ((10, 60), True),     # r' 98.2 > g' 38.4
]


def _hand_flip(r, g):
    s = 144 / 400
    before = "reddish" if r > g else "greenish"
    r2, g2 = (1 - s) * r + s * 255, (1 - s) * g
    after = "reddish" if r2 > g2 else "greenish"
    return before != after


@pytest.fixture()
def rg_probe(tmp_path):
    """Uniform images (several copies of each colour), one of them already carrying a border."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(24):
        (r, g), _ = COLOURS[i % len(COLOURS)]
        rel = f"im{i:02d}.png"
        Image.new("RGB", (SIDE, SIDE), (r, g, 0)).save(images / rel)
        rows.append([rel, int(r > g), int(r <= g), int(i == 23)])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reddish", "greenish", "border"])
        w.writerows(rows)
    return images, labels


def _layers(flagged=(0,), dead=(2,)):
    neurons = []
    for k in range(3):
        flags = [Flag(artifact="border", rule="formula", formula="border", auroc=0.9, p_adjusted=0.001,
                      artifact_auroc=0.9, auroc_without_artifact=None, margin=None, reason="hand-set")] \
            if k in flagged else []
        neurons.append(NeuronResult(index=k, status="dead" if k in dead else "ok", flags=flags))
    return [LayerResult(name="feat", output_shape=[3], reduction="mean", neurons=neurons)]


def _run(probe, layers, **kw):
    args = dict(probe=probe, artifacts=["border"], count=kw.pop("count", 100), seed=kw.pop("seed", 3),
                params={"border": {"width": WIDTH, "color": list(RED)}}, geometry=lambda im: im, mean=None, std=None,
                device="cpu", batch_size=5)
    args.update(kw)
    return imp.run_impact(MeanRG(), layers, **args)


def test_hand_set_model_flips_exactly(rg_probe):
    for (r, g), flips in COLOURS:
        assert _hand_flip(r, g) == flips, (r, g)
    probe = load_probe_set(*rg_probe)
    assert clean_mask(probe).sum() == 23  # the image labelled 'border' is not clean
    [res] = _run(probe, _layers(), ablation="zero", draws=3)
    assert isinstance(res, ArtifactImpact) and res.output_kind == "classes"
    rows = pick_clean(probe, "border", 100, 3)
    assert res.n_images == len(rows) == 23
    expected = sum(COLOURS[int(r) % len(COLOURS)][1] for r in rows)
    assert expected == 11  # rows 0..22: colours 0,4,5 flip -> 4+4+3
    assert res.n_flips == expected and res.flip_rate == expected / 23
    assert res.control_flip_rate == 0.0  # a uniform image blurred is the same image
    n_green = sum(1 for r in rows if COLOURS[int(r) % 6][0][0] <= COLOURS[int(r) % 6][0][1])
    assert res.flows == [{"from": "greenish", "to": "reddish", "n": expected, "share": expected / n_green}]
    assert res.clean_accuracy == 1.0 and res.n_labelled == 23
    assert res.class_names_source == "the model's class_names attribute"
    # Zeroing the red mean: logits depend on G alone (g > 0 everywhere -> greenish), nothing flips.
    a = res.ablation
    assert a["neurons"] == ["feat#0"] and a["flip_rate"] == 0.0 and a["share_carried"] == 1.0
    # ... and costs the accuracy on the reddish images (8 of 23: colour 3 -> rows 3, 9, 15, 21 -> 4)
    n_red = sum(1 for r in rows if COLOURS[int(r) % 6][0][0] > COLOURS[int(r) % 6][0][1])
    assert a["ablated_accuracy"] == pytest.approx(1 - n_red / 23)
    # Random draws come from the live, unflagged neurons: only neuron 1 (G). Zeroing G: logits = [r, -r],
    # every image with r > 0 is reddish either way; the (0, 250) image is a tie [0, 0] -> class 0 on clean.
    assert a["random"]["draws"] == 3 and a["random"]["pool"] == {"feat": 1}
    assert a["random"]["flip_rates"] == [0.0, 0.0, 0.0]
    assert "border flips" in res.summary and "47.8%" in res.summary


def test_paired_effect_of_every_neuron_on_the_test_pairs(rg_probe):
    probe = load_probe_set(*rg_probe)
    paired = {}
    _run(probe, _layers(), paired=paired, draws=1)
    eff = paired["feat"]["border"]
    rows = pick_clean(probe, "border", 100, 3)
    r = np.array([COLOURS[int(i) % 6][0][0] for i in rows], dtype=float)
    d = 0.36 * (255 - r) / 255  # the red mean rises by the frame's share of (255 - r)
    assert eff["n_pairs"][0] == 23 and eff["frac_rise"][0] == 1.0
    assert eff["mean_diff_sd"][0] == pytest.approx(d.mean() / (r / 255).std(), rel=1e-5)
    assert eff["frac_rise"][1] == 0.0  # green falls under a red frame
    assert eff["mean_diff_sd"][2] == 0.0 and eff["wilcoxon_p"][2] == 1.0  # blue: 0 everywhere


class SkipRG(MeanRG):
    """MeanRG plus a path around ``feat``: the head also reads the pooled input directly."""

    def forward(self, x):
        pooled = self.pool(x)
        return self.head(self.feat(pooled)) + 0.5 * self.head(pooled.flatten(1))


def test_downstream_only_ablation_passes_equal_full_passes(rg_probe, monkeypatch):
    probe = load_probe_set(*rg_probe)
    [fast] = _run(probe, _layers(), ablation="mean", draws=4)
    monkeypatch.setattr(imp, "STORE_MAX_BYTES", 0)
    [full] = _run(probe, _layers(), ablation="mean", draws=4)
    assert fast.ablation.pop("downstream_only") is True and full.ablation.pop("downstream_only") is False
    assert fast.ablation == full.ablation


def test_a_path_around_the_layer_falls_back_to_full_passes(rg_probe, monkeypatch):
    """With a tensor from before the layer read after it, the shortcut would be wrong: it is not used."""
    probe = load_probe_set(*rg_probe)
    args = dict(probe=probe, artifacts=["border"], count=100, seed=3,
                params={"border": {"width": WIDTH, "color": list(RED)}}, geometry=lambda im: im, mean=None,
                std=None, device="cpu", batch_size=5, ablation="zero", draws=2)
    [res] = imp.run_impact(SkipRG(), _layers(), **args)
    assert res.ablation["downstream_only"] is False
    # Zeroing R in feat only: logits = 0.5*[r-g, g-r] + [-g, g]; recompute by hand from the image means.
    rows = pick_clean(probe, "border", 100, 3)
    rg = np.array([COLOURS[int(r) % 6][0] for r in rows], dtype=float) / 255
    s = 144 / 400
    def cls(r, g):
        return np.where(0.5 * (r - g) - g > 0.5 * (g - r) + g, 0, 1)
    clean = cls(rg[:, 0], rg[:, 1])
    pasted = cls((1 - s) * rg[:, 0] + s, (1 - s) * rg[:, 1])
    assert res.ablation["flip_rate"] == pytest.approx((clean != pasted).mean(), abs=1e-12)


def test_mean_ablation_uses_the_mean_over_the_clean_test_images(rg_probe):
    probe = load_probe_set(*rg_probe)
    [res] = _run(probe, _layers(), ablation="mean", draws=1)
    rows = pick_clean(probe, "border", 100, 3)
    rg = np.array([COLOURS[int(r) % 6][0] for r in rows], dtype=float) / 255
    mean_r = rg[:, 0].mean()
    s = 144 / 400
    clean = np.where(mean_r - rg[:, 1] > rg[:, 1] - mean_r, 0, 1)
    pasted = np.where(mean_r - (1 - s) * rg[:, 1] > (1 - s) * rg[:, 1] - mean_r, 0, 1)
    assert res.ablation["flip_rate"] == pytest.approx((clean != pasted).mean(), abs=1e-12)


def test_count_and_seed_pick_the_same_images_as_synth(rg_probe, tmp_path):
    images, labels = rg_probe
    probe = load_probe_set(images, labels)
    pairs = tmp_path / "pairs"
    [res] = _run(probe, _layers(), count=7, seed=5, save_pairs=str(pairs), draws=1)
    made = synthesise(images, labels, tmp_path / "synth", artifacts=["border"], count=7, seed=5,
                      params={"border": {"width": WIDTH, "color": list(RED)}})
    written = sorted(p.name for p in (made.images / "border").iterdir())
    saved = sorted(p.name for p in (pairs / "images" / "border").iterdir())
    assert written == saved and len(written) == 7 == res.n_images
    for name in written:  # the same bytes
        assert (made.images / "border" / name).read_bytes() == (pairs / "images" / "border" / name).read_bytes()
    # Recompute the flip rate independently from the files synth wrote.
    flips = 0
    for name in written:
        c = np.asarray(Image.open(images / name), dtype=float).mean(axis=(0, 1))
        p = np.asarray(Image.open(made.images / "border" / name), dtype=float).mean(axis=(0, 1))
        flips += (c[0] > c[1]) != (p[0] > p[1])
    assert res.n_flips == flips
    table = list(csv.DictReader(open(pairs / "pairs.csv")))
    assert len(table) == 7 and {r["artifact"] for r in table} == {"border"}
    assert json.loads(json.dumps(res.to_dict()))["generator"]["synth_command"].endswith(
        "--param border.width=0.1 --param 'border.color=[255, 0, 0]'")


def test_no_flags_no_ablation_and_embedding_outputs(rg_probe):
    probe = load_probe_set(*rg_probe)
    [res] = _run(probe, _layers(flagged=()))
    assert res.ablation is None
    [emb] = _run(probe, _layers(), output="embedding")
    assert emb.output_kind == "embedding" and emb.flip_rate is None and emb.ablation is None
    assert emb.output_change["output"]["mean_cosine_distance"] > 0
    assert emb.control_output_change["output"]["mean_cosine_distance"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_generator_is_skipped_with_a_warning(rg_probe):
    probe = load_probe_set(*rg_probe)
    warnings = []
    assert _run(probe, _layers(), artifacts=["stamp"], warnings=warnings) == []
    assert "no artifact generator" in warnings[0]
    with pytest.raises(ConfigError, match="has no parameter 'widht'"):
        _run(probe, _layers(), params={"border": {"widht": 0.1}})
    with pytest.raises(ConfigError, match="impact_params given for 'text'"):
        _run(probe, _layers(), params={"text": {"size": 0.1}})


def test_save_pairs_never_overwrites_or_writes_into_the_images(rg_probe, tmp_path):
    probe = load_probe_set(*rg_probe)
    images = rg_probe[0]
    with pytest.raises(ConfigError, match="overlaps the probe image folder"):
        _run(probe, _layers(), save_pairs=str(images / "pairs"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no earlier pairs.csv"):
        _run(probe, _layers(), save_pairs=str(other))
    assert (other / "keep.txt").read_text() == "mine"
    _run(probe, _layers(), save_pairs=str(tmp_path / "p"), draws=1)
    _run(probe, _layers(), save_pairs=str(tmp_path / "p"), draws=1, count=3)  # replaces an earlier one
    assert len(list(csv.DictReader(open(tmp_path / "p" / "pairs.csv")))) == 3


class Tokens(nn.Module):
    """A token layer (B, T, D) before a mean-pooled linear head: the mean ablation is per neuron."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Identity()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]]))
            self.head.bias.zero_()

    def forward(self, x):
        t = self.tok(x.flatten(2).transpose(1, 2))  # (B, H*W, 3) tokens
        return self.head(t.mean(1))


def test_token_layers_are_ablated_per_neuron(rg_probe):
    probe = load_probe_set(*rg_probe)
    layers = [LayerResult(name="tok", output_shape=[400, 3], reduction="mean", neurons=_layers()[0].neurons)]
    args = dict(probe=probe, artifacts=["border"], count=100, seed=3,
                params={"border": {"width": WIDTH, "color": list(RED)}}, geometry=lambda im: im, mean=None,
                std=None, device="cpu", batch_size=5, ablation="mean", draws=1)
    [res] = imp.run_impact(Tokens(), layers, **args)
    [ref] = _run(probe, _layers(), ablation="mean", draws=1)  # the same function through a (B, 3) layer
    assert res.n_flips == ref.n_flips == 11
    assert res.ablation["flip_rate"] == pytest.approx(ref.ablation["flip_rate"], abs=1e-12)


def test_results_round_trip(rg_probe, tmp_path):
    probe = load_probe_set(*rg_probe)
    [res] = _run(probe, _layers(), draws=2)
    result = AuditResult(schema_version="1.0", tool={}, created="", title="t", config={}, provenance={},
                         thresholds={}, concepts=[], artifacts=["border"], layers=_layers(), impact=[res])
    result.save(tmp_path / "r.json")
    back = AuditResult.load(tmp_path / "r.json")
    assert back.impact[0] == res
    # a results file without the key (1.x) still loads
    data = json.loads((tmp_path / "r.json").read_text())
    del data["impact"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert AuditResult.load(tmp_path / "old.json").impact == []


# --------------------------------------------------------------------------- the demo (slow)

STAR = "star"


def _demo_impact(demo_audit, artifact="watermark"):
    result, _out, _written = demo_audit
    return next(i for i in result.impact if i.artifact == artifact), result


def _predict(model, images):
    from auditor.demo.model import images_to_tensor

    with torch.no_grad():
        return model(images_to_tensor(images)).argmax(1).numpy()


@pytest.mark.slow
def test_demo_flip_rate_equals_a_recomputation_on_synth_images(demo_audit, tmp_path):
    """`auditor synth --count M --seed S` writes the images; predicting them directly gives the same numbers."""
    from auditor.cli import main
    from auditor.demo.model import DEMO_CLASSES, load_demo_model

    wm, result = _demo_impact(demo_audit)
    cfg = result.config
    M, seed = wm.generator["count"], wm.generator["seed"]
    assert main(["synth", "--images", cfg["images"], "--labels", cfg["labels"], "--artifacts", "watermark",
                 "--count", str(M), "--seed", str(seed), "--out", str(tmp_path / "s"), "-q"]) == 0
    folder = tmp_path / "s" / "images"
    names = sorted(p.relative_to(folder / "watermark").as_posix() for p in (folder / "watermark").rglob("*.png"))
    assert len(names) == wm.n_images
    model = load_demo_model()
    clean = _predict(model, [Image.open(folder / "clean" / n).convert("RGB") for n in names])
    pasted = _predict(model, [Image.open(folder / "watermark" / n).convert("RGB") for n in names])
    assert wm.n_flips == int((clean != pasted).sum())
    assert wm.flip_rate == pytest.approx(float((clean != pasted).mean()), abs=1e-12)
    star = DEMO_CLASSES.index(STAR)
    to_star = float(((clean != star) & (pasted == star)).sum() / (clean != star).sum())
    top = wm.towards[0]
    assert top["class"] == STAR and top["share_to"] == pytest.approx(to_star, abs=1e-12)
    # The shortcut is large: (measured 0.41 of the non-star images become star), the control is not.
    assert top["share_to"] > 0.25 and wm.flip_rate > 0.25
    assert wm.control_flip_rate < 0.1 and wm.flip_ci[0] > wm.control_ci[1]
    assert wm.flows[0]["to"] == STAR and all(f["to"] == STAR for f in wm.flows[:2])
    assert wm.score_change[0]["class"] == STAR and wm.score_change[0]["mean"] > 0.1
    assert wm.score_change[0]["p_wilcoxon"] < 1e-10


@pytest.mark.slow
def test_demo_ablating_the_flagged_neurons_removes_most_flips(demo_audit):
    wm, result = _demo_impact(demo_audit)
    flagged = [f"features.13#{n.index}" for n in result.layers[0].neurons
               if any(f.artifact == "watermark" for f in n.flags)]
    a = wm.ablation
    assert a is not None and a["neurons"] == flagged and a["mode"] == "mean"
    assert a["share_carried"] > 0.5
    r = a["random"]
    assert r["draws"] >= 10 and r["share_mean"] < 0.2 and r["share_max"] < a["share_carried"]
    assert a["accuracy_cost"] is not None and wm.examples and wm.examples[0]["pairs"]
    # Every neuron's paired change on the test pairs; the documented watermark channels rise most.
    from auditor.demo.model import DEMO_WATERMARK_CHANNELS

    neurons = result.layers[0].neurons
    assert all("watermark" in n.paired and n.paired["watermark"]["n_pairs"] == wm.n_images for n in neurons)
    top = sorted(neurons, key=lambda n: -n.paired["watermark"]["mean_diff_sd"])[:len(DEMO_WATERMARK_CHANNELS)]
    assert {n.index for n in top} == set(DEMO_WATERMARK_CHANNELS)
    # The text artifact flags no neuron: no ablation.
    text, _ = _demo_impact(demo_audit, "text")
    assert text.ablation is None


@pytest.mark.slow
def test_control_model_without_the_shortcut_barely_flips(demo_audit):
    """The shipped control model (watermark on 20% of every class in training): near-zero flips."""
    from auditor.collect import build_transform
    from auditor.demo.model import CONTROL_WEIGHTS, load_demo_model
    from auditor.models import Preprocessing

    wm, result = _demo_impact(demo_audit)
    geometry, _ = build_transform(Preprocessing(), False)
    probe = load_probe_set(result.config["images"], result.config["labels"])
    [res] = imp.run_impact(load_demo_model(CONTROL_WEIGHTS), [], probe=probe, artifacts=["watermark"], count=500,
                           seed=0, params={}, geometry=geometry, mean=None, std=None, device="cpu", draws=1)
    assert res.n_images == wm.n_images
    star = next((t for t in res.towards if t["class"] == STAR), {"share_to": 0.0})
    assert res.flip_rate < 0.08 and res.flip_rate < wm.flip_rate / 4, res.summary
    assert star["share_to"] < 0.02, res.summary


@pytest.mark.slow
def test_fail_on_impact_exit_codes_and_junit(demo_audit, tmp_path):
    from auditor.cli import main

    result = demo_audit[0]
    cfg = result.config
    base = ["run", "--model", "auditor.demo.model:load_demo_model", "--layer", "features.13", "--images",
            cfg["images"], "--labels", cfg["labels"], "--artifacts", "watermark", "--no-normalize",
            "--no-fail-on-flag", "--impact-count", "80", "--ablation-draws", "1", "--bootstrap", "0",
            "--formats", "json,junit", "--cache-dir", cfg["cache_dir"], "--device", "cpu", "-q"]
    assert main(base + ["--out", str(tmp_path / "a"), "--fail-on-impact", "0.05"]) == 1
    junit = (tmp_path / "a" / "junit.xml").read_text()
    assert "artifact 'watermark' flips at most 0.05 of predictions" in junit and "ArtifactImpact" in junit
    assert main(base + ["--out", str(tmp_path / "b"), "--fail-on-impact", "0.95"]) == 0
    assert "ArtifactImpact" not in (tmp_path / "b" / "junit.xml").read_text()
    assert main(base + ["--out", str(tmp_path / "c")]) == 0  # no gate
    assert main(base + ["--out", str(tmp_path / "d"), "--fail-on-impact", "1.5"]) == 2


def test_report_page_one_and_junit_show_the_impact(rg_probe):
    from auditor.report import render_html
    from auditor.report.junit import junit_tree

    probe = load_probe_set(*rg_probe)
    [res] = _run(probe, _layers(), draws=2)

    def result(gate):
        return AuditResult(schema_version="1.0", tool={}, created="", title="t", config={"fail_on_impact": gate},
                           provenance={}, thresholds={}, concepts=[], artifacts=["border"], layers=_layers(),
                           impact=[res])

    html = render_html(result(0.1))
    page1 = html[:html.index('id="flagged"')]
    # page 1's verdict table carries the impact beside each artifact's verdict
    assert "Impact on outputs" in page1
    assert "<strong>47.8%</strong> of predictions flip (control 0.0%)" in page1
    assert "Above the --fail-on-impact threshold 10.0%" in page1 and "flagged neurons carry" in page1
    assert "Above the --fail-on-impact threshold" not in render_html(result(0.9)).split('id="flagged"')[0]
    assert 'id="impact-border"' in html and "greenish → reddish" in html and "flow-bar" in html
    assert "--count 100 --seed 3" in html  # the synth command that writes the same images

    def cases(gate):
        root = junit_tree(result(gate)).getroot()
        suite = next(s for s in root if s.get("name") == "auditor.impact")
        return suite, [c for c in suite]

    suite, [case] = cases(0.1)
    assert suite.get("failures") == "1" and case.find("failure") is not None
    suite, [case] = cases(0.5)
    assert suite.get("failures") == "0" and case.find("failure") is None and case.find("skipped") is None
    suite, [case] = cases(None)
    assert case.find("skipped") is not None


def test_synth_count_on_the_command_line(rg_probe, tmp_path, capsys):
    from auditor.cli import main

    images, labels = rg_probe
    args = ["synth", "--images", str(images), "--labels", str(labels), "--artifacts", "border", "-q"]
    assert main(args + ["--out", str(tmp_path / "a"), "--count", "5", "--fraction", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b"), "--count", "0"]) == 2
    assert main(args + ["--out", str(tmp_path / "c"), "--count", "5", "--seed", "2"]) == 0
    made = sorted(p.name for p in (tmp_path / "c" / "images" / "border").iterdir())
    probe = load_probe_set(images, labels)
    assert made == sorted(probe.paths[i] for i in pick_clean(probe, "border", 5, 2))
    assert "im23.png" not in made  # carries a border already
    manifest = json.loads((tmp_path / "c" / "synth.json").read_text())
    assert manifest["count"] == 5 and manifest["fraction"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_hand_computed_flips(rg_probe):
    probe = load_probe_set(*rg_probe)
    [cpu] = _run(probe, _layers(), ablation="zero", draws=2)
    [gpu] = _run(probe, _layers(), ablation="zero", draws=2, device="cuda")
    assert gpu.n_flips == cpu.n_flips == 11 and gpu.flows == cpu.flows
    assert gpu.ablation["share_carried"] == cpu.ablation["share_carried"] == 1.0


def test_bad_impact_inputs_are_exit_2_before_any_work(colour_args, tmp_path, capsys):
    from auditor.cli import main

    assert main(["run", *colour_args, "--class-names", str(tmp_path / "missing.txt")]) == 2
    assert "class_names: cannot read" in capsys.readouterr().err
    assert main(["run", *colour_args, "--impact-params", "{watermark: [1, 2"]) == 2
    assert "impact_params" in capsys.readouterr().err
    assert main(["run", *colour_args, "--fail-on-impact", "-0.1"]) == 2
    assert not (tmp_path / "out").exists()


def test_results_are_cached_and_reused_only_when_nothing_changed(rg_probe, tmp_path, monkeypatch):
    probe = load_probe_set(*rg_probe)
    calls = []
    real = imp._one_artifact
    monkeypatch.setattr(imp, "_one_artifact", lambda *a, **k: calls.append(1) or real(*a, **k))
    cid = {"model": "hand-set", "preprocessing": None}

    def run(**kw):
        paired = {}
        [res] = _run(probe, _layers(**kw.pop("layers", {})), cache_dir=tmp_path / "c", cache_id=cid, draws=2,
                     paired=paired, **kw)
        return res, paired

    first, p1 = run()
    second, p2 = run()
    assert len(calls) == 1 and second == first
    assert all(np.array_equal(p1["feat"]["border"][k], p2["feat"]["border"][k]) for k in p1["feat"]["border"])
    run(seed=4)  # another seed: other images
    run(layers={"flagged": (1,)})  # another flagged neuron: another ablation
    run(params={"border": {"width": 0.2, "color": list(RED)}})
    assert len(calls) == 4
    _run(probe, _layers(), cache_dir=tmp_path / "c", cache_id=cid, draws=2, save_pairs=str(tmp_path / "p"))
    assert len(calls) == 5  # --save-pairs needs the images: always computed
