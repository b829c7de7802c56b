"""The data path at scale: float32 memmaps read in blocks instead of float64 copies,
no torch on the CPU path of `auditor explain`, and the pieces that made it fast.

Every test compares against an independent direct computation (the whole layer in
memory, numpy indexing, pandas' own CSV writer, a full sort)."""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from auditor import columns as colmod
from auditor import invert
from auditor.cli import main
from auditor.columns import ColumnBlocks, check_finite, compact_rows, read_columns
from auditor.errors import DataError


def _problem(seed, N=240, K=9, C=7):
    """Heavy ties (values rounded to one decimal, ReLU zeros), a dead neuron, a neuron that
    is constant on all but one row, labels with a duplicate and a complementary column."""
    rng = np.random.default_rng(seed)
    Y = rng.random((N, C)) < rng.uniform(0.1, 0.5, C)
    Y[:, -1] = ~Y[:, 0]
    Y[:, -2] = Y[:, 1]
    A = np.round(np.maximum(rng.normal(size=(N, K)), 0), 1).astype(np.float32)
    A[:, 0] += 2 * Y[:, 2]
    A[:, 3] = 0.5  # dead
    A[:, 5] = 0.0
    A[7, 5] = 1.0
    return A, Y, [f"c{i}" for i in range(C)]


@pytest.mark.parametrize("seed", range(6))
def test_chunked_memmap_equals_whole_layer_in_memory(seed, tmp_path):
    """float32 memmap, neuron chunks of 1..3 and the prefetch thread give exactly the
    results of the whole layer as one float64 array in memory (and of the torch backend)."""
    A, Y, names = _problem(seed)
    np.save(tmp_path / "a.npy", A)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    for kw in (dict(length=3, beam=3, all_lengths=True), dict(length=2, beam=2, mode="negative"),
               dict(length=2, beam=3, heldout=0.3, seed=seed)):
        whole = invert.explain(A.astype(np.float64), Y, names, invert.InvertParams(chunk_neurons=A.shape[1], **kw))
        assert [r.status for r in whole][3] == "dead"
        for chunk in (1, 2, 3):
            got = invert.explain(mm, Y, names, invert.InvertParams(chunk_neurons=chunk, **kw))
            assert got == whole
        torch_backend = invert.explain(A, Y, names, invert.InvertParams(backend="torch", chunk_neurons=4, **kw))
        assert torch_backend == whole


def test_kth_largest_without_partition_matches_a_sort():
    from auditor.invert._search import _NumpyOps

    rng = np.random.default_rng(0)
    for _ in range(200):
        k, M = int(rng.integers(1, 6)), int(rng.integers(1, 4000))
        m = int(rng.integers(1, min(M, 80) + 1))
        x = np.round(rng.normal(size=(k, M)), int(rng.integers(0, 3)))
        x[rng.random((k, M)) < rng.random()] = -np.inf
        assert np.array_equal(_NumpyOps.kth_largest(x, m), -np.sort(-x, axis=1)[:, m - 1])


def test_read_columns_and_blocks_equal_direct_indexing(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    A = rng.normal(size=(1000, 13)).astype(np.float32)
    np.save(tmp_path / "a.npy", A)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    monkeypatch.setattr(colmod, "_ROW_BYTES", 7 * 13 * 4)  # slabs of 7 rows
    for cols in ([0], [3, 4, 5], [12, 1, 7], list(range(13))):
        got = read_columns(mm, sorted(cols))
        assert got.dtype == np.float64 and got.flags.c_contiguous
        assert np.array_equal(got, A[:, sorted(cols)].T.astype(np.float64))
    monkeypatch.setattr(colmod, "DEFAULT_BLOCK_MB", 3 * 1000 * 8 / 2**20)  # 3 columns per block
    blocks = ColumnBlocks(mm, [11, 2, 5, 6, 0])
    assert [list(g) for g in blocks.groups] == [[0, 2, 5], [6, 11]]
    for k in (0, 2, 5, 6, 11):
        assert np.array_equal(blocks.column(k), A[:, k].astype(np.float64))
    with pytest.raises(KeyError):
        blocks.column(1)


def test_compact_rows_is_file_backed_and_exact(tmp_path):
    rng = np.random.default_rng(2)
    A = rng.normal(size=(500, 6)).astype(np.float32)
    keep = rng.random(500) < 0.8
    assert compact_rows(A, np.ones(500, bool)) is A
    got = compact_rows(A, keep, tmp_path)
    assert isinstance(got, np.memmap) and got.dtype == np.float32
    assert np.array_equal(np.asarray(got), A[keep])
    assert list(tmp_path.iterdir()) == []  # the backing file is unlinked at once


def test_check_finite_names_row_and_column():
    A = np.zeros((100, 4), dtype=np.float32)
    check_finite(A, "activations x")
    A[61, 2] = np.inf
    with pytest.raises(DataError, match=r"activations x contain NaN or infinite values \(first at row 61, column 2\)"):
        check_finite(A, "activations x")


def test_neuron_results_in_blocks_equal_whole_columns(monkeypatch):
    """Per-neuron statistics, artifact AUROCs and their DeLong intervals from 2-column blocks of
    a float32 array equal those computed on the whole float64 layer."""
    from auditor.pipeline import neuron_results

    A, Y, names = _problem(3, N=400, K=7)
    explained = invert.explain(A, Y, names, invert.InvertParams(length=2, beam=2))
    whole = neuron_results(A.astype(np.float64), explained, Y, names, ["c2", "c4"])
    monkeypatch.setattr(colmod, "DEFAULT_BLOCK_MB", 2 * 400 * 8 / 2**20)
    blocked = neuron_results(A, explained, Y, names, ["c2", "c4"])
    import dataclasses

    for got, want in zip(blocked, whole):
        # DeLong intervals are vectorised over the columns given: the last bits may differ by block shape
        for art, ci in want.artifact_auroc_ci.items():
            assert got.artifact_auroc_ci[art] == pytest.approx(ci, rel=1e-12, abs=1e-14)
        assert dataclasses.replace(got, artifact_auroc_ci={}) == dataclasses.replace(want, artifact_auroc_ci={})
    ref = invert.auroc(A.astype(np.float64), Y[:, [2, 4]])
    for n in blocked:
        assert [n.artifact_auroc["c2"], n.artifact_auroc["c4"]] == list(ref[n.index])
        assert n.stats["mean"] == A[:, n.index].astype(np.float64).mean()


def test_paired_effects_in_blocks_equal_whole(monkeypatch):
    from auditor.paired import paired_effects_by_artifact
    from auditor.pipeline import _paired_in_blocks

    rng = np.random.default_rng(4)
    A = np.round(rng.normal(size=(300, 8)), 1).astype(np.float32)
    pairs = {"wm": np.stack([np.arange(0, 120), np.arange(150, 270)], 1), "txt": np.zeros((0, 2), int)}
    clean = np.arange(150)
    want = paired_effects_by_artifact(A.astype(np.float64), pairs, ["wm", "txt"], clean)
    monkeypatch.setattr(colmod, "DEFAULT_BLOCK_MB", 3 * 300 * 8 / 2**20)
    got = _paired_in_blocks(A, pairs, ["wm", "txt"], clean)
    assert got.keys() == want.keys() == {"wm"}
    for key in want["wm"]:
        assert np.array_equal(got["wm"][key], want["wm"][key]), key
    assert _paired_in_blocks(A, {"txt": np.zeros((0, 2), int)}, ["txt"], clean) == {}


def test_csv_writer_writes_what_pandas_wrote():
    import pandas as pd

    from auditor.report import tables
    from report_fixtures import make_result

    result = make_result()
    df = tables.neurons_table(result)
    for col in ("layer", "formula", "flags", "sensitive"):
        df[col] = df[col].map(tables._csv_safe)
    want = df.to_csv(index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        got = tables.write_csv(result, Path(d) / "n.csv").read_text(encoding="utf-8")
    assert got == want
    assert pd.read_csv(__import__("io").StringIO(got)).shape[0] == sum(len(l.neurons) for l in result.layers)


def _saved(tmp_path):
    rng = np.random.default_rng(0)
    N, C, K = 300, 6, 5
    Y = rng.random((N, C)) < 0.2
    A = np.maximum(rng.normal(size=(N, K)), 0).astype(np.float32)
    A[:, 0] += 3.0 * Y[:, 4]
    names = ["a", "b", "c", "d", "wm", "f"]
    np.save(tmp_path / "acts.npy", A)
    np.savez(tmp_path / "labels.npz", labels=Y, concepts=np.array(names))
    return A, Y, names


def test_explain_imports_no_torch(tmp_path):
    """The CPU path of `auditor explain` (and of auditor.invert) never imports torch."""
    _saved(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from auditor.cli import main
        rc = main(["explain", "--activations", {str(tmp_path / 'acts.npy')!r}, "--labels",
                   {str(tmp_path / 'labels.npz')!r}, "--artifacts", "wm", "--out", {str(tmp_path / 'out')!r},
                   "--formats", "json,csv", "-q"])
        assert rc in (0, 1), rc  # 1: a neuron flagged for wm (fail_on_flag)
        assert "torch" not in sys.modules, "torch was imported"
        assert "pandas" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["layers"][0]["neurons"]


def test_explain_neurons_subset_equals_the_full_run(tmp_path, capsys):
    A, Y, names = _saved(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["explain", "--activations", str(tmp_path / "acts.npy"), "--labels", str(tmp_path / "labels.npz"),
            "--artifacts", "wm", "--length", "2", "--beam", "2", "--formats", "json", "-q"]
    assert main(args + ["--out", str(full)]) in (0, 1)  # 1: flagged (fail_on_flag)
    assert main(args + ["--out", str(part), "--neurons", "3:5,0"]) in (0, 1)
    f = json.loads((full / "results.json").read_text())["layers"][0]["neurons"]
    p = json.loads((part / "results.json").read_text())["layers"][0]["neurons"]
    assert [n["index"] for n in p] == [0, 3, 4]
    for n in p:  # p_adjusted is over the neurons explained, so compare the rest
        want = f[n["index"]]
        for key in ("status", "stats", "artifact_auroc", "artifact_auroc_ci"):
            assert n[key] == want[key]
        assert [e["formula"] for e in n["explanations"]] == [e["formula"] for e in want["explanations"]]
    rc = main(args + ["--out", str(tmp_path / "bad"), "--neurons", "2:9"])
    assert rc == 2 and "--neurons '2:9'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
def test_cuda_from_a_memmap_in_chunks_equals_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    A, Y, names = _problem(11, N=600, K=10)
    np.save(tmp_path / "a.npy", A)
    mm = np.load(tmp_path / "a.npy", mmap_mode="r")
    cpu = invert.explain(A, Y, names, invert.InvertParams(length=3, beam=3))
    for chunk in (3, 10):
        got = invert.explain(mm, Y, names, invert.InvertParams(length=3, beam=3, device="cuda", chunk_neurons=chunk))
        assert got == cpu


def test_topk_packed_key_selects_what_two_stable_sorts_select():
    """The streaming top-k's one-topk selection equals the reference order (value desc, ties
    by the lower probe index) on ties, -0.0, infinities and half precision."""
    torch = pytest.importorskip("torch")
    from auditor.collect.topk import _top_rows

    def reference(values, idx, k):
        order = torch.argsort(idx, dim=0, stable=True)
        order = torch.gather(order, 0, torch.argsort(-torch.gather(values, 0, order), dim=0, stable=True))
        return order[:k]

    g = torch.Generator().manual_seed(0)
    for t in range(150):
        n, K = int(torch.randint(1, 300, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        v = torch.round(torch.randn(n, K, generator=g) * 3) / 2
        v[torch.rand(n, K, generator=g) < 0.3] = 0.0
        v[torch.rand(n, K, generator=g) < 0.1] = -0.0
        v[torch.rand(n, K, generator=g) < 0.05] = float("inf")
        v[torch.rand(n, K, generator=g) < 0.05] = -float("inf")
        if t % 3 == 0:
            v = v.half()
        idx = torch.randperm(10_000, generator=g)[:n].view(-1, 1).expand(n, K).clone()
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        got, want = _top_rows(v, idx, k), reference(v, idx, k)
        assert torch.equal(got, want), t
    v64 = torch.randn(50, 3, dtype=torch.float64, generator=g)  # float64: the two-sort path
    idx = torch.arange(50).view(-1, 1).expand(50, 3)
    assert torch.equal(_top_rows(v64, idx, 7), reference(v64, idx, 7))


@pytest.mark.parametrize("seed", range(3))
def test_explain_modes_equals_separate_calls(seed):
    """Both directions from one ranking pass give exactly what two explain calls give."""
    A, Y, names = _problem(seed)
    for kw in (dict(length=3, beam=3), dict(length=2, beam=2, heldout=0.3, seed=seed)):
        pos = invert.InvertParams(chunk_neurons=2, **kw)
        neg = invert.InvertParams(mode="negative", alternative="less", chunk_neurons=2, **kw)
        both = invert.explain_modes(A, Y, names, [pos, neg], neurons=[8, 0, 3, 5])
        assert both == [invert.explain(A, Y, names, pos, neurons=[8, 0, 3, 5]),
                        invert.explain(A, Y, names, neg, neurons=[8, 0, 3, 5])]
    with pytest.raises(Exception, match="same heldout"):
        invert.explain_modes(A, Y, names, [invert.InvertParams(), invert.InvertParams(heldout=0.5)])
