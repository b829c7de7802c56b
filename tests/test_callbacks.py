"""Training-loop callbacks: a Lightning Callback and a Hugging Face TrainerCallback audit the
live model every epoch and append to the history. CI installs both frameworks (the
`integrations` extra), so these tests run there; they skip only where a framework is absent."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import auditor
from auditor.cli import main
from auditor.history import History

sys.path.insert(0, str(Path(__file__).parent / "data"))
from colour_model import ColourNet  # noqa: E402


class Probe(torch.utils.data.Dataset):
    """The colour probe set: ([0, 1] image tensor, concept vector); .targets: has the stamp."""

    def __init__(self, images: Path, labels: Path):
        with open(labels, newline="") as fh:
            rows = list(csv.reader(fh))
        self.concepts = rows[0][1:]
        self.x = []
        self.y = []
        for r in rows[1:]:
            with Image.open(images / r[0]) as im:
                self.x.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
            self.y.append(torch.tensor([int(v) for v in r[1:]]))
        self.targets = [int(v[self.concepts.index("stamp")]) for v in self.y]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _check_history(out: Path, steps: list[str], source: str, final_model: nn.Module, probe: Probe, layer: str,
                   html: bool = False):
    with History(out / "history.sqlite") as h:
        rows = h.rows()
    assert [r["step"] for r in rows] == steps and {r["source"] for r in rows} == {source}
    for s in steps:
        assert (out / s / "results.json").is_file() and (out / s / "report.html").is_file() == html
    # the last audit saw the final weights: it equals an independent audit of the trained model
    last = json.loads((out / steps[-1] / "results.json").read_text())
    again = auditor.audit(final_model, layer=layer, images=probe, artifacts=["stamp"], normalize=False,
                          bootstrap=0, device="cpu", no_cache=True).to_dict()
    assert last["layers"] == again["layers"]
    assert main(["history", str(out), "--source", source, "--json"]) == 0


@pytest.fixture(scope="module")
def probe(colour_probe):
    return Probe(*colour_probe)


@pytest.mark.slow
def test_lightning_callback_audits_every_epoch(probe, tmp_path, capsys):
    L = pytest.importorskip("lightning.pytorch")
    from auditor.callbacks import AuditCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ColourNet()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y[:, probe.concepts.index("stamp")].long())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    module = Module()
    cb = AuditCallback(every_n_epochs=1, on_checkpoint=True, layer="net.act", images=probe, artifacts=["stamp"], out=tmp_path / "audits",
                       normalize=False, bootstrap=0, device="cpu", cache_dir=str(tmp_path / "cache"),
                       formats=["json"])
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False,
                        default_root_dir=str(tmp_path / "pl"), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(probe, batch_size=32))
    steps = [s for s, _ in cb.auditor.results]
    assert [s for s in steps if s.startswith("epoch")] == ["epoch-0001", "epoch-0002"]
    assert len([s for s in steps if s.startswith("step-")]) == 2  # one per saved checkpoint
    assert [n.index for n in cb.auditor.results[0][1].flagged_neurons()] == [2]  # the stamp detector stays
    _check_history(tmp_path / "audits", steps, "lightning", module, probe, "net.act")


@pytest.mark.slow
def test_transformers_trainer_callback_audits_epochs_and_saves(probe, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from auditor.callbacks import AuditTrainerCallback

    class HFColour(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = ColourNet()

        def forward(self, pixel_values, labels=None):
            logits = self.net(pixel_values)
            if labels is None:
                return {"logits": logits}
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    class Train(torch.utils.data.Dataset):
        def __len__(self):
            return len(probe)

        def __getitem__(self, i):
            return {"pixel_values": probe.x[i], "labels": probe.targets[i]}

    torch.manual_seed(0)
    model = HFColour()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=2,
                                          per_device_train_batch_size=32, learning_rate=0.01, use_cpu=True,
                                          report_to=[], save_strategy="epoch", logging_strategy="no",
                                          disable_tqdm=True)
    cb = AuditTrainerCallback(every_n_epochs=1, on_save=True, layer="net.act", images=probe, artifacts=["stamp"],
                              out=tmp_path / "audits", normalize=False, bootstrap=0, device="cpu",
                              cache_dir=str(tmp_path / "cache"), formats=["json", "html"])
    transformers.Trainer(model=model, args=args, train_dataset=Train(), callbacks=[cb]).train()
    steps = [s for s, _ in cb.auditor.results]
    assert [s for s in steps if s.startswith("epoch")] == ["epoch-0001", "epoch-0002"]
    saves = [s for s in steps if s.startswith("checkpoint-")]
    assert len(saves) == 2
    with History(tmp_path / "audits" / "history.sqlite") as h:
        rows = {r["step"]: r for r in h.rows()}
    assert rows[saves[-1]]["checkpoint_sha256"] and rows[saves[-1]]["checkpoint_name"] == "model.safetensors"
    _check_history(tmp_path / "audits", steps, "transformers", model, probe, "net.act", html=True)
