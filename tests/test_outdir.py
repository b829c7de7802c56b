"""The output folder under faults: one run's files at a time, never another's, never the user's.

The kill tests fork a child that runs :func:`auditor.outdir.publish` and dies with
``os._exit`` (no ``finally``, no cleanup — as under SIGKILL) just before its k-th
file-system change, for every k; the parent then checks that every output path of
``--out`` opens a file of one run only, and that the next run leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from auditor import outdir
from auditor.errors import OutputError

NAMES = outdir.OUTPUT_NAMES  # format -> file name
VISIBLE = set(NAMES.values())


def producer(tag: str, formats):
    def produce(folder: Path) -> dict[str, Path]:
        written = {}
        for fmt in formats:
            p = folder / NAMES[fmt]
            p.write_text(f"{tag}:{fmt}\n")
            written[fmt] = p
        return written
    return produce


def expected(tag: str, formats) -> dict[str, str]:
    return {NAMES[f]: f"{tag}:{f}\n" for f in formats}


def visible(out: Path) -> dict[str, str]:
    """What a reader of ``out`` sees: every output name that opens, with its text."""
    seen = {}
    for name in VISIBLE:
        p = out / name
        if p.exists():
            seen[name] = p.read_text()
    return seen


def assert_clean(out: Path, user_files: dict[str, str]) -> None:
    """Exactly one run folder, no dangling links, no temporary names; the user's files unchanged."""
    state = out / outdir.STATE
    runs = list((state / "runs").iterdir())
    assert len(runs) == 1 and (state / "current").resolve() == runs[0].resolve(), runs
    assert not (state / "current.new").exists() and not (state / "current.new").is_symlink()
    for p in out.iterdir():
        if p.is_symlink():
            assert p.exists(), f"dangling link {p.name}"
        assert not p.name.endswith(".auditor-link"), p
    for name, text in user_files.items():
        assert (out / name).read_text() == text
    manifest = json.loads((out / outdir.MANIFEST).read_text())
    assert set(manifest["files"]) == set(visible(out))
    for name, info in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]


ALL = ("html", "pdf", "json", "csv", "junit")

MUTATORS = [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (os, "link"), (os, "rmdir"),
            (shutil, "rmtree"), (shutil, "copy2")]


def _run_and_die_at(k: int, out: Path, produce) -> int:
    """Fork; in the child, die just before the k-th file-system change of ``publish``. Returns the count."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        count = [0]

        def wrap(mod, name):
            real = getattr(mod, name)

            def f(*a, **kw):
                count[0] += 1
                if count[0] == k:
                    os._exit(137)
                return real(*a, **kw)
            setattr(mod, name, f)

        try:
            for mod, name in MUTATORS:
                wrap(mod, name)
            outdir.publish(out, produce)
            os.write(w, str(count[0]).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data) if data else -1


def _legacy(out: Path) -> dict[str, str]:
    """Plain files as an older auditor wrote them (recognised by their content)."""
    out.mkdir(parents=True)
    files = {"results.json": '{"schema_version": "1.0", "tool": {"name": "auditor"}}\n',
             "report.html": '<html><head><meta name="generator" content="auditor 0.0.9"></head></html>\n',
             "junit.xml": '<testsuites name="auditor: old"/>\n',
             "neurons.csv": "layer,neuron,status\n",
             "report.pdf": "%PDF-1.7 old\n"}
    for n, t in files.items():
        (out / n).write_text(t)
    return files


SCENARIOS = {
    "shrink": (ALL, ("json",)),         # a full run, then --formats json
    "grow": (("json",), ALL),
    "swap": (("html", "csv"), ("json", "junit")),
    "first": (None, ("json", "csv")),   # no --out yet
    "legacy": ("legacy", ("json", "csv")),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kill_between_every_pair_of_steps(tmp_path, scenario):
    before, after = SCENARIOS[scenario]
    user = {"keep.txt": "mine\n"}
    base = tmp_path / "base"
    if before == "legacy":
        old_files = _legacy(base)
    elif before is not None:
        outdir.publish(base, producer("old", before))
        old_files = expected("old", before)
    else:
        old_files = {}
    if before is not None:
        (base / "keep.txt").write_text(user["keep.txt"])
    # How many changes does an uninterrupted switch make?
    probe = tmp_path / "probe"
    shutil.copytree(base, probe, symlinks=True) if base.exists() else None
    total = _run_and_die_at(10 ** 9, probe, producer("new", after))
    assert total > 3, total
    assert visible(probe) == expected("new", after)
    new_files = expected("new", after)
    old_visible = {n: t for n, t in old_files.items()}
    for k in range(1, total + 1):
        out = tmp_path / f"k{k}"
        if base.exists():
            shutil.copytree(base, out, symlinks=True)
        _run_and_die_at(k, out, producer("new", after))
        seen = visible(out) if out.exists() else {}
        assert seen in (old_visible, new_files), f"kill before change {k}/{total}: {seen}"
        if out.exists() and before is not None:
            assert (out / "keep.txt").read_text() == user["keep.txt"]
        # The next run recovers: its files only, nothing left behind.
        outdir.publish(out, producer("next", ("json", "html")))
        assert visible(out) == expected("next", ("json", "html"))
        assert_clean(out, user if before is not None else {})


def test_second_run_with_fewer_formats_removes_the_others(tmp_path):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ALL))
    (out / "keep.txt").write_text("mine\n")
    outdir.publish(out, producer("b", ("json",)))
    assert visible(out) == expected("b", ("json",))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["keep.txt", "results.json"]
    assert_clean(out, {"keep.txt": "mine\n"})


def test_a_file_auditor_did_not_write_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}\n')  # no manifest, not auditor's
    with pytest.raises(OutputError, match=r"results\.json was not written by auditor"):
        outdir.publish(out, producer("a", ("json",)))
    assert (out / "results.json").read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # nothing of ours left


def test_a_user_file_replacing_our_link_is_refused(tmp_path):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ("json", "csv")))
    (out / "neurons.csv").unlink()
    (out / "neurons.csv").write_text("my edited table\n")
    with pytest.raises(OutputError, match=r"neurons\.csv was not written by auditor"):
        outdir.publish(out, producer("b", ("json",)))
    assert (out / "neurons.csv").read_text() == "my edited table\n"
    assert visible(out)["results.json"] == "a:json\n"


def test_a_lone_pdf_without_other_auditor_outputs_is_not_taken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.pdf").write_bytes(b"%PDF-1.4 someone else's\n")
    with pytest.raises(OutputError, match=r"report\.pdf was not written by auditor"):
        outdir.publish(out, producer("a", ("json",)))


def test_legacy_folder_is_taken_over_and_replaced(tmp_path):
    out = tmp_path / "out"
    _legacy(out)
    (out / "notes.md").write_text("mine\n")
    outdir.publish(out, producer("n", ("json",)))
    assert visible(out) == expected("n", ("json",))
    assert_clean(out, {"notes.md": "mine\n"})


def test_failure_while_rendering_leaves_out_as_it_was(tmp_path):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ("json", "csv")))
    before = visible(out)

    def broken(folder: Path):
        (folder / "results.json").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "neurons.csv"))

    with pytest.raises(OSError):
        outdir.publish(out, broken)
    assert visible(out) == before
    assert_clean(out, {})


def test_failed_first_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "out"

    def broken(folder: Path):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "report.pdf"))

    with pytest.raises(OSError):
        outdir.publish(out, broken)
    assert not out.exists()


def test_out_that_is_a_file_or_odd_state_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        outdir.publish(f, producer("a", ("json",)))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".auditor").write_text("not ours")
    with pytest.raises(OutputError, match="is not auditor's state folder"):
        outdir.publish(out, producer("a", ("json",)))
    assert (out / ".auditor").read_text() == "not ours"


def test_run_folders_are_readable_like_the_reports(tmp_path):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ("json",)))
    mode = (out / ".auditor" / "current").resolve().stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_error_during_the_switch_moves_leaves_old_run_and_no_dangling_link(tmp_path, monkeypatch):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ("json",)))
    real = os.symlink
    calls = {"n": 0}

    def symlink(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second new link: the metadata write hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))
        return real(*a, **kw)

    monkeypatch.setattr(os, "symlink", symlink)
    with pytest.raises(OSError):
        outdir.publish(out, producer("b", ("json", "csv", "junit")))
    monkeypatch.undo()
    assert visible(out) == expected("a", ("json",))
    assert sorted(p.name for p in out.iterdir()) == [".auditor", ".auditor-manifest.json", "results.json"]
    assert_clean(out, {})


def test_a_file_system_without_symlinks_is_refused_before_rendering(tmp_path, monkeypatch):
    out = tmp_path / "out"
    outdir.publish(out, producer("a", ("json",)))

    def no_links(*a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted", str(a[1]))

    rendered = []
    monkeypatch.setattr(os, "symlink", no_links)
    with pytest.raises(OutputError, match="cannot hold symbolic links"):
        outdir.publish(out, lambda folder: rendered.append(folder) or {})
    monkeypatch.undo()
    assert rendered == [] and visible(out) == expected("a", ("json",))
    assert_clean(out, {})
