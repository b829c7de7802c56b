"""Probe images and concept labels.

A :class:`ProbeSet` is the list of image paths (relative to an image root) and a
boolean concept-label matrix with one row per image: dense ``numpy`` for small
wide tables, ``scipy.sparse`` CSR for the sparse formats (see
:mod:`auditor.formats`). Loading validates at the boundary: every problem a user
can fix is a :class:`~auditor.errors.DataError` that names the file, row, column
or value and says what was expected.

Path checks are built for 10⁶ rows: vectorised textual checks for empty,
absolute and ``..`` paths, one ``scandir`` per folder (file types come with the
listing), an ``lstat`` only for files not found that way, and ``realpath`` only
for symbolic links (and for folders on the way that are links), never per row.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import stat as _stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import DataError, did_you_mean
from .formats import (IMAGE_SUFFIXES, PATH_HEADERS, LabelTable, expand, first_occurrences,  # noqa: F401
                      has_class_folders, read_hierarchy, read_label_matrix, read_labels, read_wide_csv_table)


@dataclass(frozen=True)
class ProbeSet:
    root: Path
    paths: list[str]  # relative to root, '/' separators
    labels: Any  # (N, C) bool: numpy array, or scipy.sparse CSR for the sparse formats
    concepts: list[str]
    labels_file: str | None = None
    labels_sha256: str | None = None
    display_names: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    # Row of each image's clean source (a synthesised copy), -1 for an original; None: no copies.
    source_rows: np.ndarray | None = None
    labels_format: str | None = None
    hierarchy_file: str | None = None
    hierarchy_sha256: str | None = None
    # Things the user should see in the report that are not errors (e.g. concepts not in the hierarchy).
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    # Pairs of rows (clean image, the same image with a synthesised artifact), per
    # artifact concept: shape (M, 2). Empty when the probe set has no synthesised copies.
    pairs: dict[str, np.ndarray] = field(default_factory=dict)

    # -- labels, dense or sparse ------------------------------------------------------
    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.labels)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: j for j, c in enumerate(self.concepts)}

    def row_concepts(self, i: int) -> list[str]:
        """Names of the concepts positive on row ``i``."""
        if sp.issparse(self.labels):
            csr = self.labels if self.labels.format == "csr" else self.labels.tocsr()
            cols = csr.indices[csr.indptr[i]:csr.indptr[i + 1]]
            data = csr.data[csr.indptr[i]:csr.indptr[i + 1]]
            return [self.concepts[j] for j in sorted(int(c) for c, v in zip(cols, data) if v)]
        row = np.asarray(self.labels[i]).ravel()
        return [c for c, on in zip(self.concepts, row) if on]

    def column(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise DataError(f"unknown concept {name!r}{did_you_mean(name, self.concepts)}") from None

    def dense_columns(self, names: list[str]) -> np.ndarray:
        """(N, len(names)) bool matrix of the named concepts."""
        cols = [self.column(n) for n in names]
        sub = self.labels[:, cols]
        return sub.toarray().astype(bool) if sp.issparse(sub) else np.asarray(sub, dtype=bool)

    def column_values(self, name: str) -> np.ndarray:
        """(N,) bool vector of one concept."""
        return self.dense_columns([name])[:, 0]

    def n_positive(self) -> np.ndarray:
        """(C,) number of positive images per concept."""
        return np.asarray(self.labels.sum(axis=0)).ravel().astype(np.int64)

    @property
    def clean_rows(self) -> np.ndarray:
        """Rows that are not synthesised copies (all rows when there are none)."""
        if self.source_rows is None:
            return np.arange(len(self.paths))
        return np.flatnonzero(self.source_rows == -1)  # -2: a copy whose original was left out

    def full_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    # -- fingerprints --------------------------------------------------------------------
    def _stat_lines(self, h) -> None:
        # ctime and inode too: a file replaced by another of the same size, with its mtime set back
        # (cp --preserve, rsync -t, touch -r), still gets a new inode or ctime.
        size, mtime, ctime, inode = stat_rows(self.root, self.paths)
        h.update(b"stat2\0" + "\n".join(self.paths).encode())
        for col in (size, mtime, ctime, inode):
            h.update(b"\0" + col.tobytes())

    def labels_fingerprint(self) -> str:
        """Hash of the labels alone: concepts, the (N, C) matrix, the clean sources (no file access)."""
        h = hashlib.sha256()
        Y = self.labels
        if sp.issparse(Y):
            csr = sp.csr_matrix(Y, dtype=bool)
            csr.eliminate_zeros()
            csr.sort_indices()
            h.update(f"csr{csr.shape}".encode())
            h.update(np.ascontiguousarray(csr.indptr, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(csr.indices, dtype=np.int64).tobytes())
        else:
            h.update(np.ascontiguousarray(Y).tobytes())
        h.update("\0".join(self.concepts).encode())
        if self.source_rows is not None:
            h.update(np.ascontiguousarray(self.source_rows, dtype=np.int64).tobytes())
        return h.hexdigest()

    def fingerprint(self, images_fingerprint: str | None = None) -> str:
        """Hash of every image's path, size and mtime, plus the labels.

        Pass ``images_fingerprint`` (from :meth:`image_fingerprint`, computed once
        already) to skip a second ``stat`` of every image.
        """
        h = hashlib.sha256()
        h.update((images_fingerprint or self.image_fingerprint()).encode())
        h.update(self.labels_fingerprint().encode())
        return h.hexdigest()

    def image_fingerprint(self) -> str:
        """Hash of the images alone (the activation cache key: labels do not change activations)."""
        h = hashlib.sha256()
        h.update(str(self.root.resolve()).encode() + b"\n")
        self._stat_lines(h)
        return h.hexdigest()

    def subset(self, keep: np.ndarray) -> ProbeSet:
        """The rows where ``keep`` is true (a bool mask); pairs and sources follow the rows."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else np.asarray(keep, dtype=np.int64)
        new_of = np.full(len(self.paths), -1, dtype=np.int64)
        new_of[idx] = np.arange(len(idx))
        source_rows = None
        if self.source_rows is not None:
            src = self.source_rows[idx]
            source_rows = np.where(src >= 0, new_of[np.maximum(src, 0)], -1)
            # a copy whose clean source was dropped keeps no source (-2: copy without its original)
            source_rows[(src >= 0) & (source_rows < 0)] = -2
        pairs = {}
        for name, pr in self.pairs.items():
            mapped = new_of[pr] if len(pr) else pr.reshape(0, 2)
            pairs[name] = mapped[(mapped >= 0).all(axis=1)] if len(mapped) else mapped
        return ProbeSet(root=self.root, paths=[self.paths[i] for i in idx], labels=self.labels[idx],
                        concepts=self.concepts, labels_file=self.labels_file, labels_sha256=self.labels_sha256,
                        display_names=self.display_names, descriptions=self.descriptions,
                        source_rows=source_rows, labels_format=self.labels_format,
                        hierarchy_file=self.hierarchy_file, hierarchy_sha256=self.hierarchy_sha256,
                        warnings=self.warnings, pairs=pairs)

    def provenance(self, images_fingerprint: str | None = None) -> dict[str, Any]:
        out = {"images": str(self.root), "n_images": len(self.paths), "n_concepts": len(self.concepts),
               "labels_file": self.labels_file, "labels_sha256": self.labels_sha256,
               "labels_format": self.labels_format, "fingerprint": self.fingerprint(images_fingerprint)}
        if self.hierarchy_file:
            out |= {"hierarchy_file": self.hierarchy_file, "hierarchy_sha256": self.hierarchy_sha256}
        if self.pairs:
            out["pairs"] = {name: int(len(p)) for name, p in self.pairs.items()}
        return out


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_relative(root: Path, rel: str, where: str) -> str:
    """Validate that ``rel`` names a file inside ``root``; return it normalised (one path, slow path)."""
    if not rel or not rel.strip():
        raise DataError(f"{where}: empty image path")
    rel = rel.strip().replace("\\", "/")
    p = Path(rel)
    if p.is_absolute() or rel.startswith("/") or _DRIVE.match(rel):
        raise DataError(f"{where}: image path {rel!r} is absolute; paths must be relative to the image folder {root}")
    if ".." in p.parts:
        raise DataError(f"{where}: image path {rel!r} escapes the image folder {root} ('..' is not allowed)")
    full = root / p
    try:
        resolved = full.resolve(strict=False)
        root_resolved = root.resolve()
    except OSError as exc:
        raise DataError(f"{where}: cannot resolve image path {rel!r}: {exc}") from None
    if root_resolved != resolved and root_resolved not in resolved.parents:
        raise DataError(f"{where}: image path {rel!r} resolves outside the image folder {root} "
                        f"(a symbolic link?) — copy the file into the folder instead")
    return p.as_posix()


def read_wide_csv(labels_path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read a wide CSV: ``path`` column, then one 0/1 column per concept."""
    t = read_wide_csv_table(Path(labels_path))
    return t.paths, t.concepts, t.labels


# -- path checks at scale ---------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:/")


def normalise_paths(raw: list[str], where) -> list[str]:
    """Strip, '/' separators, drop './' and doubled '/'; DataError for empty, absolute or '..' paths.

    Vectorised (pyarrow string kernels): only the rare odd paths are handled one by one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(raw):
        return []
    arr = pc.utf8_trim_whitespace(pa.array(raw, type=pa.string()).fill_null(""))
    arr = pc.replace_substring(arr, "\\", "/")
    empty = pc.equal(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False)
    absolute = pc.match_substring_regex(arr, r"^(/|[A-Za-z]:/)").to_numpy(zero_copy_only=False)
    odd = pc.match_substring_regex(arr, r"(^|/)\.{1,2}(/|$)|//|/$").to_numpy(zero_copy_only=False)
    out: list[str] = arr.to_pylist()
    bad = np.flatnonzero(empty | absolute)
    if len(bad):
        i = int(bad[0])
        if empty[i]:
            raise DataError(f"{where(i)}: empty image path")
        raise DataError(f"{where(i)}: image path {out[i]!r} is absolute; paths must be relative to the image folder")
    for i in np.flatnonzero(odd):
        t = out[i]
        parts = [p for p in t.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise DataError(f"{where(int(i))}: image path {t!r} escapes the image folder ('..' is not allowed)")
        if not parts:
            raise DataError(f"{where(int(i))}: image path {raw[i]!r} names the image folder itself, not an image")
        out[i] = "/".join(parts)
    return out


def _folders(paths: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """(folder code of every path, folder names, file name of every path); '' is the root folder.

    pyarrow string kernels: no Python work per path but building the name list.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(paths):
        return np.zeros(0, dtype=np.int64), [], []
    arr = pa.array(paths, type=pa.string())
    # "\0/" + path, split once at the last "/": ["\0/folder", "name"] or ["\0", "name"]
    parts = pc.split_pattern(pc.binary_join_element_wise(pa.scalar("\0"), arr, "/"), "/", max_splits=1,
                             reverse=True)
    enc = pc.utf8_slice_codeunits(pc.list_element(parts, 0), 2).dictionary_encode()
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, enc.dictionary.to_pylist(), pc.list_element(parts, 1).to_pylist()


def _groups(codes: np.ndarray) -> list[np.ndarray]:
    """Rows of each folder code, in row order (folders in order of first appearance)."""
    if not len(codes):
        return []
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    bounds = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1], True])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


_SCAN_MIN_ROWS = 16  # below this many listed files in a folder, lstat them one by one instead of listing it


def check_files(root: Path, paths: list[str], where, listed_in: str) -> None:
    """Every path must be a regular file inside ``root`` (symbolic links may point only inside).

    Folder by folder: one ``scandir`` lists a folder's regular files (the type
    comes with the listing: no per-file system call) and a set comparison finds
    the listed names that are not among them; only those — and every file of a
    folder with just a few listed files — get an ``lstat``. ``realpath`` runs only
    for links and for folders that are (or lie under) links. Missing files are
    reported together.
    """
    root_s = os.fspath(root)
    root_real = os.path.realpath(root_s)
    prefix = root_real.rstrip(os.sep) + os.sep
    base = root_s + os.sep
    linked_dir: dict[str, bool] = {"": False}

    def dir_is_linked(d: str) -> bool:
        if d in linked_dir:
            return linked_dir[d]
        res = dir_is_linked(d.rpartition("/")[0]) or os.path.islink(base + d)
        linked_dir[d] = res
        return res

    codes, folders, names = _folders(paths)
    n_listed = np.bincount(codes, minlength=len(folders)) if len(codes) else np.zeros(0, dtype=np.int64)
    first_row = first_occurrences(codes)
    regular: list[set[str] | None] = [None] * len(folders)  # None: check each file with lstat
    for k, d in enumerate(folders):
        full_dir = base + d if d else root_s
        if d and dir_is_linked(d):
            real = os.path.realpath(full_dir)
            if not (real == root_real or real.startswith(prefix)):
                i = int(first_row[k])
                raise DataError(f"{where(i)}: image path {paths[i]!r} resolves outside the image folder "
                                f"{root} (a symbolic link on the way) — copy the files into the folder instead")
        if n_listed[k] < _SCAN_MIN_ROWS:
            continue
        try:
            with os.scandir(full_dir) as it:
                regular[k] = {e.name for e in it if e.is_file(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            regular[k] = set()
        except OSError as exc:
            raise DataError(f"{where(int(first_row[k]))}: cannot list folder {full_dir}: {exc}") from None
    # One pass in row order (rows stay in memory order); only the suspects get an lstat.
    suspects = [i for i, (name, k) in enumerate(zip(names, codes.tolist()))
                if regular[k] is None or name not in regular[k]]

    missing: list[int] = []
    for i in suspects:
        rel = paths[i]
        full = base + rel
        try:
            mode = os.lstat(full).st_mode
        except (FileNotFoundError, NotADirectoryError):
            missing.append(i)
            continue
        except OSError as exc:
            raise DataError(f"{where(i)}: cannot read image {rel!r}: {exc}") from None
        if _stat.S_ISREG(mode):
            continue
        if _stat.S_ISLNK(mode):
            if not os.path.realpath(full).startswith(prefix):
                raise DataError(f"{where(i)}: image path {rel!r} resolves outside the image folder {root} "
                                "(a symbolic link?) — copy the file into the folder instead")
            if not os.path.isfile(full):
                missing.append(i)
            continue
        raise DataError(f"{where(i)}: image path {rel!r} is not a file (a folder?)")
    if missing:
        shown = ", ".join(repr(paths[i]) for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        first = f" (first at {where(missing[0])})"
        raise DataError(f"{len(missing)} image(s) listed in {listed_in} are missing from {root}: {shown}{more}"
                        f"{first}")


def stat_rows(root: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(size, mtime_ns, ctime_ns, inode) of every path; ``stat`` relative to each open folder
    (fewer path lookups)."""
    n = len(paths)
    size = np.zeros(n, dtype=np.int64)
    mtime = np.zeros(n, dtype=np.int64)
    ctime = np.zeros(n, dtype=np.int64)
    inode = np.zeros(n, dtype=np.uint64)
    root_s = os.fspath(root)
    use_fd = os.stat in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
    codes, folders, names = _folders(paths)
    for rows in _groups(codes):
        d = folders[codes[rows[0]]]
        full_dir = os.path.join(root_s, d) if d else root_s
        fd = None
        if use_fd and len(rows) > 1:
            try:
                fd = os.open(full_dir, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                fd = None
        try:
            for i in rows.tolist():
                if fd is not None:
                    st = os.stat(names[i], dir_fd=fd)
                else:
                    st = os.stat(os.path.join(root_s, paths[i]))
                size[i] = st.st_size
                mtime[i] = st.st_mtime_ns
                ctime[i] = st.st_ctime_ns
                inode[i] = st.st_ino
        finally:
            if fd is not None:
                os.close(fd)
    return size, mtime, ctime, inode


def _merge_duplicates(table: LabelTable, paths: list[str]) -> tuple[list[str], Any, list[str] | None, np.ndarray]:
    """Rows naming the same image: an error, or (long formats) OR-ed into one row."""
    import pyarrow as pa

    enc = pa.array(paths, type=pa.string()).dictionary_encode()
    if len(enc.dictionary) == len(paths):
        return paths, table.labels, table.sources, np.arange(len(paths))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniques = enc.dictionary.to_pylist()
    if table.duplicates == "error":
        running = np.maximum.accumulate(codes)
        second = int(np.flatnonzero(np.r_[False, codes[1:] <= running[:-1]])[0])  # first repeated code
        first = int(np.flatnonzero(codes == codes[second])[0])
        a, b = table.label(first), table.label(second)
        both = f"lines {a[5:]} and {b[5:]}" if a.startswith("line ") and b.startswith("line ") else f"{a} and {b}"
        raise DataError(f"{table.file}: image {paths[second]!r} is listed twice ({both}); "
                        "each image needs exactly one row")
    # merge: OR the rows of each image (two spellings of one path in a long table)
    n = len(uniques)
    M = sp.csr_matrix((np.ones(len(codes), dtype=np.int32), (codes, np.arange(len(codes)))), shape=(n, len(codes)))
    Y = table.labels
    merged = M @ (sp.csr_matrix(Y, dtype=np.int32) if not sp.issparse(Y) else Y.astype(np.int32))
    merged = sp.csr_matrix(merged > 0, dtype=bool)
    labels = merged if sp.issparse(Y) else merged.toarray()
    first_of = first_occurrences(codes)  # codes are numbered in order of first appearance
    sources = None
    if table.sources is not None:
        sources = [table.sources[i] for i in first_of]
        for i, c in enumerate(codes):
            if table.sources[i] != sources[c]:
                raise DataError(f"{table.where(i)}: image {paths[i]!r} has two different sources "
                                f"({sources[c]!r} and {table.sources[i]!r})")
    return [str(u) for u in uniques], labels, sources, first_of


def _source_rows(paths: list[str], sources: list[str] | None, where) -> np.ndarray | None:
    if sources is None or not any(sources):
        return None
    row_of = {p: i for i, p in enumerate(paths)}
    out = np.full(len(paths), -1, dtype=np.int64)
    copies = [i for i, s in enumerate(sources) if s]
    normed = normalise_paths([sources[i] for i in copies], lambda k: f"{where(copies[k])}, source")
    for i, norm in zip(copies, normed):
        s = sources[i]
        j = row_of.get(norm)
        if j is None:
            raise DataError(f"{where(i)}: source {s!r} of image {paths[i]!r} is not an image of the labels file; "
                            "the clean original must be listed too (with an empty source)")
        if j == i:
            raise DataError(f"{where(i)}: image {paths[i]!r} names itself as its source")
        out[i] = j
    chained = np.flatnonzero((out >= 0) & (out[np.maximum(out, 0)] >= 0))
    if len(chained):
        i = int(chained[0])
        raise DataError(f"{where(i)}: the source {paths[out[i]]!r} of {paths[i]!r} is itself a synthesised copy; "
                        "a source must be a clean original (one with an empty source)")
    return out


def compute_pairs(labels, concepts: list[str], source_rows: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per concept, the (clean row, copy row) pairs where the copy is positive and its source is not."""
    if source_rows is None:
        return {}
    copies = np.flatnonzero(source_rows >= 0)
    if not len(copies):
        return {}
    srcs = source_rows[copies]
    Y = labels if sp.issparse(labels) else sp.csr_matrix(labels)
    Yc = sp.csr_matrix(Y[copies], dtype=np.int8)
    Ys = sp.csr_matrix(Y[srcs], dtype=np.int8)
    gained = (Yc - Ys).tocoo()
    keep = gained.data > 0
    r, c = gained.row[keep], gained.col[keep]
    order = np.lexsort((r, c))
    r, c = r[order], c[order]
    out: dict[str, np.ndarray] = {}
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]]) if len(c) else np.zeros(0, dtype=np.int64)
    for a, b in zip(starts, np.r_[starts[1:], len(c)]):
        rows = r[a:b]
        out[concepts[int(c[a])]] = np.stack([srcs[rows], copies[rows]], axis=1).astype(np.int64)
    return out


def load_probe_set(images: str | os.PathLike | None, labels: str | os.PathLike | None = None, *,
                   labels_format: str = "auto", hierarchy: str | os.PathLike | None = None,
                   allow_no_concepts: bool = False) -> ProbeSet:
    """Load and validate a probe set: an image folder plus labels in any supported format.

    ``labels`` may be a wide or long CSV/Parquet file, a COCO instances JSON, an
    ``.npz``, or omitted for class folders (ImageFolder layout). ``labels_format``
    names the format instead of detecting it (``wide``, ``long``, ``folders``,
    ``coco``, ``npz``). ``hierarchy`` (JSON or CSV) adds every ancestor of a
    concept as a concept. Raises :class:`DataError` for anything the user must fix.
    """
    if not images:
        raise DataError("no image folder given: pass --images DIR (or `images:` in the config)")
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    labels_path = Path(labels) if labels else None
    if labels_path is not None and not labels_path.exists():
        raise DataError(f"labels file not found: {labels_path}")
    if labels_path is not None and labels_path.is_dir():
        raise DataError(f"labels {labels_path} is a folder, not a file; for class folders (ImageFolder layout) "
                        "leave --labels out (or set labels_format: folders)")
    if labels_path is None and labels_format == "auto" and not has_class_folders(root) and not allow_no_concepts:
        raise DataError(f"no labels file given and {root} has no class folders: pass --labels FILE (CSV, Parquet, "
                        "COCO JSON or .npz), or arrange the images as root/<class>/image.png")
    table = read_labels(root, labels_path, labels_format)
    listed_in = str(labels_path) if labels_path is not None else f"the class folders of {root}"
    # paths found by walking the folder are real names already (a '\\' in one is a character, not a separator)
    paths = table.paths if table.discovered else normalise_paths(table.paths, table.where)
    paths, Y, sources, first_of = _merge_duplicates(table, paths)
    if not table.discovered:  # (walked just now: the files exist; links were checked on the way)
        check_files(root, paths, lambda i: table.where(int(first_of[i])), listed_in)
    source_rows = _source_rows(paths, sources, lambda i: table.where(int(first_of[i])))
    table.labels = Y
    h_file = h_sha = None
    if hierarchy:
        h = read_hierarchy(hierarchy)
        table = expand(table, h)
        h_file, h_sha = str(hierarchy), sha256_file(Path(hierarchy))
    if not table.concepts and not allow_no_concepts:
        raise DataError(f"the concept set is empty: {listed_in} names no concept; a probe set needs concept labels")
    pairs = compute_pairs(table.labels, table.concepts, source_rows)
    return ProbeSet(root=root, paths=paths, labels=table.labels, concepts=list(table.concepts),
                    labels_file=str(labels_path) if labels_path is not None else None,
                    labels_sha256=sha256_file(labels_path) if labels_path is not None else None,
                    display_names=table.display_names, descriptions=table.descriptions,
                    source_rows=source_rows, labels_format=table.format, hierarchy_file=h_file,
                    hierarchy_sha256=h_sha, warnings=list(table.warnings), pairs=pairs)


def check_artifacts(probe: ProbeSet, artifacts: list[str] | tuple[str, ...]) -> None:
    """Every artifact must be a concept with at least one positive and one negative image."""
    where = probe.labels_file or (f"the class folders of {probe.root}" if probe.labels_format == "folders"
                                  else "the labels")
    for name in artifacts:
        if name not in probe._index:
            raise DataError(f"artifact {name!r} is not a concept in {where}"
                            f"{did_you_mean(name, probe.concepts)}; concepts are the label columns")
        col = probe.labels[:, probe.column(name)]
        n_pos = int(col.sum())
        if n_pos == 0:
            raise DataError(f"artifact {name!r} has no positive image in {where}; "
                            "an artifact can only be audited with images that carry it")
        if n_pos == col.shape[0]:
            raise DataError(f"artifact {name!r} is positive on every image in {where}; "
                            "the probe set also needs images without it")
