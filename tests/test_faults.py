"""Faults a real machine produces, injected on purpose, through the CLI.

Each case checks the outcome a user relies on: the exit code (2 for every failure,
143 for SIGTERM, never 1 — that means "flagged"), exactly one line on stderr,
``--out`` holding one whole run (the old one when the new one failed), and nothing
left behind (no run folder, no temporary file).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from auditor import outdir
from auditor.cli import main

from report_fixtures import make_result

HERE = Path(__file__).parent


def _err_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("auditor: error:")]


def _one_error(err: str) -> str:
    lines = _err_lines(err)
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".") and p.exists()}


def _nothing_left(out: Path) -> None:
    runs = list((out / outdir.STATE / "runs").iterdir())
    assert len(runs) == 1, runs  # only the published run
    assert all(p.exists() for p in out.iterdir() if p.is_symlink())


@pytest.fixture()
def results(tmp_path) -> Path:
    src = tmp_path / "in" / "results.json"
    src.parent.mkdir()
    make_result(n_neurons=8, second_layer=False).save(src)
    return src


@pytest.fixture()
def old_out(tmp_path, results, capsys) -> tuple[Path, dict[str, bytes]]:
    """An --out holding a complete earlier run (json, csv, junit)."""
    out = tmp_path / "out"
    assert main(["render", str(results), "--out", str(out), "--formats", "json,csv,junit"]) == 0
    capsys.readouterr()
    return out, _files(out)


# -- render: impossible numbers ------------------------------------------------------------------------------

def _edit(results: Path, edit) -> Path:
    data = json.loads(results.read_text())
    edit(data)
    results.write_text(json.dumps(data, allow_nan=True))
    return results


def _first_explanation(d):
    return next(n for n in d["layers"][0]["neurons"] if n["explanations"])["explanations"][0]


@pytest.mark.parametrize("edit, field, why", [
    (lambda d: _first_explanation(d).__setitem__("auroc", math.nan), ".explanations[0].auroc", "not a finite"),
    (lambda d: _first_explanation(d).__setitem__("auroc", math.inf), ".explanations[0].auroc", "not a finite"),
    (lambda d: _first_explanation(d).__setitem__("auroc", 1.7), ".explanations[0].auroc", r"outside \[0, 1\]"),
    (lambda d: _first_explanation(d).__setitem__("p_value", -0.2), ".explanations[0].p_value",
     r"outside \[0, 1\]"),
    (lambda d: _first_explanation(d).__setitem__("log10_p", 3.0), ".explanations[0].log10_p", "is positive"),
    (lambda d: _first_explanation(d).__setitem__("support", 2 ** 60), ".explanations[0].support",
     "not a count"),
    (lambda d: d["concepts"][0].__setitem__("n_positive", -4), "concepts[0].n_positive", "not a count"),
    (lambda d: d["layers"][0]["neurons"][0]["stats"].__setitem__("max", 1e300), "neurons[0].stats.max",
     "larger than any value"),
    (lambda d: d["layers"][0]["neurons"][0]["artifact_auroc"].__setitem__("watermark", 2.0),
     "artifact_auroc.watermark", r"outside \[0, 1\]"),
])
def test_render_rejects_impossible_numbers(results, tmp_path, capsys, edit, field, why):
    import re

    _edit(results, edit)
    out = tmp_path / "out"
    rc = main(["render", str(results), "--out", str(out)])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2
    assert field in line and re.search(why, line), line
    assert not out.exists()


def test_render_rejects_an_overlong_integer_literal(results, tmp_path, capsys):
    text = results.read_text().replace('"n_positive": ', '"n_positive": ' + "9" * 5000 + ", \"x\": ", 1)
    results.write_text(text)
    rc = main(["render", str(results), "--out", str(tmp_path / "out")])
    assert rc == 2 and "cannot read results file" in _one_error(capsys.readouterr().err)


def test_render_accepts_what_an_audit_writes(results, tmp_path):
    from auditor.results import AuditResult, check_values

    check_values(json.loads(results.read_text()))
    assert AuditResult.load(results).layers


# -- disk full, read-only, permission: patched -------------------------------------------------------------

def test_disk_full_while_rendering_keeps_the_old_run(old_out, results, capsys, monkeypatch):
    out, before = old_out
    import auditor.report as report

    def full(result, path):
        Path(path).write_bytes(b"<testsuites")  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "write_junit", full)
    rc = main(["render", str(results), "--out", str(out), "--formats", "json,junit"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "no space left on the device writing" in line and "junit.xml" in line
    assert _files(out) == before
    _nothing_left(out)


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_unwritable_out_names_the_folder(old_out, results, capsys, monkeypatch, code, words):
    out, before = old_out
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):
        if str(path).startswith(str(out)) and not os.path.exists(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    rc = main(["render", str(results), "--out", str(out), "--formats", "json"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and words in line and str(out) in line, line
    assert _files(out) == before
    _nothing_left(out)


def test_a_bug_is_exit_2_with_one_line_and_debug_shows_the_traceback(old_out, results, capsys, monkeypatch):
    out, before = old_out
    import auditor.report as report

    def bug(result, path):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(report, "write_csv", bug)
    rc = main(["render", str(results), "--out", str(out), "--formats", "csv"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "unexpected TypeError: unsupported operand" in line and "--debug" in line
    rc = main(["render", str(results), "--out", str(out), "--formats", "csv", "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback (most recent call last)" in err and len(_err_lines(err)) == 1
    assert main(["--debug", "render", str(results), "--out", str(out), "--formats", "csv"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert _files(out) == before
    _nothing_left(out)


def test_a_file_auditor_did_not_write_is_exit_2_naming_it(tmp_path, results, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "junit.xml").write_text("<mine/>")
    rc = main(["render", str(results), "--out", str(out), "--formats", "json,junit"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and str(out / "junit.xml") in line and "not written by auditor" in line
    assert sorted(p.name for p in out.iterdir()) == ["junit.xml"]
    assert (out / "junit.xml").read_text() == "<mine/>"


# -- real file systems: a tiny tmpfs (when this machine lets the tests mount one) -----------------------

@pytest.fixture()
def tmpfs(tmp_path):
    """Mount a small tmpfs; yields a function (size) -> mount point. Skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_out_that_is_a_mount_point_works_and_disk_full_keeps_the_old_run(tmpfs, results, capsys):
    out = tmpfs("64k")  # --out is the mount point itself; the report does not fit
    assert main(["render", str(results), "--out", str(out), "--formats", "csv"]) == 0
    capsys.readouterr()
    before = _files(out)
    assert list(before) == ["neurons.csv"]
    rc = main(["render", str(results), "--out", str(out), "--formats", "html,json,csv,junit"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "no space left on the device" in line, line
    assert _files(out) == before
    _nothing_left(out)


def test_read_only_out_on_a_real_file_system(tmpfs, results, capsys):
    out = tmpfs("2m")
    assert main(["render", str(results), "--out", str(out), "--formats", "json"]) == 0
    capsys.readouterr()
    before = _files(out)
    subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
    rc = main(["render", str(results), "--out", str(out), "--formats", "json,csv"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and "read-only file system" in line and str(out) in line, line
    assert _files(out) == before


# -- two runs into one folder ----------------------------------------------------------------------------

def _hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    (out / outdir.STATE).mkdir(parents=True, exist_ok=True)
    code = ("import sys, time\nfrom filelock import FileLock\n"
            "lock = FileLock(sys.argv[1]); lock.acquire()\nprint('held', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out / outdir.STATE / "lock"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_gives_up_after_the_lock_timeout(old_out, results, capsys, monkeypatch):
    out, before = old_out
    monkeypatch.setattr(outdir, "LOCK_TIMEOUT_S", 0.5)
    holder = _hold_lock(out, 30)
    try:
        rc = main(["render", str(results), "--out", str(out), "--formats", "csv"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    line = _one_error(err)
    assert rc == 2 and "another auditor run is still writing to" in line and str(out) in line
    assert "waiting for another auditor run" in err
    assert _files(out) == before


def test_second_run_waits_for_the_first(old_out, results, capsys):
    out, _ = old_out
    holder = _hold_lock(out, 1.0)
    try:
        rc = main(["render", str(results), "--out", str(out), "--formats", "csv"])
    finally:
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 0 and "waiting for another auditor run to finish writing" in err
    assert list(_files(out)) == ["neurons.csv"]
    _nothing_left(out)


# -- SIGTERM, delivered to a real process -------------------------------------------------------------------

_BLOCKING_RENDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import auditor.report as report
    from auditor.cli import main

    marker = Path(sys.argv[1])
    real = report.write_csv
    def slow(result, path):
        real(result, path)
        marker.write_text("staged")
        time.sleep(60)
    report.write_csv = slow
    sys.exit(main(sys.argv[2:]))
""")


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached the point to interrupt"
        time.sleep(0.05)


def test_sigterm_while_writing_keeps_the_old_run_and_removes_the_new(old_out, results, tmp_path):
    out, before = old_out
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_RENDER, str(marker), "render", str(results),
                             "--out", str(out), "--formats", "json,csv"],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    _wait_for(marker, proc)
    assert len(list((out / outdir.STATE / "runs").iterdir())) == 2  # the staged run exists now
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM" in _one_error(err)
    assert _files(out) == before
    _nothing_left(out)


_BLOCKING_COLLECT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from auditor.collect import assemble
    from auditor.cli import main

    marker = Path(sys.argv[1])
    real = assemble.Assembler.add
    def slow(self, start, chunk):
        real(self, start, chunk)
        marker.write_text("assembling")
        time.sleep(60)
    assemble.Assembler.add = slow
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_sigterm_while_collecting_leaves_no_temporary_files(colour_args, tmp_path):
    marker = tmp_path / "marker"
    args = colour_args + ["--chunk-size", "64", "--formats", "json"]
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_COLLECT, str(marker), "run", "-q", *args],
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    _wait_for(marker, proc, seconds=120)
    cache = Path(args[args.index("--cache-dir") + 1])
    assert list(cache.rglob(".tmp-values-*")), "the test should interrupt while a values file is open"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM" in _one_error(err)
    assert not list(cache.rglob(".tmp-*"))
    assert not Path(args[args.index("--out") + 1]).exists()


# -- a probe set too small for any finding -------------------------------------------------------------------

def test_small_probe_warnings_follow_the_exact_test():
    from scipy.stats import mannwhitneyu

    from auditor.flags import Rule
    from auditor.pipeline import small_probe_warnings

    th = Rule()
    assert "too small for any finding" in small_probe_warnings(2, {"stamp": 1}, th)[0]
    assert "too small for any finding" in small_probe_warnings(9, {"stamp": 4}, th)[0]  # < flag_min_artifact_rows
    # 160 images, the artifact on 1: a perfect separation has exact p = 2/160 > 0.01 -> warned.
    exact = mannwhitneyu([1.0], [0.0] * 159, method="exact").pvalue
    assert exact == pytest.approx(2 / 160) and exact > th.alpha
    (msg,) = small_probe_warnings(160, {"stamp": 1, "text": 40}, th)
    assert "artifact 'stamp' is on 1 of 160" in msg and "0.0125" in msg
    assert small_probe_warnings(160, {"stamp": 2, "text": 40}, th) == []  # exact p = 2/C(160,2) passes


def test_two_image_probe_set_warns_instead_of_finding(tmp_path, capsys):
    from PIL import Image

    from conftest import COLOUR_MODEL

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (230, 20, 20)).save(images / "a.png")
    im = Image.new("RGB", (32, 32), (20, 20, 230))
    im.paste((240, 10, 240), (4, 4, 16, 16))
    im.save(images / "b.png")
    (tmp_path / "labels.csv").write_text("path,red,stamp\na.png,1,0\nb.png,0,1\n")
    out = tmp_path / "out"
    rc = main(["run", "-q", "--model", COLOUR_MODEL, "--layer", "act", "--images", str(images),
               "--labels", str(tmp_path / "labels.csv"), "--artifacts", "stamp", "--no-normalize",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--formats", "json",
               "--device", "cpu", "--min-fraction", "0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: probe set too small for any finding: with 2 usable image(s)" in err
    data = json.loads((out / "results.json").read_text())
    assert any("probe set too small for any finding" in w for w in data["warnings"])
    assert not any(n["flags"] for layer in data["layers"] for n in layer["neurons"])


def test_explain_on_two_images_warns_too(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "A.npy", np.array([[0.1, 0.2], [0.9, 0.3]], dtype=np.float32))
    (tmp_path / "L.csv").write_text("path,wm,x\na,0,1\nb,1,0\n")
    rc = main(["explain", "--activations", str(tmp_path / "A.npy"), "--labels", str(tmp_path / "L.csv"),
               "--artifacts", "wm", "--out", str(tmp_path / "out"), "-q"])
    assert rc == 0
    assert "warning: probe set too small for any finding" in capsys.readouterr().err
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any("too small for any finding" in w for w in data["warnings"])


def test_second_run_with_formats_json_leaves_only_its_own_files(old_out, results, capsys):
    out, before = old_out
    assert sorted(before) == ["junit.xml", "neurons.csv", "results.json"]
    assert b"<failure" in before["junit.xml"]  # the first run's gate failure
    (out / "notes.txt").write_text("mine")
    assert main(["render", str(results), "--out", str(out), "--formats", "json"]) == 0
    assert sorted(_files(out)) == ["notes.txt", "results.json"]
    manifest = json.loads((out / outdir.MANIFEST).read_text())
    assert list(manifest["files"]) == ["results.json"]
    _nothing_left(out)
