"""``auditor synth``: labeled artifact concepts made from the user's own clean images.

Given clean probe images (a folder, with labels in any format or none), write a
new probe set in which a chosen fraction of the images also appears as a copy
carrying an artifact (a watermark, overlaid text, a border, a date stamp, or any
generator registered with :func:`auditor.artifacts.register_artifact`). The
audit then compares every neuron on exactly the same images with and without
the artifact (:mod:`auditor.paired`).

Output folder (nothing the user gave is modified; the folder must not lie in the
image folder)::

    OUT/images/clean/<path>        byte-for-byte copies (or hard links) of the originals
    OUT/images/<artifact>/<path>   the synthesised copies, same size and format
    OUT/labels.csv                 long table: path,concept,source — `auditor run` reads it
    OUT/synth.json                 what was made and how (no timestamps: reproducible)

Every copy keeps its original's concepts, gains the artifact concept, and names
its original in the ``source`` column, so :func:`auditor.data.load_probe_set`
fills ``ProbeSet.pairs[artifact]`` with (clean row, copy row).

Deterministic: the chosen images and every random draw of a generator depend
only on (seed, artifact, image path), so the same inputs and seed give
byte-identical files on the same Pillow/zlib/libjpeg build. PNG, BMP, TIFF, PPM
and GIF stay lossless (palette images are re-quantised); JPEG is re-encoded at
quality 95 with 4:4:4 chroma (a second lossy pass, documented in docs/data.md);
WebP is written lossless.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ConfigError, DataError, did_you_mean

CLEAN_DIR = "clean"
LABELS_NAME = "labels.csv"
MANIFEST_NAME = "synth.json"
SYNTH_FORMAT = 1
DEFAULT_FRACTION = 0.5
JPEG_QUALITY = 95

Log = Callable[[str], None]


@dataclass(frozen=True)
class SynthResult:
    out: Path  # the output folder
    images: Path  # pass as --images
    labels: Path  # pass as --labels
    n_clean: int
    n_synth: dict[str, int] = field(default_factory=dict)
    reused: bool = False  # (cached synthesis) an earlier identical synthesis was reused

    def run_hint(self) -> str:
        return (f"auditor run --images {self.images} --labels {self.labels} "
                f"--artifacts {','.join(self.n_synth)}")


# -- arguments ------------------------------------------------------------------------

def load_plugins(plugins: Sequence[str]) -> None:
    """Import modules (``package.module`` or ``path/to/file.py``) that register artifact generators."""
    for spec in plugins:
        try:
            if spec.endswith(".py"):
                path = Path(spec)
                if not path.is_file():
                    raise ConfigError(f"artifact plugin file not found: {path}")
                name = "auditor_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
                if name in sys.modules:
                    continue
                loader = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module
                loader.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"cannot import artifact plugin {spec!r}: {type(exc).__name__}: {exc}") from None


def parse_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["watermark.opacity=0.5", "text.text=SALE"]`` → ``{"watermark": {"opacity": 0.5}, ...}``.

    Values are read as YAML: ``0.5``, ``[0.3, 0.6]``, ``true``, ``SALE``.
    """
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        art, dot, name = key.strip().partition(".")
        if not sep or not dot or not art or not name:
            raise ConfigError(f"--param {item!r}: expected ARTIFACT.NAME=VALUE, e.g. watermark.opacity=0.5")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(art, {})[name.strip()] = parsed
    return out


def parse_fraction(value: Any, artifacts: Sequence[str]) -> dict[str, float]:
    """A number for every artifact, ``{artifact: number}``, or ``"watermark=0.5,text=0.2"``."""
    if isinstance(value, str):
        if "=" in value:
            pairs = {}
            for part in value.split(","):
                k, _, v = part.partition("=")
                pairs[k.strip()] = v.strip()
            value = pairs
        else:
            value = value.strip()
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in artifacts]
        if unknown:
            raise ConfigError(f"fraction given for {unknown[0]!r}, which is not synthesised"
                              f"{did_you_mean(str(unknown[0]), artifacts)}; artifacts: {', '.join(artifacts)}")
        fr = {a: value.get(a, DEFAULT_FRACTION) for a in artifacts}
    else:
        fr = {a: value for a in artifacts}
    out = {}
    for a, v in fr.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"fraction for {a!r}: expected a number in (0, 1], got {v!r}") from None
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"fraction for {a!r}: expected a number in (0, 1], got {f}")
        out[a] = f
    return out


def _check_artifacts(artifacts: Sequence[str], params: Mapping[str, Mapping[str, Any]]):
    from .artifacts import get_artifact

    if not artifacts:
        raise ConfigError("no artifacts to synthesise: pass --artifacts, e.g. watermark,text")
    if len(set(artifacts)) != len(artifacts):
        raise ConfigError(f"artifacts lists a generator twice: {list(artifacts)}")
    gens = {}
    for a in artifacts:
        if a == CLEAN_DIR or a in (".", "..") or "/" in a or "\\" in a or a.startswith("."):
            raise ConfigError(f"artifact name {a!r} cannot name an output folder ('{CLEAN_DIR}' is reserved for "
                              "the originals; no slashes or leading dots)")
        gens[a] = get_artifact(a)
    for a, p in params.items():
        if a not in gens:
            raise ConfigError(f"parameters given for {a!r}, which is not synthesised{did_you_mean(a, artifacts)}; "
                              f"artifacts: {', '.join(artifacts)}")
        if not isinstance(p, Mapping):
            raise ConfigError(f"parameters of {a!r} must be a mapping of name: value, got {p!r}")
        g = gens[a]
        if not g.accepts_any:
            for k in p:
                if k not in g.params:
                    raise ConfigError(f"artifact {a!r} has no parameter {k!r}{did_you_mean(k, g.params)}; "
                                      f"expected one of: {', '.join(g.params) or '(none)'}")
    return gens


# -- determinism ------------------------------------------------------------------------

def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()


def image_rng(seed: int, artifact: str, rel: str) -> np.random.Generator:
    """The generator for one (artifact, image): independent of every other image."""
    return np.random.default_rng(np.frombuffer(_digest(SYNTH_FORMAT, seed, artifact, rel, "draw"), dtype=np.uint32))


def select_rows(paths: Sequence[str], eligible: np.ndarray, artifact: str, fraction: float | None, seed: int,
                *, count: int | None = None) -> np.ndarray:
    """round(fraction × eligible) rows (at least one), or ``count`` rows (at most all eligible ones),
    chosen by a hash of (seed, artifact, path): the first ones in hash order, so a smaller count
    picks a subset of a larger one."""
    rows = np.flatnonzero(eligible)
    if not len(rows):
        return rows
    n = min(len(rows), int(count)) if count is not None else max(1, int(round(fraction * len(rows))))
    keys = [_digest(SYNTH_FORMAT, seed, artifact, paths[i], "pick") for i in rows]
    order = sorted(range(len(rows)), key=keys.__getitem__)
    return np.sort(rows[order[:n]])


def clean_mask(probe) -> np.ndarray:
    """Rows of ``probe`` that carry no artifact concept: no positive label in any column named after a
    registered artifact generator (watermark, text, border, timestamp, plugins), and not a
    synthesised copy. The images ``--count`` (and the impact test) paste artifacts on."""
    from .artifacts import available_artifacts

    mask = np.ones(len(probe), dtype=bool)
    if probe.source_rows is not None:
        mask &= probe.source_rows == -1
    arts = [a for a in available_artifacts() if a in probe.concepts]
    if arts:
        mask &= ~probe.dense_columns(arts).any(axis=1)
    return mask


def pick_clean(probe, artifact: str, count: int, seed: int) -> np.ndarray:
    """The ``count`` clean rows (at most all of them) that get ``artifact`` for ``seed``.

    One code path for ``auditor synth --count M --seed S`` and the impact test of
    ``auditor run``, so both paste the artifact on the same images with the same draws.
    """
    return select_rows(probe.paths, clean_mask(probe), artifact, None, int(seed), count=int(count))


# -- images -------------------------------------------------------------------------------

def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def encode_like(out: Image.Image, fmt: str | None, original: Image.Image, jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """Encode ``out`` in the original's file format (deterministic settings)."""
    fmt = (fmt or "PNG").upper()
    kwargs: dict[str, Any] = {}
    icc = original.info.get("icc_profile")
    if icc and fmt in ("PNG", "JPEG", "TIFF", "WEBP"):
        kwargs["icc_profile"] = icc
    exif = original.info.get("exif")
    if exif and fmt in ("PNG", "JPEG", "WEBP"):
        kwargs["exif"] = exif
    img = out
    if fmt == "JPEG":
        if img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("RGB")
        kwargs |= {"quality": jpeg_quality, "subsampling": 0, "optimize": False, "progressive": False}
    elif fmt == "GIF":
        img = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    elif fmt == "WEBP":
        kwargs |= {"lossless": True, "quality": 100, "method": 4, "exact": True}
    elif fmt == "BMP" and img.mode not in ("1", "L", "P", "RGB", "RGBA"):
        img = img.convert("RGB")
    elif fmt == "PPM" and img.mode not in ("1", "L", "RGB"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot write a {fmt} image ({exc}); convert the probe images to PNG or JPEG") from None
    return buf.getvalue()


def synthesise_image(src: Path, gen, rng: np.random.Generator, params: Mapping[str, Any],
                     jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """The bytes of ``src`` with the artifact of ``gen`` pasted on, in ``src``'s format."""
    try:
        with Image.open(src) as im:
            im.load()
            fmt = im.format
            original = im
            if im.mode in ("RGB", "RGBA", "L", "LA"):
                work = im
            else:  # palette, 1-bit, 16-bit, CMYK, ...: draw in 8-bit RGB(A)
                work = im.convert("RGBA" if _has_alpha(im) else "RGB")
            out = gen(work, rng, **dict(params))
            return encode_like(out, fmt, original, jpeg_quality)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {src}: {exc}") from None


# -- the probe set ------------------------------------------------------------------------

def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _check_out(out: Path, images: Path, labels: Path | None, overwrite: bool) -> None:
    if _inside(out, images):
        raise ConfigError(f"output folder {out} lies inside the image folder {images}; synthesis never writes into "
                          "the user's images — pick another --out")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        if _inside(images, out) or (labels is not None and _inside(labels, out)):
            raise ConfigError(f"--out {out} holds the input images or labels; pick another folder")
        if any(out.iterdir()):
            if not overwrite:
                raise ConfigError(f"--out {out} exists and is not empty; pass --overwrite to replace an earlier "
                                  "synthesis")
            if not (out / MANIFEST_NAME).is_file():
                raise ConfigError(f"--out {out} is not an earlier `auditor synth` output (no {MANIFEST_NAME}); "
                                  "refusing to replace it")


def _versions() -> dict[str, str]:
    from importlib import metadata

    from . import __version__

    out = {"auditor": __version__}
    for name in ("pillow", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return out



def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` at ``dest`` (same file system): the old ``dest``, if any, is moved
    aside first and deleted after, so ``dest`` is always either the old folder or the new one."""
    if dest.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / "old")
        os.replace(new, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, dest)

def synthesise(images: str | os.PathLike, labels: str | os.PathLike | None = None,
               out: str | os.PathLike | None = None, *, artifacts: Sequence[str], fraction: Any = DEFAULT_FRACTION,
               seed: int = 0, params: Mapping[str, Mapping[str, Any]] | None = None, labels_format: str = "auto",
               plugins: Sequence[str] = (), overwrite: bool = False, link_clean: bool = False,
               jpeg_quality: int = JPEG_QUALITY, log: Log = lambda m: None, progress: bool = False,
               count: int | None = None, _probe=None) -> SynthResult:
    """Write a synthesised probe set into ``out`` (see the module docstring); return where it is.

    ``labels`` may be any format :func:`auditor.data.load_probe_set` reads, or
    omitted (class folders, or a plain folder of images with no concepts).
    ``fraction`` (a number or ``{artifact: number}``) of the images without an
    artifact get one copy carrying it. ``params`` are per-artifact generator
    parameters. Written atomically: a failure leaves ``out`` as it was.

    ``count`` replaces ``fraction``: exactly ``count`` images (or all, if fewer)
    among those that carry no artifact concept at all (:func:`clean_mask`) get a
    copy — the very images and draws the impact test of ``auditor run`` uses with
    the same seed and parameters (:func:`pick_clean`).
    """
    from .data import load_probe_set

    if out is None:
        raise ConfigError("no output folder given: pass --out DIR")
    load_plugins(plugins)
    artifacts = list(artifacts)
    params = {a: dict(p) for a, p in (params or {}).items()}
    gens = _check_artifacts(artifacts, params)
    fractions = parse_fraction(fraction, artifacts)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ConfigError(f"jpeg_quality: expected 1..100, got {jpeg_quality}")
    images, out = Path(images), Path(out)
    probe = _probe if _probe is not None else load_probe_set(images, labels, labels_format=labels_format,
                                                             allow_no_concepts=True)
    if probe.source_rows is not None and (probe.source_rows >= 0).any():
        raise DataError(f"{probe.labels_file} already lists synthesised copies (a 'source' column); synthesise "
                        "from the clean originals")
    _check_out(out, images, Path(labels) if labels else None, overwrite)

    # What to make: per artifact, the rows that get a copy.
    chosen: dict[str, np.ndarray] = {}
    if count is not None and (not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1):
        raise ConfigError(f"count: expected a positive integer, got {count!r}")
    for a in artifacts:
        if count is not None:
            chosen[a] = pick_clean(probe, a, int(count), int(seed))
            if not len(chosen[a]):
                raise DataError(f"no image is free of artifact concepts; --count needs clean images to paste "
                                f"{a!r} on")
            continue
        eligible = np.ones(len(probe), dtype=bool)
        if a in probe.concepts:
            eligible &= ~probe.column_values(a)
        chosen[a] = select_rows(probe.paths, eligible, a, fractions[a], int(seed))
        if not len(chosen[a]):
            raise DataError(f"every image already carries {a!r}; there is no clean image to synthesise it on")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    try:
        _write(probe, tmp, artifacts, gens, params, chosen, int(seed), link_clean, int(jpeg_quality), progress)
        manifest = {
            "format": SYNTH_FORMAT,
            "versions": _versions(),
            "input": {"images": str(images), "labels": str(labels) if labels else None,
                      "labels_format": probe.labels_format, "n_images": len(probe),
                      "labels_sha256": probe.labels_sha256},
            "artifacts": artifacts,
            "fraction": fractions if count is None else None,
            "count": None if count is None else int(count),
            "seed": int(seed),
            "params": params,
            "jpeg_quality": int(jpeg_quality),
            "clean": "link" if link_clean else "copy",
            "counts": {"clean": len(probe)} | {a: int(len(chosen[a])) for a in artifacts},
            "layout": {"images": "images", "clean": f"images/{CLEAN_DIR}/<path>",
                       "copies": "images/<artifact>/<path>", "labels": LABELS_NAME},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {a: int(len(chosen[a])) for a in artifacts}
    log(f"synthesised {sum(counts.values())} artifact copies ({', '.join(f'{a}: {n}' for a, n in counts.items())}) "
        f"of {len(probe)} clean images into {out}")
    return SynthResult(out=out, images=out / "images", labels=out / LABELS_NAME, n_clean=len(probe), n_synth=counts)


def _write(probe, tmp: Path, artifacts, gens, params, chosen, seed: int, link_clean: bool, jpeg_quality: int,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    img_dir = tmp / "images"
    total = len(probe) + sum(len(r) for r in chosen.values())
    bar = tqdm(total=total, desc="synth", unit="img", disable=not progress, file=sys.stderr, leave=False)
    made_dirs: set[Path] = set()

    def target(sub: str, rel: str) -> Path:
        p = img_dir / sub / rel
        if p.parent not in made_dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(p.parent)
        return p

    root = probe.root
    concepts_of = concepts_by_row(probe.labels, probe.concepts)  # once, not a label lookup per row
    try:
        with open(tmp / LABELS_NAME, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["path", "concept", "source"])
            for i, rel in enumerate(probe.paths):
                src = root / rel
                dst = target(CLEAN_DIR, rel)
                if link_clean:
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                else:
                    shutil.copyfile(src, dst)
                for c in concepts_of[i] or [""]:
                    w.writerow([f"{CLEAN_DIR}/{rel}", c, ""])
                bar.update(1)
            for a in artifacts:
                gen, p = gens[a], params.get(a, {})
                for i in chosen[a]:
                    rel = probe.paths[i]
                    data = synthesise_image(root / rel, gen, image_rng(seed, a, rel), p, jpeg_quality)
                    target(a, rel).write_bytes(data)
                    concepts = [c for c in concepts_of[i] if c != a] + [a]
                    for c in concepts:
                        w.writerow([f"{a}/{rel}", c, f"{CLEAN_DIR}/{rel}"])
                    bar.update(1)
    finally:
        bar.close()


def concepts_by_row(labels, concepts: Sequence[str]) -> list[list[str]]:
    """Names of the positive concepts of every row of an (N, C) bool matrix (dense or sparse), in column order."""
    import scipy.sparse as sp

    csr = sp.csr_matrix(labels, dtype=bool)
    csr.eliminate_zeros()
    csr.sort_indices()
    cols, ptr = csr.indices.tolist(), csr.indptr.tolist()
    return [[concepts[j] for j in cols[ptr[i]:ptr[i + 1]]] for i in range(csr.shape[0])]


def _generator_fingerprint(names: Sequence[str]) -> dict[str, str]:
    from .artifacts import get_artifact

    out = {}
    for n in names:
        g = get_artifact(n)
        try:
            src = inspect.getsource(g.func)
        except (OSError, TypeError):
            src = f"{g.func.__module__}.{g.func.__qualname__}"
        out[n] = hashlib.sha256(src.encode()).hexdigest()[:16]
    return out


def synthesise_cached(images: str | os.PathLike, labels: str | os.PathLike | None, cache_dir: str | os.PathLike, *,
                      artifacts: Sequence[str], fraction: Any = DEFAULT_FRACTION, seed: int = 0,
                      params: Mapping[str, Mapping[str, Any]] | None = None, labels_format: str = "auto",
                      plugins: Sequence[str] = (), log: Log = lambda m: None,
                      progress: bool = False) -> SynthResult:
    """:func:`synthesise` into ``cache_dir/synth/<key>``, reusing an identical earlier synthesis.

    The key covers the input images (paths, sizes, mtimes), the labels file, the
    format, artifacts, fractions, seed, parameters, the generators' source code
    and the Pillow/numpy/auditor versions. This is how ``auditor run`` with a
    ``synth:`` section prepares its probe set: nothing is written next to the
    user's images.
    """
    from .data import load_probe_set, sha256_file

    load_plugins(plugins)
    artifacts = list(artifacts)
    params = {a: dict(p) for a, p in (params or {}).items()}
    _check_artifacts(artifacts, params)
    fractions = parse_fraction(fraction, artifacts)
    probe = load_probe_set(images, labels, labels_format=labels_format, allow_no_concepts=True)
    key_src = {"format": SYNTH_FORMAT, "images": probe.image_fingerprint(),
               "labels": sha256_file(Path(labels)) if labels else None, "labels_format": labels_format,
               "artifacts": artifacts, "fraction": fractions, "seed": int(seed), "params": params,
               "generators": _generator_fingerprint(artifacts), "versions": _versions()}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    out = Path(cache_dir) / "synth" / key
    if (out / MANIFEST_NAME).is_file() and (out / LABELS_NAME).is_file():
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        counts = {a: int(manifest["counts"][a]) for a in artifacts}
        log(f"synthesised probe set reused from {out}")
        return SynthResult(out=out, images=out / "images", labels=out / LABELS_NAME,
                           n_clean=int(manifest["counts"]["clean"]), n_synth=counts, reused=True)
    return synthesise(images, labels, out, artifacts=artifacts, fraction=fractions, seed=seed, params=params,
                      labels_format=labels_format, overwrite=out.exists(), log=log, progress=progress,
                      _probe=probe)
