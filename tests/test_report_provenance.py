"""What the pipeline records for the report's page 1, on the hand-set colour model.

Model hash and parameter count, the probe folder as given, the search size, the
sign-off, DeLong intervals for every neuron and bootstrap intervals for flagged ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from auditor.cli import main
from auditor.delong import delong_ci
from auditor.results import AuditResult


@pytest.fixture()
def run(colour_args, capsys):
    args = colour_args + ["--formats", "json", "--signoff", "prepared_by=A. Lee; decision=blocked"]
    main(["run"] + args)
    capsys.readouterr()
    out = Path(args[args.index("--out") + 1])
    return AuditResult.load(out / "results.json"), args


def test_page1_provenance(run, colour_probe):
    result, args = run
    model = result.provenance["model"]
    assert len(model["sha256"]) == 64 and model["sha256_of"] == "state_dict tensors"
    assert model["parameters"] == model["n_parameters"]
    data = result.provenance["data"]
    assert data["source"] == args[args.index("--images") + 1]
    search = result.provenance["search"]
    c = sum(1 for x in result.concepts if x.status != "excluded")
    assert search["atoms"] == 2 * c and search["formulas_per_neuron"] == 2 * c + (3 - 1) * 5 * 2 * c * 2
    assert search["in_sample"] is True
    assert result.signoff == {"prepared_by": "A. Lee", "reviewed_by": None, "decision": "blocked", "date": None}


def test_intervals_for_every_neuron_and_bootstrap_for_flagged(run, colour_probe):
    result, _ = run
    images, labels = colour_probe
    import csv

    from PIL import Image

    rows = list(csv.DictReader(open(labels)))
    acts = []
    for row in rows:
        x = np.asarray(Image.open(images / row["path"]).convert("RGB"), dtype=np.float64) / 255.0
        acts.append(np.maximum(x[..., 0] + x[..., 2] - 2 * x[..., 1] - 1, 0).mean())
    stamp = np.array([row["stamp"] == "1" for row in rows])
    n2 = result.layers[0].neurons[2]
    _, lo, hi = delong_ci(np.array(acts), stamp)
    assert n2.artifact_auroc_ci["stamp"] == pytest.approx((lo[0], hi[0]), abs=1e-9)
    live = [n for n in result.layers[0].neurons if n.status != "dead"]
    assert all("stamp" in n.artifact_auroc_ci for n in live)
    boot = n2.artifact_auroc_ci_bootstrap["stamp"]
    assert boot[0] <= n2.artifact_auroc["stamp"] <= boot[1] + 1e-12
    assert all(not n.artifact_auroc_ci_bootstrap for n in result.layers[0].neurons if not n.flags)


def test_signoff_config_section(tmp_path):
    from auditor.config import load_config
    from auditor.errors import ConfigError

    path = tmp_path / "audit.yaml"
    path.write_text("signoff:\n  prepared_by: A. Lee\n  date: 2026-12-02\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.signoff.prepared_by == "A. Lee" and cfg.signoff.date == "2026-12-02"  # YAML date kept as text
    assert cfg.signoff.reviewed_by is None
    path.write_text("signoff:\n  reviwed_by: B\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key 'signoff.reviwed_by'.*reviewed_by"):
        load_config(path)
