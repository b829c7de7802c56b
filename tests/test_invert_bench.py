"""Smoke test of bench/bench_invert.py at its small scale."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_invert.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_invert", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_data_shape():
    A, Y, names = _load().make_data("small")
    assert A.shape == (5000, 64) and Y.shape == (5000, 148) and len(names) == 148
    assert (A == 0).mean() > 0.4  # ReLU-like
    leaves = Y[:, :100].toarray()
    assert (leaves.sum(1) == 1).all()  # one-hot classes
    hyper = Y[:, 100:].toarray()
    for c in range(hyper.shape[1]):  # each hypernym is an OR of whole classes
        members = np.flatnonzero(leaves[hyper[:, c]].any(0))
        assert np.array_equal(hyper[:, c], leaves[:, members].any(1))


@pytest.mark.slow
def test_bench_small_run(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = _load().main(["--scale", "small", "--repeats", "1", "--baseline-neurons", "1",
                       "--baseline-candidates", "20", "--json", str(out), "--save-dir", str(tmp_path)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["sizes"]["K"] == 64 and data["engine_s"] > 0 and data["speedup_vs_sort"] > 1
    assert "| measure | value |" in capsys.readouterr().out
    Y = sp.load_npz(tmp_path / "labels.npz")
    names = np.load(tmp_path / "labels.npz")["concepts"]
    assert Y.shape == (5000, len(names))
    assert np.load(tmp_path / "activations.npy").shape == (5000, 64)
