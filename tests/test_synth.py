"""`auditor synth`: determinism, formats, labels that `run` reads, pairs, safety, the CLI."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditor.artifacts import ARTIFACTS, register_artifact
from auditor.cli import main
from auditor.config import make_config
from auditor.data import check_artifacts, load_probe_set
from auditor.errors import ConfigError, DataError
from auditor.synth import parse_fraction, parse_params, select_rows, synthesise, synthesise_cached


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _clean_set(tmp_path, n=12):
    """Mixed formats and modes: RGB PNG, grayscale PNG, JPEG, palette PNG."""
    rng = np.random.default_rng(0)
    images = tmp_path / "clean"
    rows = []
    for i in range(n):
        arr = rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)
        kind = ["rgb.png", "gray.png", "photo.jpg", "pal.png"][i % 4]
        rel = f"{'cats' if i % 2 else 'dogs'}/{i:02d}_{kind}"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(arr)
        if kind == "gray.png":
            im = im.convert("L")
        elif kind == "pal.png":
            im = im.convert("P")
        im.save(images / rel, quality=90) if kind.endswith("jpg") else im.save(images / rel)
        rows.append((rel, i % 2 == 1, i == 3))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,cat,watermark\n" + "".join(f"{r},{int(c)},{int(w)}\n" for r, c, w in rows))
    return images, labels


def test_deterministic_and_complete(tmp_path):
    images, labels = _clean_set(tmp_path)
    before = _tree(images)
    kw = dict(artifacts=["watermark", "border", "text", "timestamp"], fraction=0.5, seed=7)
    a = synthesise(images, labels, tmp_path / "a", **kw)
    b = synthesise(images, labels, tmp_path / "b", **kw)
    assert _tree(a.out) == _tree(b.out)  # byte-identical images, labels and manifest
    c = synthesise(images, labels, tmp_path / "c", **(kw | {"seed": 8}))
    assert _tree(c.out) != _tree(a.out)
    assert _tree(images) == before  # nothing the user gave is modified
    # 11 images lack 'watermark' (one has it already): round(0.5 * 11) = 6; others round(0.5 * 12) = 6
    assert a.n_synth == {"watermark": 6, "border": 6, "text": 6, "timestamp": 6}
    assert a.n_clean == 12
    manifest = json.loads((a.out / "synth.json").read_text())
    assert manifest["seed"] == 7 and manifest["counts"]["clean"] == 12


def test_copies_keep_size_format_and_concepts(tmp_path):
    images, labels = _clean_set(tmp_path)
    made = synthesise(images, labels, tmp_path / "out", artifacts=["watermark", "border"], fraction=1.0, seed=0)
    probe = load_probe_set(made.images, made.labels)
    assert probe.labels_format == "long csv"
    rows = {p: i for i, p in enumerate(probe.paths)}
    for art in ("watermark", "border"):
        pairs = probe.pairs[art]
        assert len(pairs) == made.n_synth[art]
        for clean, copy in pairs:
            cp, sp_ = probe.paths[clean], probe.paths[copy]
            rel = cp.split("/", 1)[1]
            assert cp == f"clean/{rel}" and sp_ == f"{art}/{rel}"
            assert set(probe.row_concepts(copy)) == set(probe.row_concepts(clean)) | {art}
            with Image.open(made.images / cp) as a, Image.open(made.images / sp_) as b:
                assert a.size == b.size and a.format == b.format
                assert np.asarray(a.convert("RGB")).tobytes() != np.asarray(b.convert("RGB")).tobytes()
            # the clean copy is the original, byte for byte
            assert (made.images / cp).read_bytes() == (images / rel).read_bytes()
    # the image that already had a watermark got no synthetic one; it stays a clean positive
    assert "watermark/cats/03_pal.png" not in rows
    assert "watermark" in probe.row_concepts(rows["clean/cats/03_pal.png"])
    check_artifacts(probe, ["watermark", "border"])


def test_selection_is_stable_and_exact():
    paths = [f"{i}.png" for i in range(100)]
    eligible = np.ones(100, dtype=bool)
    eligible[:10] = False
    rows = select_rows(paths, eligible, "watermark", 0.3, seed=1)
    assert len(rows) == 27 and not (rows < 10).any()
    assert select_rows(paths, eligible, "watermark", 0.3, seed=1).tolist() == rows.tolist()
    assert select_rows(paths, eligible, "text", 0.3, seed=1).tolist() != rows.tolist()
    assert len(select_rows(paths, eligible, "x", 0.001, seed=1)) == 1  # at least one
    # adding images does not reshuffle which of the old ones are picked at fraction 1
    assert len(select_rows(paths, eligible, "x", 1.0, seed=1)) == 90


def test_class_folders_and_unlabeled_input(tmp_path):
    root = tmp_path / "imgs"
    for rel in ("a/1.png", "a/2.png", "b/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (10, 200, 30)).save(root / rel)
    made = synthesise(root, None, tmp_path / "out", artifacts=["border"], fraction=1.0)
    probe = load_probe_set(made.images, made.labels)
    assert probe.concepts == ["a", "b", "border"]
    assert len(probe.pairs["border"]) == 3
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "x.png")
    made = synthesise(flat, None, tmp_path / "out2", artifacts=["border"], fraction=1.0)
    probe = load_probe_set(made.images, made.labels)
    assert probe.concepts == ["border"] and probe.pairs["border"].tolist() == [[0, 1]]


def test_params_and_user_generator(tmp_path):
    images, labels = _clean_set(tmp_path, n=4)

    @register_artifact("test_sticker")
    def sticker(image, rng, *, size=0.3, color=(255, 0, 255)):
        """A square sticker."""
        out = image.copy()
        s = max(1, int(size * min(image.size)))
        x = int(rng.integers(0, image.size[0] - s + 1))
        patch = Image.new(image.mode, (s, s), color if image.mode == "RGB" else 200)
        out.paste(patch, (x, 0))
        return out

    try:
        made = synthesise(images, labels, tmp_path / "o", artifacts=["test_sticker", "border"], fraction=1.0,
                          params={"test_sticker": {"size": 0.5}, "border": {"width": 0.2, "color": [0, 0, 0]}})
        probe = load_probe_set(made.images, made.labels)
        assert len(probe.pairs["test_sticker"]) == 4
        with Image.open(made.images / "border/dogs/00_rgb.png") as im:
            assert im.getpixel((0, 0)) == (0, 0, 0)
        with pytest.raises(ConfigError, match=r"'test_sticker' has no parameter 'sise'.*did you mean 'size'"):
            synthesise(images, labels, tmp_path / "o2", artifacts=["test_sticker"],
                       params={"test_sticker": {"sise": 1}})
        with pytest.raises(ConfigError, match="parameters given for 'text', which is not synthesised"):
            synthesise(images, labels, tmp_path / "o2", artifacts=["border"], params={"text": {"size": 1}})
    finally:
        ARTIFACTS.pop("test_sticker", None)


@pytest.mark.parametrize("kwargs, err, pattern", [
    ({"artifacts": ["watermak"]}, ConfigError, r"unknown artifact 'watermak'.*did you mean 'watermark'"),
    ({"artifacts": []}, ConfigError, "no artifacts to synthesise"),
    ({"artifacts": ["border"], "fraction": 0}, ConfigError, r"fraction for 'border': expected a number in \(0, 1\]"),
    ({"artifacts": ["border"], "fraction": {"text": 0.5}}, ConfigError, "fraction given for 'text'"),
    ({"artifacts": ["border"], "seed": 1.5}, ConfigError, "seed: expected an integer"),
])
def test_argument_errors(tmp_path, kwargs, err, pattern):
    images, labels = _clean_set(tmp_path, n=4)
    with pytest.raises(err, match=pattern):
        synthesise(images, labels, tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_output_folder_safety(tmp_path):
    images, labels = _clean_set(tmp_path, n=4)
    with pytest.raises(ConfigError, match="lies inside the image folder"):
        synthesise(images, labels, images / "synth", artifacts=["border"])
    other = tmp_path / "busy"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        synthesise(images, labels, other, artifacts=["border"])
    with pytest.raises(ConfigError, match="not an earlier `auditor synth` output"):
        synthesise(images, labels, other, artifacts=["border"], overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="holds the input images"):
        synthesise(images, labels, tmp_path, artifacts=["border"], overwrite=True)
    out = tmp_path / "out"
    synthesise(images, labels, out, artifacts=["border"], fraction=1.0)
    synthesise(images, labels, out, artifacts=["text"], fraction=1.0, overwrite=True)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["clean", "text"]
    # re-synthesising a synthesised set is refused
    with pytest.raises(DataError, match="already lists synthesised copies"):
        synthesise(out / "images", out / "labels.csv", tmp_path / "again", artifacts=["border"])


def test_all_images_already_carry_it(tmp_path):
    images, labels = _clean_set(tmp_path, n=2)
    labels.write_text("path,watermark\ndogs/00_rgb.png,1\ncats/01_gray.png,1\n")
    with pytest.raises(DataError, match="every image already carries 'watermark'"):
        synthesise(images, labels, tmp_path / "o", artifacts=["watermark"])


def test_cached_synthesis_is_reused(tmp_path):
    images, labels = _clean_set(tmp_path, n=4)
    logs = []
    a = synthesise_cached(images, labels, tmp_path / "cache", artifacts=["border"], fraction=1.0, log=logs.append)
    b = synthesise_cached(images, labels, tmp_path / "cache", artifacts=["border"], fraction=1.0, log=logs.append)
    assert a.out == b.out and b.reused and not a.reused
    assert a.out.parent == tmp_path / "cache" / "synth"
    c = synthesise_cached(images, labels, tmp_path / "cache", artifacts=["border"], fraction=1.0, seed=1)
    assert c.out != a.out


def test_parse_helpers():
    assert parse_params(["watermark.opacity=0.5", "watermark.angle=[0, 10]", "text.text=SALE 50%"]) == {
        "watermark": {"opacity": 0.5, "angle": [0, 10]}, "text": {"text": "SALE 50%"}}
    with pytest.raises(ConfigError, match="expected ARTIFACT.NAME=VALUE"):
        parse_params(["opacity=0.5"])
    assert parse_fraction("watermark=0.2", ["watermark", "text"]) == {"watermark": 0.2, "text": 0.5}
    assert parse_fraction("0.25", ["a"]) == {"a": 0.25}


def test_cli(tmp_path, capsys):
    images, labels = _clean_set(tmp_path, n=4)
    plugin = tmp_path / "plug.py"
    plugin.write_text("from auditor.artifacts import register_artifact\n"
                      "@register_artifact('test_plugin_frame', overwrite=True)\n"
                      "def frame(image, rng, width=2):\n"
                      "    from auditor.artifacts import border\n"
                      "    return border(image, rng, width=0.1)\n")
    try:
        code = main(["synth", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o"),
                     "--artifacts", "border,test_plugin_frame", "--fraction", "border=1.0", "--seed", "3",
                     "--param", "border.width=0.25", "--plugin", str(plugin), "-q"])
        assert code == 0
        err = capsys.readouterr().err
        assert "auditor run --images" in err and "labels.csv" in err
        probe = load_probe_set(tmp_path / "o" / "images", tmp_path / "o" / "labels.csv")
        assert len(probe.pairs["border"]) == 4 and len(probe.pairs["test_plugin_frame"]) == 2
        code = main(["synth", "--images", str(images), "--out", str(tmp_path / "o2"), "--artifacts", "wotermark"])
        assert code == 2 and "did you mean 'watermark'" in capsys.readouterr().err
    finally:
        ARTIFACTS.pop("test_plugin_frame", None)


def test_config_synth_section():
    cfg = make_config({"synth": {"artifacts": ["watermark"], "fraction": {"watermark": 0.3}, "seed": 2,
                                 "params": {"watermark": {"opacity": 0.5}}}})
    assert cfg.artifacts == ("watermark",) and cfg.synth.seed == 2
    assert cfg.plain()["synth"]["params"] == {"watermark": {"opacity": 0.5}}
    cfg = make_config({"synth": "watermark,text", "artifacts": "watermark"})
    assert cfg.synth.artifacts == ("watermark", "text") and cfg.artifacts == ("watermark",)
    with pytest.raises(ConfigError, match=r"unknown key 'synth.fractoin'.*did you mean 'fraction'"):
        make_config({"synth": {"artifacts": ["a"], "fractoin": 1}})
    cfg = make_config({"labels_format": "coco", "hierarchy": "h.json"})
    assert cfg.labels_format == "coco" and cfg.hierarchy == "h.json"


def test_concepts_by_row_matches_the_probe_rows():
    import scipy.sparse as sp

    from auditor.synth import concepts_by_row

    rng = np.random.default_rng(3)
    Y = rng.random((40, 7)) < 0.3
    names = [f"c{j}" for j in range(7)]
    want = [[names[j] for j in range(7) if Y[i, j]] for i in range(40)]
    assert concepts_by_row(Y, names) == want
    assert concepts_by_row(sp.csr_matrix(Y), names) == want
    assert concepts_by_row(sp.csc_matrix(Y), names) == want
