"""Reading a layer's activations column by column without copying the layer.

At 10⁶ probe images × 2,048 units the float32 activations are an 8 GB memmap; a
float64 copy would be 16 GB of anonymous memory. Everything after collection reads
them through these helpers instead, in blocks of columns (neurons) that fit a small
budget. Reading one column of a row-major (N, K) file touches every row, so
columns are read together, a block per pass over the rows.

Torch-free (``auditor explain`` on the CPU imports no torch).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

DEFAULT_BLOCK_MB = 256
_ROW_BYTES = 1 << 24  # rows are copied in slabs of about 16 MB of the source


def _row_step(a: np.ndarray) -> int:
    return max(1, _ROW_BYTES // max(1, a.shape[1] * a.dtype.itemsize))


def read_columns(a: np.ndarray, cols: Sequence[int], dtype=np.float64) -> np.ndarray:
    """``a[:, cols].T`` as a C-contiguous (len(cols), N) array of ``dtype``, read in slabs of
    rows (one pass over ``a``; a memmap is never copied whole)."""
    cols = np.asarray(cols, dtype=np.int64)
    N = a.shape[0]
    out = np.empty((len(cols), N), dtype=dtype)
    if not len(cols):
        return out
    contiguous = cols[-1] - cols[0] == len(cols) - 1 and bool(np.all(np.diff(cols) == 1))
    sel = slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols
    # slabs of ~1 MB of source rows: the transposing copy stays in cache (3x faster than 16 MB)
    step = max(1, (1 << 20) // max(1, a.shape[1] * a.dtype.itemsize))
    for s in range(0, N, step):
        out[:, s : s + step] = a[s : s + step, sel].T
    return out


def block_width(N: int, max_mb: int | None = None, itemsize: int = 8) -> int:
    """Columns per block so that a (width, N) block of ``itemsize`` bytes fits ``max_mb``
    (default :data:`DEFAULT_BLOCK_MB`)."""
    mb = DEFAULT_BLOCK_MB if max_mb is None else max_mb
    return max(1, int(mb * (1 << 20)) // max(1, N * itemsize))


class ColumnBlocks:
    """Columns of an (N, K) array as float64 vectors, read a block at a time.

    ``columns``: the columns that will be asked for (in any order; default all).
    ``column(k)`` returns a contiguous float64 copy of ``a[:, k]``; asking for the
    columns in increasing order reads ``a`` once per block of ``block`` columns.
    """

    def __init__(self, a: np.ndarray, columns: Sequence[int] | None = None, *, max_mb: int | None = None):
        self.a = a
        want = np.arange(a.shape[1]) if columns is None else np.unique(np.asarray(list(columns), dtype=np.int64))
        self.width = block_width(a.shape[0], max_mb)
        self.groups = [want[s : s + self.width] for s in range(0, len(want), self.width)]
        self._group_of = {int(c): g for g, grp in enumerate(self.groups) for c in grp}
        self._loaded = -1
        self._block: np.ndarray | None = None
        self._pos: dict[int, int] = {}

    def column(self, k: int) -> np.ndarray:
        g = self._group_of.get(int(k))
        if g is None:
            raise KeyError(f"column {k} was not requested")
        if g != self._loaded:
            self._block = None  # free the previous block before reading the next
            self._block = read_columns(self.a, self.groups[g])
            self._pos = {int(c): i for i, c in enumerate(self.groups[g])}
            self._loaded = g
        return self._block[self._pos[int(k)]]

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(column indices, (width, N) float64 block) for every block, in order."""
        for g, grp in enumerate(self.groups):
            self.column(int(grp[0]))
            yield grp, self._block


def check_finite(a: np.ndarray, where: str, rows: int | None = None) -> None:
    """DataError naming ``where`` if ``a`` (its first ``rows`` rows, default all) holds NaN or
    infinite values; checked in slabs of rows, in the array's own dtype."""
    if a.dtype.kind != "f":
        return
    n = a.shape[0] if rows is None else min(rows, a.shape[0])
    step = _row_step(a)
    for s in range(0, n, step):
        blk = np.asarray(a[s : min(n, s + step)])
        if not np.isfinite(blk).all():
            r, c = np.argwhere(~np.isfinite(blk))[0]
            raise DataError(f"{where} contain NaN or infinite values (first at row {s + int(r)}, "
                            f"column {int(c)})")


def compact_rows(a: np.ndarray, keep: np.ndarray, directory: str | os.PathLike | None = None) -> np.ndarray:
    """``a[keep]`` (boolean row mask) without holding it in anonymous memory: ``a`` itself when
    every row is kept, else a copy (same dtype) written slab by slab to a memmap in
    ``directory`` (default: the temp folder; the file is unlinked at once, the mapping keeps it)."""
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return a
    idx = np.flatnonzero(keep)
    d = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    d.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="auditor-rows-", suffix=".f32", dir=d)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(name, mode="w+", dtype=a.dtype, shape=(len(idx), a.shape[1]))
        step = _row_step(a)
        for s in range(0, len(idx), step):
            out[s : s + step] = a[idx[s : s + step]]
        out.flush()
    finally:
        os.unlink(name)  # POSIX: the mapping stays valid; nothing is left behind on exit
    return out
