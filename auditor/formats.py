"""Concept-label formats and concept hierarchies.

Every reader turns one on-disk format into a :class:`LabelTable`: image paths as
written (validated later, against the image folder, by :mod:`auditor.data`), the
concept names, and an (N, C) boolean label matrix: dense ``numpy`` for the wide
formats, ``scipy.sparse`` CSR for the sparse ones (long CSV/Parquet, COCO, class
folders, ``.npz``), which are built without any dense N×C structure.

===============  =======================================================================
format           what it reads
===============  =======================================================================
``wide``         CSV or Parquet: a path column, then one 0/1 column per concept
``long``         CSV or Parquet: ``path,concept`` (one row per positive pair;
                 optional ``value`` 0/1 and ``source`` columns; an empty concept lists
                 an image with no concept)
``folders``      ImageFolder layout: ``root/<class>/…/image.png``; the class is a concept
``coco``         COCO instances JSON: categories → concepts, supercategories → parents
``npz``          ``paths``, ``concepts`` and a dense ``labels`` or CSR ``indptr/indices/shape``
===============  =======================================================================

A **hierarchy** (:func:`read_hierarchy`, :func:`expand`) adds every ancestor of a
label concept as a concept, positive wherever any descendant is.

Both wide and long tables may carry a ``source`` column: for an image that is a
synthesised copy (see :mod:`auditor.synth`), the path of its clean original.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import DataError, did_you_mean

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PATH_HEADERS = ("path", "image", "file", "filename", "file_name", "img")
LONG_CONCEPT_HEADERS = ("concept", "label", "class", "category")
SOURCE_HEADER = "source"
VALUE_HEADER = "value"
FORMATS = ("auto", "wide", "long", "folders", "coco", "npz")
TRUE_TEXT = ("1", "1.0", "true", "True", "TRUE")
FALSE_TEXT = ("0", "0.0", "false", "False", "FALSE")

Labels = Any  # np.ndarray (N, C) bool | scipy.sparse.csr_matrix (N, C) bool


@dataclass
class LabelTable:
    """What a reader found, before the paths are checked against the image folder."""

    paths: list[str]  # one per image row, as written in the file
    concepts: list[str]
    labels: Labels  # (N, C) bool: dense ndarray or CSR
    format: str  # e.g. "wide csv", "long parquet", "coco", "folders"
    file: str | None  # the labels file (None for class folders)
    sources: list[str] | None = None  # per row: clean-source path as written, "" for none
    display_names: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    row_label: Callable[[int], str] | None = None  # "line 7" (of ``file``) for row i
    duplicates: str = "error"  # "error": an image listed twice is an error; "merge": rows are OR-ed
    discovered: bool = False  # paths came from walking the folder (already known to exist)

    def label(self, i: int) -> str:
        return self.row_label(int(i)) if self.row_label is not None else f"row {int(i) + 1}"

    def where(self, i: int) -> str:
        """Where row ``i`` comes from, for messages: "labels.csv line 7"."""
        return f"{self.file} {self.label(i)}" if self.file else self.label(i)


# -- helpers ---------------------------------------------------------------------------

def _bool_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR bool matrix with ones at (rows, cols); repeated pairs count once."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if len(rows):
        key = np.sort(rows * shape[1] + cols)  # sorted by (row, col)
        key = key[np.r_[True, key[1:] != key[:-1]]]  # duplicates dropped
        rows, cols = key // shape[1], key % shape[1]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    itype = np.int32 if max(shape[1], len(cols)) < 2**31 - 1 else np.int64
    return sp.csr_matrix((np.ones(len(cols), dtype=bool), cols.astype(itype), indptr.astype(itype)),
                         shape=shape)


def first_occurrences(codes: np.ndarray) -> np.ndarray:
    """Row of the first occurrence of each code, for codes numbered in order of first appearance."""
    codes = np.asarray(codes, dtype=np.int64)
    if not len(codes):
        return codes
    running = np.maximum.accumulate(codes)
    return np.flatnonzero(np.r_[True, running[1:] > running[:-1]])


def _show(items: Sequence[Any], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for row in csv.reader(fh):
                if any(cell.strip() for cell in row):
                    return [h.strip() for h in row]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {path}: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a valid CSV file: {exc}") from None
    return []


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return [str(c) for c in pq.read_schema(path).names if not str(c).startswith("__index_level_")]
    except Exception as exc:
        raise DataError(f"cannot read labels Parquet {path}: {exc}") from None


def is_long_header(columns: Sequence[str]) -> bool:
    """A path column, a concept column, and at most ``value`` and ``source`` besides."""
    low = [c.strip().lower() for c in columns]
    if len(low) < 2 or not any(c in LONG_CONCEPT_HEADERS for c in low[1:]):
        return False
    rest = [c for c in low[1:] if c not in LONG_CONCEPT_HEADERS]
    n_concept_cols = sum(1 for c in low[1:] if c in LONG_CONCEPT_HEADERS)
    return n_concept_cols == 1 and set(rest) <= {VALUE_HEADER, SOURCE_HEADER}


def has_class_folders(root: Path) -> bool:
    try:
        return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))
    except OSError:
        return False


def detect_format(root: Path, labels: Path | None, labels_format: str = "auto") -> str:
    """The format of ``labels`` (``labels_format`` if given): one of :data:`FORMATS` minus auto."""
    if labels_format not in FORMATS:
        raise DataError(f"unknown labels_format {labels_format!r}{did_you_mean(labels_format, FORMATS)}; "
                        f"expected one of {', '.join(FORMATS)}")
    if labels is None:
        if labels_format not in ("auto", "folders"):
            raise DataError(f"labels_format {labels_format!r} needs a labels file: pass --labels FILE")
        return "folders"
    if labels_format == "folders":
        raise DataError("labels_format 'folders' takes the concepts from the class folders of --images; "
                        f"leave --labels out (got {labels})")
    if labels_format != "auto":
        return labels_format
    suffix = labels.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix == ".npz":
        return "npz"
    if suffix == ".csv":
        return "long" if is_long_header(_csv_header(labels)) else "wide"
    if suffix in (".parquet", ".pq"):
        return "long" if is_long_header(_parquet_columns(labels)) else "wide"
    raise DataError(f"unsupported labels format {suffix or '(no suffix)'!r} for {labels}; expected .csv, "
                    ".parquet, .json (COCO) or .npz, or no labels file for class folders")


def read_labels(root: Path, labels: Path | None, labels_format: str = "auto") -> LabelTable:
    """Read ``labels`` (or the class folders of ``root``) in the given or detected format."""
    fmt = detect_format(root, labels, labels_format)
    if fmt == "folders":
        return read_class_folders(root)
    assert labels is not None
    suffix = labels.suffix.lower()
    if fmt == "coco":
        return read_coco(labels)
    if fmt == "npz":
        return read_npz(labels)
    parquet = suffix in (".parquet", ".pq")
    if fmt == "wide":
        return read_wide_parquet(labels) if parquet else read_wide_csv_table(labels)
    if fmt == "long":
        return read_long(labels, parquet=parquet)
    raise DataError(f"unknown labels_format {fmt!r}")  # pragma: no cover


# -- wide -------------------------------------------------------------------------------

def read_wide_csv_table(labels_path: Path) -> LabelTable:
    """Wide CSV: ``path`` column, then one 0/1 column per concept (``source`` column optional)."""
    try:
        with open(labels_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows: list[list[str]] = []
            lines: list[int] = []
            start = 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
    except FileNotFoundError:
        raise DataError(f"labels file not found: {labels_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {labels_path}: {exc}") from None
    except csv.Error as exc:
        raise DataError(f"{labels_path} is not a valid CSV file: {exc}") from None
    if not rows:
        raise DataError(f"labels file {labels_path} is empty; expected a header row: path,concept1,concept2,…")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise DataError(f"labels file {labels_path} has no concept columns; expected a header row: "
                        "path,concept1,concept2,…")
    src_col = header.index(SOURCE_HEADER) if SOURCE_HEADER in header[1:] else None
    concept_cols = [j for j in range(1, len(header)) if j != src_col]
    concepts = [header[j] for j in concept_cols]
    seen: dict[str, int] = {}
    for j in concept_cols:
        name = header[j]
        if not name:
            raise DataError(f"{labels_path}: concept column {j + 1} has an empty name in the header")
        if name in seen:
            raise DataError(f"{labels_path}: concept {name!r} appears twice in the header (columns "
                            f"{seen[name] + 1} and {j + 1})")
        seen[name] = j
    if not concepts:
        raise DataError(f"labels file {labels_path} has no concept columns; expected a header row: "
                        "path,concept1,concept2,…")
    body, body_lines = rows[1:], lines[1:]
    if not body:
        raise DataError(f"labels file {labels_path} has a header but no image rows")
    for row, line in zip(body, body_lines):
        if len(row) != len(header):
            raise DataError(f"{labels_path} line {line}: {len(row)} fields, the header has {len(header)}")
    cells = np.array([[row[j] for j in concept_cols] for row in body], dtype=str).reshape(len(body), len(concepts))
    stripped = np.char.strip(cells)
    on = np.isin(stripped, TRUE_TEXT)
    bad = ~(on | np.isin(stripped, FALSE_TEXT))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(f"{labels_path} line {body_lines[i]}, column {concepts[j]!r}: value {str(cells[i, j])!r} "
                        "is not 0 or 1")
    sources = [row[src_col].strip() for row in body] if src_col is not None else None
    return LabelTable(paths=[row[0] for row in body], concepts=concepts, labels=on, format="wide csv",
                      file=str(labels_path), sources=sources,
                      row_label=lambda i: f"line {body_lines[i]}")


def frame_to_wide(df, source: str) -> tuple[list[str] | None, list[str], np.ndarray, list[str] | None]:
    """A pandas frame (optional leading path column, optional ``source``, 0/1 columns)."""
    paths = None
    sources = None
    cols = [str(c) for c in df.columns]
    if cols and (cols[0].lower() in PATH_HEADERS or df[df.columns[0]].dtype == object):
        paths = ["" if p is None else str(p) for p in df[df.columns[0]].tolist()]
        df = df.iloc[:, 1:]
        cols = cols[1:]
    if SOURCE_HEADER in cols:
        sources = ["" if s is None or s != s else str(s).strip() for s in df[SOURCE_HEADER].tolist()]
        df = df.drop(columns=[SOURCE_HEADER])
        cols = [str(c) for c in df.columns]
    if not cols:
        raise DataError(f"{source} has no concept columns")
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
        raise DataError(f"{source}: concept column(s) {dupes} appear more than once")
    values = df.to_numpy()
    if values.dtype == bool:
        return paths, cols, values, sources
    try:
        num = values.astype(np.float64)
    except (TypeError, ValueError):
        bad_col = next(c for c in df.columns if df[c].dtype == object)
        bad = df[bad_col].iloc[0]
        raise DataError(f"{source}, column {str(bad_col)!r}: value {bad!r} is not 0 or 1") from None
    bad = ~np.isin(num, (0.0, 1.0))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        v = values[i, j]
        v = v.item() if hasattr(v, "item") else v
        raise DataError(f"{source} row {i + 1}, column {cols[j]!r}: value {v!r} is not 0 or 1")
    return paths, cols, num.astype(bool), sources


def read_wide_parquet(path: Path) -> LabelTable:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"cannot read labels Parquet {path}: {exc}") from None
    if len(df) == 0:
        raise DataError(f"labels file {path} has no image rows")
    paths, cols, lab, sources = frame_to_wide(df, str(path))
    if paths is None:
        raise DataError(f"{path}: the first column must hold the image paths (a string column named one of "
                        f"{', '.join(PATH_HEADERS)}), found {str(df.columns[0])!r}")
    return LabelTable(paths=paths, concepts=cols, labels=lab, format="wide parquet", file=str(path),
                      sources=sources)


# -- long -------------------------------------------------------------------------------

def _string_column(table, name: str, file: Path):
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    col = col.fill_null("")
    return pc.utf8_trim_whitespace(col)


def _encode(col) -> tuple[np.ndarray, list[str]]:
    """(codes in order of first appearance, unique values)."""
    enc = col.dictionary_encode()
    return (enc.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            enc.dictionary.to_pylist())


def _csv_line_of_row(path: Path, row: int) -> int:
    """Physical line of data row ``row`` (0-based, blank lines skipped), for error messages."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            start, k = 1, -1
            for rec in reader:
                if any(cell.strip() for cell in rec):
                    if k == row:
                        return start
                    k += 1
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return row + 2


def read_long(path: Path, parquet: bool = False) -> LabelTable:
    """Long table: one row per (image, concept); optional ``value`` (0/1) and ``source`` columns.

    A row with an empty concept lists an image that has no concept; rows with
    value 0 list the image without making it positive. Repeated (image, concept)
    rows count once (e.g. one row per object instance).
    """
    import pyarrow as pa

    kind = "parquet" if parquet else "csv"
    if parquet:
        import pyarrow.parquet as pq

        header = _parquet_columns(path)
        try:
            table = pq.read_table(path, columns=header)
        except Exception as exc:
            raise DataError(f"cannot read labels Parquet {path}: {exc}") from None
    else:
        import pyarrow.csv as pacsv

        header = _csv_header(path)
        if not header:
            raise DataError(f"labels file {path} is empty; expected a header row: path,concept")
        names = [h if h else f"column{j + 1}" for j, h in enumerate(header)]
        try:
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
                parse_options=pacsv.ParseOptions(newlines_in_values=False),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                     strings_can_be_null=False))
        except pa.ArrowInvalid as exc:
            msg = str(exc).strip().splitlines()[0]
            raise DataError(f"cannot parse labels CSV {path}: {msg}") from None
        except OSError as exc:
            raise DataError(f"cannot read labels file {path}: {exc}") from None
        header = names
    low = [h.strip().lower() for h in header]
    if not is_long_header(header):
        raise DataError(f"{path}: a long labels table needs a path column then a concept column (optionally "
                        f"'value' and 'source'), e.g. path,concept; found columns {header}")
    path_col = header[0]
    concept_col = header[next(j for j in range(1, len(low)) if low[j] in LONG_CONCEPT_HEADERS)]
    value_col = header[low.index(VALUE_HEADER)] if VALUE_HEADER in low[1:] else None
    src_col = header[low.index(SOURCE_HEADER)] if SOURCE_HEADER in low[1:] else None
    n_rows = table.num_rows
    if n_rows == 0:
        raise DataError(f"labels file {path} has a header but no rows")

    def label_row(r: int) -> str:
        return f"row {r + 1}" if parquet else f"line {_csv_line_of_row(path, r)}"

    def where_row(r: int) -> str:
        return f"{path} {label_row(r)}"

    img_codes, raw_paths = _encode(_string_column(table, path_col, path))
    con_codes, con_names = _encode(_string_column(table, concept_col, path))
    positive = np.ones(n_rows, dtype=bool)
    if value_col is not None:
        import pyarrow.compute as pc

        vals = table.column(value_col).combine_chunks()
        if pa.types.is_boolean(vals.type):
            positive = vals.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        else:
            text = pc.utf8_trim_whitespace(vals.cast(pa.string()).fill_null("")).to_numpy(zero_copy_only=False)
            text = text.astype(str)
            on = np.isin(text, TRUE_TEXT)
            bad = ~(on | np.isin(text, FALSE_TEXT))
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise DataError(f"{where_row(r)}, column {value_col!r}: value {str(text[r])!r} is not 0 or 1")
            positive = on
    # The empty concept name lists an image without a concept.
    keep_concepts = [j for j, c in enumerate(con_names) if c != ""]
    remap = np.full(len(con_names), -1, dtype=np.int64)
    remap[keep_concepts] = np.arange(len(keep_concepts))
    cols = remap[con_codes]
    mask = positive & (cols >= 0)
    labels = _bool_csr(img_codes[mask], cols[mask], (len(raw_paths), len(keep_concepts)))
    concepts = [con_names[j] for j in keep_concepts]

    first_row = first_occurrences(img_codes)
    sources = None
    if src_col is not None:
        src_codes, src_values = _encode(_string_column(table, src_col, path))
        # One source per image: every row of an image must agree.
        per_image = src_codes[first_row]
        conflict = per_image[img_codes] != src_codes
        if conflict.any():
            r = int(np.flatnonzero(conflict)[0])
            first = int(first_row[img_codes[r]])
            raise DataError(f"{where_row(r)}: image {raw_paths[img_codes[r]]!r} has source "
                            f"{src_values[src_codes[r]]!r} here but {src_values[per_image[img_codes[r]]]!r} on "
                            f"{label_row(first)}; an image has one clean source")
        sources = [src_values[c] for c in per_image]
    return LabelTable(paths=raw_paths, concepts=concepts, labels=labels, format=f"long {kind}", file=str(path),
                      sources=sources, row_label=lambda i: label_row(int(first_row[i])), duplicates="merge")


# -- npz --------------------------------------------------------------------------------

def read_npz(path: Path) -> LabelTable:
    paths, concepts, lab = read_label_matrix(path)
    if paths is None:
        raise DataError(f"{path} has no 'paths' array; a probe set needs the image path of every row "
                        "(paths relative to the image folder)")
    if len(paths) != lab.shape[0]:
        raise DataError(f"{path}: {len(paths)} paths but {lab.shape[0]} label rows")
    if sp.issparse(lab):
        lab = sp.csr_matrix(lab, dtype=bool)
    return LabelTable(paths=paths, concepts=concepts, labels=lab, format="npz", file=str(path))


# -- label matrices without images (``auditor explain``) -------------------------------

def _matrix_from_frame(df, source: str) -> tuple[list[str] | None, list[str], np.ndarray]:
    paths, cols, values, _sources = frame_to_wide(df, source)
    return paths, cols, values


def read_label_matrix(path: str | os.PathLike):
    """Labels for ``auditor explain``: (paths or None, concept names, (N, C) bool or scipy CSR).

    Formats: ``.csv`` and ``.parquet`` (optional leading path column, then 0/1
    columns); ``.npz`` with ``concepts`` and either a dense ``labels`` matrix or
    CSR parts ``indptr``, ``indices``, ``shape``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"labels file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        try:
            df = pd.read_csv(p)
        except Exception as exc:
            raise DataError(f"cannot read labels CSV {p}: {exc}") from None
        return _matrix_from_frame(df, str(p))
    if suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(p)
        except Exception as exc:
            raise DataError(f"cannot read labels Parquet {p}: {exc}") from None
        return _matrix_from_frame(df, str(p))
    if suffix == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"cannot read labels archive {p}: {exc}") from None
        with z:
            if "concepts" not in z.files:
                raise DataError(f"{p} has no 'concepts' array (concept names); found {z.files}")
            concepts = [str(c) for c in z["concepts"]]
            paths = [str(s) for s in z["paths"]] if "paths" in z.files else None
            if "labels" in z.files:
                lab = z["labels"]
                if lab.ndim != 2:
                    raise DataError(f"{p}: 'labels' must be 2-D (N, C), got shape {lab.shape}")
                if lab.dtype != bool:
                    bad = ~np.isin(lab, (0, 1))
                    if bad.any():
                        i, j = np.argwhere(bad)[0]
                        raise DataError(f"{p} row {i}, concept {concepts[j]!r}: value {lab[i, j].item()!r} is not 0 or 1")
                    lab = lab.astype(bool)
            elif {"indptr", "indices", "shape"} <= set(z.files):
                shape = tuple(int(s) for s in z["shape"])
                data = z["data"] if "data" in z.files else np.ones(len(z["indices"]), dtype=bool)
                if not np.isin(data, (0, 1)).all():
                    raise DataError(f"{p}: sparse label values must be 0 or 1")
                lab = sp.csr_matrix((data.astype(bool), z["indices"], z["indptr"]), shape=shape)
                lab.eliminate_zeros()
            else:
                raise DataError(f"{p} must hold 'labels' (dense N×C) or 'indptr', 'indices', 'shape' (CSR); "
                                f"found {z.files}")
        if lab.shape[1] != len(concepts):
            raise DataError(f"{p}: {lab.shape[1]} label columns but {len(concepts)} concept names")
        return paths, concepts, lab
    raise DataError(f"unsupported labels format {suffix or '(none)'!r} for {p}; expected .csv, .parquet or .npz")


# -- class folders ----------------------------------------------------------------------

def walk_images(root: Path) -> tuple[list[str], list[str]]:
    """Every image file under ``root`` (relative '/' paths, sorted) and the ignored symlinked folders.

    Hidden files and folders (a leading '.') are skipped. A symbolic link, to a
    file or a folder, that resolves outside ``root`` is an error; a symlinked
    folder inside ``root`` is not followed (its images are reachable directly).
    """
    root_s = os.fspath(root)
    root_real = os.path.realpath(root_s)
    found: list[str] = []
    skipped: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(root_s, rel_dir) if rel_dir else root_s
        try:
            with os.scandir(full_dir) as it:
                entries = list(it)
        except OSError as exc:
            raise DataError(f"cannot list image folder {full_dir}: {exc}") from None
        pre = rel_dir + "/" if rel_dir else ""
        for e in entries:
            name = e.name
            if name[0] == ".":
                continue
            if e.is_file(follow_symlinks=False):  # the common case first: no system call
                if name[name.rfind("."):].lower() in IMAGE_SUFFIXES:
                    found.append(pre + name)
            elif e.is_dir(follow_symlinks=False):
                stack.append(pre + name)
            elif e.is_symlink():
                rel = pre + name
                real = os.path.realpath(e.path)
                if not _inside(real, root_real):
                    raise DataError(f"{rel!r} in the image folder {root} is a symbolic link that resolves outside "
                                    "it — copy the files into the folder instead")
                if os.path.isdir(real):
                    skipped.append(rel)
                elif name[name.rfind("."):].lower() in IMAGE_SUFFIXES and os.path.isfile(real):
                    found.append(rel)
    found.sort()
    return found, skipped


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def read_class_folders(root: Path) -> LabelTable:
    """ImageFolder layout: the first folder under ``root`` is the image's class (a concept).

    Images directly in ``root`` are kept with no class. Classes are the sorted
    folder names, as torchvision's ImageFolder orders them.
    """
    paths, skipped = walk_images(root)
    if not paths:
        raise DataError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files, "
                        "class folders: root/<class>/image.png)")
    top = [p.split("/", 1)[0] if "/" in p else "" for p in paths]
    classes = sorted({t for t in top if t})
    try:
        classes_all = sorted(e.name for e in os.scandir(root)
                             if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except OSError:
        classes_all = classes
    index = {c: j for j, c in enumerate(classes_all)}
    rows = np.array([i for i, t in enumerate(top) if t], dtype=np.int64)
    cols = np.array([index[t] for t in top if t], dtype=np.int64)
    labels = _bool_csr(rows, cols, (len(paths), len(classes_all)))
    warnings = []
    n_loose = len(paths) - len(rows)
    if n_loose:
        warnings.append(f"{n_loose} image(s) directly in {root} belong to no class folder (kept, negative for "
                        "every class)")
    if skipped:
        warnings.append(f"symbolic-linked folder(s) not followed: {_show(skipped)}")
    return LabelTable(paths=paths, concepts=classes_all, labels=labels, format="folders", file=None,
                      warnings=warnings, row_label=lambda i: f"{root}/{paths[i]}", discovered=True)


# -- COCO -------------------------------------------------------------------------------

def _int_ids(ids: list) -> np.ndarray | None:
    """The ids as int64, or None when they are not all plain integers."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):
        return None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        return None
    return arr.astype(np.int64)


def _lookup_ids(ids: list, refs: list, path: Path, what: str) -> np.ndarray:
    """Position in ``ids`` of every reference (-1 when absent); DataError for a repeated id."""
    plural = "categories" if what == "category" else f"{what}s"
    a, r = _int_ids(ids), _int_ids(refs) if len(refs) else np.zeros(0, dtype=np.int64)
    if a is not None and r is not None:  # integer ids (the usual case): vectorised
        order = np.argsort(a, kind="stable")
        srt = a[order]
        dup = np.flatnonzero(srt[1:] == srt[:-1])
        if len(dup):
            i, j = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
            raise DataError(f"{path}: {what} id {int(a[i])!r} is used twice ({plural}[{i}] and {plural}[{j}])")
        pos = np.minimum(np.searchsorted(srt, r), max(len(srt) - 1, 0))
        found = (srt[pos] == r) if len(srt) else np.zeros(len(r), dtype=bool)
        return np.where(found, order[pos] if len(srt) else -1, -1).astype(np.int64)
    index: dict[Any, int] = {}
    for i, x in enumerate(ids):
        if x in index:
            raise DataError(f"{path}: {what} id {x!r} is used twice ({plural}[{index[x]}] and {plural}[{i}])")
        index[x] = i
    return np.fromiter((index.get(x, -1) for x in refs), dtype=np.int64, count=len(refs))


def read_coco(path: Path) -> LabelTable:
    """COCO instances JSON → image-level concepts.

    Every category is a concept (named by its ``name``), positive on an image
    with at least one annotation of it — crowd annotations (``iscrowd: 1``)
    included, since a crowd of people still shows people. Every supercategory is
    a parent concept, positive when any of its categories is; a supercategory
    named like its only category (COCO's ``person``) is that concept, and one
    named like another category becomes ``"<name> (supercategory)"``. Images with
    no annotation are kept, negative for every concept.
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        try:  # optional: orjson parses large COCO files several times faster
            import orjson

            data = orjson.loads(raw)
        except ImportError:
            data = json.loads(raw)
        del raw
    except FileNotFoundError:
        raise DataError(f"labels file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read COCO annotations {path}: {exc}") from None
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        keys = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} is not a COCO instances file: expected a JSON object with 'images', "
                        f"'annotations' and 'categories', found {keys}")
    images, cats = data["images"], data["categories"]
    anns = data.get("annotations") or []
    if not isinstance(images, list) or not isinstance(cats, list) or not isinstance(anns, list):
        raise DataError(f"{path}: 'images', 'annotations' and 'categories' must be lists")
    if not images:
        raise DataError(f"{path} lists no images")
    try:
        img_ids = [im["id"] for im in images]
        files = [im["file_name"] for im in images]
    except (KeyError, TypeError):
        bad = next(i for i, im in enumerate(images) if not isinstance(im, dict) or "id" not in im
                   or "file_name" not in im)
        raise DataError(f"{path}: images[{bad}] needs 'id' and 'file_name'") from None
    names: list[str] = []
    name_at: dict[str, int] = {}
    supers: list[str | None] = []
    for k, c in enumerate(cats):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{path}: categories[{k}] needs 'id' and 'name'")
        name = str(c["name"]).strip()
        if not name:
            raise DataError(f"{path}: categories[{k}] has an empty name")
        if name in name_at:
            raise DataError(f"{path}: category name {name!r} is used by two categories (ids "
                            f"{cats[name_at[name]]['id']!r} and {c['id']!r}); concept names must be unique")
        name_at[name] = k
        names.append(name)
        sc = c.get("supercategory")
        supers.append(str(sc).strip() if sc not in (None, "") else None)
    if not names:
        raise DataError(f"{path} has no categories: the concept set is empty")
    try:
        a_img = [a["image_id"] for a in anns]
        a_cat = [a["category_id"] for a in anns]
    except (KeyError, TypeError):
        bad = next(i for i, a in enumerate(anns) if not isinstance(a, dict) or "image_id" not in a
                   or "category_id" not in a)
        raise DataError(f"{path}: annotations[{bad}] needs 'image_id' and 'category_id'") from None
    rows = _lookup_ids(img_ids, a_img, path, "image")
    cat_ids = [c["id"] for c in cats]
    cols = _lookup_ids(cat_ids, a_cat, path, "category")
    if (rows < 0).any():
        k = int(np.flatnonzero(rows < 0)[0])
        raise DataError(f"{path}: annotations[{k}] names image id {a_img[k]!r}, which is not in 'images'")
    if (cols < 0).any():
        k = int(np.flatnonzero(cols < 0)[0])
        raise DataError(f"{path}: annotations[{k}] names category id {a_cat[k]!r}, which is not in 'categories'")
    labels = _bool_csr(rows, cols, (len(images), len(names)))

    # Supercategories as a one-level hierarchy.
    children: dict[str, list[str]] = {}
    for name, sc in zip(names, supers):
        if sc is not None:
            children.setdefault(sc, []).append(name)
    parents: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    order: list[str] = list(names)
    for sc, kids in children.items():
        if sc in name_at:
            if kids == [sc]:
                continue  # COCO's 'person': the supercategory is the category itself
            concept = f"{sc} (supercategory)"
        else:
            concept = sc
        order.append(concept)
        descriptions[concept] = f"COCO supercategory: any of {', '.join(kids)}"
        for k in kids:
            if k != concept:
                parents.setdefault(k, []).append(concept)
    for name, sc in zip(names, supers):
        descriptions.setdefault(name, f"COCO category{f' (supercategory {sc})' if sc else ''}")
    table = LabelTable(paths=[str(f) for f in files], concepts=names, labels=labels, format="coco",
                       file=str(path), descriptions=descriptions,
                       row_label=lambda i: f"images[{i}] (id {img_ids[i]!r})")
    n_empty = int((np.diff(labels.indptr) == 0).sum())
    if n_empty:
        table.warnings.append(f"{n_empty} image(s) in {path.name} have no annotation (kept, negative for every "
                              "category)")
    if parents:
        h = Hierarchy(parents=parents, names={}, definitions={}, order=order, declared=None, file=f"{path} "
                      "supercategories")
        table = expand(table, h, warn_missing=False)
    return table


# -- hierarchies ------------------------------------------------------------------------

@dataclass
class Hierarchy:
    """A concept DAG: child → parents, with optional names and definitions."""

    parents: dict[str, list[str]]
    names: dict[str, str]
    definitions: dict[str, str]
    order: list[str]  # every node, in the order the file introduces it
    declared: set[str] | None  # nodes the file defines; None: every id is defined by its use (edge lists)
    file: str
    references: list[tuple[str, str, str]] = field(default_factory=list)  # (id, relation, other id)


_ID_KEYS = ("id", "wnid", "synset", "name_id")
_NAME_KEYS = ("name", "label", "words", "lemma", "title")
_DEF_KEYS = ("definition", "gloss", "description", "desc")


def _first(d: dict, keys: Iterable[str]) -> Any:
    for k in keys:
        if k in d and d[k] not in (None, ""):
            return d[k]
    return None


class _Builder:
    def __init__(self, file: str):
        self.file = file
        self.parents: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}
        self.definitions: dict[str, str] = {}
        self.order: dict[str, None] = {}
        self.declared: set[str] = set()
        self.references: list[tuple[str, str, str]] = []

    def node(self, nid: Any, *, declare: bool, name: Any = None, definition: Any = None) -> str:
        if isinstance(nid, bool) or not isinstance(nid, (str, int)) or str(nid).strip() == "":
            raise DataError(f"hierarchy {self.file}: node id {nid!r} must be a non-empty string")
        nid = str(nid).strip()
        self.order.setdefault(nid, None)
        if declare:
            self.declared.add(nid)
        if name not in (None, ""):
            self.names.setdefault(nid, str(name).strip())
        if definition not in (None, ""):
            self.definitions.setdefault(nid, str(definition).strip())
        return nid

    def edge(self, parent: str, child: str, relation: str, referenced: str) -> None:
        lst = self.parents.setdefault(child, [])
        if parent not in lst:
            lst.append(parent)
        self.references.append((referenced, relation, parent if referenced == child else child))

    def build(self, declared: bool) -> Hierarchy:
        return Hierarchy(parents=self.parents, names=self.names, definitions=self.definitions,
                         order=list(self.order), declared=self.declared if declared else None, file=self.file,
                         references=self.references if declared else [])


def _json_node(b: _Builder, obj: dict, key: Any = None) -> str:
    nid = key if key is not None else _first(obj, _ID_KEYS)
    if nid is None:
        raise DataError(f"hierarchy {b.file}: a node has no id (expected one of {', '.join(_ID_KEYS)}): "
                        f"{json.dumps(obj)[:120]}")
    nid = b.node(nid, declare=True, name=_first(obj, _NAME_KEYS), definition=_first(obj, _DEF_KEYS))
    kids = obj.get("children") or []
    if not isinstance(kids, list):
        raise DataError(f"hierarchy {b.file}: 'children' of {nid!r} must be a list")
    for kid in kids:
        if isinstance(kid, dict):
            cid = _json_node(b, kid)
        else:
            cid = b.node(kid, declare=False)
            b.edge(nid, cid, "child of", cid)
            continue
        b.edge(nid, cid, "child of", cid)
    par = obj.get("parents", obj.get("parent"))
    if par not in (None, "", []):
        for p in par if isinstance(par, list) else [par]:
            pid = b.node(p, declare=False)
            b.edge(pid, nid, "parent of", pid)
    return nid


def read_hierarchy(path: str | os.PathLike) -> Hierarchy:
    """Read a concept hierarchy (JSON or CSV). See ``docs/data.md`` for the accepted shapes.

    JSON: a mapping ``{id: {"name", "definition", "children": [...], "parents": [...]}}``,
    a list of such nodes with an ``"id"`` (or ``{"nodes": [...]}``), a nested tree
    (``{"id", "children": [{...}, ...]}``), or a plain ``{parent: [child, ...]}``.
    CSV: an edge list ``parent,child[,name,definition]`` (name/definition describe
    the child; an empty parent declares a root), or a node table
    ``id,parent[,name,definition]``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"hierarchy file not found: {p}")
    b = _Builder(str(p))
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            with open(p, "rb") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"cannot read hierarchy {p}: {exc}") from None
        declared = True
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            data = data["nodes"]
        if isinstance(data, list):
            for k, obj in enumerate(data):
                if not isinstance(obj, dict):
                    raise DataError(f"hierarchy {p}: item {k} must be an object with an 'id', got {obj!r}")
                _json_node(b, obj)
        elif isinstance(data, dict) and _first(data, _ID_KEYS) is not None and isinstance(data.get("children"), list):
            _json_node(b, data)
        elif isinstance(data, dict):
            plain = all(isinstance(v, (list, str)) for v in data.values())
            declared = not plain
            for key, val in data.items():
                if isinstance(val, dict):
                    _json_node(b, val, key=key)
                elif isinstance(val, list):
                    pid = b.node(key, declare=True)
                    for kid in val:
                        cid = _json_node(b, kid) if isinstance(kid, dict) else b.node(kid, declare=False)
                        b.edge(pid, cid, "child of", cid)
                elif isinstance(val, str):
                    b.node(key, declare=True, name=val)
                else:
                    raise DataError(f"hierarchy {p}: the value of {key!r} must be a node object, a list of "
                                    f"children or a name, got {type(val).__name__}")
        else:
            raise DataError(f"hierarchy {p}: expected a JSON object or list of nodes, got {type(data).__name__}")
        return b.build(declared)
    if suffix in (".csv", ".tsv"):
        try:
            with open(p, newline="", encoding="utf-8-sig") as fh:
                rows = [r for r in csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                        if any(c.strip() for c in r)]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"cannot read hierarchy {p}: {exc}") from None
        if not rows:
            raise DataError(f"hierarchy {p} is empty")
        head = [h.strip().lower() for h in rows[0]]

        def col(*names: str) -> int | None:
            return next((head.index(n) for n in names if n in head), None)

        c_par, c_child, c_id = col("parent", "parents", "hypernym"), col("child", "hyponym"), col(*_ID_KEYS)
        c_name, c_def = col(*_NAME_KEYS), col(*_DEF_KEYS)
        node_col = c_child if c_child is not None else c_id
        if c_par is None or node_col is None:
            raise DataError(f"hierarchy {p}: expected columns parent,child (an edge list) or id,parent (a node "
                            f"table), optionally name,definition; found {rows[0]}")
        declared = c_child is None
        for line, r in enumerate(rows[1:], start=2):
            if len(r) != len(head):
                raise DataError(f"hierarchy {p} line {line}: {len(r)} fields, the header has {len(head)}")
            nid = b.node(r[node_col], declare=True,
                         name=r[c_name] if c_name is not None else None,
                         definition=r[c_def] if c_def is not None else None)
            for par in (x.strip() for x in r[c_par].split(";")):
                if par:
                    pid = b.node(par, declare=not declared)
                    b.edge(pid, nid, "parent of", pid)
        return b.build(declared)
    raise DataError(f"unsupported hierarchy format {suffix or '(no suffix)'!r} for {p}; expected .json or .csv")


def _check_acyclic(h: Hierarchy) -> list[str]:
    """Topological order (parents first) of every node; DataError naming a cycle."""
    nodes = list(dict.fromkeys(h.order + [x for ps in h.parents.values() for x in ps] + list(h.parents)))
    n_parents = {n: len(h.parents.get(n, ())) for n in nodes}
    children: dict[str, list[str]] = {}
    for c, ps in h.parents.items():
        for q in ps:
            children.setdefault(q, []).append(c)
    ready = [n for n in nodes if n_parents[n] == 0]
    topo: list[str] = []
    while ready:
        n = ready.pop()
        topo.append(n)
        for c in children.get(n, ()):
            n_parents[c] -= 1
            if n_parents[c] == 0:
                ready.append(c)
    if len(topo) < len(nodes):
        left = {n for n in nodes if n_parents[n] > 0}
        start = next(n for n in nodes if n in left)
        seen: dict[str, int] = {}
        path: list[str] = []
        n = start
        while n not in seen:
            seen[n] = len(path)
            path.append(n)
            n = next(q for q in h.parents[n] if q in left)
        cycle = path[seen[n]:] + [n]
        raise DataError(f"hierarchy {h.file} has a cycle: " + " → ".join(repr(x) for x in reversed(cycle))
                        + " (each arrow is parent → child); a hierarchy must be acyclic")
    return topo


def expand(table: LabelTable, h: Hierarchy, warn_missing: bool = True) -> LabelTable:
    """Add every ancestor of a label concept as a concept, positive wherever any descendant is.

    Raises :class:`DataError` for a cycle, for ids the hierarchy references but
    never defines (in files that define their nodes), and when no label concept
    is in the hierarchy at all.
    """
    topo = _check_acyclic(h)
    label_set = set(table.concepts)
    if h.declared is not None:
        unknown: dict[str, tuple[str, str]] = {}
        for ref, relation, other in h.references:
            if ref not in h.declared and ref not in label_set and ref not in unknown:
                unknown[ref] = (relation, other)
        if unknown:
            shown = ", ".join(f"{k!r} ({rel} {o!r}){did_you_mean(k, sorted(h.declared | label_set), 1)}"
                              for k, (rel, o) in list(unknown.items())[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise DataError(f"hierarchy {h.file} references unknown id(s) {shown}{more}: every id named as a "
                            "child or parent must be defined as a node in the file or be a concept of the labels")
    nodes = set(topo)
    in_h = [c for c in table.concepts if c in nodes]
    if not in_h:
        sample = [n for n in h.order][:5]
        hint = did_you_mean(table.concepts[0], h.order) if table.concepts else ""
        raise DataError(f"no concept of the labels is a node of hierarchy {h.file} (concepts: "
                        f"{_show(table.concepts, 3)}{hint}; hierarchy ids: {_show(sample, 3)}); the hierarchy "
                        "ids must be the concept names (e.g. WordNet ids as class folder names)")
    # Ancestors of every label concept, walking up in reverse topological order.
    rank = {n: i for i, n in enumerate(topo)}
    anc: dict[str, set[str]] = {}
    needed: set[str] = set()
    stack = list(in_h)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(h.parents.get(n, ()))
    for n in sorted(needed, key=rank.__getitem__):  # parents before children
        s: set[str] = set()
        for q in h.parents.get(n, ()):
            s.add(q)
            s |= anc[q]
        anc[n] = s
    new = [n for n in topo if n in needed and n not in label_set]
    order_pos = {n: i for i, n in enumerate(h.order)}
    new.sort(key=lambda n: (order_pos.get(n, len(order_pos)), n))
    concepts = list(table.concepts) + new
    col = {c: j for j, c in enumerate(concepts)}
    C0 = len(table.concepts)
    e_rows, e_cols = [], []
    for j, c in enumerate(table.concepts):
        e_rows.append(j)
        e_cols.append(j)
        for a in anc.get(c, ()):
            e_rows.append(j)
            e_cols.append(col[a])
    E = sp.csr_matrix((np.ones(len(e_rows), dtype=np.int32), (e_rows, e_cols)), shape=(C0, len(concepts)))
    Y = table.labels
    dense = not sp.issparse(Y)
    Ycsr = sp.csr_matrix(Y, dtype=np.int32) if dense else Y.astype(np.int32)
    out = (Ycsr @ E).tocsr()
    out.data = out.data > 0
    out = sp.csr_matrix(out, dtype=bool)
    out.eliminate_zeros()
    out.sort_indices()
    labels = out.toarray() if dense else out
    names = dict(table.display_names)
    descriptions = dict(table.descriptions)
    for c in concepts:
        if c in h.names and c not in names:
            names[c] = h.names[c]
        if c in h.definitions and c not in descriptions:
            descriptions[c] = h.definitions[c]
    warnings = list(table.warnings)
    missing = [c for c in table.concepts if c not in nodes]
    if missing and warn_missing:
        warnings.append(f"{len(missing)} concept(s) are not in hierarchy {Path(h.file).name} and get no "
                        f"ancestors: {_show(missing)}")
    return replace(table, concepts=concepts, labels=labels, display_names=names, descriptions=descriptions,
                   warnings=warnings)
