"""Artifact generators: determinism, the image contract, what each artifact looks like, the registry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from auditor import artifacts
from auditor.artifacts import (
    ARTIFACTS,
    BUILTIN_ARTIFACTS,
    ArtifactGenerator,
    apply_artifact,
    get_artifact,
    register_artifact,
)
from auditor.errors import ConfigError

SIZE = 96


def _background(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE), lo: int = 50, hi: int = 170) -> Image.Image:
    """Mid-grey noisy photo stand-in: every channel strictly between 0 and 255."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(lo, hi, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _changed(before: Image.Image, after: Image.Image, tol: int = 2) -> np.ndarray:
    """H x W bool: pixels where some channel moved by more than ``tol``."""
    return (np.abs(_arr(after) - _arr(before)) > tol).any(axis=-1)


def _orientation(mask: np.ndarray) -> float:
    """Principal-axis angle (degrees, 0 = horizontal, counter-clockwise) of the True pixels."""
    ys, xs = np.nonzero(mask)
    x, y = xs - xs.mean(), -(ys - ys.mean())
    cov = np.cov(np.stack([x, y]))
    evals, evecs = np.linalg.eigh(cov)
    vx, vy = evecs[:, np.argmax(evals)]
    ang = np.degrees(np.arctan2(vy, vx))
    return float((ang + 90) % 180 - 90)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", BUILTIN_ARTIFACTS)
def test_builtin_is_registered_and_changes_the_image(name):
    base = _background()
    out = get_artifact(name)(base, np.random.default_rng(0))
    assert isinstance(ARTIFACTS[name], ArtifactGenerator)
    assert _changed(base, out).sum() > 20, f"{name} left the image (nearly) unchanged"


@pytest.mark.parametrize("name", BUILTIN_ARTIFACTS)
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(name):
    base = _background(1)
    gen = get_artifact(name)
    a = gen(base, np.random.default_rng(123)).tobytes()
    b = gen(base, np.random.default_rng(123)).tobytes()
    assert a == b
    others = {gen(base, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(others) == 5, f"{name}: five seeds gave only {len(others)} distinct images"


@pytest.mark.parametrize("name", BUILTIN_ARTIFACTS)
def test_input_image_is_not_modified(name):
    base = _background(2)
    before = base.tobytes()
    get_artifact(name)(base, np.random.default_rng(0))
    assert base.tobytes() == before


@pytest.mark.parametrize("name", BUILTIN_ARTIFACTS)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_size_and_mode_are_preserved(name, mode):
    base = _background(3, size=(97, 41)).convert(mode)
    if mode == "RGBA":
        alpha = Image.linear_gradient("L").resize(base.size)
        base.putalpha(alpha)
    out = get_artifact(name)(base, np.random.default_rng(0))
    assert out is not base
    assert out.size == (97, 41) and out.mode == mode
    if mode == "RGBA":  # the artifact goes on the colour, the alpha channel is kept
        assert out.getchannel("A").tobytes() == base.getchannel("A").tobytes()


def test_rng_may_be_an_int_seed_and_other_types_fail():
    base = _background()
    assert get_artifact("border")(base, 5).tobytes() == get_artifact("border")(base, np.random.default_rng(5)).tobytes()
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        get_artifact("border")(base, "seed")
    with pytest.raises(TypeError, match="PIL"):
        get_artifact("border")(np.zeros((8, 8, 3)), 0)


# --------------------------------------------------------------------------- watermark


def test_watermark_is_a_semi_transparent_blend_not_a_box():
    fills = []
    for seed in range(8):
        base = _background(seed)
        out = get_artifact("watermark")(base, np.random.default_rng(seed), tiled=False)
        changed = _changed(base, out)
        assert changed.sum() > 30
        before, after = _arr(base)[changed], _arr(out)[changed]
        # White ink over a background in [50, 170): every channel must rise but stay below 255.
        strictly_between = ((after > before) & (after < 255)).all(axis=-1)
        assert strictly_between.mean() > 0.95, f"seed {seed}: only {strictly_between.mean():.2f} of pixels are a blend"
        # The implied alpha never reaches 1 (default opacity is at most 0.6).
        alpha = (after - before) / (255.0 - before)
        assert alpha.max() < 0.7
        assert np.median(alpha) > 0.05
        # Letters, not a filled rectangle: the changed pixels cover well under the bounding box.
        ys, xs = np.nonzero(changed)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(changed.sum() / box)
        # Even a bold horizontal word leaves gaps inside its box, away from the box's edges.
        inner = changed[ys.min() + 2 : ys.max() - 1, xs.min() + 2 : xs.max() - 1]
        assert (~inner).mean() > 0.1, f"seed {seed}: the inside of the mark has no holes"
        # A translucent box would have one alpha everywhere; letters have soft edges.
        assert np.percentile(alpha, 90) - np.percentile(alpha, 10) > 0.1
    assert np.median(fills) < 0.5, np.round(fills, 2)


@pytest.mark.parametrize("tiled", [False, True])
def test_watermark_edges_have_no_dark_fringe(tiled):
    # White ink can only lighten: a rotated or tiled mark must not darken any pixel at its edges.
    for seed in range(6):
        base = _background(seed)
        out = get_artifact("watermark")(base, np.random.default_rng(seed), tiled=tiled)
        diff = _arr(out) - _arr(base)
        assert diff.min() >= -1, f"seed {seed}: a pixel got darker by {-diff.min()}"
        assert (diff > 2).any()


def test_watermark_opacity_is_the_alpha_of_covered_pixels():
    base = _background(0)
    out = get_artifact("watermark")(base, np.random.default_rng(0), opacity=0.5, tiled=False, angle=0)
    changed = _changed(base, out)
    before, after = _arr(base)[changed], _arr(out)[changed]
    alpha = (after - before) / (255.0 - before)
    # Fully covered glyph pixels sit at 0.5 (up to rounding); partial ones below.
    assert 0.47 < alpha.max() < 0.53
    assert (np.abs(alpha - 0.5) < 0.03).mean() > 0.3


def test_watermark_varies_in_position_size_and_angle_across_seeds():
    base = _background(0, size=(128, 128))
    centres, areas, angles = [], [], []
    for seed in range(16):
        out = get_artifact("watermark")(base, np.random.default_rng(seed), tiled=False)
        m = _changed(base, out)
        ys, xs = np.nonzero(m)
        centres.append((xs.mean(), ys.mean()))
        areas.append(m.sum())
        angles.append(_orientation(m))
    centres = np.array(centres)
    assert centres.std(axis=0).min() > 6, f"positions hardly vary: {centres.std(axis=0)}"
    assert max(areas) > 1.8 * min(areas), f"sizes hardly vary: {min(areas)}..{max(areas)}"
    assert np.std(angles) > 10, f"angles hardly vary: {np.round(angles)}"


def test_watermark_fixed_parameters_are_honoured():
    base = _background(0, size=(128, 128))
    out = get_artifact("watermark")(
        base, np.random.default_rng(0), text="SAMPLE", angle=0, position="center", scale=0.8, tiled=False, color=(0, 0, 0)
    )
    m = _changed(base, out)
    ys, xs = np.nonzero(m)
    assert abs(xs.mean() - 64) < 8 and abs(ys.mean() - 64) < 8
    assert abs(_orientation(m)) < 5
    width = xs.max() - xs.min() + 1
    assert 0.65 * 128 < width < 0.9 * 128
    after, before = _arr(out)[m], _arr(base)[m]
    assert ((after < before) & (after > 0)).all(axis=-1).mean() > 0.95  # black ink: darker, never black

    rotated = get_artifact("watermark")(
        base, np.random.default_rng(0), text="SAMPLE", angle=30, position="center", scale=0.8, tiled=False
    )
    assert 22 < _orientation(_changed(base, rotated)) < 38


def test_tiled_watermark_covers_the_image_with_repeats():
    base = _background(0, size=(128, 128))
    out = get_artifact("watermark")(base, np.random.default_rng(0), tiled=True, scale=0.3)
    m = _changed(base, out)
    quadrants = [m[:64, :64], m[:64, 64:], m[64:, :64], m[64:, 64:]]
    assert all(q.sum() > 20 for q in quadrants), [int(q.sum()) for q in quadrants]
    assert m.mean() < 0.6  # still letters, not a sheet


def test_logo_watermark_from_png(tmp_path):
    logo = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse((4, 4, 35, 35), fill=(255, 0, 0, 255))
    path = tmp_path / "logo.png"
    logo.save(path)
    base = _background(0)
    out = get_artifact("watermark")(base, np.random.default_rng(0), logo=path, opacity=0.5, scale=0.5,
                                    angle=0, position="center", tiled=False)
    m = _changed(base, out)
    before, after = _arr(base)[m], _arr(out)[m]
    # Red logo: red rises, green and blue fall, none reaches the ink.
    assert ((after[:, 0] > before[:, 0]) & (after[:, 0] < 255)).mean() > 0.95
    assert ((after[:, 1:] < before[:, 1:]) & (after[:, 1:] > 0)).all(axis=-1).mean() > 0.95
    # The transparent corners of the logo stay transparent: the mark is a disc, not its square.
    ys, xs = np.nonzero(m)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert 0.6 < m.sum() / box < 0.85  # a disc fills pi/4 of its box
    # Same logo passed as an image gives the same result.
    same = get_artifact("watermark")(base, np.random.default_rng(0), logo=logo, opacity=0.5, scale=0.5,
                                     angle=0, position="center", tiled=False)
    assert same.tobytes() == out.tobytes()


def test_logo_without_alpha_is_dark_ink_on_white(tmp_path):
    logo = Image.new("RGB", (60, 20), (255, 255, 255))
    ImageDraw.Draw(logo).rectangle((0, 8, 59, 11), fill=(0, 0, 0))  # a black bar on white
    path = tmp_path / "flat.png"
    logo.save(path)
    base = _background(0)
    out = get_artifact("watermark")(base, 0, logo=path, opacity=0.6, scale=0.6, angle=0, position="center", tiled=False)
    m = _changed(base, out)
    ys, _ = np.nonzero(m)
    assert ys.max() - ys.min() < 8  # only the bar shows, not the white rectangle around it


def test_watermark_bad_parameters_raise_config_error(tmp_path):
    base = _background(0)
    wm = get_artifact("watermark")
    with pytest.raises(ConfigError, match="opacity"):
        wm(base, 0, opacity=(0.8, 0.2))
    with pytest.raises(ConfigError, match="opacity"):
        wm(base, 0, opacity=1.5)
    with pytest.raises(ConfigError, match="color"):
        wm(base, 0, color="white")
    with pytest.raises(ConfigError, match="not found"):
        wm(base, 0, logo=tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="did you mean 'opacity'"):
        wm(base, 0, opactiy=0.5)


# --------------------------------------------------------------------------- text, border, timestamp


def test_text_is_opaque():
    base = _background(0)
    out = get_artifact("text")(base, np.random.default_rng(0), text="HELLO", color=(255, 0, 0), stroke=0)
    m = _changed(base, out)
    ink = (_arr(out)[m] == (255, 0, 0)).all(axis=-1)
    assert ink.mean() > 0.3, "opaque text should paint many pixels exactly in its colour"


def test_text_varies_in_words_colour_and_place():
    base = _background(0)
    seen = set()
    for seed in range(10):
        m = _changed(base, get_artifact("text")(base, np.random.default_rng(seed)))
        ys, xs = np.nonzero(m)
        seen.add((round(xs.mean() / 10), round(ys.mean() / 10), int(m.sum()) // 20))
    assert len(seen) >= 8


def test_border_is_a_solid_frame():
    base = _background(0, size=(100, 80))
    out = _arr(get_artifact("border")(base, 0, width=0.1, color=(10, 200, 30)))
    px = 8  # 0.1 * min(100, 80)
    frame = np.ones((80, 100), bool)
    frame[px:-px, px:-px] = False
    assert (out[frame] == (10, 200, 30)).all()
    assert (out[~frame] == _arr(base)[~frame]).all()


def test_border_width_varies():
    base = _background(0)
    widths = set()
    for seed in range(10):
        m = _changed(base, get_artifact("border")(base, seed))
        widths.add(int(m[SIZE // 2].argmin()))  # first unchanged pixel from the left on the middle row
    assert len(widths) >= 3


def test_timestamp_is_orange_digits_in_the_chosen_corner():
    base = _background(0, size=(128, 128), lo=0, hi=60)  # dark, so the stamp stands out
    out = get_artifact("timestamp")(base, np.random.default_rng(0), corner="bottom-right", glow=False)
    m = _changed(base, out, tol=20)
    ys, xs = np.nonzero(m)
    assert ys.min() > 128 * 0.7 and xs.min() > 128 * 0.2 and xs.max() > 128 * 0.85
    full = _arr(out)[m]
    r, g, b = full[:, 0].mean(), full[:, 1].mean(), full[:, 2].mean()
    assert r > g > b, (r, g, b)  # orange: red above green above blue
    top_left = get_artifact("timestamp")(base, np.random.default_rng(0), corner="top-left", date="2019 08 14")
    ys2, xs2 = np.nonzero(_changed(base, top_left, tol=20))
    assert ys2.max() < 128 * 0.3 and xs2.min() < 128 * 0.1


def test_timestamp_formats():
    import datetime as dt

    base = _background(0)
    a = get_artifact("timestamp")(base, 0, date=dt.date(2019, 8, 14), style="ymd", glow=False, corner="top-left")
    b = get_artifact("timestamp")(base, 0, date="2019 08 14", glow=False, corner="top-left")
    assert a.tobytes() == b.tobytes()
    with pytest.raises(ConfigError, match="did you mean 'bottom-left'"):
        get_artifact("timestamp")(base, 0, corner="bottom-lef")
    with pytest.raises(ConfigError, match="style"):
        get_artifact("timestamp")(base, 0, style="iso")


# --------------------------------------------------------------------------- registry


@pytest.fixture
def scratch_registry():
    before = dict(ARTIFACTS)
    yield
    ARTIFACTS.clear()
    ARTIFACTS.update(before)


def test_unknown_artifact_names_the_closest(scratch_registry):
    with pytest.raises(ConfigError, match="did you mean 'watermark'") as info:
        get_artifact("watermrk")
    assert "registered:" in str(info.value)
    with pytest.raises(ConfigError, match="unknown artifact"):
        apply_artifact("sticker", _background(), 0)


def test_user_registered_generator(scratch_registry):
    @register_artifact("sticker")
    def sticker(image, rng, size=(0.1, 0.2)):
        """A yellow disc."""
        out = image.copy()
        d = float(rng.uniform(*size)) * image.width
        x = float(rng.uniform(0, image.width - d))
        ImageDraw.Draw(out).ellipse((x, x, x + d, x + d), fill=(255, 220, 0))
        return out

    assert "sticker" in artifacts.available_artifacts()
    assert get_artifact("sticker") is sticker
    assert sticker.describe() == "A yellow disc."
    base = _background()
    out = apply_artifact("sticker", base, np.random.default_rng(0), size=(0.2, 0.3))
    assert _changed(base, out).sum() > 50
    assert out.tobytes() == apply_artifact("sticker", base, np.random.default_rng(0), size=(0.2, 0.3)).tobytes()
    with pytest.raises(ConfigError, match="did you mean 'size'"):
        apply_artifact("sticker", base, 0, sizes=0.2)
    with pytest.raises(ConfigError, match="already registered"):
        register_artifact("sticker")(lambda image, rng: image)
    register_artifact("sticker", overwrite=True)(lambda image, rng: image)
    assert apply_artifact("sticker", base, 0).tobytes() == base.tobytes()


def test_user_generator_that_breaks_the_contract_is_reported(scratch_registry):
    register_artifact("shrinker")(lambda image, rng: image.resize((4, 4)))
    register_artifact("greyer")(lambda image, rng: image.convert("L"))
    register_artifact("nothing")(lambda image, rng: None)
    base = _background()
    with pytest.raises(ConfigError, match="size"):
        apply_artifact("shrinker", base, 0)
    with pytest.raises(ConfigError, match="mode"):
        apply_artifact("greyer", base, 0)
    with pytest.raises(ConfigError, match="returned NoneType"):
        apply_artifact("nothing", base, 0)


def test_user_generator_cannot_modify_the_callers_image(scratch_registry):
    def vandal(image, rng):
        image.paste((0, 0, 0), (0, 0, 10, 10))  # modifies its argument in place
        return image

    register_artifact("vandal")(vandal)
    base = _background()
    before = base.tobytes()
    apply_artifact("vandal", base, 0)
    assert base.tobytes() == before


def test_bad_registrations(scratch_registry):
    with pytest.raises(ConfigError, match="non-empty"):
        register_artifact("")
    with pytest.raises(ConfigError, match=r"\(image, rng"):
        register_artifact("lonely")(lambda image: image)
