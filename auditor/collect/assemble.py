"""The committed result in a cache folder: each layer's (N, K) ``values-NNN.npy`` and
``summary.npz`` (read/unread images, top-k), written last as the commit marker.

Commit order: the ``values-NNN.npy`` files are renamed into place; ``manifest.json``
gets a ``final`` section (a fresh commit id and, per array, its sha256, shape and
dtype); ``summary.npz`` (which carries the same commit id) is written last. A read
serves the arrays only when the summary's commit id is the manifest's and every
array's shape, dtype and sha256 match: a flipped byte, a truncated or swapped file,
an array of another width is never served (see :func:`load_final`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

from ..errors import LayerError
from .cache import CACHE_FORMAT
from .files import atomic_savez, atomic_write_text, load_chunk
from .result import LayerActivations
from .topk import merge_top

def _values_file(folder: Path, li: int) -> Path:
    return folder / f"values-{li:03d}.npy"


class Assembler:
    """Writes chunks' rows into each layer's (N, K) ``.npy`` (under a temp name) and merges top-k;
    :meth:`commit` renames the arrays into place and writes ``summary.npz`` last."""

    def __init__(self, folder: Path, layers: list[str], n: int, k: int, manifest: dict | None = None):
        self.folder, self.layers, self.n, self.k = folder, layers, n, k
        self.manifest = manifest  # the cache key's manifest: commit() adds the arrays' checksums to it
        self.ok = np.zeros(n, dtype=bool)
        self.seen = np.zeros(n, dtype=bool)
        self.bad_index: list[int] = []
        self.bad_reason: list[str] = []
        self.files: dict[int, tuple[Path, int, int, int]] = {}  # li -> (tmp path, fd, data offset, K)
        self.meta: dict[int, dict[str, np.ndarray]] = {}
        self.tops: dict[int, dict[str, np.ndarray | None]] = {}

    def _open(self, li: int, K: int) -> tuple[Path, int, int, int]:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-values-", suffix=".npy")
        os.close(fd)
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.n, K))
        offset = int(mm.offset)
        del mm
        # Rows go in with plain positional writes, not through the mapping: written
        # pages then live in the page cache, not in this process's resident memory.
        fd = os.open(tmp, os.O_RDWR)
        self.files[li] = (Path(tmp), fd, offset, K)
        return self.files[li]

    def add(self, start: int, chunk: dict[str, np.ndarray]) -> None:
        n = len(chunk["ok"])
        self.ok[start:start + n] = chunk["ok"]
        self.seen[start:start + n] = True
        self.bad_index.extend(int(i) for i in chunk.get("bad_index", []))
        self.bad_reason.extend(str(r) for r in chunk.get("bad_reason", []))
        for li in range(len(self.layers)):
            vals = np.ascontiguousarray(chunk[f"L{li}/values"], dtype=np.float32)
            _, fd, offset, K = self.files.get(li) or self._open(li, vals.shape[1])
            if vals.shape[1] != K:
                raise LayerError(f"layer {self.layers[li]!r} gave {vals.shape[1]} neurons in one chunk and {K} in "
                                 "another; its output size must not depend on the input")
            _pwrite_all(fd, memoryview(vals).cast("B"), offset + start * K * 4)
            self.meta[li] = {key: chunk[f"L{li}/{key}"] for key in ("shape", "kind", "reduction", "layout", "calls")
                             if f"L{li}/{key}" in chunk}
            part = {key: chunk.get(f"L{li}/{key}") for key in ("top_values", "top_index", "top_maps")}
            self.tops[li] = merge_top([self.tops.get(li) or {}, part], self.k)

    def commit(self) -> None:
        if not self.seen.all():
            raise RuntimeError(f"internal error: {int((~self.seen).sum())} rows were never assembled")
        commit = uuid.uuid4().hex
        record: dict[str, dict] = {}
        for li, (tmp, fd, _, K) in sorted(self.files.items()):
            os.fsync(fd)
            os.close(fd)
            record[_values_file(self.folder, li).name] = {"sha256": sha256_file(tmp), "shape": [self.n, K],
                                                          "dtype": "float32"}
            os.replace(tmp, _values_file(self.folder, li))
        self.files = {}
        manifest = dict(self.manifest or {})
        manifest["final"] = {"commit": commit, "arrays": record}
        atomic_write_text(self.folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True, default=str))
        arrays: dict[str, np.ndarray] = {
            "format": np.asarray(CACHE_FORMAT), "n": np.asarray(self.n), "ok": self.ok,
            "commit": np.asarray(commit),
            "layers": np.asarray(self.layers, dtype=str),
            "bad_index": np.asarray(self.bad_index, dtype=np.int64),
            "bad_reason": np.asarray(self.bad_reason, dtype=str)}
        for li in range(len(self.layers)):
            for key, v in self.meta[li].items():
                arrays[f"L{li}/{key}"] = v
            for key, v in self.tops[li].items():
                if v is not None:
                    arrays[f"L{li}/{key}"] = v
        atomic_savez(self.folder / "summary.npz", **arrays)

    def abort(self) -> None:
        for tmp, fd, _, _ in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
            tmp.unlink(missing_ok=True)
        self.files = {}


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[:1 << 30], offset)
        data, offset = data[n:], offset + n


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def load_final(folder: Path, layers: list[str], n: int, *, verify: bool = True,
               problems: list[str] | None = None) -> tuple[dict[str, LayerActivations], dict] | None:
    """The committed result in ``folder`` (memory-mapped), or None if absent or unusable.

    With ``verify`` (every read of a result this process did not just write), each
    array must match the checksum, shape and dtype the commit recorded in
    ``manifest.json``. Why a result present on disk was not served is appended to
    ``problems`` (absent results add nothing).
    """
    problems = problems if problems is not None else []
    if not (folder / "summary.npz").exists():
        return None
    summary = load_chunk(folder / "summary.npz")
    if summary is None:
        problems.append("summary.npz is unreadable (changed on disk)")
        return None
    try:
        if list(summary["layers"]) != list(layers) or int(summary["n"]) != n or len(summary["ok"]) != n:
            problems.append("summary.npz describes other layers or another number of images")
            return None
        try:
            final = json.loads((folder / "manifest.json").read_text())["final"]
            record = final["arrays"]
        except (OSError, ValueError, KeyError, TypeError):
            problems.append("manifest.json has no record of the committed arrays")
            return None
        if "commit" not in summary or str(summary["commit"]) != final.get("commit"):
            problems.append("summary.npz and manifest.json are from different commits")
            return None
        out: dict[str, LayerActivations] = {}
        for li, name in enumerate(layers):
            path = _values_file(folder, li)
            want = record.get(path.name)
            if not isinstance(want, dict):
                problems.append(f"{path.name} has no recorded checksum")
                return None
            values = np.load(path, mmap_mode="r")
            if values.dtype != np.float32 or list(values.shape) != list(want.get("shape", [])) or values.shape[0] != n:
                problems.append(f"{path.name} holds a {values.dtype} array of shape {tuple(values.shape)}, "
                                f"recorded as {want.get('dtype')} {tuple(want.get('shape', []))}")
                return None
            if verify and sha256_file(path) != want.get("sha256"):
                problems.append(f"{path.name} does not match its recorded sha256 (changed on disk)")
                return None
            get = summary.get
            out[name] = LayerActivations(
                name=name, values=values, output_shape=tuple(int(s) for s in summary[f"L{li}/shape"]),
                top_index=get(f"L{li}/top_index"), top_values=get(f"L{li}/top_values"),
                top_maps=get(f"L{li}/top_maps"),
                kind=str(summary[f"L{li}/kind"]) if f"L{li}/kind" in summary else None,
                reduction=str(summary[f"L{li}/reduction"]) if f"L{li}/reduction" in summary else None,
                layout=str(summary[f"L{li}/layout"]) if f"L{li}/layout" in summary else None,
                calls=int(summary[f"L{li}/calls"]) if f"L{li}/calls" in summary else None)
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"unreadable ({type(exc).__name__}: {exc})")
        return None
    return out, {"ok": summary["ok"].astype(bool), "bad_index": summary["bad_index"],
                 "bad_reason": summary["bad_reason"]}
