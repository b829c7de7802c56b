"""The Python API: an in-memory model and a torch Dataset give the results.json the CLI gives
on the same inputs; AuditResult.save writes what `auditor run` writes; the Jupyter view."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import auditor
from auditor.cli import main
from auditor.errors import AuditorError, ConfigError, DataError

sys.path.insert(0, str(Path(__file__).parent / "data"))
from colour_model import ColourNet  # noqa: E402




class LabelledImages(torch.utils.data.Dataset):
    """The colour probe set as a Dataset of ([0, 1] tensor, concept vector)."""

    def __init__(self, images: Path, labels: Path, as_pil: bool | str = False):
        with open(labels, newline="") as fh:
            rows = list(csv.reader(fh))
        self.concepts = rows[0][1:]
        self.items = [(images / r[0], np.array([int(v) for v in r[1:]])) for r in rows[1:]]
        self.as_pil = as_pil

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, vec = self.items[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.as_pil == "uint8":  # torchvision.io.read_image style
                return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous(), vec.tolist()
            if self.as_pil == "array":  # an (H, W, 3) uint8 array, concept vector as numpy
                return np.asarray(im).copy(), vec
            if self.as_pil:
                return im.copy(), torch.from_numpy(vec)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return x, torch.from_numpy(vec)


def _comparable(d: dict) -> dict:
    """results.json without what names times, durations, commands and paths."""
    d = json.loads(json.dumps(d))
    for key in ("created", "title", "provenance"):
        d.pop(key)
    for key in ("model", "images", "labels", "out", "cache_dir", "weights", "formats"):
        d["config"].pop(key)
    for layer in d["layers"]:
        for n in layer["neurons"]:
            for img in n["top_images"]:
                img.pop("path")
    return d


@pytest.fixture(scope="module")
def cli_result(colour_probe, tmp_path_factory):
    images, labels = colour_probe
    base = tmp_path_factory.mktemp("cli")
    rc = main(["run", "--model", f"{Path(__file__).parent / 'data' / 'colour_model.py'}:make", "--layer", "act",
               "--images", str(images), "--labels", str(labels), "--artifacts", "stamp", "--no-normalize",
               "--cache-dir", str(base / "cache"), "--out", str(base / "out"), "--bootstrap", "200",
               "--device", "cpu", "--formats", "json", "-q"])
    assert rc == 1  # the planted stamp detector is flagged
    return json.loads((base / "out" / "results.json").read_text())


@pytest.mark.parametrize("as_pil", [False, True, "uint8", "array"])
def test_api_on_model_and_dataset_equals_cli(cli_result, colour_probe, tmp_path, as_pil):
    images, labels = colour_probe
    model = ColourNet()
    model.train()  # the API must audit in eval mode and give the mode back
    result = auditor.audit(model, layer="act", images=LabelledImages(images, labels, as_pil=as_pil),
                           artifacts=["stamp"], normalize=False, bootstrap=200, device="cpu",
                           cache_dir=str(tmp_path / "cache"))
    assert model.training
    api = result.to_dict()
    assert _comparable(api) == _comparable(cli_result)
    # the verdict itself, not just equality: channel 2 is the stamp detector
    assert [n.index for n in result.flagged_neurons()] == [2]
    prov_cli, prov_api = cli_result["provenance"], api["provenance"]
    assert prov_api["preprocessing"] == prov_cli["preprocessing"]
    assert prov_api["data"]["n_used"] == prov_cli["data"]["n_used"] == 160
    assert prov_api["model"]["kind"] == "in-memory" and prov_api["model"]["class"] == "ColourNet"
    # thumbnails are the same pictures
    t_api = [i["thumbnail"] for n in api["layers"][0]["neurons"] for i in n["top_images"]]
    t_cli = [i["thumbnail"] for n in cli_result["layers"][0]["neurons"] for i in n["top_images"]]
    assert t_api == t_cli and any(t_api)


def test_api_with_paths_and_save_matches_cli(cli_result, colour_probe, tmp_path):
    images, labels = colour_probe
    spec = f"{Path(__file__).parent / 'data' / 'colour_model.py'}:make"
    result = auditor.audit(spec, layer="act", images=images, labels=labels, artifacts=["stamp"], normalize=False,
                           bootstrap=200, device="cpu", cache_dir=str(tmp_path / "cache"))
    written = result.save(tmp_path / "report", formats=["json", "junit", "html"])
    assert sorted(p.name for p in written.values()) == ["junit.xml", "report.html", "results.json"]
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert _comparable(saved) == _comparable(cli_result)
    one = result.save(tmp_path / "only.json")
    assert list(one) == ["json"] and json.loads(one["json"].read_text()) == saved
    # the loader takes the folder or the file
    assert auditor.load(tmp_path / "report").to_dict() == auditor.load(tmp_path / "report" / "results.json").to_dict()


def test_repr_html_shows_verdict_and_cards(cli_result):
    from auditor.results import AuditResult

    r = AuditResult.from_dict(cli_result)
    html = r._repr_html_()
    assert html.startswith("<iframe") and "srcdoc=" in html
    import html as h

    doc = h.unescape(html.split('srcdoc="', 1)[1].rsplit('"', 1)[0])
    assert "Artifact detectors found" in doc and "act · neuron 2" in doc
    assert "<script" not in doc


@pytest.mark.parametrize("as_pil", [False, True])
def test_api_preprocessing_applies_to_dataset_images_as_to_files(colour_probe, tmp_path, as_pil):
    """mean/std (and crop) given: tensors and PIL images from a Dataset are preprocessed as the CLI preprocesses
    files; the activations, hence the whole result, match the CLI's."""
    images, labels = colour_probe
    opts = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), crop=24, bootstrap=0, device="cpu")
    spec = f"{Path(__file__).parent / 'data' / 'colour_model.py'}:make"
    files = auditor.audit(spec, layer="act", images=images, labels=labels, artifacts=["stamp"],
                          cache_dir=str(tmp_path / "c1"), **opts)
    mem = auditor.audit(ColourNet(), layer="act", images=LabelledImages(images, labels, as_pil=as_pil),
                        artifacts=["stamp"], cache_dir=str(tmp_path / "c2"), **opts)
    a, b = files.to_dict(), mem.to_dict()
    assert _comparable(a) == _comparable(b)
    assert a["provenance"]["preprocessing"]["mean"] == [0.5, 0.4, 0.3]


def test_api_bad_inputs_are_auditor_errors(colour_probe, tmp_path):
    images, labels = colour_probe
    ds = LabelledImages(images, labels)
    with pytest.raises(ConfigError, match="concepts"):
        auditor.audit(ColourNet(), layer="act", images=[(torch.zeros(3, 8, 8), [1])], artifacts=[])
    with pytest.raises(ConfigError, match="lenght"):
        auditor.audit(ColourNet(), layer="act", images=ds, artifacts=["stamp"], lenght=2)
    with pytest.raises(DataError, match="length 2, expected 6"):
        auditor.audit(ColourNet(), layer="act", images=[(torch.zeros(3, 8, 8), [1, 0])],
                      concepts=list("abcdef"), artifacts=[])
    with pytest.raises(AuditorError, match="no layer"):
        auditor.audit(ColourNet(), layer="nope", images=ds, artifacts=["stamp"], device="cpu",
                      cache_dir=str(tmp_path / "c"))
