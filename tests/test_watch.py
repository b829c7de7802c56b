"""auditor watch / history on checkpoints whose detectors are known by construction
(the hand-set colour model of tests/data/colour_model.py: channel 2 detects the stamp)."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from auditor.cli import main
from auditor.history import History
from auditor.results import AuditResult
from auditor.watch import is_complete, list_checkpoints

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from colour_model import ColourNet, no_stamp  # noqa: E402



def _pt_bytes(model) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _write(path: Path, data: bytes, mtime: float) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture()
def setup(colour_probe, tmp_path):
    images, labels = colour_probe
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    cfg = {"model": str(DATA / "colour_model.py") + ":make", "layer": "act", "images": str(images),
           "labels": str(labels), "artifacts": ["stamp"], "normalize": False, "bootstrap": 0, "device": "cpu",
           "cache_dir": str(tmp_path / "cache"), "formats": ["json"]}
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return ckpts, config


def test_watch_once_audits_each_once_in_order_compares_and_records(setup, capsys):
    ckpts, config = setup
    t0 = time.time() - 1000
    # mtime order differs from name order: b (shortcut) first, then a (trained out), then c (shortcut back)
    _write(ckpts / "b-epoch1.pt", _pt_bytes(ColourNet()), t0)
    save_file(no_stamp().state_dict(), str(ckpts / "a-epoch2.safetensors"))
    os.utime(ckpts / "a-epoch2.safetensors", (t0 + 10, t0 + 10))
    (ckpts / "notes.txt").write_text("not a checkpoint")
    assert [p.name for p in list_checkpoints(ckpts)] == ["b-epoch1.pt", "a-epoch2.safetensors"]

    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    reports = ckpts / "reports"
    r1 = AuditResult.load(reports / "b-epoch1.pt" / "results.json")
    r2 = AuditResult.load(reports / "a-epoch2.safetensors" / "results.json")
    assert [n.index for n in r1.flagged_neurons()] == [2] and r2.flagged_neurons() == []
    cmp = json.loads((reports / "a-epoch2.safetensors" / "compare" / "compare.json").read_text())
    assert [c["old_index"] for c in cmp["artifacts"][0]["no_longer_flagged"]] == [2]
    assert not (reports / "b-epoch1.pt" / "compare").exists()  # the first has nothing to compare with

    # a second pass finds nothing new; a new checkpoint is audited alone and compared with a-epoch2
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    _write(ckpts / "c-epoch3.pth", _pt_bytes(ColourNet()), t0 + 20)
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q", "--fail-on-new"]) == 1
    capsys.readouterr()

    with History(reports / "history.sqlite") as h:
        rows = h.rows()
    assert [r["checkpoint_name"] for r in rows] == ["b-epoch1.pt", "a-epoch2.safetensors", "c-epoch3.pth"]
    assert [r["artifacts"]["stamp"]["flagged"] for r in rows] == [1, 0, 1]
    assert rows[0]["artifacts"]["stamp"]["strongest"][0]["neuron"] == 2
    assert len({r["config_hash"] for r in rows}) == 1 and len({r["probe_fingerprint"] for r in rows}) == 1
    import hashlib
    assert rows[1]["checkpoint_sha256"] == hashlib.sha256((ckpts / "a-epoch2.safetensors").read_bytes()).hexdigest()

    assert main(["history", str(reports), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["checkpoint_name"] for r in listed] == ["b-epoch1.pt", "a-epoch2.safetensors", "c-epoch3.pth"]
    assert main(["history", str(reports / "history.sqlite"), "--artifact", "stamp", "--flagged"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "stamp" in table[0] and [line.split()[3] for line in table[1:]] == ["b-epoch1.pt", "c-epoch3.pth"]
    for where in (["--history", str(reports / "history.sqlite")], [str(ckpts)]):  # option; the watched folder
        assert main(["history", *where, "--json", "--limit", "1"]) == 0
        assert [r["checkpoint_name"] for r in json.loads(capsys.readouterr().out)] == ["c-epoch3.pth"]
    assert main(["history", str(reports), "--checkpoint", "a-*", "--json"]) == 0
    assert [r["checkpoint_name"] for r in json.loads(capsys.readouterr().out)] == ["a-epoch2.safetensors"]

    index = (reports / "index.html").read_text()
    assert "Timeline: stamp" in index and index.index("b-epoch1.pt") < index.index("a-epoch2.safetensors") \
        < index.index("c-epoch3.pth")
    assert 'href="c-epoch3.pth/compare/compare.html"' in index


def test_checkpoint_written_slowly_is_picked_up_only_when_complete(setup, capsys):
    ckpts, config = setup
    for name, data in (("slow.pt", _pt_bytes(ColourNet())), ("slow2.safetensors", None)):
        if data is None:
            save_file(ColourNet().state_dict(), str(ckpts / "tmp.bin"))
            data = (ckpts / "tmp.bin").read_bytes()
            (ckpts / "tmp.bin").unlink()
        path = ckpts / name
        for cut in (0, 5, len(data) // 3, len(data) - 1):
            path.write_bytes(data[:cut])
            assert not is_complete(path)[0], (name, cut)
            assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
            assert not (ckpts / "reports" / name).exists()
        path.write_bytes(data)
        assert is_complete(path) == (True, "complete")
    err = capsys.readouterr().err
    assert "waiting for slow.pt" in err and "waiting for slow2.safetensors" in err
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    with History(ckpts / "reports" / "history.sqlite") as h:
        assert sorted(r["checkpoint_name"] for r in h.rows()) == ["slow.pt", "slow2.safetensors"]
    # a safetensors file with bytes beyond what its header accounts for is not complete either
    (ckpts / "x.safetensors").write_bytes(data + b"\0")
    assert not is_complete(ckpts / "x.safetensors")[0]
    # a legacy (non-zip) file counts once its sentinel is there
    legacy = ckpts / "legacy.pt"
    torch.save(ColourNet().state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert not is_complete(legacy)[0]
    (ckpts / "legacy.pt.done").touch()
    assert is_complete(legacy) == (True, "sentinel")


def test_restart_audits_nothing_twice_and_skips_nothing(setup, monkeypatch, capsys):
    import auditor.watch as w

    ckpts, config = setup
    t0 = time.time() - 1000
    for i, m in enumerate((ColourNet(), no_stamp(), ColourNet())):
        _write(ckpts / f"e{i}.pt", _pt_bytes(m), t0 + i)
    # the run is killed after e1's report is written but before the history records it
    real_record = History.record
    calls = {"n": 0}

    def dying_record(self, result, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_record(self, result, **kw)

    monkeypatch.setattr(History, "record", dying_record)
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 130
    monkeypatch.setattr(History, "record", real_record)
    assert (ckpts / "reports" / "e1.pt" / "results.json").is_file()
    # ... and (killed while moving the files into place) one of its outputs is missing
    config.write_text(config.read_text().replace("- json", "- json\n- csv"))
    (ckpts / "reports" / "e1.pt" / "results.json").touch()

    audited = []
    real_run = __import__("auditor.pipeline", fromlist=["run_audit"]).run_audit

    def counting(cfg, **kw):
        audited.append(Path(cfg.weights).name)
        return real_run(cfg, **kw)

    monkeypatch.setattr("auditor.pipeline.run_audit", counting)
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert audited == ["e2.pt"]  # e0 recorded, e1 recovered from its report, e2 new
    assert (ckpts / "reports" / "e1.pt" / "neurons.csv").is_file()  # re-rendered from results.json
    assert "report already in place" in capsys.readouterr().err
    with History(ckpts / "reports" / "history.sqlite") as h:
        rows = h.rows()
    assert [r["checkpoint_name"] for r in rows] == ["e0.pt", "e1.pt", "e2.pt"]
    # a checkpoint copied in later with an old mtime is not skipped
    _write(ckpts / "old-copy.pt", _pt_bytes(no_stamp()), t0 - 500)
    # same name, new content: audited again, into its own report folder
    _write(ckpts / "e0.pt", _pt_bytes(no_stamp()), t0 + 50)
    audited.clear()
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert audited == ["old-copy.pt", "e0.pt"]
    assert any(p.name.startswith("e0.pt-") for p in (ckpts / "reports").iterdir())
    audited.clear()
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert audited == []


def test_second_watcher_is_locked_out(setup, capsys):
    from filelock import FileLock

    ckpts, config = setup
    _write(ckpts / "e0.pt", _pt_bytes(ColourNet()), time.time() - 100)
    (ckpts / "reports").mkdir()
    with FileLock(str(ckpts / "reports" / "history.sqlite.lock")):
        assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
        assert "another auditor watch holds" in capsys.readouterr().err
        assert not (ckpts / "reports" / "e0.pt").exists()
        assert main(["watch", str(ckpts), "--config", str(config), "-q", "--interval", "1"]) == 2
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert (ckpts / "reports" / "e0.pt" / "results.json").is_file()


def test_bad_checkpoint_is_exit_2_and_retried(setup, capsys):
    ckpts, config = setup
    save_file({"other.weight": torch.zeros(2)}, str(ckpts / "wrong.safetensors"))
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 2
    err = capsys.readouterr().err
    assert "wrong.safetensors" in err and "do not fit model ColourNet" in err
    assert main(["history", str(ckpts / "reports"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_history_write_is_all_or_nothing_on_crash(tmp_path, colour_probe):
    """A process killed between the INSERT and the COMMIT leaves no row and a sound database."""
    db = tmp_path / "h.sqlite"
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from auditor.history import History
from auditor.results import AuditResult
import json
r = AuditResult.from_dict(json.loads(open({str(tmp_path / 'r.json')!r}).read()))
h = History({str(db)!r})
h.record(r, source="api")
h.record(r, source="api", _before_commit=lambda: os._exit(9))
"""
    from auditor import audit

    images, labels = colour_probe
    r = audit(str(DATA / "colour_model.py") + ":make", layer="act", images=images, labels=labels,
              artifacts=["stamp"], normalize=False, bootstrap=0, device="cpu", cache_dir=str(tmp_path / "c"))
    r.save(tmp_path / "r.json")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    with History(db) as h:
        rows = h.rows()
        assert len(rows) == 1 and rows[0]["artifacts"]["stamp"]["flagged"] == 1
        assert h.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with pytest.raises(Exception, match="cannot open the audit history"):
        (tmp_path / "junk.sqlite").write_text("not a database " * 100)
        History(tmp_path / "junk.sqlite")
    assert main(["history", str(tmp_path / "missing.sqlite")]) == 2
    sqlite3.connect(db).close()


def test_history_counts_rule_2_statuses_and_ranks_flags_by_effect():
    """The history row's per-artifact counts are the result's own statuses (rule 2.x); 1.x files keep
    their artifact-sensitive count; the strongest flags come first by |effect - 0.5|."""
    from report_fixtures import make_result

    from auditor.history import artifact_summary

    for v2 in (True, False):
        result = make_result(v2=v2)
        summary = artifact_summary(result)
        by_status = result.summary()
        for art in result.artifacts:
            for key in ("flagged", "near_miss", "inconclusive", "sensitive"):
                assert summary[art][key] == len(by_status[art][key]), (v2, art, key)
        if v2:
            assert any(summary[a]["near_miss"] for a in result.artifacts)
            wm = summary["watermark"]["strongest"]
            strengths = [s["strength"] for s in wm]
            assert wm and strengths == sorted(strengths, reverse=True)
        else:
            assert any(summary[a]["sensitive"] for a in result.artifacts)
