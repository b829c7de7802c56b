"""Probe images and concept labels.

A :class:`ProbeSet` is the list of image paths (relative to an image root) and a
boolean concept-label matrix with one row per image. Loading validates at the
boundary: every problem a user can fix is a :class:`~auditor.errors.DataError`
that names the file, row, column or value and says what was expected.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, did_you_mean

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PATH_HEADERS = ("path", "image", "file", "filename", "img")


@dataclass(frozen=True)
class ProbeSet:
    root: Path
    paths: list[str]  # relative to root, '/' separators
    labels: np.ndarray  # (N, C) bool
    concepts: list[str]
    labels_file: str | None = None
    labels_sha256: str | None = None
    display_names: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    # Pairs of rows (clean image, the same image with a synthesised artifact), per
    # artifact concept: shape (M, 2). Empty when the probe set has no synthesised copies.
    pairs: dict[str, np.ndarray] = field(default_factory=dict)

    def row_concepts(self, i: int) -> list[str]:
        """Names of the concepts positive on row ``i``."""
        row = self.labels[i]
        if hasattr(row, "toarray"):
            row = row.toarray().ravel()
        return [c for c, on in zip(self.concepts, np.asarray(row).ravel()) if on]

    def dense_columns(self, names: list[str]) -> np.ndarray:
        """(N, len(names)) bool matrix of the named concepts."""
        cols = [self.column(n) for n in names]
        sub = self.labels[:, cols]
        return sub.toarray().astype(bool) if hasattr(sub, "toarray") else np.asarray(sub, dtype=bool)

    def column(self, name: str) -> int:
        try:
            return self.concepts.index(name)
        except ValueError:
            raise DataError(f"unknown concept {name!r}{did_you_mean(name, self.concepts)}") from None

    def full_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def fingerprint(self) -> str:
        """Hash of every image's path, size and mtime, plus the labels."""
        h = hashlib.sha256()
        for rel in self.paths:
            st = (self.root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update("\0".join(self.concepts).encode())
        return h.hexdigest()

    def image_fingerprint(self) -> str:
        """Hash of the images alone (the activation cache key: labels do not change activations)."""
        h = hashlib.sha256()
        h.update(str(self.root.resolve()).encode() + b"\n")
        for rel in self.paths:
            st = (self.root / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def subset(self, keep: np.ndarray) -> ProbeSet:
        idx = np.flatnonzero(keep)
        return ProbeSet(root=self.root, paths=[self.paths[i] for i in idx], labels=self.labels[idx],
                        concepts=self.concepts, labels_file=self.labels_file, labels_sha256=self.labels_sha256,
                        display_names=self.display_names, descriptions=self.descriptions)

    def provenance(self) -> dict[str, Any]:
        return {"images": str(self.root), "n_images": len(self.paths), "n_concepts": len(self.concepts),
                "labels_file": self.labels_file, "labels_sha256": self.labels_sha256,
                "fingerprint": self.fingerprint()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_relative(root: Path, rel: str, where: str) -> str:
    """Validate that ``rel`` names a file inside ``root``; return it normalised."""
    if not rel or not rel.strip():
        raise DataError(f"{where}: empty image path")
    rel = rel.strip().replace("\\", "/")
    p = Path(rel)
    if p.is_absolute() or rel.startswith("/"):
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
    try:
        with open(labels_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"labels file not found: {labels_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labels file {labels_path}: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"labels file {labels_path} is empty; expected a header row: path,concept1,concept2,…")
    header = [h.strip() for h in rows[0]]
    if len(header) < 2:
        raise DataError(f"labels file {labels_path} has no concept columns; expected a header row: "
                        "path,concept1,concept2,…")
    concepts = header[1:]
    seen: dict[str, int] = {}
    for j, name in enumerate(concepts):
        if not name:
            raise DataError(f"{labels_path}: concept column {j + 2} has an empty name in the header")
        if name in seen:
            raise DataError(f"{labels_path}: concept {name!r} appears twice in the header (columns "
                            f"{seen[name] + 2} and {j + 2})")
        seen[name] = j
    body = rows[1:]
    if not body:
        raise DataError(f"labels file {labels_path} has a header but no image rows")
    labels = np.zeros((len(body), len(concepts)), dtype=bool)
    paths: list[str] = []
    for i, row in enumerate(body):
        line = i + 2
        if len(row) != len(header):
            raise DataError(f"{labels_path} line {line}: {len(row)} fields, the header has {len(header)}")
        paths.append(row[0])
        for j, cell in enumerate(row[1:]):
            v = cell.strip()
            if v in ("1", "1.0", "true", "True", "TRUE"):
                labels[i, j] = True
            elif v in ("0", "0.0", "false", "False", "FALSE"):
                continue
            else:
                raise DataError(f"{labels_path} line {line}, column {concepts[j]!r}: value {cell!r} is not 0 or 1")
    return paths, concepts, labels


def load_probe_set(images: str | os.PathLike | None, labels: str | os.PathLike | None) -> ProbeSet:
    """Load and validate a probe set from an image folder and a wide label CSV."""
    if not images:
        raise DataError("no image folder given: pass --images DIR (or `images:` in the config)")
    if not labels:
        raise DataError("no labels file given: pass --labels FILE.csv (or `labels:` in the config)")
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    labels_path = Path(labels)
    if not labels_path.is_file():
        raise DataError(f"labels file not found: {labels_path}")
    suffix = labels_path.suffix.lower()
    if suffix != ".csv":
        raise DataError(f"unsupported labels format {suffix or '(no suffix)'!r} for {labels_path}; expected .csv")
    raw_paths, concepts, matrix = read_wide_csv(labels_path)
    paths: list[str] = []
    first_row: dict[str, int] = {}
    missing: list[str] = []
    for i, raw in enumerate(raw_paths):
        rel = safe_relative(root, raw, f"{labels_path} line {i + 2}")
        if rel in first_row:
            raise DataError(f"{labels_path}: image {rel!r} is listed twice (lines {first_row[rel] + 2} and {i + 2}); "
                            "each image needs exactly one row")
        first_row[rel] = i
        if not (root / rel).is_file():
            missing.append(rel)
        paths.append(rel)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{len(missing)} image(s) listed in {labels_path} are missing from {root}: {shown}{more}")
    return ProbeSet(root=root, paths=paths, labels=matrix, concepts=concepts,
                    labels_file=str(labels_path), labels_sha256=_sha256(labels_path))


def check_artifacts(probe: ProbeSet, artifacts: list[str] | tuple[str, ...]) -> None:
    """Every artifact must be a concept with at least one positive and one negative image."""
    for name in artifacts:
        if name not in probe.concepts:
            raise DataError(f"artifact {name!r} is not a concept in {probe.labels_file}"
                            f"{did_you_mean(name, probe.concepts)}; concepts are the label columns")
        col = probe.labels[:, probe.concepts.index(name)]
        n_pos = int(col.sum())
        if n_pos == 0:
            raise DataError(f"artifact {name!r} has no positive image in {probe.labels_file}; "
                            "an artifact can only be audited with images that carry it")
        if n_pos == len(col):
            raise DataError(f"artifact {name!r} is positive on every image in {probe.labels_file}; "
                            "the probe set also needs images without it")


# -- label tables without images (``auditor explain``) ---------------------------------

def _matrix_from_frame(df, source: str) -> tuple[list[str] | None, list[str], np.ndarray]:
    paths = None
    cols = [str(c) for c in df.columns]
    if cols and (cols[0].lower() in PATH_HEADERS or df[df.columns[0]].dtype == object):
        paths = [str(p) for p in df[df.columns[0]].tolist()]
        df = df.iloc[:, 1:]
        cols = cols[1:]
    if not cols:
        raise DataError(f"{source} has no concept columns")
    dupes = sorted({c for c in cols if cols.count(c) > 1})
    if dupes:
        raise DataError(f"{source}: concept column(s) {dupes} appear more than once")
    values = df.to_numpy()
    if values.dtype == bool:
        return paths, cols, values
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
    return paths, cols, num.astype(bool)


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
                import scipy.sparse as sp

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
