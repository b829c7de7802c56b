"""The demo probe set: labels, determinism, artifact rates, the on-disk layout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from auditor.demo.data import (
    ARTIFACT_CONCEPTS,
    COLORS,
    CONCEPT_GROUPS,
    CONCEPTS,
    SHAPES,
    TEXTURES,
    Shortcut,
    generate,
    make_probe_set,
)
from auditor.errors import ConfigError


@pytest.fixture(scope="module")
def demo800():
    return generate(800, seed=0)


def test_labels_are_one_int_column_per_concept(demo800):
    images, labels, classes = demo800
    assert list(labels.columns) == list(CONCEPTS)
    assert classes == list(SHAPES)
    assert len(images) == len(labels) == 800
    assert all(pd.api.types.is_integer_dtype(t) for t in labels.dtypes)
    assert set(np.unique(labels.to_numpy())) == {0, 1}
    for group in ("shape", "color", "texture"):  # exactly one of each per image
        assert (labels[list(CONCEPT_GROUPS[group])].sum(axis=1) == 1).all(), group
    assert (demo800.targets == np.arange(800) % 4).all()
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)


def test_every_concept_occurs_often(demo800):
    rates = demo800.labels.mean()
    for c in SHAPES:
        assert rates[c] == 0.25
    for c in COLORS:
        assert 0.18 < rates[c] < 0.32, (c, rates[c])
    for c in TEXTURES:
        assert 0.1 < rates[c] < 0.23, (c, rates[c])
    for c in ARTIFACT_CONCEPTS:
        assert 0.15 <= rates[c] <= 0.25, (c, rates[c])


def test_artifacts_are_independent_of_the_class(demo800):
    labels = demo800.labels
    for a in ARTIFACT_CONCEPTS:
        per_class = labels.groupby(demo800.targets)[a].mean()
        assert per_class.between(0.1, 0.3).all(), (a, per_class.round(3).tolist())
        # and of each other: co-occurrence close to the product of the rates
        for b in ARTIFACT_CONCEPTS:
            if a < b:
                both = (labels[a] & labels[b]).mean()
                assert abs(both - labels[a].mean() * labels[b].mean()) < 0.03, (a, b)


def test_images_are_textured_not_flat(demo800):
    for img in demo800.images[:40]:
        arr = np.asarray(img, dtype=np.float32)
        assert arr.std(axis=(0, 1)).mean() > 8  # shape + background structure
        assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 300


def test_deterministic_and_prefix_stable():
    a = generate(12, seed=3)
    b = generate(12, seed=3)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    pd.testing.assert_frame_equal(a.labels, b.labels)
    small = generate(5, seed=3)
    assert [im.tobytes() for im in small.images] == [im.tobytes() for im in a.images[:5]]
    other = generate(12, seed=4)
    assert sum(x.tobytes() != y.tobytes() for x, y in zip(a.images, other.images)) == 12


def test_artifact_labels_match_the_pixels():
    clean = generate(8, seed=1, artifact_rates={a: 0.0 for a in ARTIFACT_CONCEPTS})
    marked = generate(8, seed=1, artifact_rates={"border": 1.0, "watermark": 0.0, "text": 0.0, "timestamp": 0.0})
    assert marked.labels["border"].all() and not clean.labels[list(ARTIFACT_CONCEPTS)].to_numpy().any()
    for c, m in zip(clean.images, marked.images):
        a, b = np.asarray(c, dtype=np.int16), np.asarray(m, dtype=np.int16)
        assert (a[0] != b[0]).any()  # the top row now belongs to the frame
        assert (a[32, 20:44] == b[32, 20:44]).all()  # the middle is untouched


def test_shortcut_ties_the_artifact_to_one_class():
    demo = generate(800, seed=1, shortcut=Shortcut("star", "watermark", 0.95, 0.03))
    wm = demo.labels["watermark"]
    star = demo.labels["star"] == 1
    assert wm[star].mean() > 0.88
    assert wm[~star].mean() < 0.07
    assert 0.1 < demo.labels["text"][star].mean() < 0.3  # the others keep their default rates


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="did you mean 'watermark'"):
        generate(4, artifact_rates={"watermrk": 0.5})
    with pytest.raises(ConfigError, match="probability"):
        generate(4, artifact_rates={"text": 1.5})
    with pytest.raises(ConfigError, match="positive integer"):
        generate(0)
    with pytest.raises(ConfigError, match="image_size"):
        generate(4, image_size=8)
    with pytest.raises(ConfigError, match="did you mean 'star'"):
        Shortcut("stra")
    with pytest.raises(ConfigError, match="p_class"):
        Shortcut("star", p_class=2.0)


def test_make_probe_set_layout(tmp_path):
    csv = make_probe_set(tmp_path / "probe", n=24, seed=5, image_size=48)
    assert csv == tmp_path / "probe" / "labels.csv"
    table = pd.read_csv(csv)
    assert list(table.columns) == ["path", *CONCEPTS]
    assert table["path"].tolist() == [f"{i:04d}.png" for i in range(24)]
    demo = generate(24, seed=5, image_size=48)
    pd.testing.assert_frame_equal(table.drop(columns="path"), demo.labels)
    for name, expected in zip(table["path"], demo.images):
        with Image.open(tmp_path / "probe" / "images" / name) as im:
            assert im.size == (48, 48)
            assert im.convert("RGB").tobytes() == expected.tobytes()  # PNG is lossless


def test_make_probe_set_is_reproducible(tmp_path):
    """Same seed, same bytes (its speed is measured by bench/bench_demo_data.py, not asserted here)."""
    a = make_probe_set(tmp_path / "a", n=30, seed=3)
    b = make_probe_set(tmp_path / "b", n=30, seed=3)
    c = make_probe_set(tmp_path / "c", n=30, seed=4)
    assert a.read_bytes() == b.read_bytes()
    files = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(files) == 30
    assert all((tmp_path / "a" / "images" / f).read_bytes() == (tmp_path / "b" / "images" / f).read_bytes()
               for f in files)
    assert any((tmp_path / "a" / "images" / f).read_bytes() != (tmp_path / "c" / "images" / f).read_bytes()
               for f in files)
