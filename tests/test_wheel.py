"""The built wheel (not only the editable install) carries the templates and the demo weights."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_built_wheel_renders_a_report_from_its_own_files(tmp_path):
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(dist.glob("auditor-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "auditor/_templates/report.html.j2" in names and "auditor/_templates/report.css" in names
    assert "auditor/demo/demo_model.pt" in names
    assert "auditor/collect/run.py" in names and "auditor/collect/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Render a saved result using only the unpacked wheel (run outside the repository).
    from report_fixtures import make_result
    results = tmp_path / "results.json"
    make_result(n_neurons=12).save(results)
    code = ("import sys, auditor, auditor.report.env as e; "
            "assert str(e.templates_dir()).startswith(sys.argv[1]), e.templates_dir(); "
            "from auditor.cli import main; sys.exit(main(['render', sys.argv[2], '--out', sys.argv[3], "
            "'--formats', 'html']))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, str(site), str(results), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<html" in html and "INVERT" in html
