"""The batched INVERT beam search for a chunk of neurons.

Everything that decides the result is computed from exact integers held in
float64: doubled mid-rank sums S (sum of 2*rank over a labeling) and support
counts n. For a labeling with n positives out of N,

    AUROC = (S - n(n+1)) / (2 n (N - n))

is one correctly rounded IEEE division of two exact integers, so it is the same
float on every device and in the brute-force reference.

One beam step for the whole chunk (k neurons, beam B, C concepts):

    S(f AND c) = (r2 * f)^T Y          n(f AND c) = f^T Y      (one product)
    S(f AND ~c) = S(f) - S(f AND c)    S(f OR c) = S(f) + S(c) - S(f AND c)
    S(f OR ~c) = S_all - S(c) + S(f AND c)

The scipy backend forms the product over the support of f (or of NOT f, whichever
is smaller): a sparse (kB x N) @ sparse (N x C) product whose cost is the number of
label entries in those rows; doubled ranks and counts travel together as the real
and imaginary parts of one complex product. The torch backend (CUDA) multiplies the
sparse Y^T by a dense (N x 2kB) matrix.

Selection: per neuron, the candidates with the m best keys are pulled to the host
(m = 4B + 8; all of the neuron's candidates if duplicates exhaust them), sorted by
(key desc, length asc, enumeration order asc) and walked; a candidate whose
labeling equals one already taken is skipped. Only candidates with equal (n, S)
can be equal, so labelings are materialised (as packed bits) for those alone.

The scipy backend runs on numpy alone (the CPU path imports no torch); the torch
backend runs the same steps on torch tensors through :class:`_TorchOps`. Both
perform the same IEEE float64 operations on exact integers, so their results are
identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._labels import LabelMatrix

AND, OR = 0, 1
_BLOCK = 32
_OPS = ("and", "or")


@dataclass
class Entry:
    """A formula in a beam: index tree, length, doubled rank sum, support."""

    ast: object
    length: int
    S: float
    n: float


def auroc_from_sums(S, n, N):
    """AUROC from doubled rank sums (floats, numpy arrays or tensors)."""
    return (S - n * (n + 1)) / (2 * n * (N - n))


def count_bounds(N: int, min_fraction: float, max_fraction: float) -> tuple[int, int]:
    """[lo, hi]: the supports n with 0 < n < N and min_fraction <= n/N <= max_fraction,
    decided with the same float division n / N that a direct check would use."""
    frac = np.arange(N + 1, dtype=np.float64) / float(N)
    ok = (frac >= min_fraction) & (frac <= max_fraction)
    ok[0] = ok[N] = False
    where = np.flatnonzero(ok)  # n/N is monotone in n, so this is a range
    if len(where) == 0:
        return 1, 0
    return int(where[0]), int(where[-1])


def _decode(e, Pc):
    """Expansion offset -> (beam position, pool position, negated, op)."""
    op = e & 1
    sign = (e >> 1) & 1
    bp = e >> 2
    return bp // Pc, bp % Pc, sign, op


def pack_bits_torch(lab):
    """Pack the last axis of a bool tensor into uint8 like np.packbits (MSB first)."""
    import torch

    *lead, N = lab.shape
    x = torch.nn.functional.pad(lab.to(torch.int32), (0, (-N) % 8)).reshape(*lead, -1, 8)
    w = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=lab.device)
    return (x * w).sum(-1).to(torch.uint8)


class _Bits:
    """Labelings as packed bits on the host (np.packbits layout, N bits per row)."""

    def __init__(self, lm: LabelMatrix):
        self.lm = lm
        self.mask = np.packbits(np.ones(lm.N, dtype=bool))
        self.cache: dict[int, np.ndarray] = {}

    def col(self, c: int, negated: bool = False) -> np.ndarray:
        b = self.cache.get(c)
        if b is None:
            b = self.cache[c] = np.packbits(self.lm.column(c))
        return (~b & self.mask) if negated else b

    def cols(self, cs: np.ndarray, negated: np.ndarray) -> np.ndarray:
        """Packed columns (len(cs), NB), each negated where ``negated``."""
        out = np.stack([self.col(int(c)) for c in cs]) if len(cs) else np.zeros((0, len(self.mask)), np.uint8)
        neg = np.asarray(negated, dtype=bool)
        out[neg] = ~out[neg] & self.mask
        return out

    @staticmethod
    def pack(lab) -> np.ndarray:
        """np.packbits(lab, axis=-1) of a (k, B, N) bool tensor; packed on its device."""
        if lab.device.type == "cpu":
            return np.packbits(lab.numpy(), axis=-1)
        return pack_bits_torch(lab).cpu().numpy()

    @staticmethod
    def positions(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, position) of every set bit of a (R, NB) packed array, row-major."""
        r, byte = np.nonzero(packed)
        if len(r) == 0:
            return r.astype(np.int64), r.astype(np.int64)
        rr, bit = np.nonzero(np.unpackbits(packed[r, byte][:, None], axis=1))
        return r[rr].astype(np.int64), byte[rr].astype(np.int64) * 8 + bit


class _NumpyOps:
    """The array operations of the search on numpy (the CPU path: no torch import)."""

    is_torch = False
    device = "cpu"

    @staticmethod
    def host(x):
        return np.asarray(x)

    @staticmethod
    def put(x):
        return np.asarray(x)

    @staticmethod
    def array(values, dtype):
        return np.array(values, dtype={"f8": np.float64, "i8": np.int64, "b": bool}[dtype])

    @staticmethod
    def ones_bool(shape):
        return np.ones(shape, dtype=bool)

    @staticmethod
    def stack(xs, axis):
        return np.stack(xs, axis=axis)

    @staticmethod
    def cat(xs, axis):
        return np.concatenate(xs, axis=axis)

    where = staticmethod(np.where)
    abs = staticmethod(np.abs)

    @staticmethod
    def masked_fill_(x, mask, value):
        np.copyto(x, value, where=mask)
        return x

    @staticmethod
    def gather(x, axis, idx):
        return np.take_along_axis(x, idx, axis=axis)

    @staticmethod
    def expand(x, shape):
        return np.broadcast_to(x, shape)

    @staticmethod
    def argsort_stable(x):
        return np.argsort(x, axis=1, kind="stable")

    @staticmethod
    def kth_largest(x, m):
        """The m-th largest value of each row (duplicates counted), like topk(m).values[:, -1].

        np.partition is slow on these rows (many equal keys and -inf), so: the m-th
        largest of the block maxima (blocks of 32) is a lower bound t0 (m blocks hold
        a value >= it); the exact value is then found among the few values >= t0."""
        k, M = x.shape
        if M <= 4 * _BLOCK or m >= M // _BLOCK:
            return np.partition(x, M - m, axis=1)[:, M - m]
        Mb = M - M % _BLOCK
        maxes = x[:, :Mb].reshape(k, Mb // _BLOCK, _BLOCK).max(axis=2)
        if Mb < M:
            maxes = np.concatenate([maxes, x[:, Mb:].max(axis=1, keepdims=True)], axis=1)
        nb = maxes.shape[1]
        t0 = np.partition(maxes, nb - m, axis=1)[:, nb - m]
        rows, cols = np.nonzero(x >= t0[:, None])
        vals = x[rows, cols]
        o = np.lexsort((-vals, rows))  # by row, then value descending
        start = np.searchsorted(rows[o], np.arange(k), side="left")
        return vals[o[start + m - 1]]

    @staticmethod
    def nonzero(x):
        return np.nonzero(x)

    @staticmethod
    def flatnonzero(x):
        return np.flatnonzero(x)

    @staticmethod
    def repeat(x, r):
        return np.repeat(x, r)

    @staticmethod
    def long(x):
        return np.asarray(x).astype(np.int64)

    @staticmethod
    def key_inplace(S, n, N, negative):
        t = n + 1
        t *= n
        num = S
        num -= t  # S - n(n+1)
        np.subtract(float(N), n, out=t)
        t *= n
        t *= 2  # (N - n) n 2 == 2 n (N - n): products of exact integers
        num /= t
        if negative:
            np.negative(num, out=num)
        return num


class _TorchOps:
    """The same operations on torch tensors on ``device`` (the CUDA path)."""

    is_torch = True

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device

    def host(self, x):
        return x.cpu().numpy()

    def put(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def array(self, values, dtype):
        t = {"f8": self.torch.float64, "i8": self.torch.int64, "b": self.torch.bool}[dtype]
        return self.torch.tensor(values, dtype=t).to(self.device)

    def ones_bool(self, shape):
        return self.torch.ones(shape, dtype=self.torch.bool, device=self.device)

    def stack(self, xs, axis):
        return self.torch.stack(xs, dim=axis)

    def cat(self, xs, axis):
        return self.torch.cat(xs, dim=axis)

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def abs(self, x):
        return self.torch.abs(x)

    @staticmethod
    def masked_fill_(x, mask, value):
        return x.masked_fill_(mask, value)

    @staticmethod
    def gather(x, axis, idx):
        return x.gather(axis, idx)

    @staticmethod
    def expand(x, shape):
        return x.expand(*shape)

    def argsort_stable(self, x):
        return self.torch.sort(x, dim=1, stable=True).indices

    def kth_largest(self, x, m):
        return self.torch.topk(x, m, dim=1).values[:, -1]

    @staticmethod
    def nonzero(x):
        return x.nonzero(as_tuple=True)

    @staticmethod
    def flatnonzero(x):
        return x.nonzero(as_tuple=True)[0]

    @staticmethod
    def repeat(x, r):
        return x.repeat_interleave(r)

    @staticmethod
    def long(x):
        return x.long()

    def key_inplace(self, S, n, N, negative):
        t = n + 1
        t.mul_(n)
        num = S.sub_(t)  # S - n(n+1)
        self.torch.sub(float(N), n, out=t)
        t.mul_(n).mul_(2)  # (N - n) n 2 == 2 n (N - n): products of exact integers
        num.div_(t)
        return num.neg_() if negative else num


class ChunkSearch:
    """Beam search for k neurons whose doubled ranks ``r2`` (k, N) are given.

    backend "scipy": ``r2`` is a numpy array and everything runs on numpy (``dl`` may
    be None); backend "torch": ``r2`` is a tensor on its device and ``dl`` the
    :class:`~auditor.invert._labels.DeviceLabels` there."""

    def __init__(self, r2, dl, lm: LabelMatrix, params, backend: str, bits=None):
        self.r2 = r2
        self.dl = dl
        self.lm = lm
        self.p = params
        self.backend = backend
        self.ops = _TorchOps(r2.device) if backend == "torch" else _NumpyOps()
        self.dev = self.ops.device
        self.k, self.N = r2.shape
        self.S_all = float(self.N) * (self.N + 1)  # sum of all doubled ranks
        self.B = params.beam
        self.negative = params.mode == "negative"
        self.lo, self.hi = count_bounds(self.N, params.min_fraction, params.max_fraction)
        self._r2_np = r2 if backend == "scipy" else None
        self.n_pos = dl.n_pos if backend == "torch" else lm.n_pos.astype(np.float64)
        self.bits = bits if bits is not None else _Bits(lm)

    # -- products ------------------------------------------------------------------
    def _atom_sums(self):
        """S(c) for every neuron and concept: (k, C)."""
        if self.backend == "scipy":
            out = np.asarray(self.lm.csr.T @ self._r2_np.T).T
            return np.ascontiguousarray(out)
        return (self.dl.yt @ self.r2.T.contiguous()).T.contiguous()

    def _beam_products(self, beams, nf, bvalid, Sc):
        """S(f AND c), n(f AND c) for every beam formula and concept: (k, B, C) each.

        ``beams``: packed bits (k, B, NB) numpy for the scipy backend, a dense bool
        tensor (k, B, N) for the torch backend."""
        k, B = nf.shape
        N, C = self.N, self.lm.C
        if self.backend == "scipy":
            bv = bvalid
            flip = (nf * 2 > N) & bv  # use NOT f where f covers more than half
            side = beams ^ (flip[:, :, None] * self.bits.mask[None, None, :])
            side &= (bv[:, :, None] * np.uint8(255))
            rows, cols = _Bits.positions(side.reshape(k * B, -1))
            del side
            indptr = np.zeros(k * B + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows, minlength=k * B), out=indptr[1:])
            # real part: doubled ranks, imaginary part: 1 -> one product gives S and n
            data = self._r2_np[rows // B, cols] + 1j
            F = sp.csr_matrix((data, cols, indptr), shape=(k * B, N))
            P = (F @ self.lm.csr).toarray().reshape(k, B, C)
            PS = np.ascontiguousarray(P.real)
            Pn = np.ascontiguousarray(P.imag)
            del P
            fl = flip[:, :, None]
            PS = np.where(fl, Sc[:, None, :] - PS, PS)
            Pn = np.where(fl, self.n_pos[None, None, :] - Pn, Pn)
            return PS, Pn
        X = (beams & bvalid[:, :, None]).reshape(k * B, N).double()
        Xs = X * self.r2.repeat_interleave(B, dim=0)
        P = self.dl.yt @ self.ops.cat([Xs, X], 0).T.contiguous()  # (C, 2kB)
        del X, Xs
        PS = P[:, : k * B].T.reshape(k, B, C)
        Pn = P[:, k * B :].T.reshape(k, B, C)
        return PS.contiguous(), Pn.contiguous()

    # -- scoring ---------------------------------------------------------------------
    def _key(self, S, n):
        auc = auroc_from_sums(S, n, float(self.N))
        return -auc if self.negative else auc

    def _key_inplace(self, S, n):
        """_key(S, n), reusing S's memory (S is consumed); the same IEEE operations."""
        return self.ops.key_inplace(S, n, self.N, self.negative)

    def _admissible(self, n):
        return (n >= self.lo) & (n <= self.hi)

    # -- selection -------------------------------------------------------------------
    def _select(self, keym, gather, order_of, labels_of):
        """Top-B distinct labelings per neuron.

        keym: (k, M) keys, -inf where invalid. gather(rows, cols) -> (S, n, length)
        numpy arrays; order_of(cols) -> enumeration order; labels_of(rows, cols) ->
        packed labelings (len, NB). Returns per neuron a list of (col, S, n, length)
        in beam order.
        """
        ops = self.ops
        k, M = keym.shape
        B = self.B
        out: list[list[tuple]] = [[] for _ in range(k)]
        if M == 0:
            return out
        finite = keym > -np.inf
        nvalid = ops.host(finite.sum(1))
        todo = np.flatnonzero(nvalid > 0)
        m = min(M, 4 * B + 8)
        while len(todo):
            sub = ops.put(todo)
            ks, fs = keym[sub], finite[sub]
            thr = ops.kth_largest(ks, m)
            r, cols = ops.nonzero(fs & (ks >= thr[:, None]))
            rows = sub[r]
            key = ops.host(keym[rows, cols])
            S, n, length = gather(rows, cols)
            rows, cols = ops.host(rows), ops.host(cols)
            chosen = self._choose(rows, cols, key, S, n, length, order_of(cols), labels_of)
            considered = np.bincount(rows, minlength=k)
            got = np.bincount(rows[chosen], minlength=k)
            for i in chosen:
                out[rows[i]].append((int(cols[i]), float(S[i]), float(n[i]), int(length[i])))
            # neurons whose candidates were used up by duplicates: take more of theirs
            short = todo[(got[todo] < B) & (considered[todo] < nvalid[todo])]
            for j in short:
                out[j] = []
            todo = short
            m = min(M, m * 8)
        return out

    def _choose(self, rows, cols, key, S, n, length, order, labels_of):
        """Vectorised walk: indices of the chosen candidates, in (row, rank) order.

        Sorted by (row, key desc, length, order); a candidate whose labeling equals
        an earlier one of its row is dropped; each row keeps its first B.

        Only a candidate with the same (row, n, S) as an earlier one (a "suspect")
        can be a duplicate, and only suspects ranked before the row's B-th
        non-suspect can change the outcome: labelings are materialised for those
        and for the earlier members of their signature groups alone.
        """
        B = self.B
        L = len(rows)
        o = np.lexsort((order, length, -key, rows))
        rows_o, n_o, S_o = rows[o], n[o], S[o]
        pos = np.arange(L)
        row_start = np.searchsorted(rows_o, rows_o, side="left")
        g = np.lexsort((pos, S_o, n_o, rows_o))  # signature groups, members in rank order
        same = (rows_o[g][1:] == rows_o[g][:-1]) & (n_o[g][1:] == n_o[g][:-1]) & (S_o[g][1:] == S_o[g][:-1])
        suspect = np.zeros(L, dtype=bool)
        suspect[g[1:][same]] = True
        gid = np.empty(L, dtype=np.int64)
        gid[g] = np.cumsum(np.r_[True, ~same])
        # each row considers positions before its B-th non-suspect (or its end)
        sure = ~suspect
        cs = np.cumsum(sure)
        sure_rank = cs - 1 - (cs - sure)[row_start]  # rank among the row's non-suspects
        hit = np.flatnonzero(sure & (sure_rank == B - 1))
        row_end = np.searchsorted(rows_o, rows_o, side="right")
        lim = np.zeros(L, dtype=np.int64)
        lim[row_start] = row_end[row_start]
        lim[row_start[hit]] = hit + 1
        limit = lim[row_start]
        relevant = suspect & (pos < limit)
        dup = np.zeros(L, dtype=bool)
        if relevant.any():
            groups = np.zeros(int(gid.max()) + 1, dtype=bool)
            groups[gid[relevant]] = True
            need = np.flatnonzero(groups[gid] & (pos < limit))
            labs = np.ascontiguousarray(labels_of(rows[o[need]], cols[o[need]]))
            as_void = labs.view(np.dtype((np.void, labs.shape[1]))).ravel()
            _, lid = np.unique(as_void, return_inverse=True)
            pair = rows_o[need].astype(np.int64) * (int(lid.max()) + 1) + lid.ravel()
            _, first = np.unique(pair, return_index=True)  # earliest position of each (row, labeling)
            d = np.ones(len(need), dtype=bool)
            d[first] = False
            dup[need] = d
        keep = np.flatnonzero(~dup & (pos < limit))
        kr = rows_o[keep]
        rank = np.arange(len(keep)) - np.searchsorted(kr, kr, side="left")
        return o[keep[rank < B]]

    # -- the search ------------------------------------------------------------------
    def run(self, L: int, keep_all: bool):
        """Returns (final beams, beams per length or None): lists over the k neurons of
        lists of :class:`Entry`."""
        # 0/0 keys of inadmissible candidates (n = 0, padded beams) are masked out
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._run(L, keep_all)

    def _run(self, L: int, keep_all: bool):
        k, N, B = self.k, self.N, self.B
        ops = self.ops
        nc = self.n_pos  # (C,) float64
        C = len(nc)
        Sc = self._atom_sums()  # (k, C)
        cvalid = (nc > 0) & (nc < N)

        # ---- length 1: atoms in order (c0, NOT c0, c1, NOT c1, ...)
        S1 = ops.stack([Sc, self.S_all - Sc], 2).reshape(k, 2 * C)
        n1 = ops.stack([nc, N - nc], 1).reshape(1, 2 * C)
        v1 = ops.repeat(cvalid, 2)[None, :] & self._admissible(n1)
        key1 = ops.masked_fill_(self._key(S1, n1), ~v1, -np.inf)

        def gather1(rows, cols):
            return (ops.host(S1[rows, cols]), ops.host(n1[0, cols]), np.ones(len(cols), dtype=np.int64))

        def labels_atom(rows, cols):
            return self.bits.cols(cols >> 1, cols & 1)

        sel = self._select(key1, gather1, lambda cols: cols, labels_atom)
        del S1, key1
        entries = [[Entry(c >> 1 if not c & 1 else ["not", c >> 1], 1, s, nn) for (c, s, nn, _) in row] for row in sel]
        history = [entries] if keep_all else None
        if L == 1 or not bool(cvalid.any()):
            if keep_all:
                history.extend([entries] * (L - 1))
            return entries, history
        lab = self._build_atoms(sel)

        # ---- the expansion pool: concepts by |AUROC - 0.5| desc, then index
        X = Sc - nc * (nc + 1)
        D = 2 * nc * (N - nc)
        vidx = ops.flatnonzero(cvalid)
        d = (ops.abs(2 * X - D) / (2 * D))[:, vidx]
        del X
        perm = ops.argsort_stable(-d)
        n_atoms = 2 * len(vidx) if self.p.limit_search is None else min(self.p.limit_search, 2 * len(vidx))
        Pc = (n_atoms + 1) // 2
        pool = vidx[perm[:, :Pc]]  # (k, Pc) concept indices in pool order
        del d, perm
        atom_ok = ops.ones_bool((Pc, 4))
        if n_atoms % 2:
            atom_ok[-1, 2:] = False  # the last concept's negation is past the limit
        pool_np = ops.host(pool)
        Scp = ops.gather(Sc, 1, pool)  # (k, Pc)
        ncp = nc[pool]  # (k, Pc)
        na = ops.stack([ncp, ncp, N - ncp, N - ncp], 2)[:, None]  # (k, 1, Pc, 4)
        E = B * Pc * 4

        for _ell in range(2, L + 1):
            Bp = B
            pad = [[0.0] * (B - len(row)) for row in entries]
            bS = ops.array([[e.S for e in row] + p for row, p in zip(entries, pad)], "f8").reshape(k, B)
            bn = ops.array([[e.n for e in row] + p for row, p in zip(entries, pad)], "f8").reshape(k, B)
            blen = ops.array([[e.length for e in row] + [0] * len(p) for row, p in zip(entries, pad)], "i8")
            bvalid = ops.array([[True] * len(row) + [False] * len(p) for row, p in zip(entries, pad)], "b")
            blen, bvalid = blen.reshape(k, B), bvalid.reshape(k, B)
            bits = lab if self.backend == "scipy" else self.bits.pack(lab)

            PS, Pn = self._beam_products(lab, bn, bvalid, Sc)
            idx = ops.expand(pool[:, None, :], (k, B, Pc))
            Sfc = ops.gather(PS, 2, idx)  # (k, B, Pc)
            nfc = ops.gather(Pn, 2, idx)
            del PS, Pn, idx
            Sf, nf = bS[:, :, None], bn[:, :, None]
            S4 = ops.stack([Sfc, Sf + Scp[:, None] - Sfc, Sf - Sfc, self.S_all - Scp[:, None] + Sfc], 3)
            n4 = ops.stack([nfc, nf + ncp[:, None] - nfc, nf - nfc, N - ncp[:, None] + nfc], 3)
            v4 = self._admissible(n4)
            v4 &= n4 != nf[..., None]  # f AND a == f, f OR a == f: trivial
            v4 &= n4 != na  # == a: trivial
            v4 &= bvalid[:, :, None, None]
            v4 &= atom_ok
            key4 = self._key_inplace(S4, n4)
            del S4, n4
            ops.masked_fill_(key4, ~v4, -np.inf)
            del v4
            keyp = ops.masked_fill_(self._key(bS, bn), ~bvalid, -np.inf)
            keym = ops.cat([key4.reshape(k, E), keyp], 1)  # expansions, then the old beam
            del key4

            def gather(rows, cols, Sfc=Sfc, nfc=nfc, bS=bS, bn=bn, blen=blen):
                prev = cols >= E
                pb = ops.where(prev, cols - E, 0)
                b, p, sign, op = _decode(ops.where(prev, 0, cols), Pc)
                b = ops.where(prev, pb, b)
                sfc, nfc_ = Sfc[rows, b, p], nfc[rows, b, p]
                sf, nf_ = bS[rows, b], bn[rows, b]
                sc, nc_ = Scp[rows, p], ncp[rows, p]
                S = ops.where(
                    sign == 0,
                    ops.where(op == AND, sfc, sf + sc - sfc),
                    ops.where(op == AND, sf - sfc, self.S_all - sc + sfc),
                )
                n = ops.where(
                    sign == 0,
                    ops.where(op == AND, nfc_, nf_ + nc_ - nfc_),
                    ops.where(op == AND, nf_ - nfc_, N - nc_ + nfc_),
                )
                S = ops.where(prev, sf, S)
                n = ops.where(prev, nf_, n)
                length = blen[rows, b] + ops.long(~prev)
                return ops.host(S), ops.host(n), ops.host(length)

            def order_of(cols, Bp=Bp):
                return np.where(cols >= E, cols - E, cols + Bp)

            def labels_exp(rows, cols, bits=bits):
                prev = cols >= E
                b, p, sign, op = _decode(np.where(prev, 0, cols), Pc)
                b = np.where(prev, cols - E, b)
                res = bits[rows, b]
                for x, fn in ((np.flatnonzero(~prev & (op == AND)), np.bitwise_and),
                              (np.flatnonzero(~prev & (op == OR)), np.bitwise_or)):
                    if len(x):
                        res[x] = fn(res[x], self.bits.cols(pool_np[rows[x], p[x]], sign[x]))
                return res

            sel = self._select(keym, gather, order_of, labels_exp)
            del keym, Sfc, nfc
            new_entries = []
            for j, row in enumerate(sel):
                out = []
                for col, s, nn, ln in row:
                    if col >= E:
                        out.append(entries[j][col - E])
                    else:
                        b, p, sign, op = _decode(col, Pc)
                        c = int(pool_np[j, p])
                        atom = ["not", c] if sign else c
                        out.append(Entry([_OPS[op], entries[j][b].ast, atom], ln, s, nn))
                new_entries.append(out)
            entries = new_entries
            if keep_all:
                history.append(entries)
            if _ell < L:
                lab = self._build_expanded(lab, sel, E, Pc, pool_np)
        return entries, history

    # -- beam labelings -------------------------------------------------------------
    # scipy backend: packed bits (k, B, NB) numpy; torch backend: dense bool (k, B, N)
    def _build_atoms(self, sel):
        k, B, N = self.k, self.B, self.N
        jj, slot, cols = _flatten(sel)
        if self.backend == "scipy":
            bits = np.zeros((k, B, len(self.bits.mask)), dtype=np.uint8)
            bits[jj, slot] = self.bits.cols(cols >> 1, cols & 1)
            return bits
        import torch

        lab = torch.zeros((k, B, N), dtype=torch.bool, device=self.dev)
        if len(jj):
            y = self.dl.columns(cols >> 1)
            y ^= torch.from_numpy((cols & 1).astype(bool)).to(self.dev)[:, None]
            lab[torch.from_numpy(jj).to(self.dev), torch.from_numpy(slot).to(self.dev)] = y
        return lab

    def _build_expanded(self, lab, sel, E, Pc, pool_np):
        k, B, N = self.k, self.B, self.N
        jj, slot, cols = _flatten(sel)
        prev = cols >= E
        b, p, sign, op = _decode(np.where(prev, 0, cols), Pc)
        b = np.where(prev, cols - E, b)
        x = np.flatnonzero(~prev)
        if self.backend == "scipy":
            new = np.zeros_like(lab)
            res = lab[jj, b]
            if len(x):
                y = self.bits.cols(pool_np[jj[x], p[x]], sign[x])
                base = res[x]
                res[x] = np.where((op[x] == AND)[:, None], base & y, base | y)
            new[jj, slot] = res
            return new
        import torch

        dev = self.dev
        new = torch.zeros((k, B, N), dtype=torch.bool, device=dev)
        if not len(jj):
            return new
        jj_t, slot_t = torch.from_numpy(jj).to(dev), torch.from_numpy(slot).to(dev)
        res = lab[jj_t, torch.from_numpy(b).to(dev)]
        if len(x):
            y = self.dl.columns(pool_np[jj[x], p[x]])
            y ^= torch.from_numpy(sign[x].astype(bool)).to(dev)[:, None]
            xt = torch.from_numpy(x).to(dev)
            is_and = torch.from_numpy(op[x] == AND).to(dev)[:, None]
            base = res[xt]
            res[xt] = torch.where(is_and, base & y, base | y)
        new[jj_t, slot_t] = res
        return new


def _flatten(sel):
    jj, slot, cols = [], [], []
    for j, row in enumerate(sel):
        for s, item in enumerate(row):
            jj.append(j)
            slot.append(s)
            cols.append(item[0])
    return (np.asarray(jj, dtype=np.int64), np.asarray(slot, dtype=np.int64), np.asarray(cols, dtype=np.int64))
