"""Files on disk that are never read half-written: atomic writes, chunk files, temp cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

STALE_TMP_S = 3600.0  # leftover temp files older than this are removed

def atomic_write(path: Path, write: Callable[[IO], object], mode: str = "wb") -> None:
    """Write ``path`` through ``write(fh)`` into a temp file beside it, fsync, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), "w")


def load_chunk(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None  # unreadable chunk: recompute it


def chunk_valid(chunk: dict[str, np.ndarray] | None, n: int, n_layers: int) -> bool:
    if chunk is None or "ok" not in chunk or len(chunk["ok"]) != n:
        return False
    for li in range(n_layers):
        v = chunk.get(f"L{li}/values")
        if v is None or v.ndim != 2 or v.shape[0] != n:
            return False
    return True


def clean_stale_tmp(folder: Path, all_of_them: bool = False) -> None:
    """Remove temp files a killed run left: all of them (the caller holds the folder's lock)
    or those older than :data:`STALE_TMP_S`."""
    now = time.time()
    for p in folder.glob(".tmp-*"):
        try:
            if all_of_them or now - p.stat().st_mtime > STALE_TMP_S:
                p.unlink()
        except OSError:
            pass


def remove_scratch(scratch: Path) -> None:
    if os.name == "nt":  # open memory maps pin their files on Windows: remove at exit
        import atexit
        atexit.register(shutil.rmtree, scratch, True)
    else:  # POSIX: the mapped data stays readable after the files are unlinked
        shutil.rmtree(scratch, ignore_errors=True)
