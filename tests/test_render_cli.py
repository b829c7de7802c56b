"""`auditor render` re-creates every output from results.json alone — no torch, model or data."""

import subprocess
import sys

import pytest

from auditor.results import AuditResult

from report_fixtures import make_result
from helpers import NO_TORCH


@pytest.mark.slow
def test_render_without_torch(tmp_path):
    results = tmp_path / "results.json"
    make_result(n_neurons=16).save(results)
    code = (NO_TORCH +
            "from auditor.cli import main\n"
            "sys.exit(main(['render', sys.argv[1], '--out', sys.argv[2]]))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, str(results), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["junit.xml", "neurons.csv",
                                                                                "report.html", "report.pdf"]
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")


def test_render_of_a_broken_file_is_exit_2(tmp_path, capsys):
    from auditor.cli import main

    bad = tmp_path / "results.json"
    bad.write_text('{"schema_version": "1.0", "layers": 3}')
    rc = main(["render", str(bad), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "auditor: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_render_round_trip_json_equal(tmp_path):
    from auditor.cli import main

    original = make_result(n_neurons=8)
    src = tmp_path / "results.json"
    original.save(src)
    assert main(["render", str(src), "--out", str(tmp_path / "out"), "--formats", "json,csv"]) == 0
    assert AuditResult.load(tmp_path / "out" / "results.json") == original
