"""End to end on the demo model over a few checkpoints: one trained briefly, the shipped one
with its planted watermark shortcut, and the shipped one with its watermark channels cut out
(the truth by construction: those channels become constant, every other one is untouched)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from auditor.cli import main
from auditor.history import History
from auditor.results import AuditResult

pytestmark = pytest.mark.slow


def _ablated(state: dict, channels) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    for c in channels:
        state["features.11.weight"][c] = 0.0
        state["features.11.bias"][c] = 0.0
    return state


def test_watch_demo_checkpoints(tmp_path, monkeypatch, capsys):
    from auditor.demo.model import DEMO_WATERMARK_CHANNELS, DEMO_WEIGHTS
    from auditor.demo.run import demo_probe_set
    from auditor.demo.train import TrainConfig, train

    images, labels = demo_probe_set(tmp_path / "cache", n_images=400)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    config = tmp_path / "audit.yaml"
    config.write_text(yaml.safe_dump({
        "model": "auditor.demo.model:DemoNet", "layer": "features.13", "images": str(images),
        "labels": str(labels), "artifacts": ["watermark", "text"], "normalize": False, "min_fraction": 0.02,
        "bootstrap": 0, "device": "cpu", "cache_dir": str(tmp_path / "cache"), "formats": ["json", "html"]}))

    t0 = time.time() - 1000
    brief, _ = train(TrainConfig(n_train=256, n_val=64, n_eval=64, epochs=1), log=lambda m: None)
    torch.save(brief.state_dict(), ckpts / "epoch1.pt")
    shipped = torch.load(DEMO_WEIGHTS, weights_only=True)
    torch.save(shipped, ckpts / "epoch2.pt")
    save_file(_ablated(shipped, DEMO_WATERMARK_CHANNELS), str(ckpts / "epoch3.safetensors"))
    for i, name in enumerate(("epoch1.pt", "epoch2.pt", "epoch3.safetensors")):
        os.utime(ckpts / name, (t0 + i, t0 + i))
    # a fourth checkpoint is still being written: half of it is there
    buf = io.BytesIO()
    torch.save(shipped, buf)
    (ckpts / "epoch4.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    audited: list[str] = []
    import auditor.pipeline as pipeline

    real = pipeline.run_audit

    def counting(cfg, **kw):
        audited.append(Path(cfg.weights).name)
        return real(cfg, **kw)

    monkeypatch.setattr(pipeline, "run_audit", counting)
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert audited == ["epoch1.pt", "epoch2.pt", "epoch3.safetensors"]
    assert "waiting for epoch4.pt" in capsys.readouterr().err

    reports = ckpts / "reports"
    r2 = AuditResult.load(reports / "epoch2.pt" / "results.json")
    r3 = AuditResult.load(reports / "epoch3.safetensors" / "results.json")
    wm2 = {n.index for n in r2.flagged_neurons() if any(f.artifact == "watermark" for f in n.flags)}
    wm3 = {n.index for n in r3.flagged_neurons() if any(f.artifact == "watermark" for f in n.flags)}
    cut = set(DEMO_WATERMARK_CHANNELS)
    assert wm2 & cut  # the shipped shortcut is found among its known channels
    # by construction: the cut channels are constant in epoch3 (never flagged), all others are untouched
    assert all(n.status == "dead" for n in r3.layers[0].neurons if n.index in cut)
    assert wm3 == wm2 - cut
    cmp = json.loads((reports / "epoch3.safetensors" / "compare" / "compare.json").read_text())
    wm = next(a for a in cmp["artifacts"] if a["artifact"] == "watermark")
    assert {c["old_index"] for c in wm["no_longer_flagged"]} == wm2 & cut
    assert {c["new_index"] for c in wm["still_flagged"]} == wm2 - cut
    assert wm["newly_flagged"] == []
    assert "No neuron newly flagged" in (reports / "epoch3.safetensors" / "compare" / "compare.html").read_text()

    # the slow checkpoint completes; a restart audits it alone, a further restart nothing
    (ckpts / "epoch4.pt").write_bytes(buf.getvalue())
    os.utime(ckpts / "epoch4.pt", (t0 + 3, t0 + 3))
    audited.clear()
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q", "--fail-on-new"]) == 1
    assert audited == ["epoch4.pt"]  # and the shortcut is back: newly flagged vs epoch3
    audited.clear()
    assert main(["watch", str(ckpts), "--config", str(config), "--once", "-q"]) == 0
    assert audited == []

    with History(reports / "history.sqlite") as h:
        rows = h.rows()
    assert [r["checkpoint_name"] for r in rows] == ["epoch1.pt", "epoch2.pt", "epoch3.safetensors", "epoch4.pt"]
    assert rows[1]["artifacts"]["watermark"]["flagged"] == len(wm2) and rows[2]["artifacts"]["watermark"]["flagged"] == len(wm3)
    capsys.readouterr()
    assert main(["history", str(reports)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in lines[1:]] == ["epoch1.pt", "epoch2.pt", "epoch3.safetensors", "epoch4.pt"]
    index = (reports / "index.html").read_text()
    assert "Timeline: watermark" in index and 'href="epoch2.pt/report.html"' in index
