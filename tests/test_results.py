"""results.json round-trips exactly into typed records."""

import json

import pytest

from auditor.errors import ReportError
from auditor.results import AuditResult, Distribution, Explanation

from report_fixtures import make_result


def test_round_trip_restores_typed_records(tmp_path):
    original = make_result()
    path = tmp_path / "results.json"
    original.save(path)
    loaded = AuditResult.load(path)
    assert loaded == original
    neuron = next(n for lyr in loaded.layers for n in lyr.neurons if n.distribution is not None)
    assert isinstance(neuron.distribution, Distribution)
    assert all(isinstance(e, Explanation) for e in neuron.explanations)
    with_ci = [e for lyr in loaded.layers for n in lyr.neurons for e in n.explanations if e.auroc_ci]
    assert with_ci and all(isinstance(e.auroc_ci, tuple) for e in with_ci)


def test_load_rejects_foreign_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ReportError, match="not an auditor results file"):
        AuditResult.load(p)
    p.write_text(json.dumps({"schema_version": "9.0"}))
    with pytest.raises(ReportError, match="schema_version '9.0'"):
        AuditResult.load(p)
    p.write_text("{broken")
    with pytest.raises(ReportError, match="cannot read results file"):
        AuditResult.load(p)
    with pytest.raises(ReportError, match="not found"):
        AuditResult.load(tmp_path / "missing.json")
