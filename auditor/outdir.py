"""The output folder (``--out``): owned by auditor, switched from one run to the next at once.

Layout (``OUT`` is the folder the user named; nothing else in it is touched)::

    OUT/report.html            -> .auditor/current/report.html   (one link per output)
    OUT/results.json           -> .auditor/current/results.json
    OUT/.auditor-manifest.json -> .auditor/current/manifest.json
    OUT/.auditor/current       -> runs/<run id>                   (the one switch)
    OUT/.auditor/runs/<run id>/  the files themselves + manifest.json (sha256 of each)
    OUT/.auditor/lock            held while a run writes here

A run renders every file into a fresh ``.auditor/runs/<id>/`` — inside ``OUT``, so on
``OUT``'s own file system (an ``OUT`` that is a mount point works) — syncs it, and then
publishes it with these steps, each a single atomic file-system call:

1. add the links for outputs the previous run did not have (they resolve to nothing
   until step 2, so no file of the new run is visible yet);
2. ``rename(.auditor/current.new, .auditor/current)``: *the* switch — every link now
   resolves into the new run;
3. remove the links for outputs the new run does not have (they resolve to nothing
   since step 2);
4. delete the previous run's folder.

A kill between any two steps therefore leaves every output path of ``OUT`` opening a
file of one run — all of the old run (before step 2) or all of the new (from step 2),
never a mix; a link that resolves to nothing may be left over, and the next run removes
it together with any half-written run folder. SIGTERM and Ctrl-C are held over steps 1–3
(:func:`auditor.interrupt.critical`).

Ownership: a name auditor writes (``report.html``, ``results.json``, …) that exists in
``OUT`` but is not auditor's link is refused with exit 2 naming it — auditor never
overwrites or deletes a file it did not write. A folder written by an older auditor (no
manifest, plain files) is recognised by the outputs' content (``results.json`` of
auditor, the report's generator tag, the CSV header, the JUnit suite name; a
``report.pdf`` counts when one of those is present) and taken over without a gap: each
file is first hard-linked (or copied) into a run folder, then swapped for its link.

Two runs into one ``OUT`` take ``.auditor/lock`` (filelock); the second waits for the
first to finish writing (it says so on stderr) for at most :data:`LOCK_TIMEOUT_S`
seconds, then exits 2.
"""

from __future__ import annotations

import datetime as _dt
import errno
import filecmp
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import interrupt
from .errors import OutputError

STATE = ".auditor"
MANIFEST = ".auditor-manifest.json"
#: every name auditor writes at the top of ``--out`` (format -> file name)
OUTPUT_NAMES = {"html": "report.html", "pdf": "report.pdf", "json": "results.json", "csv": "neurons.csv",
                "junit": "junit.xml"}
LOCK_TIMEOUT_S = 600.0

Log = Callable[[str], None]


def _link_target(name: str) -> str:
    target = "manifest.json" if name == MANIFEST else name
    return f"{STATE}/current/{target}"


def _is_our_link(path: Path, name: str) -> bool:
    return path.is_symlink() and os.readlink(path) == _link_target(name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the data files are synced
        pass
    finally:
        os.close(fd)


# -- recognising an older auditor's plain files --------------------------------------------------

def _head(path: Path, n: int = 65536) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _looks_like_ours(name: str, path: Path) -> bool:
    head = _head(path)
    if name == "results.json":
        return b'"schema_version"' in head and b'"auditor"' in head
    if name == "compare.json":
        return b'"n_new"' in head and b'"comparable"' in head
    if name == "report.html":
        return b'<meta name="generator" content="auditor' in head
    if name == "neurons.csv":
        return head.startswith(b"layer,neuron,status")
    if name == "junit.xml":
        return b'<testsuites name="auditor' in head
    return False


def _legacy_files(out: Path, names: dict[str, str]) -> list[str]:
    """Plain output files of an older auditor (no manifest); raises for one that is not auditor's.

    A file is recognised by its content; a PDF or an HTML page without a signature of its own
    counts when another output beside it is recognised."""
    present = [n for n in names.values() if (out / n).is_file() and not (out / n).is_symlink()]
    recognised = {n for n in present if _looks_like_ours(n, out / n)}
    for n in present:
        if n in recognised:
            continue
        if recognised and n.endswith(".pdf") and _head(out / n, 5) == b"%PDF-":
            continue
        if recognised and n.endswith(".html") and b"<html" in _head(out / n, 4096).lower():
            continue
        raise OutputError(f"{out / n} was not written by auditor (the folder has no {MANIFEST}); auditor never "
                          "overwrites files it did not write — move it away or choose another --out")
    return present


def _check_owned(out: Path, has_current: bool, names: dict[str, str]) -> list[str]:
    """Refuse an output name auditor did not write; return plain files left by an interrupted take-over."""
    twins = []
    for name in (*names.values(), MANIFEST):
        p = out / name
        if not os.path.lexists(p) or _is_our_link(p, name):
            continue
        if has_current and p.is_file() and not p.is_symlink():
            # Left by an interrupted take-over of an older folder: the same file is in the run folder.
            twin = out / STATE / "current" / name
            if twin.is_file() and (os.path.samefile(p, twin) or filecmp.cmp(p, twin, shallow=False)):
                twins.append(name)
                continue
        if not has_current and name != MANIFEST and p.is_file() and not p.is_symlink():
            continue  # judged by _legacy_files
        raise OutputError(f"{p} was not written by auditor; auditor never overwrites files it did not write — "
                          "move it away or choose another --out")
    return twins


# -- the folder ----------------------------------------------------------------------------------

class _Lock:
    def __init__(self, path: Path, out: Path, log: Log):
        from filelock import FileLock

        self.lock = FileLock(str(path))
        self.out = out
        self.log = log

    def __enter__(self):
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
            return self
        except Timeout:
            pass
        self.log(f"waiting for another auditor run to finish writing {self.out} (up to {LOCK_TIMEOUT_S:g} s)")
        try:
            self.lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise OutputError(f"another auditor run is still writing to {self.out} after {LOCK_TIMEOUT_S:g} s "
                              f"(lock {self.lock.lock_file}); wait for it to finish or choose another --out") \
                from None
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _current_run(state: Path) -> Path | None:
    cur = state / "current"
    if cur.is_symlink() and cur.exists():
        return cur.resolve()
    return None


def _tidy(out: Path, state: Path, names: dict[str, str]) -> None:
    """Remove what an interrupted run left (under the lock: nobody else is writing here)."""
    (state / "current.new").unlink(missing_ok=True)
    cur = _current_run(state)
    runs = state / "runs"
    for d in list(runs.iterdir()) if runs.is_dir() else []:
        if cur is not None and d.resolve() == cur:
            continue
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink()
    for name in (*names.values(), MANIFEST):
        p = out / name
        if _is_our_link(p, name) and not p.exists():
            p.unlink()
        tmp = out / f".{name}.auditor-link"
        if tmp.is_symlink():
            tmp.unlink()


def _new_run_folder(state: Path, prefix: str) -> Path:
    run = Path(tempfile.mkdtemp(prefix=prefix, dir=state / "runs"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(run, 0o777 & ~umask)  # mkdtemp makes 0700; the reports are as readable as the folder
    return run


def _replace_with_link(out: Path, name: str) -> None:
    tmp = out / f".{name}.auditor-link"
    tmp.unlink(missing_ok=True)
    os.symlink(_link_target(name), tmp)
    os.replace(tmp, out / name)


def _take_over_legacy(out: Path, state: Path, files: list[str], names: dict[str, str]) -> None:
    """Move an older auditor's plain files under management without a moment where one is missing."""
    run = _new_run_folder(state, "legacy-")
    for n in files:
        try:
            os.link(out / n, run / n)
        except OSError:
            shutil.copy2(out / n, run / n)
    fmt_of = {v: k for k, v in names.items()}
    _write_manifest(run, {fmt_of[n]: run / n for n in files}, legacy=True)
    _fsync_dir(run)
    _switch_pointer(state, run)
    for n in files:  # each file is swapped for a link to identical bytes
        _replace_with_link(out, n)
    _fsync_dir(out)


def _write_manifest(run: Path, written: dict[str, Path], legacy: bool = False) -> None:
    from . import __version__

    files = {p.name: {"format": fmt, "bytes": p.stat().st_size, "sha256": _sha256(p)} for fmt, p in written.items()}
    manifest = {"tool": {"name": "auditor", "version": __version__}, "run": run.name,
                "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "files": files}
    if legacy:
        manifest["note"] = "plain files of an older auditor, taken over as they were"
    (run / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _switch_pointer(state: Path, run: Path) -> None:
    new = state / "current.new"
    new.unlink(missing_ok=True)
    os.symlink(f"runs/{run.name}", new)
    os.replace(new, state / "current")
    _fsync_dir(state)


def publish(out: str | os.PathLike, produce: Callable[[Path], dict[str, Path]],
            log: Log | None = None, names: dict[str, str] | None = None) -> dict[str, Path]:
    """Let ``produce(folder)`` write the outputs into a fresh run folder, then switch ``out`` to them.

    ``produce`` returns ``{format: path}`` for files directly inside the folder it is given,
    named as in ``names`` (default :data:`OUTPUT_NAMES`; ``auditor compare`` has its own).
    Every name in ``names`` is auditor's in ``out``. Returns ``{format: out / name}``. On any failure —
    before the switch — ``out`` is left as it was and the run folder is removed.
    """
    log = log or (lambda msg: None)
    names = dict(names or OUTPUT_NAMES)
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    state = out / STATE
    if os.path.lexists(state) and (not state.is_dir() or state.is_symlink()):
        raise OutputError(f"{state} is not auditor's state folder; move it away or choose another --out")
    made_out = not out.exists()
    made_state = not state.exists()
    try:
        (state / "runs").mkdir(parents=True, exist_ok=True)
        with _Lock(state / "lock", out, log):
            return _publish_locked(out, state, produce, names)
    except BaseException:
        # A failed first run into a new folder leaves no trace of itself.
        if made_state and _current_run(state) is None:
            shutil.rmtree(state, ignore_errors=True)
        if made_out:
            try:
                out.rmdir()
            except OSError:
                pass
        raise


def _check_links(state: Path) -> None:
    """Fail early, before rendering, where the file system cannot hold symbolic links."""
    probe = state / "link-probe"
    probe.unlink(missing_ok=True)
    try:
        os.symlink("runs", probe)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OutputError(f"the file system of {state.parent} cannot hold symbolic links ({exc.strerror}), "
                              "which auditor uses to switch --out from one run to the next at once; write --out "
                              "on another file system (any local Linux/macOS or NFS one) and copy it") from None
        raise
    probe.unlink()


def _publish_locked(out: Path, state: Path, produce: Callable[[Path], dict[str, Path]],
                    names: dict[str, str]) -> dict[str, Path]:
    _check_links(state)
    _tidy(out, state, names)
    has_current = _current_run(state) is not None
    twins = _check_owned(out, has_current, names)
    legacy = [] if has_current else _legacy_files(out, names)
    run = _new_run_folder(state, "run-")
    switched = False
    try:
        written = produce(run)
        for fmt, p in written.items():
            if p.parent != run or names.get(fmt) != p.name:
                raise ValueError(f"output {fmt} written as {p}, expected {run / names.get(fmt, '?')}")
            _fsync_file(p)
        _write_manifest(run, written)
        _fsync_file(run / "manifest.json")
        _fsync_dir(run)
        with interrupt.critical():
            if legacy:
                _take_over_legacy(out, state, legacy, names)
            for name in twins:  # finish a take-over a kill cut short: same bytes, now behind a link
                _replace_with_link(out, name)
            old = _current_run(state)
            new_names = [p.name for p in written.values()] + [MANIFEST]
            for name in new_names:  # step 1: links for new names (resolve to nothing yet)
                if not _is_our_link(out / name, name):
                    _replace_with_link(out, name)
            _fsync_dir(out)
            _switch_pointer(state, run)  # step 2: the switch
            switched = True
            try:
                for name in (*names.values(), MANIFEST):  # step 3: links the new run has no file for
                    if name not in new_names and _is_our_link(out / name, name):
                        (out / name).unlink()
                _fsync_dir(out)
            except OSError:  # the run is published; a link left resolves to nothing and the next run removes it
                pass
        if old is not None and old != run.resolve():  # step 4
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if not switched:
            shutil.rmtree(run, ignore_errors=True)
            try:
                _tidy(out, state, names)  # links added in step 1 for this run's files
            except OSError:
                pass
        raise
    return {fmt: out / p.name for fmt, p in written.items()}
