"""Concept label matrices: validation and the sparse form the engine works on.

Every accepted input (numpy / torch bool, 0/1 integers or floats of any dtype,
scipy.sparse matrices, torch sparse tensors) becomes a :class:`LabelMatrix`: a
scipy CSR matrix of float64 ones (for rank-sum products) plus the CSC column
structure (for pulling single columns out as boolean vectors).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import DataError



def _name(concepts: Sequence[str] | None, col: int) -> str:
    if concepts is not None and 0 <= col < len(concepts):
        return f"column {col} ({concepts[col]!r})"
    return f"column {col}"


def _bad_value_error(col: int, row: int, value, concepts) -> DataError:
    if isinstance(value, np.generic):
        value = value.item()
    return DataError(
        f"concept labels {_name(concepts, col)} has value {value!r} at row {row}; "
        "expected boolean or 0/1 values"
    )


class LabelMatrix:
    """A validated boolean (N, C) label matrix, stored sparse."""

    __slots__ = ("csr", "N", "C", "colptr", "rowidx", "n_pos")

    def __init__(self, csr: sp.csr_matrix):
        csr = csr.astype(np.float64, copy=False)
        csr.sort_indices()
        self.csr = csr
        self.N, self.C = csr.shape
        csc = csr.tocsc()
        csc.sort_indices()
        self.colptr = csc.indptr.astype(np.int64, copy=False)
        self.rowidx = csc.indices.astype(np.int64, copy=False)
        self.n_pos = np.diff(self.colptr).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.C)

    def column(self, c: int) -> np.ndarray:
        out = np.zeros(self.N, dtype=bool)
        out[self.rowidx[self.colptr[c] : self.colptr[c + 1]]] = True
        return out

    def rows(self, idx: np.ndarray) -> LabelMatrix:
        return LabelMatrix(self.csr[np.asarray(idx)])


def _from_scipy(m, concepts) -> sp.csr_matrix:
    csr = sp.csr_matrix(m)  # copies COO/CSC/...; duplicates are summed (OR for bool)
    csr.sum_duplicates()
    data = csr.data
    if data.dtype != np.bool_:
        bad = ~((data == 0) | (data == 1))
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            row = int(np.searchsorted(csr.indptr, pos, side="right") - 1)
            raise _bad_value_error(int(csr.indices[pos]), row, data[pos], concepts)
    csr = sp.csr_matrix((np.ones(len(data)), csr.indices, csr.indptr), shape=csr.shape)
    csr.data[data == 0] = 0
    csr.eliminate_zeros()
    return csr


def _from_dense(y: np.ndarray, concepts) -> sp.csr_matrix:
    if y.dtype == np.bool_:
        nz = y
    else:
        if y.dtype.kind not in "biuf":
            raise DataError(f"concept labels must be boolean or 0/1 numbers, got dtype {y.dtype}")
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            col = int(bad.any(axis=0).argmax())
            row = int(bad[:, col].argmax())
            raise _bad_value_error(col, row, y[row, col], concepts)
        nz = y != 0
    return sp.csr_matrix(nz, dtype=np.float64)


def as_label_matrix(labels, concepts: Sequence[str] | None = None) -> LabelMatrix:
    """Validate ``labels`` (N, C) and return its sparse form."""
    if isinstance(labels, LabelMatrix):
        return labels
    if sp.issparse(labels):
        if len(labels.shape) != 2:
            raise DataError(f"concept labels must be a 2-D (images x concepts) matrix, got shape {labels.shape}")
        return LabelMatrix(_from_scipy(labels, concepts))
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded; never import it here
    if torch is not None and isinstance(labels, torch.Tensor):
        if labels.dim() != 2:
            raise DataError(
                f"concept labels must be a 2-D (images x concepts) matrix, got shape {tuple(labels.shape)}"
            )
        if labels.layout != torch.strided:
            coo = labels.detach().to_sparse_coo().coalesce().cpu()
            idx = coo.indices().numpy()
            vals = coo.values()
            vals = vals.numpy() if vals.dtype != torch.bfloat16 else vals.float().numpy()
            m = sp.coo_matrix((vals, (idx[0], idx[1])), shape=tuple(labels.shape))
            return LabelMatrix(_from_scipy(m, concepts))
        t = labels.detach().cpu()
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        labels = t.numpy()
    y = np.asarray(labels)
    if y.ndim != 2:
        raise DataError(f"concept labels must be a 2-D (images x concepts) matrix, got shape {y.shape}")
    return LabelMatrix(_from_dense(y, concepts))


class DeviceLabels:
    """The label structure on a torch device: CSC columns, counts, and (on request)
    the transposed CSR matrix for sparse x dense products."""

    def __init__(self, lm: LabelMatrix, device, need_matrix: bool):
        import torch

        self.N, self.C = lm.N, lm.C
        self.device = device
        self.colptr = torch.from_numpy(lm.colptr).to(device)
        self.rowidx = torch.from_numpy(lm.rowidx).to(device)
        self.n_pos = torch.from_numpy(lm.n_pos.astype(np.float64)).to(device)
        self.yt = None
        if need_matrix:
            # Y^T as CSR (C x N) == the CSC structure of Y
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self.yt = torch.sparse_csr_tensor(
                    self.colptr,
                    self.rowidx,
                    torch.ones(len(lm.rowidx), dtype=torch.float64, device=device),
                    size=(lm.C, lm.N),
                    check_invariants=False,
                )

    def columns(self, cols):
        """Dense boolean (len(cols), N) rows holding the given label columns (a tensor)."""
        import torch

        cols = torch.as_tensor(cols, dtype=torch.int64).to(self.device)
        out = torch.zeros(len(cols) * self.N, dtype=torch.bool, device=self.device)
        if len(cols):
            starts = self.colptr[cols]
            lens = self.colptr[cols + 1] - starts
            owner = torch.repeat_interleave(torch.arange(len(cols), device=self.device), lens)
            if len(owner):
                offs = torch.cumsum(lens, 0) - lens
                pos = torch.arange(len(owner), device=self.device) - offs[owner] + starts[owner]
                out[owner * self.N + self.rowidx[pos]] = True
        return out.view(len(cols), self.N)
