"""Public entry points: explain(), auroc(), auroc_vector(), mannwhitney().

The CPU path (device "cpu", backend "scipy"/"auto") runs on numpy and scipy alone
and never imports torch; torch is imported only for CUDA, for the torch backend,
and when the caller passes tensors (then it is imported already).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from ..errors import ConfigError, DataError
from ._formula import evaluate_columns, formula_text, map_leaves
from ._labels import DeviceLabels, as_label_matrix
from ._ranks import rank2_numpy
from ._search import ChunkSearch, Entry, _Bits, auroc_from_sums
from ._stats import benjamini_hochberg, mwu_from_ranksums
from ._types import Formula, InvertParams, NeuronExplanation

# ----------------------------------------------------------------------------- inputs


def _is_tensor(x) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch: a tensor implies it is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _dev_type(dev) -> str:
    return dev.split(":")[0] if isinstance(dev, str) else dev.type


def _as_activations(activations) -> np.ndarray:
    if _is_tensor(activations):
        torch = sys.modules["torch"]
        t = activations.detach()
        if t.dtype == torch.bfloat16:
            t = t.float()
        a = t.cpu().numpy()
    else:
        a = np.asarray(activations)
    if a.ndim != 2:
        raise DataError(f"activations must be a 2-D (images x neurons) array, got shape {a.shape}")
    if a.dtype.kind not in "biuf":
        raise DataError(f"activations must be numeric, got dtype {a.dtype}")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype.kind in "iu" and a.dtype not in (np.int8, np.uint8, np.int16, np.int32, np.int64):
        a = a.astype(np.float64)  # e.g. uint32: not every torch device sorts it
    if a.shape[0] < 2:
        raise DataError(f"activations need at least 2 images (rows), got shape {a.shape}")
    return a


def _scan(a: np.ndarray, rows, cols: np.ndarray) -> np.ndarray:
    """One pass over a[:, cols] in row blocks: raises DataError on NaN (any row);
    returns the 'constant on the given rows' (dead) flag of each column."""
    N = a.shape[0]
    all_cols = len(cols) == a.shape[1] and np.array_equal(cols, np.arange(a.shape[1]))
    keep = None
    if rows is not None:
        keep = np.zeros(N, dtype=bool)
        keep[rows] = True
    lo = hi = None
    nan = np.zeros(len(cols), dtype=bool)
    step = max(1, (1 << 22) // max(1, len(cols)))
    for s in range(0, N, step):
        blk = a[s : s + step]
        if not all_cols:
            blk = blk[:, cols]
        if a.dtype.kind == "f":
            nan |= np.isnan(blk).any(axis=0)
        if keep is not None:
            blk = blk[keep[s : s + step]]
            if not len(blk):
                continue
        bmin, bmax = blk.min(axis=0), blk.max(axis=0)
        lo = bmin if lo is None else np.minimum(lo, bmin)
        hi = bmax if hi is None else np.maximum(hi, bmax)
    if nan.any():
        j = int(nan.argmax())
        row = int(np.isnan(a[:, cols[j]]).argmax())
        raise DataError(f"activations of neuron {int(cols[j])} contain NaN (first at row {row})")
    return lo == hi


def _resolve_device(params: InvertParams):
    """(device, backend): the device is the string "cpu" on the numpy path, else a torch.device."""
    backend = params.backend
    if backend == "auto":
        backend = "scipy" if params.device == "cpu" else "torch"
    if params.device == "cpu" and backend == "scipy":
        return "cpu", backend
    import torch

    if params.device == "cpu":
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise ConfigError(f"invert.device is {params.device!r} but CUDA is not available; use device 'cpu'")
        dev = torch.device(params.device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"invert.device is {params.device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev, backend


def _inputs(activations, labels, concepts):
    a = _as_activations(activations)
    concepts = list(concepts) if concepts is not None else None
    lm = as_label_matrix(labels, concepts)
    if lm.N != a.shape[0]:
        raise DataError(
            f"labels have shape {lm.shape} but activations have shape {a.shape}: "
            "both need one row per image"
        )
    if concepts is not None and len(concepts) != lm.C:
        raise DataError(f"{len(concepts)} concept names given for labels with {lm.C} columns (shape {lm.shape})")
    return a, lm, concepts


def _transposed_block(a: np.ndarray, rows, cols: np.ndarray) -> np.ndarray:
    """a[rows][:, cols].T as a contiguous (k, n) array, copied in row blocks."""
    n = a.shape[0] if rows is None else len(rows)
    out = np.empty((len(cols), n), dtype=a.dtype)
    contiguous = len(cols) and cols[-1] - cols[0] == len(cols) - 1
    csel = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
    step = 2048
    for s in range(0, n, step):
        r = slice(s, s + step) if rows is None else rows[s : s + step]
        out[:, s : s + step] = a[r][:, csel].T if rows is not None else a[r, csel].T
    return out


def _gathered_block(a: np.ndarray, rows, cols: np.ndarray) -> np.ndarray:
    """a[rows][:, cols] as a contiguous (n, k) array, copied in row blocks (so a memmap
    is read chunk by chunk, never copied whole)."""
    n = a.shape[0] if rows is None else len(rows)
    out = np.empty((n, len(cols)), dtype=a.dtype)
    contiguous = len(cols) and cols[-1] - cols[0] == len(cols) - 1
    csel = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
    step = max(1, (1 << 24) // max(1, a.shape[1] * a.itemsize))
    for s in range(0, n, step):
        r = slice(s, s + step) if rows is None else rows[s : s + step]
        out[s : s + step] = a[r][:, csel] if rows is not None else a[r, csel]
    return out


def _rank_block(a: np.ndarray, rows, cols, dev, on_host: bool | None = None):
    """Doubled mid-ranks (k, n_rows) and tie terms (k,) of a[rows][:, cols]: numpy
    arrays when ranked on the host (the CPU), tensors on ``dev`` when ranked there
    with torch (a GPU; ``on_host=False`` forces that path)."""
    if on_host if on_host is not None else _dev_type(dev) == "cpu":
        return rank2_numpy(_transposed_block(a, rows, cols))
    import torch

    from ._ranks import rank2_torch

    # on a GPU: upload the (n, k) block as it is and transpose there
    t = torch.from_numpy(_gathered_block(a, rows, cols)).to(dev, non_blocking=False)
    return rank2_torch(t.T.contiguous())


@contextmanager
def _torch_threads(dev, backend: str):
    """One torch thread for the torch backend on the CPU: torch's elementwise ops lose
    far more to thread hand-offs on a busy 2-core machine than they gain from a second
    thread. (The numpy path needs nothing.)"""
    if backend != "torch" or _dev_type(dev) != "cpu":
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _chunk_size(params: InvertParams, N: int, C: int, K: int, backend: str, dev) -> int:
    if params.chunk_neurons is not None:
        return params.chunk_neurons
    B = params.beam
    # two chunks' ranks live at once (prefetch); beams; candidate arrays (k, B, C, 4)
    per = N * (96 + 2 * B + (24 * B if backend == "torch" else 0)) + 512 * B * C + 1
    budget = params.memory_mb if params.memory_mb is not None else (8192 if _dev_type(dev) == "cuda" else 1024)
    return int(max(1, min(K, (budget << 20) // per)))


# ----------------------------------------------------------------------------- explain


def heldout_split(N: int, heldout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(search rows, held-out rows), sorted: the split :func:`explain` uses for ``heldout``/``seed``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    n_hold = min(N - 2, max(2, int(round(heldout * N))))
    if n_hold < 2 or N - n_hold < 2:
        raise DataError(f"heldout={heldout} leaves too few images in a split (N={N})")
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def explain(
    activations,
    labels,
    concepts: Sequence[str],
    params: InvertParams = InvertParams(),
    neurons: Sequence[int] | None = None,
    progress: bool = False,
) -> list[NeuronExplanation]:
    """INVERT explanations for every neuron (column) of ``activations``.

    activations: (N, K) array or tensor; labels: (N, C) boolean (dense, 0/1 integers,
    or scipy/torch sparse); concepts: C names. Returns one NeuronExplanation per
    requested neuron, in the order requested.
    """
    return explain_modes(activations, labels, concepts, [params], neurons, progress)[0]


_SHARED = ("heldout", "seed", "device", "backend", "memory_mb", "chunk_neurons")


def explain_modes(
    activations,
    labels,
    concepts: Sequence[str],
    params_list: Sequence[InvertParams],
    neurons: Sequence[int] | None = None,
    progress: bool = False,
) -> list[list[NeuronExplanation]]:
    """:func:`explain` once per ``InvertParams`` of ``params_list`` (e.g. the positive and the
    negative search), from one pass over the activations: each chunk of neurons is read and
    ranked once and searched with every parameter set. The results equal separate
    :func:`explain` calls (Benjamini-Hochberg runs per parameter set). The parameter sets
    must agree on heldout, seed, device, backend, memory_mb and chunk_neurons.
    """
    params_list = list(params_list)
    if not params_list:
        raise ConfigError("params_list is empty: give at least one InvertParams")
    for params in params_list:
        if not isinstance(params, InvertParams):
            raise ConfigError(f"params must be an InvertParams, got {type(params).__name__}")
    params = params_list[0]
    for other in params_list[1:]:
        for name in _SHARED:
            if getattr(other, name) != getattr(params, name):
                raise ConfigError(f"explain_modes: every parameter set needs the same {name} "
                                  f"({getattr(params, name)!r} vs {getattr(other, name)!r})")
    a, lm, concepts = _inputs(activations, labels, concepts)
    if concepts is None:
        raise DataError("concept names are required")
    N, K = a.shape
    if neurons is None:
        order = np.arange(K)
    else:
        order = np.asarray(list(neurons))
        if order.ndim != 1 or (order.size and order.dtype.kind not in "iu"):
            raise ConfigError(f"neurons must be a list of integer indices, got {neurons!r}")
        bad = order[(order < 0) | (order >= K)]
        if bad.size:
            raise ConfigError(f"neuron index {int(bad[0])} out of range [0, {K})")
        order = order.astype(np.int64)
    dev, backend = _resolve_device(params)
    uniq = np.unique(order)

    # ---- split
    search_rows = hold_rows = None
    lm_s, lm_h = lm, None
    if params.heldout is not None:
        search_rows, hold_rows = heldout_split(N, params.heldout, params.seed)
        lm_s, lm_h = lm.rows(search_rows), lm.rows(hold_rows)
    Ns = lm_s.N

    # ---- NaN check, dead neurons (constant on the search split)
    dead = _scan(a, search_rows, uniq)
    live = uniq[~dead]

    dl = DeviceLabels(lm_s, dev, need_matrix=True) if backend == "torch" else None
    chunk = min(_chunk_size(p, Ns, lm.C, len(live), backend, dev) for p in params_list)
    all_results: list[dict[int, NeuronExplanation]] = [
        {int(i): NeuronExplanation(int(i), "dead", [], None) for i in uniq[dead]} for _ in params_list]
    chunks = [live[s : s + chunk] for s in range(0, len(live), chunk)]
    bits = _Bits(lm_s)  # packed label columns, shared by the chunks
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(live), desc="INVERT", unit="neuron", file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    def prepare(cols):
        """Ranks of one chunk (search split on dev, held-out split on the host)."""
        r2, tie = _rank_block(a, search_rows, cols, dev)
        if backend == "torch" and isinstance(r2, np.ndarray):  # the torch backend on the CPU
            import torch

            r2, tie = torch.from_numpy(r2), torch.from_numpy(tie)
        hold = None
        if lm_h is not None:
            r2h, tieh = _rank_block(a, hold_rows, cols, "cpu")
            hold = (r2h, tieh, lm_h)
        return r2, tie, hold

    # On the CPU the next chunk is ranked in a background thread while this one is
    # searched (numpy's sort and ufunc loops release the GIL); on a GPU ranking is cheap.
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit if _dev_type(dev) == "cpu" else _Done
        nxt = run(prepare, chunks[0]) if chunks else None
        done = 0
        for i, cols in enumerate(chunks):
            r2, tie, hold = nxt.result()
            nxt = run(prepare, chunks[i + 1]) if i + 1 < len(chunks) else None
            for p, results in zip(params_list, all_results):
                with _torch_threads(dev, backend):
                    search = ChunkSearch(r2, dl, lm_s, p, backend, bits)
                    final, history = search.run(p.length, p.all_lengths)
                del search
                conv = _Converter(concepts, Ns, _host(tie), p.alternative, hold, final, history)
                for j, neuron in enumerate(cols):
                    formulas = conv.formulas(final[j])
                    beams = [conv.formulas(h[j]) for h in history] if history is not None else None
                    results[int(neuron)] = NeuronExplanation(int(neuron), "ok", formulas, beams)
            del r2
            done += len(cols)
            if bar is not None:
                bar.update(len(cols))
            elif progress:
                print(f"INVERT: {done}/{len(live)} neurons", file=sys.stderr)
    if bar is not None:
        bar.close()

    return [_bh(results, order) for results in all_results]


def _bh(results: dict[int, NeuronExplanation], order: np.ndarray) -> list[NeuronExplanation]:
    """Benjamini-Hochberg across neurons (best formula of each ok neuron); results in ``order``."""
    keys = [i for i in results if results[i].status == "ok" and results[i].formulas]
    if keys:
        padj = benjamini_hochberg([results[i].formulas[0].p_value for i in keys])
        for i, q in zip(keys, padj):
            r = results[i]
            best = dataclasses.replace(r.formulas[0], p_adjusted=None if math.isnan(q) else float(q))
            formulas = [best] + r.formulas[1:]
            beams = r.beams
            if beams is not None and beams and beams[-1] and beams[-1][0] is r.formulas[0]:
                beams = beams[:-1] + [[best] + beams[-1][1:]]
            results[i] = dataclasses.replace(r, formulas=formulas, beams=beams)
    return [results[int(i)] for i in order]


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


class _Done:
    """A finished 'future': runs the call at once (same interface as Executor.submit)."""

    def __init__(self, fn, *args):
        self._value = fn(*args)

    def result(self):
        return self._value


def _opt(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


class _Converter:
    """Entries (index trees + rank sums) of a chunk's neurons -> Formula objects,
    with p-values computed for all of them in one vectorised call."""

    def __init__(self, concepts, N, tie, alternative, hold, final, history):
        self.concepts, self.N, self.alt = concepts, N, alternative
        self.cache: dict[int, Formula] = {}
        todo: dict[int, tuple[int, Entry]] = {}
        for lists in [final] + (history or []):
            for j, row in enumerate(lists):
                for e in row:
                    todo.setdefault(id(e), (j, e))
        if not todo:
            return
        js = np.array([j for j, _ in todo.values()], dtype=np.int64)
        ents = [e for _, e in todo.values()]
        S = np.array([e.S for e in ents])
        n = np.array([e.n for e in ents])
        p, lp = mwu_from_ranksums(S, n, float(N), tie[js], alternative)
        auc = auroc_from_sums(S, n, float(N))
        hp = [(None, None, None)] * len(ents)
        if hold is not None:
            hp = self._heldout(hold, js, ents)
        for i, e in enumerate(ents):
            names = map_leaves(e.ast, lambda c: concepts[c])
            self.cache[id(e)] = Formula(
                ast=names,
                text=formula_text(names),
                length=int(e.length),
                auroc=float(auc[i]),
                fraction=float(e.n / N),
                support=int(e.n),
                p_value=float(p[i]),
                log10_p=float(lp[i]),
                heldout_auroc=hp[i][0],
                heldout_p_value=hp[i][1],
                heldout_log10_p=hp[i][2],
                ast_columns=e.ast,
            )

    def formulas(self, entries: list[Entry]) -> list[Formula]:
        return [self.cache[id(e)] for e in entries]

    def _heldout(self, hold, js, ents):
        r2h, tieh, lm_h = hold
        Nh = lm_h.N
        S, n = np.empty(len(ents)), np.empty(len(ents))
        for i, (j, e) in enumerate(zip(js, ents)):
            y = evaluate_columns(e.ast, lm_h.column)
            S[i] = r2h[j][y].sum()
            n[i] = y.sum()
        p, lp = mwu_from_ranksums(S, n, float(Nh), tieh[js], self.alt)
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = auroc_from_sums(S, n, float(Nh))
        auc = np.where((n > 0) & (n < Nh), auc, np.nan)
        return [(_opt(a_), _opt(p_), _opt(l_)) for a_, p_, l_ in zip(auc, p, lp)]


# ----------------------------------------------------------------------------- helpers


def auroc(activations, labels, *, chunk_neurons: int | None = None) -> np.ndarray:
    """Exact mid-rank AUROC of every neuron against every label column: (K, C).

    NaN where a column has no positives or no negatives. Labels may be dense or sparse.
    """
    a, lm, _ = _inputs(activations, labels, None)
    N, K = a.shape
    _scan(a, None, np.arange(K))
    out = np.empty((K, lm.C))
    n = lm.n_pos.astype(np.float64)
    step = chunk_neurons or max(1, min(K, (256 << 20) // (64 * N + 8 * lm.C + 1)))
    yt = lm.csr.T.tocsr()
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in range(0, K, step):
            r2, _ = rank2_numpy(_transposed_block(a, None, np.arange(s, min(K, s + step))))
            S = np.asarray(yt @ r2.T).T  # (k, C)
            out[s : s + step] = auroc_from_sums(S, n, float(N))
    out[:, (lm.n_pos == 0) | (lm.n_pos == N)] = np.nan
    return out


def _vector_pair(a, y):
    a = np.asarray(a.detach().cpu().numpy() if _is_tensor(a) else a)
    y = np.asarray(y.detach().cpu().numpy() if _is_tensor(y) else y)
    if a.ndim != 1 or y.ndim != 1 or a.shape != y.shape:
        raise DataError(f"expected two 1-D arrays of one length, got shapes {a.shape} and {y.shape}")
    if y.dtype != np.bool_:
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            i = int(bad.argmax())
            raise DataError(f"labels have value {y[i].item()!r} at row {i}; expected boolean or 0/1 values")
        y = y != 0
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise DataError(f"activations contain NaN (first at row {int(np.isnan(a).argmax())})")
    return a, y


def auroc_vector(a, y) -> float:
    """Exact mid-rank AUROC of scores ``a`` against boolean ``y`` (NaN if degenerate)."""
    a, y = _vector_pair(a, y)
    n = int(y.sum())
    N = len(y)
    if n == 0 or n == N:
        return math.nan
    r2, _ = rank2_numpy(a[None, :])
    return float(auroc_from_sums(float(r2[0][y].sum()), float(n), float(N)))


def mannwhitney(a, y, alternative: str = "two-sided") -> tuple[float, float]:
    """Mann-Whitney U test of ``a[y]`` against ``a[~y]``: (p_value, log10_p).

    Matches ``scipy.stats.mannwhitneyu(a[y], a[~y], alternative=...)`` with default
    arguments; log10_p stays finite when p underflows. NaN if a side is empty.
    """
    from ._types import ALTERNATIVES

    if alternative not in ALTERNATIVES:
        raise ConfigError(f"alternative must be one of {', '.join(map(repr, ALTERNATIVES))}, got {alternative!r}")
    a, y = _vector_pair(a, y)
    r2, tie = rank2_numpy(a[None, :])
    p, lp = mwu_from_ranksums(float(r2[0][y].sum()), float(y.sum()), float(len(y)), tie[0], alternative)
    return float(p), float(lp)


__all__ = ["explain", "heldout_split", "auroc", "auroc_vector", "mannwhitney"]
