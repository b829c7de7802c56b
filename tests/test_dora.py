"""DORA: EA distances against their definition, outlier scores, s-AMS determinism, the cache,
hooks and modes, the s-AMS property on the demo model, config, command and results."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.dora import (SamsParams, activations_on, ea_distance, generate, layerwise_ea, outlier_scores,
                          pairwise_ea, representation_matrix, sams_for_layer)
from auditor.dora.objective import layer_values, objective_values
from auditor.errors import ConfigError

DATA = Path(__file__).parent / "data"
TINY = SamsParams(size=16, steps=4, signals=2, batch_size=8, lr=0.05)


def colour_net():
    spec = importlib.util.spec_from_file_location("colour_model_for_dora", DATA / "colour_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make().eval()


# -- EA distances --------------------------------------------------------------------------

def _cos(u, v):
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    if nu == 0 or nv == 0:
        return 0.0
    return sum(x * y for x, y in zip(u, v)) / (nu * nv)


def _matrix(seed=0, K=9):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(K, K)) + 2.0 * np.eye(K)
    A[3] = 0.0  # a neuron silent on its own s-AMS and a row of zeros
    A[:, 5] = np.abs(A[:, 5])
    return A


def test_pairwise_ea_matches_the_definition_pair_by_pair():
    A = _matrix()
    K = len(A)
    D = pairwise_ea(A)
    for q in range(K):
        for m in range(K):
            a = (A[q, q], A[q, m])
            b = (A[m, q], A[m, m])
            want = 0.0 if q == m else math.sqrt(max(0.0, (1 - _cos(a, b)) / 2))
            assert D[q, m] == pytest.approx(want, abs=1e-12), (q, m)
    assert np.allclose(D, D.T) and np.all((D >= 0) & (D <= 1))


def test_layerwise_ea_matches_the_definition_and_scipy():
    from scipy.spatial.distance import cosine

    A = _matrix(1)
    K = len(A)
    D = layerwise_ea(A)
    for q in range(K):
        for m in range(K):
            if q == m:
                want = 0.0
            elif not A[q].any() or not A[m].any():
                want = math.sqrt(0.5)  # undefined cosine taken as 0 (documented)
            else:
                want = math.sqrt(max(0.0, cosine(A[q], A[m]) / 2))  # scipy's cosine distance is 1 - cos
            assert D[q, m] == pytest.approx(want, abs=1e-12), (q, m)
    assert np.array_equal(ea_distance(A, "layerwise"), D)
    with pytest.raises(ConfigError, match="pairwise"):
        ea_distance(A, "euclid")


def test_the_two_forms_differ():
    A = _matrix(2)
    assert not np.allclose(pairwise_ea(A), layerwise_ea(A))


def test_representation_matrix_averages_each_neurons_signals():
    K, S = 3, 2
    values = np.arange(K * S * K, dtype=float).reshape(K * S, K)  # rows: (neuron 0, s0), (0, s1), (1, s0), ...
    A = representation_matrix(values, K, S)
    for i in range(K):
        assert np.allclose(A[i], (values[2 * i] + values[2 * i + 1]) / 2)


# -- outliers --------------------------------------------------------------------------------

def _cluster_with_outlier(seed=0, n=40):
    rng = np.random.default_rng(seed)
    pts = rng.normal(scale=0.05, size=(n, 3))
    pts[7] = [1.0, 1.0, 1.0]  # planted far away
    return np.linalg.norm(pts[:, None] - pts[None], axis=-1)


@pytest.mark.parametrize("method", ["lof", "iforest", "knn"])
def test_a_planted_far_neuron_is_the_top_outlier(method):
    D = _cluster_with_outlier()
    found = outlier_scores(D, method, seed=0)
    assert found.rank[7] == 1 and found.outlier[7]
    assert found.outlier.sum() <= 4
    assert sorted(found.rank.tolist()) == list(range(1, len(D) + 1))


def test_lof_scores_are_scikit_learns_and_contamination_takes_the_top_share():
    from sklearn.neighbors import LocalOutlierFactor

    D = _cluster_with_outlier(1)
    found = outlier_scores(D, "lof", n_neighbors=10)
    ref = LocalOutlierFactor(n_neighbors=10, metric="precomputed").fit(D)
    assert np.allclose(found.scores, -ref.negative_outlier_factor_)
    top = outlier_scores(D, "lof", n_neighbors=10, contamination=0.1)
    assert top.outlier.sum() == 4 and set(np.flatnonzero(top.outlier)) == set(np.argsort(-found.scores)[:4])
    with pytest.raises(ConfigError, match="contamination"):
        outlier_scores(D, "lof", contamination=0.9)
    with pytest.raises(ConfigError, match="outliers"):
        outlier_scores(D, "zscore")


# -- generation -------------------------------------------------------------------------------

def test_generation_is_deterministic_per_seed():
    model = colour_net()
    a = generate(model, "act", "mean", [0, 2], TINY, progress=False)
    b = generate(model, "act", "mean", [0, 2], TINY, progress=False)
    assert a.shape == (2, 2, 3, 16, 16) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    c = generate(model, "act", "mean", [0, 2], SamsParams(**{**TINY.__dict__, "seed": 1}), progress=False)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[:, 0], a[:, 1])  # the signals start from different random images


def test_a_neurons_sams_do_not_depend_on_its_batch_companions():
    model = colour_net()
    together = generate(model, "act", "mean", [0, 1, 2, 3], TINY, progress=False)
    alone = generate(model, "act", "mean", [2], SamsParams(**{**TINY.__dict__, "batch_size": 2}), progress=False)
    assert np.abs(together[2].astype(int) - alone[0].astype(int)).max() <= 1


def test_objective_is_each_images_own_neuron_and_redirects_a_silent_relu():
    model = colour_net()
    red = torch.zeros(4, 3, 8, 8)
    red[:, 0] = 1.0  # channel 0 (R - G - B) = 1, the others 0
    own = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        got = objective_values(model, "act", "mean", red, own)
        values = layer_values(model, "act", "mean", red)
    assert got[0] == pytest.approx(1.0) and torch.allclose(values[:, 0], torch.ones(4))
    # Silent channels: the objective is the ReLU's input, R·w + b, which is negative but has a gradient.
    assert got[1] == pytest.approx(-1.0) and got[2] == pytest.approx(0.0) and got[3] == pytest.approx(-1.0)
    x = red.clone().requires_grad_(True)
    objective_values(model, "act", "mean", x, torch.tensor([1, 1, 1, 1])).sum().backward()
    assert x.grad.abs().sum() > 0


def test_hooks_removed_mode_and_requires_grad_restored_even_on_error():
    model = colour_net().train()
    model.head.weight.requires_grad_(False)
    generate(model, "act", "mean", [1], TINY, progress=False)
    with pytest.raises(ConfigError, match="neurons must lie in 0"):
        generate(model, "act", "mean", [4], TINY, progress=False)
    assert model.training
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert model.conv.weight.requires_grad and not model.head.weight.requires_grad


# -- cache ---------------------------------------------------------------------------------------

def test_cache_reused_and_invalidated_by_parameters_and_weights(tmp_path):
    model = colour_net()
    first, _, info = sams_for_layer(model, "act", "mean", TINY, cache_dir=tmp_path, progress=False)
    assert info["status"] == "miss" and (Path(info["dir"]) / "sams.npy").is_file()
    again, _, info2 = sams_for_layer(model, "act", "mean", TINY, cache_dir=tmp_path, progress=False)
    assert info2["status"] == "hit" and info2["key"] == info["key"] and np.array_equal(first, again)
    for changed in ({"lr": 0.06}, {"steps": 5}, {"signals": 1}, {"seed": 3}, {"size": 20}, {"robustness": None}):
        _, _, other = sams_for_layer(model, "act", "mean", SamsParams(**{**TINY.__dict__, **changed}),
                                     cache_dir=tmp_path, progress=False)
        assert other["status"] == "miss" and other["key"] != info["key"], changed
    _, _, red = sams_for_layer(model, "act", "max", TINY, cache_dir=tmp_path, progress=False)
    assert red["key"] != info["key"]
    _, _, norm = sams_for_layer(model, "act", "mean", TINY, mean=(0.5,) * 3, std=(0.25,) * 3, cache_dir=tmp_path,
                                progress=False)
    assert norm["key"] != info["key"]
    with torch.no_grad():
        model.conv.bias[1] += 0.5
    _, _, weights = sams_for_layer(model, "act", "mean", TINY, cache_dir=tmp_path, progress=False)
    assert weights["status"] == "miss" and weights["key"] != info["key"]
    # A damaged array is ignored and written again.
    (Path(info["dir"]) / "sams.npy").write_bytes(b"garbage")
    with torch.no_grad():
        model.conv.bias[1] -= 0.5
    fixed, _, info3 = sams_for_layer(model, "act", "mean", TINY, cache_dir=tmp_path, progress=False)
    assert info3["status"] == "miss" and np.array_equal(fixed, first)


# -- the s-AMS property on the demo model -------------------------------------------------------

def test_demo_sams_beat_every_probe_image_and_other_neurons_sams():
    """A neuron's s-AMS activate it more than any probe image, and more than the s-AMS of other
    neurons do, except members of its own planted watermark group (which share a preference by
    construction and activate each other). Small and quick: 64², 32 steps, lr 0.1, one signal."""
    from auditor.demo.data import generate as demo_images
    from auditor.demo.model import DEMO_LAYER, DEMO_WATERMARK_CHANNELS, images_to_tensor, layer_means, load_demo_model

    model = load_demo_model()
    neurons = [0, 27, 5, 10, 20, 40, 50, 60]
    params = SamsParams(size=64, steps=32, lr=0.1, signals=1, batch_size=8)
    sams = generate(model, DEMO_LAYER, "mean", neurons, params, progress=False)
    values = activations_on(model, DEMO_LAYER, "mean", sams.reshape(len(neurons), 3, 64, 64))
    A = representation_matrix(values, len(neurons), 1)[:, neurons]  # A[i, j]: neuron j on neuron i's s-AMS
    probe = layer_means(model, images_to_tensor(demo_images(200, seed=5, image_size=64).images)).numpy()
    group = set(DEMO_WATERMARK_CHANNELS)
    for j, k in enumerate(neurons):
        assert A[j, j] > probe[:, k].max(), (k, A[j, j], probe[:, k].max())
        others = [i for i, m in enumerate(neurons) if i != j and not (m in group and k in group)]
        assert A[j, j] > A[others, j].max(), (k, A[:, j])


# -- config, command, results ------------------------------------------------------------------

def test_config_section_off_by_default_and_validated():
    from auditor.config import make_config

    assert make_config({}).dora is None
    assert make_config({"dora": "on"}).dora.steps == 90
    assert make_config({"dora": "{steps: 7, distance: layerwise}"}).dora.distance == "layerwise"
    assert make_config({"dora": {"enabled": False}}).dora is None
    with pytest.raises(ConfigError, match="unknown key 'dora.stepz'.*'steps'"):
        make_config({"dora": {"stepz": 3}})
    with pytest.raises(ConfigError, match="dora.outliers"):
        make_config({"dora": {"outliers": "zscore"}})


def test_auditor_dora_command_writes_results_and_bad_input_is_exit_2(tmp_path, capsys):
    from auditor.cli import main
    from auditor.results import DoraResult

    model = f"{DATA / 'colour_model.py'}:make"
    args = ["dora", "--model", model, "--layer", "act", "--no-normalize", "--device", "cpu", "-q",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--dora", "{size: 16, steps: 3, signals: 2, contamination: 0.25}"]
    assert main(args) == 0
    data = json.loads((tmp_path / "out" / "dora.json").read_text())
    result = DoraResult.from_dict(data)
    layer = result.layers[0]
    assert layer.n_neurons == 4 and len(layer.outliers) == 1 and result.distance == "pairwise"
    pngs = list((tmp_path / "out" / "sams").rglob("*.png"))
    assert len(pngs) == 2  # the outlier's two signals
    assert "rank  neuron" in capsys.readouterr().out
    assert main(args[:3] + ["--layer", "nope"] + args[5:]) == 2
    assert "no layer 'nope'" in capsys.readouterr().err
    assert main(args[:-1] + ["{steps: 0}"]) == 2


def test_results_round_trip_and_old_files_have_no_dora(tmp_path):
    from auditor.results import AuditResult, DoraLayer, DoraNeuron, DoraResult

    base = dict(schema_version="1.0", tool={"name": "auditor"}, created="2026-01-01T00:00:00+00:00", title="t",
                config={}, provenance={}, thresholds={}, concepts=[], artifacts=[], layers=[])
    old = AuditResult(**base)
    path = tmp_path / "r.json"
    old.save(path)
    data = json.loads(path.read_text())
    data.pop("dora")
    path.write_text(json.dumps(data))
    assert AuditResult.load(path).dora is None
    dora = DoraResult(distance="pairwise", method="lof", params={"steps": 3}, layers=[DoraLayer(
        name="act", reduction="mean", n_neurons=1, outliers=[0], neurons=[DoraNeuron(
            index=0, score=2.0, rank=1, outlier=True, x=0.1, y=-0.2, self_activation=1.5, max_other=0.3,
            sams=["data:image/png;base64,AAAA"])])])
    full = AuditResult(**base, dora=dora)
    full.save(path)
    assert AuditResult.load(path) == full


def test_the_map_reproduces_planar_distances():
    from auditor.dora import embed_2d

    pts = np.random.default_rng(0).random((12, 2))
    D = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    xy = embed_2d(D)
    assert np.allclose(np.linalg.norm(xy[:, None] - xy[None], axis=-1), D, atol=1e-6)


@pytest.mark.parametrize("shape,reduction", [((3, 5, 4, 4), "mean"), ((3, 5, 4, 4), "max"), ((3, 7, 5), "cls"),
                                             ((3, 7, 5), "mean"), ((3, 7, 5), "max"), ((3, 6), "mean")])
def test_objective_reduction_is_the_activation_collections(shape, reduction):
    from auditor.collect import reduce_output
    from auditor.dora.objective import reduce_values

    out = torch.randn(*shape)
    want, _ = reduce_output(out, "layer", reduction)
    assert torch.equal(reduce_values(out, "layer", reduction), want)
    if len(shape) == 3:  # a sequence-first (T, B, D) output is turned around
        assert torch.equal(reduce_values(out.transpose(0, 1), "layer", reduction, "sequence_first"), want)


def test_sams_for_a_token_layer_and_a_linear_layer():
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Conv2d(3, 6, 4, stride=4)
            self.blocks = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 3)

            self.seq = torch.nn.Identity()

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 6)
            t = torch.cat([t.mean(1, keepdim=True), t], 1)  # a CLS-like token first
            t = self.blocks(t)
            self.seq(t.transpose(0, 1))  # the same tokens sequence-first (T, B, D)
            return self.head(t[:, 0])

    model = Tokens().eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    for reduction in ("cls", "mean"):  # the sequence-first output is measured and turned around
        assert np.array_equal(activations_on(model, "seq", reduction, images),
                              activations_on(model, "blocks", reduction, images))
    for layer, reduction, K in (("blocks", "cls", 6), ("blocks", "mean", 6), ("head", "mean", 3)):
        sams = generate(model, layer, reduction, list(range(K)), TINY, progress=False)
        values = activations_on(model, layer, reduction, sams.reshape(K * 2, 3, 16, 16))
        assert values.shape == (K * 2, K)


def test_a_size_the_model_cannot_take_is_a_clear_error():
    from auditor.errors import ModelError

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ModelError, match="set dora.size"):
        generate(Fixed(), "fc", "mean", [0], SamsParams(size=20, steps=1, signals=1), progress=False)
    generate(Fixed(), "fc", "mean", [0], SamsParams(size=16, steps=1, signals=1), progress=False)


def test_run_dora_keeps_images_only_for_kept_and_outlier_neurons(tmp_path):
    from auditor.dora import run_dora

    model = colour_net()
    result = run_dora(model, ["act"], params=TINY, contamination=0.25, device="cpu", cache_dir=tmp_path,
                      keep={"act": {1}}, progress=False)
    layer = result.layers[0]
    assert result.distance == "pairwise" and result.method == "lof" and result.params["steps"] == TINY.steps
    assert len(layer.outliers) == 1 and layer.cache["status"] == "miss"
    (out,) = layer.outliers
    assert next(n for n in layer.neurons if n.index == out).rank == 1
    for n in layer.neurons:
        assert (len(n.sams) == TINY.signals) == (n.index in {1, out}), n.index
    again = run_dora(model, ["act"], params=TINY, contamination=0.25, device="cpu", cache_dir=tmp_path,
                     keep={"act": {1}}, progress=False)
    assert again.layers[0].cache["status"] == "hit"
    assert again.layers[0].neurons == layer.neurons  # same scores, ranks, map and images from the cache


class _RedLayer(torch.nn.Module):
    """A hand-set 1×1 conv layer: K − 1 noisy copies of a red detector and, last, one blue detector."""

    def __init__(self, K=12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, K, 1)
        self.act = torch.nn.ReLU()
        with torch.no_grad():
            w = torch.tensor([1.0, -0.5, -0.5]).repeat(K, 1) + 0.15 * torch.randn(K, 3, generator=g)
            w[K - 1] = torch.tensor([-0.5, -0.5, 1.0])
            self.conv.weight.copy_(w.view(K, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.act(self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("K", [12, 24])
def test_a_planted_odd_neuron_is_the_only_outlier(K):
    """Truth by construction: one blue detector among red ones. Default settings except a small, fast budget."""
    from auditor.dora import run_dora

    result = run_dora(_RedLayer(K).eval(), ["act"], params=SamsParams(size=16, steps=24, signals=1, lr=0.2),
                      device="cpu", progress=False)
    layer = result.layers[0]
    assert layer.outliers == [K - 1]
    assert layer.n_neighbors == min(20, (K - 1) // 2)
