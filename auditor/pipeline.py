"""``run_audit(config) -> AuditResult``: the one place that strings the stages together.

config ─► model + layer ─► activations ─► INVERT (both directions) ─► artifact tests ─► evidence ─► AuditResult
                probe set (images, concept labels) ─┘

Writing is separate (:func:`write_outputs`): every output is rendered into a
fresh folder inside ``--out`` and switched into place at once when all succeeded
(:mod:`auditor.outdir`).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import tempfile
import time
import warnings as _pywarnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .columns import ColumnBlocks, compact_rows
from .errors import AuditorWarning, ConfigError, DataError, ReportError, did_you_mean
from .flags import RULE_VERSION, Rule
from .results import (SCHEMA_VERSION, AuditResult, Concept, Distribution, Explanation, LayerResult,
                      NeuronResult, TopImage)

if TYPE_CHECKING:  # pydantic is not needed by `auditor explain`
    from .config import AuditConfig

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"auditor: {msg}", file=sys.stderr, flush=True)


def package_versions() -> dict[str, str]:
    out = {"auditor": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "scipy", "pandas", "jinja2", "weasyprint", "seaborn", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def resolve_preprocessing(cfg: AuditConfig, default):
    from .models import Preprocessing

    given = any(v is not None for v in (cfg.resize, cfg.crop, cfg.mean, cfg.std))
    mean = cfg.mean if cfg.mean is not None else default.mean
    std = cfg.std if cfg.std is not None else default.std
    if (cfg.mean is None) != (cfg.std is None):
        raise ConfigError("give --mean and --std together (or --no-normalize for plain [0, 1] RGB input)")
    if not cfg.normalize:
        mean = std = None
    source = "config" if given else default.source
    if not cfg.normalize:
        source += "; normalisation off"
    return Preprocessing(resize=cfg.resize if cfg.resize is not None else default.resize,
                         crop=cfg.crop if cfg.crop is not None else default.crop,
                         mean=mean, std=std, source=source,
                         interpolation=getattr(default, "interpolation", "bilinear"))


UPSCALE_SAMPLE = 2000  # images whose size is read (evenly spaced) to tell whether preprocessing enlarges them


def preprocessing_notes(cfg: AuditConfig, pre, default, probe) -> tuple[list[str], dict[str, Any]]:
    """Preprocessing decisions the user did not state, as sentences, and what was found in the images.

    Normalisation assumed (from the model's defaults) or off (a model that declares
    none, with no --mean/--std); resize and crop taken from the model's defaults;
    probe images smaller than the model input, which the transform enlarges (or a
    crop pads).
    """
    notes: list[str] = []
    normalisation_given = cfg.mean is not None or cfg.std is not None or not cfg.normalize
    if not normalisation_given:
        if pre.mean is None:
            notes.append(f"no normalisation: neither --mean/--std nor the model ({default.source}) gives one, so "
                         "images reach the model as plain [0, 1] RGB; pass --mean/--std (ImageNet: "
                         "0.485,0.456,0.406 / 0.229,0.224,0.225) if it was trained on normalised images, or "
                         "--no-normalize to confirm [0, 1]")
        else:
            notes.append(f"normalisation assumed from {default.source}: mean {list(pre.mean)}, std {list(pre.std)}; "
                         "pass --mean/--std or --no-normalize to change it")
    if cfg.resize is None and cfg.crop is None and (pre.resize or pre.crop):
        steps = " and ".join(s for s in (f"resize {pre.resize}" if pre.resize else "",
                                         f"centre crop {pre.crop}" if pre.crop else "") if s)
        notes.append(f"{steps} assumed from {default.source}; pass --resize/--crop to change them")
    found: dict[str, Any] = {}
    target = pre.resize or pre.crop
    if target and len(probe):
        n = len(probe)
        in_memory = hasattr(probe, "load")  # a Dataset's items may be costly: look at fewer
        rows = sorted({int(i) for i in np.linspace(0, n - 1, min(n, 64 if in_memory else UPSCALE_SAMPLE))})
        small, sizes = 0, []
        for i in rows:
            side = _shorter_side(probe, i)
            if side is None:  # unreadable images are reported by the collection
                continue
            sizes.append(side)
            small += side < target
        if small:
            how = f"resized up to {pre.resize} px (shorter side)" if pre.resize else \
                f"padded to the {pre.crop} px centre crop"
            where = "of the probe images" if len(rows) == n else f"of {len(rows)} probe images sampled"
            notes.append(f"{small} {where} are smaller than the model input (shortest side {min(sizes)} px) and are "
                         f"{how}; small artifacts are blurred by upscaling: probe at the model's input size, or "
                         "pass --resize/--crop to choose")
        found = {"images_checked": len(rows), "images_enlarged": int(small), "smallest_side": min(sizes) if sizes
                 else None}
    return notes, found


def _shorter_side(probe, i: int) -> int | None:
    """The shorter side in pixels of probe image ``i`` (a file's header, or an in-memory image), or None."""
    try:
        if hasattr(probe, "load"):
            x = probe.load(i)
            if hasattr(x, "size") and not callable(x.size):  # PIL
                return int(min(x.size))
            shape = tuple(x.shape)
            hw = shape[-2:] if len(shape) == 3 and shape[0] in (1, 3, 4) else shape[:2]
            return int(min(hw))
        from PIL import Image

        with Image.open(probe.full_path(i)) as im:
            return int(min(im.size))
    except Exception:
        return None


def _check_paths(cfg: AuditConfig) -> None:
    out = Path(cfg.out).resolve()
    cache = cfg.cache_path.resolve()
    if cache == out or out in cache.parents:
        raise ConfigError(f"cache_dir {cfg.cache_path} lies inside the output folder {cfg.out}; "
                          "put the cache elsewhere (the default is the user's cache folder)")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out} exists and is not a folder")


def load_probe(cfg: AuditConfig, *, log: Log = _stderr, progress: bool = True) -> tuple[Any, dict | None]:
    """The probe set of ``cfg`` (synthesising artifact copies first when ``synth`` asks), and the
    synth record for the provenance (None without synth). ``auditor watch`` loads it once."""
    from .data import load_probe_set

    images, labels, fmt = cfg.images, cfg.labels, cfg.labels_format
    synth_info = None
    if cfg.synth:
        # Artifact copies of the probe images go to the cache, never next to the user's images.
        from .synth import synthesise_cached

        synth_dir = cfg.cache_path if not cfg.no_cache else Path(tempfile.mkdtemp(prefix="auditor-synth-"))
        made = synthesise_cached(cfg.images, cfg.labels, synth_dir, artifacts=cfg.synth.artifacts,
                                 fraction=cfg.synth.fraction, seed=cfg.synth.seed, params=cfg.synth.params,
                                 labels_format=cfg.labels_format, plugins=cfg.synth.plugins, log=log,
                                 progress=progress)
        images, labels, fmt = made.images, made.labels, "long"
        synth_info = {"dir": str(made.out), "counts": made.n_synth, "reused": made.reused} \
            | cfg.synth.model_dump(mode="json")
    return load_probe_set(images, labels, labels_format=fmt, hierarchy=cfg.hierarchy), synth_info


def run_audit(cfg: AuditConfig, *, log: Log = _stderr, progress: bool = True, model: Any = None,
              probe: Any = None, synth_info: dict | None = None) -> AuditResult | None:
    """Audit the layers of one model on one probe set; return the result (writes nothing but the cache).

    ``model`` (a :class:`~auditor.models.LoadedModel`) replaces loading ``cfg.model``
    and ``cfg.weights``; ``probe`` (a :class:`~auditor.data.ProbeSet`, possibly one
    whose images live in memory) replaces loading ``cfg.images``/``cfg.labels``.
    The Python API (:mod:`auditor.api`) and ``auditor watch`` pass them.

    Returns None on the worker ranks of a distributed (torchrun) run: they only
    collect their shard of the activations; rank 0 explains and reports.
    """
    import torch

    from .collect import build_transform, collect, state_hash
    from .data import check_artifacts
    from .models import load_model, resolve_layer
    from .paired import neuron_paired

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    if not cfg.model and model is None:
        raise ConfigError("no model given: pass --model (a torchvision name, package.module:callable, "
                          "file.py:callable or a TorchScript file)")
    if not cfg.layer:
        raise ConfigError("no layer given: pass --layer NAME (list the names with `auditor layers MODEL`)")
    _check_paths(cfg)
    if cfg.impact and cfg.artifacts:  # the impact stage's own inputs, checked before any work
        from .impact import check_pairs_folder, read_class_names

        if cfg.class_names:
            read_class_names(cfg.class_names)
        if cfg.save_pairs and cfg.images:
            check_pairs_folder(Path(cfg.save_pairs), Path(cfg.images))
    warnings: list[str] = []

    t = time.perf_counter()
    if probe is None:
        probe, synth_info = load_probe(cfg, log=log, progress=progress)
    check_artifacts(probe, cfg.artifacts)
    warnings.extend(probe.warnings)
    timings["load_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded = model if model is not None else load_model(cfg.model, cfg.weights)
    if loaded.info.get("warning"):
        warnings.append(loaded.info["warning"])
    layers = cfg.layers
    for name in layers:
        resolve_layer(loaded.module, name)
    pre = resolve_preprocessing(cfg, loaded.default_preprocessing)
    pre_notes, pre_found = preprocessing_notes(cfg, pre, loaded.default_preprocessing, probe)
    for note in pre_notes:
        log(f"warning: {note}")
    warnings.extend(pre_notes)
    geometry, transform = build_transform(pre, cfg.normalize)
    if hasattr(probe, "input_transform"):  # images held in memory (auditor.audit with a Dataset)
        transform = probe.input_transform(transform)
    model_hash = state_hash(loaded.module)  # what the cache key needs: the weights actually loaded
    timings["load_model_s"] = time.perf_counter() - t

    with _pywarnings.catch_warnings():  # collect's warnings reach the log and the results: not twice
        _pywarnings.simplefilter("ignore", AuditorWarning)
        collected = collect(loaded.module, layers, probe, transform=transform, transform_desc=pre.plain(),
                            model_hash=f"{type(loaded.module).__name__}|{model_hash}",
                            reduction=cfg.reduction, batch_size=cfg.batch_size, workers=cfg.workers,
                            device=cfg.device, top_k=cfg.top_k, cache_dir=None if cfg.no_cache else cfg.cache_path,
                            on_bad_image=cfg.on_bad_image, log=log, progress=progress, precision=cfg.precision,
                            channels_last=cfg.channels_last, compile=cfg.compile, pin_memory=cfg.pin_memory,
                            prefetch_factor=cfg.prefetch_factor, decode=cfg.decode, preprocessing=pre,
                            normalize=cfg.normalize, fingerprint=cfg.fingerprint, chunk_size=cfg.chunk_size,
                            token_layout=cfg.token_layout)
    if collected is None:  # a worker rank of a distributed run: rank 0 explains and reports
        return None
    timings["activations_s"] = collected.seconds
    warnings.extend(collected.warnings)
    if collected.bad:
        warnings.append(f"{len(collected.bad)} unreadable image(s) skipped: "
                        + ", ".join(p for p, _ in collected.bad[:10]) + (" …" if len(collected.bad) > 10 else ""))
    keep_rows = collected.ok
    used = probe.subset(keep_rows) if not keep_rows.all() else probe
    Y = used.labels
    N = len(used)
    # Map probe rows (top-k indices refer to them) to rows of the used set.
    row_of = np.full(len(probe), -1, dtype=np.int64)
    row_of[np.flatnonzero(keep_rows)] = np.arange(N)

    concepts, usable, excluded_warnings = summarise_concepts(Y, probe.concepts, cfg.artifacts,
                                                             probe.display_names, probe.descriptions)
    warnings.extend(excluded_warnings)
    names = [probe.concepts[j] for j in usable]
    Yu = Y[:, usable]
    Y_art = used.dense_columns(list(cfg.artifacts)) if cfg.artifacts else np.zeros((N, 0), dtype=bool)
    for msg in small_probe_warnings(N, {a: int(Y_art[:, i].sum()) for i, a in enumerate(cfg.artifacts)},
                                    rule_of(cfg), cfg.max_fraction):
        log(f"warning: {msg}")
        warnings.append(msg)

    t = time.perf_counter()
    # The float32 activations as collected (a memmap at scale), never a float64 copy of the
    # layer: INVERT and the statistics read them in blocks of neurons.
    acts = [(name, compact_rows(collected.layers[name].values, keep_rows, None if cfg.no_cache else cfg.cache_path))
            for name in layers]
    device = collected.device if cfg.device != "cpu" else "cpu"
    ancestors = hierarchy_ancestors(cfg.hierarchy, list(cfg.artifacts)) if cfg.hierarchy else {}
    all_neurons, calibration = explain_layers(acts, Yu, names, list(cfg.artifacts), cfg, device=device,
                                              ancestors=ancestors, progress=progress)
    timings["explain_s"] = time.perf_counter() - t

    results: list[LayerResult] = []
    timings["evidence_s"] = 0.0
    for (name, A), neurons in zip(acts, all_neurons):
        layer_acts = collected.layers[name]
        t = time.perf_counter()
        effects = _paired_in_blocks(A, used.pairs, list(cfg.artifacts), used.clean_rows)
        if effects:
            neurons = [_replace(n, paired=neuron_paired(effects, n.index)) for n in neurons]
        neurons = _add_evidence(neurons, A, Yu, names, layer_acts, probe, row_of, cfg, geometry, Y_art=Y_art)
        timings["evidence_s"] += time.perf_counter() - t
        dead = sum(1 for n in neurons if n.status == "dead")
        if dead:
            warnings.append(f"layer {name}: {dead} neuron(s) have a constant activation on the probe set (dead) "
                            "and no explanation")
        results.append(LayerResult(name=name, output_shape=list(layer_acts.output_shape),
                                   reduction=getattr(layer_acts, "reduction", None) or cfg.reduction,
                                   neurons=neurons))
    dora = None
    if cfg.dora is not None:
        t = time.perf_counter()
        dora, results = _run_dora(cfg, loaded.module, results, collected, probe, row_of, geometry, pre,
                                  model_hash, log, progress)
        timings["dora_s"] = time.perf_counter() - t
    impacts = []
    if cfg.impact and cfg.artifacts:
        t = time.perf_counter()
        paired: dict[str, dict] = {}
        impacts = _impact(cfg, loaded, results, probe, keep_rows, pre, geometry, log, warnings, paired, model_hash)
        results = _with_impact_pairs(results, paired)
        timings["impact_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    provenance: dict[str, Any] = {
        "model": loaded.provenance(state_sha256=model_hash),  # the weights are hashed once
        "layers": layers,
        # how each layer was captured: output kind, where it held the batch, how often its module runs
        "capture": {name: {"kind": la.kind, "layout": la.layout, "module_calls": la.calls}
                    for name, la in collected.layers.items()},
        "preprocessing": pre.plain() | {"notes": pre_notes, **pre_found},
        # The collection already fingerprinted every image: reuse it instead of a second stat per image.
        "data": probe.provenance(collected.cache.get("images_fingerprint")) | {
                                      # the folders as the user gave them (with synth, "images" is the cache copy)
                                      "source": cfg.images, "labels_source": cfg.labels,
                                      "n_used": int(N), "n_unreadable": len(collected.bad),
                                      **({"synth": synth_info} if synth_info else {})},
        "search": search_size(len(names), cfg, [len(r.neurons) for r in results]),
        "device": collected.device,
        "precision": collected.precision,
        "batch_size_used": collected.batch_size,
        "world_size": collected.world_size,
        "torch_threads": torch.get_num_threads(),
        "cache": collected.cache,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "packages": package_versions(),
        "platform": platform.platform(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    }
    title = cfg.title or f"Audit of {loaded.spec} · {'layer' if len(layers) == 1 else 'layers'} {', '.join(layers)}"
    return AuditResult(schema_version=SCHEMA_VERSION, tool={"name": "auditor", "version": __version__},
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       title=title, config=cfg.plain(), provenance=provenance,
                       thresholds=thresholds_plain(cfg, len(names)),
                       concepts=concepts, artifacts=list(cfg.artifacts), layers=results, warnings=warnings,
                       rule_version=RULE_VERSION, calibration=calibration, dora=dora, impact=impacts,
                       signoff=cfg.signoff.model_dump(mode="json") if cfg.signoff is not None else None)


def dora_params(cfg: AuditConfig, size: int):
    from .dora import SamsParams

    d = cfg.dora
    return SamsParams(size=d.size or size, steps=d.steps, lr=d.lr, signals=d.signals, seed=d.seed,
                      batch_size=d.batch_size)


def dora_image_size(pre, probe) -> int:
    """The s-AMS side when the config gives none: the model's crop, its resize, the first probe image, 224."""
    if pre.crop:
        return int(pre.crop)
    if pre.resize:
        return int(pre.resize)
    try:
        if hasattr(probe, "load"):  # images in memory (a Dataset): PIL images, (C, H, W) tensors or (H, W, 3) arrays
            x = probe.load(0)
            size = getattr(x, "size", None)
            if isinstance(size, tuple) and len(size) == 2:
                return int(max(size))
            shape = tuple(getattr(x, "shape", ()))
            if len(shape) == 3:
                return int(max(shape[1:]) if shape[0] in (1, 3) else max(shape[:2]))
            return 224
        from PIL import Image

        with Image.open(probe.full_path(0)) as im:
            return int(max(im.size))
    except (OSError, IndexError, AttributeError, ValueError, TypeError, RuntimeError):
        return 224


def run_dora_only(cfg: AuditConfig, *, log: Log = _stderr, progress: bool = True):
    """``auditor dora``: DORA on the configured model and layers, without probe data or INVERT.

    Uses ``cfg.dora`` (its defaults when the config has no ``dora:`` section).
    Returns a :class:`~auditor.results.DoraResult` with s-AMS images for the outliers.
    """
    from .collect import state_hash
    from .config import DoraSection
    from .dora import run_dora
    from .models import load_model, resolve_layer

    if not cfg.model:
        raise ConfigError("no model given: pass --model (a torchvision name, package.module:callable, "
                          "file.py:callable or a TorchScript file)")
    if not cfg.layer:
        raise ConfigError("no layer given: pass --layer NAME (list the names with `auditor layers MODEL`)")
    loaded = load_model(cfg.model, cfg.weights)
    for name in cfg.layers:
        resolve_layer(loaded.module, name)
    pre = resolve_preprocessing(cfg, loaded.default_preprocessing)
    size = pre.crop or pre.resize
    if not size and cfg.images:
        try:
            from .data import load_probe_set

            size = dora_image_size(pre, load_probe_set(cfg.images, cfg.labels, labels_format=cfg.labels_format))
        except Exception:  # noqa: BLE001 - the probe set only suggests a size here
            size = None
    if cfg.dora is None:
        cfg = cfg.model_copy(update={"dora": DoraSection()})
    d = cfg.dora
    return run_dora(loaded.module, cfg.layers, reduction=cfg.reduction, params=dora_params(cfg, size or 224),
                    distance=d.distance, method=d.outliers, n_neighbors=d.neighbors, contamination=d.contamination,
                    mean=pre.mean if cfg.normalize else None, std=pre.std if cfg.normalize else None,
                    device=cfg.device, cache_dir=None if cfg.no_cache else cfg.cache_path,
                    model_hash=state_hash(loaded.module), log=log,
                    progress=progress)


def _run_dora(cfg: AuditConfig, model, results: list[LayerResult], collected, probe, row_of, geometry, pre,
              model_hash: str, log: Log, progress: bool):
    """DORA on the audited layers, after the explanations: s-AMS are kept for flagged and outlier
    neurons, and outlier neurons get their top probe images (the report shows them side by side)."""
    from .dora import run_dora
    from .evidence import data_uri, overlay, thumbnail, top_image_views

    d = cfg.dora
    keep = {lyr.name: {n.index for n in lyr.neurons if n.flags} for lyr in results}
    dora = run_dora(model, [lyr.name for lyr in results], reduction={lyr.name: lyr.reduction for lyr in results},
                    params=dora_params(cfg, dora_image_size(pre, probe)), distance=d.distance, method=d.outliers,
                    n_neighbors=d.neighbors, contamination=d.contamination,
                    mean=pre.mean if cfg.normalize else None, std=pre.std if cfg.normalize else None,
                    device=cfg.device, cache_dir=None if cfg.no_cache else cfg.cache_path, model_hash=model_hash,
                    keep=keep, log=log, progress=progress)
    out = []
    for lyr in results:
        dl = dora.layer(lyr.name)
        wanted = set(dl.outliers) if dl is not None else set()
        neurons = list(lyr.neurons)
        for i, n in enumerate(neurons):
            if n.index in wanted and not n.top_images:
                tops = _top_images(n.index, collected.layers[lyr.name], probe, row_of, cfg.artifacts, geometry,
                                   top_image_views, thumbnail, overlay, data_uri)
                neurons[i] = _replace(n, top_images=tops)
        out.append(_replace(lyr, neurons=neurons))
    return dora, out


def _with_impact_pairs(layers: list[LayerResult], paired: dict[str, dict]) -> list[LayerResult]:
    """Every neuron's paired change on the impact test's pairs, where --synth did not measure one."""
    from .paired import neuron_paired

    out = []
    for lyr in layers:
        eff = paired.get(lyr.name)
        if eff:
            lyr = _replace(lyr, neurons=[_replace(n, paired={**neuron_paired(eff, n.index), **n.paired})
                                         for n in lyr.neurons])
        out.append(lyr)
    return out


def _impact(cfg: AuditConfig, loaded, layers: list[LayerResult], probe, keep_rows, pre, geometry, log, warnings,
            paired=None, model_hash: str = ""):
    """The impact stage (auditor.impact): paste each artifact on clean probe images, compare the outputs."""
    from .impact import run_impact

    if cfg.synth:  # the user's own images, before synthesis: what `auditor synth --count` reads
        from .data import load_probe_set

        clean_probe = load_probe_set(cfg.images, cfg.labels, labels_format=cfg.labels_format,
                                     allow_no_concepts=True)
    else:
        clean_probe = probe.subset(keep_rows) if not keep_rows.all() else probe
    from .artifacts import ARTIFACTS

    if hasattr(clean_probe, "load") and any(a in ARTIFACTS for a in cfg.artifacts):
        # images held in memory (auditor.audit with a Dataset): no file to paste on
        warnings.append("impact test skipped: it pastes artifacts on image files, and these probe images are "
                        "held in memory (pass an image folder to measure the impact)")
        return []
    from .collect import architecture_hash

    cache_id = {"model": model_hash, "architecture": architecture_hash(loaded.module), "preprocessing": pre.plain(),
                "normalize": cfg.normalize}
    seed = cfg.impact_seed if cfg.impact_seed is not None else (cfg.synth.seed if cfg.synth else cfg.seed)
    params = cfg.impact_params if cfg.impact_params is not None else (dict(cfg.synth.params) if cfg.synth else {})
    return run_impact(loaded.module, layers, probe=clean_probe, artifacts=list(cfg.artifacts),
                      count=cfg.impact_count, seed=seed, params=params, geometry=geometry,
                      mean=pre.mean if cfg.normalize else None, std=pre.std if cfg.normalize else None,
                      device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size,
                      reduction=cfg.reduction, output=cfg.output, class_names=cfg.class_names,
                      model_spec=loaded.spec, model_kind=loaded.kind, ablation=cfg.ablation,
                      draws=cfg.ablation_draws, save_pairs=cfg.save_pairs, log=log, warnings=warnings,
                      paired=paired, cache_dir=None if cfg.no_cache else cfg.cache_path, cache_id=cache_id)


def search_size(n_concepts: int, cfg: AuditConfig, layer_sizes: list[int]) -> dict[str, Any]:
    """How much INVERT searched, for the method section (docs/invert.md, "Search").

    Per neuron: the 2C atoms at length 1, then at each further length every beam
    formula combined with every pool atom by AND and by OR. Trivial and inadmissible
    combinations are dropped, so this is an upper bound on the formulas scored.
    """
    atoms = 2 * n_concepts
    pool = min(cfg.limit_search, atoms) if cfg.limit_search else atoms
    per_neuron = atoms + max(cfg.length - 1, 0) * cfg.beam * pool * 2
    return {"concepts": n_concepts, "atoms": atoms, "pool": pool, "length": cfg.length, "beam": cfg.beam,
            "formulas_per_neuron": per_neuron, "neurons": int(sum(layer_sizes)),
            "formulas_total": per_neuron * int(sum(layer_sizes)),
            "in_sample": cfg.heldout is None, "heldout": cfg.heldout}


def _add_evidence(neurons: list[NeuronResult], A, Yu, names, layer_acts, probe, row_of, cfg, geometry,
                  Y_art=None):
    """Histograms, bootstrap CIs and top images for flagged, near-miss and the strongest neurons.

    Flagged neurons also get a bootstrap interval of each flagged artifact's AUROC
    (every neuron already has the analytic DeLong one)."""
    from . import invert
    from .evidence import bootstrap_auroc_ci, data_uri, histogram, overlay, thumbnail, top_image_views

    neurons = list(neurons)
    detail = [i for i, n in enumerate(neurons) if n.flags or n.sensitive
              or any(t.status == "near_miss" for t in n.artifact_tests)]
    # The strongest unflagged neurons get evidence too, so the report can show what normal looks like.
    ranked = sorted((i for i, n in enumerate(neurons) if n.explanations and i not in detail),
                    key=lambda i: -neurons[i].explanations[0].auroc)
    chosen = sorted(set(detail) | set(ranked[:5]), key=lambda i: neurons[i].index)
    columns = ColumnBlocks(A, [neurons[i].index for i in chosen])
    for i in chosen:
        n = neurons[i]
        a = columns.column(n.index)
        dist = None
        exps = list(n.explanations)
        if exps:
            y = invert.evaluate(exps[0].ast, Yu, names)
            edges, inside, outside = histogram(a, y)
            dist = Distribution(formula=exps[0].formula, edges=edges, inside=inside, outside=outside)
            if n.flags and cfg.bootstrap:
                ci = bootstrap_auroc_ci(a, y, n_resamples=cfg.bootstrap, seed=cfg.seed)
                exps[0] = _replace(exps[0], auroc_ci=ci)
        boot = {}
        if n.flags and cfg.bootstrap and Y_art is not None:
            for f in n.flags:
                if f.artifact in cfg.artifacts:
                    ci = bootstrap_auroc_ci(a, Y_art[:, list(cfg.artifacts).index(f.artifact)],
                                            n_resamples=cfg.bootstrap, seed=cfg.seed)
                    if ci is not None:
                        boot[f.artifact] = (float(ci[0]), float(ci[1]))
        tops = _top_images(n.index, layer_acts, probe, row_of, cfg.artifacts, geometry,
                           top_image_views, thumbnail, overlay, data_uri)
        neurons[i] = _replace(n, explanations=exps, distribution=dist, top_images=tops,
                              artifact_auroc_ci_bootstrap=boot)
    return neurons


def _paired_in_blocks(A, pairs, artifacts, clean_rows):
    """:func:`paired_effects_by_artifact` over blocks of neurons (each neuron's statistics
    depend on its own column only), so A is never copied whole."""
    from .paired import paired_effects_by_artifact

    if not any(len(pairs.get(a, ())) for a in artifacts):
        return {}
    parts = [paired_effects_by_artifact(block.T, pairs, artifacts, clean_rows)
             for _, block in ColumnBlocks(A).blocks()]
    return {art: {key: np.concatenate([p[art][key] for p in parts]) for key in parts[0][art]}
            for art in parts[0]}


def selection_factor(cfg, n_concepts: int) -> int:
    """What a region test's p-value is multiplied by: the formulas the search scored per neuron
    (both directions) when the region is tested on the rows that chose it; 1 with a held-out split."""
    from .flags import search_size

    return 1 if cfg.heldout is not None else search_size(n_concepts, cfg.length, cfg.beam, cfg.limit_search)


def thresholds_plain(cfg, n_concepts: int) -> dict[str, Any]:
    """The rule's thresholds as results.json records them."""
    return rule_of(cfg).plain() | {"region_selection_factor": selection_factor(cfg, n_concepts)}


def rule_of(cfg) -> Rule:
    """The flag rule's thresholds from a config (``run`` and ``explain`` alike)."""
    return Rule(alpha=cfg.flag_max_p, min_effect=cfg.flag_min_effect, strong_effect=cfg.flag_strong_effect,
                min_artifact_rows=cfg.flag_min_artifact_rows, strata=cfg.flag_strata,
                calibration_runs=cfg.calibration_runs, seed=cfg.seed)


def hierarchy_ancestors(path, artifacts: list[str]) -> dict[str, list[str]]:
    """Per artifact: its ancestors in the hierarchy file (containers of the artifact)."""
    from .formats import read_hierarchy

    h = read_hierarchy(path)
    out: dict[str, list[str]] = {}
    for art in artifacts:
        seen: list[str] = []
        stack = list(h.parents.get(art, ()))
        while stack:
            q = stack.pop()
            if q not in seen:
                seen.append(q)
                stack.extend(h.parents.get(q, ()))
        out[art] = seen
    return out


def explain_layers(acts: list[tuple[str, np.ndarray]], Yu, names: list[str], artifacts: list[str], cfg, *,
                   device: str = "cpu", ancestors: dict[str, list[str]] | None = None,
                   progress: bool = False, subset: list[int] | None = None
                   ) -> tuple[list[list[NeuronResult]], dict | None]:
    """INVERT in both directions for every layer, then the flag rule over the whole audit.

    The one code path of ``run`` and ``explain``: ``cfg`` is an :class:`AuditConfig`
    (search and flag settings). Returns the neurons of every layer (with
    ``artifact_tests`` and ``flags``) and the calibration record. ``subset``: explain only
    these columns (default all). Each ``A`` may be a float32 memmap: it is read in blocks.
    """
    from . import invert
    from .flags import Labels, flag_of, run_tests

    search_rows = test_rows = None
    if cfg.heldout is not None:
        search_rows, test_rows = invert.heldout_split(Yu.shape[0], cfg.heldout, cfg.seed)
    layer_neurons: list[list[NeuronResult]] = []
    plan_input = []
    for _name, A in acts:
        common = dict(length=cfg.length, beam=cfg.beam, min_fraction=cfg.min_fraction,
                      max_fraction=cfg.max_fraction, limit_search=cfg.limit_search, heldout=cfg.heldout,
                      seed=cfg.seed, device=device)
        # both directions from one pass: each chunk of neurons is read and ranked once
        pos, neg = invert.explain_modes(A, Yu, names, [invert.InvertParams(**common),
                                                       invert.InvertParams(mode="negative", **common)],
                                        neurons=subset, progress=progress)
        neurons = neuron_results(A, pos, Yu, names, artifacts, negative=neg)
        layer_neurons.append(neurons)
        plan_input.append((A, [(n.index, n.status, [(e.formula, e.ast) for e in (n.explanations[:1]
                                                                                  + n.negative_explanations[:1])])
                               for n in neurons]))
    if not artifacts:
        return layer_neurons, None
    labels = Labels(Yu, names)
    decided = run_tests(plan_input, labels, artifacts, rule_of(cfg), ancestors=ancestors,
                        search_rows=search_rows, test_rows=test_rows, selection=selection_factor(cfg, len(names)))
    out = []
    for li, neurons in enumerate(layer_neurons):
        done = []
        for pos, n in enumerate(neurons):
            tests = decided.tests.get((li, pos), [])
            flags = []
            for t in tests:
                if t.status != "flagged":
                    continue
                exps = n.explanations[:1] + n.negative_explanations[:1]
                f = next((e for e in exps if e.formula in t.named_by), n.best)
                flags.append(flag_of(t, f.formula if f else None, f.auroc if f else None,
                                     n.artifact_auroc.get(t.artifact)))
            done.append(_replace(n, artifact_tests=tests, flags=flags))
        out.append(done)
    return out, decided.calibration


def best_possible_p(n_pos: int, n: int) -> float:
    """The smallest two-sided Mann-Whitney p-value any neuron can reach for a split of ``n``
    images into ``n_pos`` and ``n - n_pos``: the one of a perfect separation."""
    from . import invert

    if not 0 < n_pos < n:
        return 1.0
    y = np.zeros(n, dtype=bool)
    y[n - n_pos:] = True  # the n_pos highest activations, no ties
    return invert.mannwhitney(np.arange(n, dtype=np.float64), y, "two-sided")[0]


def small_probe_warnings(n: int, artifact_counts: dict[str, int], rule: Rule,
                         max_fraction: float = 0.5) -> list[str]:
    """Say so when the probe set is too small for any finding to be evidence.

    A neuron is flagged only at p <= ``flag_max_p``; with few images even a perfect
    separation cannot get there (2 images: p = 1). Findings then come from chance
    alone, so the run says so instead of reporting them silently.
    """
    out: list[str] = []
    alpha = rule.alpha
    best_any = best_possible_p(max(1, min(n // 2, int(max_fraction * n) or 1)), n)
    if best_any > alpha or n < rule.min_artifact_rows:
        out.append(f"probe set too small for any finding: with {n} usable image(s) the smallest p-value any "
                   f"formula can reach is {best_any:.3g} (flag_max_p {alpha:g}) and a flag needs "
                   f"{rule.min_artifact_rows} artifact images (flag_min_artifact_rows); no flag can be raised, and "
                   "any near miss is chance — use a larger probe set (hundreds of images)")
        return out
    for art, k in artifact_counts.items():
        p = best_possible_p(k, n)
        if p > alpha:
            out.append(f"artifact {art!r} is on {k} of {n} image(s): even a neuron that separates them perfectly "
                       f"gets p = {p:.3g} > flag_max_p {alpha:g}, so no neuron can be flagged for it — label "
                       "more images with and without it")
    return out




def summarise_concepts(Y, concept_names: list[str], artifacts, display_names=None, descriptions=None):
    """Concept records, the usable column indices, and warnings for excluded ones.

    A concept with no positive or no negative image cannot be scored: it is
    excluded and listed (an artifact in that state is the user's error).
    """
    import scipy.sparse as sp

    N = Y.shape[0]
    n_pos = np.asarray(Y.sum(axis=0)).ravel() if sp.issparse(Y) else Y.sum(axis=0)
    concepts: list[Concept] = []
    usable: list[int] = []
    warnings: list[str] = []
    for j, name in enumerate(concept_names):
        reason = None
        if n_pos[j] == 0:
            reason = "no positive image"
        elif n_pos[j] == N:
            reason = "positive on every image"
        if reason and name in artifacts:
            raise DataError(f"artifact {name!r} has {reason} among the readable images; an artifact needs "
                            "images with and without it")
        if reason:
            warnings.append(f"concept {name!r} excluded: {reason}")
        else:
            usable.append(j)
        concepts.append(Concept(name=name, n_positive=int(n_pos[j]), fraction=float(n_pos[j] / max(N, 1)),
                                is_artifact=name in artifacts, status="excluded" if reason else "ok",
                                reason=reason, display_name=(display_names or {}).get(name),
                                description=(descriptions or {}).get(name)))
    if not usable:
        raise DataError("no concept has both positive and negative images")
    return concepts, usable, warnings


def neuron_results(A, explained, Yu, names: list[str], artifacts: list[str], negative=None) -> list[NeuronResult]:
    """INVERT output (positive and, when given, negative search) + artifact AUROCs -> one NeuronResult
    per neuron (no flags yet: :func:`explain_layers` decides them over the whole audit)."""
    from . import invert

    from .delong import delong_ci

    Y_art = np.column_stack([invert.evaluate(c, Yu, names) for c in artifacts]) if artifacts \
        else np.zeros((A.shape[0], 0), dtype=bool)
    neg_of = {ne.index: ne for ne in (negative or [])}
    neurons: list[NeuronResult] = []
    # float64 columns read a block of neurons at a time (A may be a float32 memmap of 10⁶ rows)
    columns = ColumnBlocks(A, [ne.index for ne in explained])
    art_auroc: dict[int, np.ndarray] = {}
    # Analytic (DeLong) 95% interval of each artifact's AUROC alone, per block of neurons
    art_ci: dict[str, tuple[dict[int, float], dict[int, float]]] = {art: ({}, {}) for art in artifacts}
    if artifacts:
        for cols, block in columns.blocks():
            ks = cols.tolist()
            art_auroc.update(zip(ks, invert.auroc(block.T, Y_art)))
            for i, art in enumerate(artifacts):
                lo, hi = delong_ci(block.T, Y_art[:, i])[1:]
                art_ci[art][0].update(zip(ks, np.atleast_1d(lo)))
                art_ci[art][1].update(zip(ks, np.atleast_1d(hi)))
    for ne in explained:
        k = ne.index
        a = columns.column(k)
        exps = [_explanation(f) for f in ne.formulas]
        beams = [[_explanation(f) for f in beam] for beam in ne.beams] if ne.beams else None
        neg = neg_of.get(k)
        negs = [_explanation(f) for f in neg.formulas] if neg is not None else []
        aa = {art: float(art_auroc[k][i]) for i, art in enumerate(artifacts)}
        aa_ci = {art: (float(lo[k]), float(hi[k])) for art, (lo, hi) in art_ci.items()
                 if np.isfinite(lo[k]) and np.isfinite(hi[k])}
        stats = {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
                 "frac_zero": float((a == 0).mean())}
        neurons.append(NeuronResult(index=k, status=ne.status, explanations=exps, artifact_auroc=aa,
                                    stats=stats, beams=beams, negative_explanations=negs, artifact_auroc_ci=aa_ci))
    return neurons


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _explanation(f) -> Explanation:
    return Explanation(formula=f.text, ast=f.ast, length=f.length, auroc=float(f.auroc), fraction=float(f.fraction),
                       support=int(f.support), p_value=float(f.p_value), log10_p=float(f.log10_p),
                       p_adjusted=None if f.p_adjusted is None else float(f.p_adjusted),
                       heldout_auroc=None if f.heldout_auroc is None else float(f.heldout_auroc),
                       heldout_p_value=None if f.heldout_p_value is None else float(f.heldout_p_value),
                       heldout_log10_p=None if f.heldout_log10_p is None else float(f.heldout_log10_p))


def _top_images(k, layer_acts, probe, row_of, artifacts, geometry, views_fn, thumb_fn, overlay_fn, uri_fn):
    if layer_acts.top_index is None:
        return []
    rows = [int(r) for r in layer_acts.top_index[:, k] if row_of[int(r)] >= 0]
    vals = {int(r): float(v) for r, v in zip(layer_acts.top_index[:, k], layer_acts.top_values[:, k])}
    maps = None
    if layer_acts.top_maps is not None:
        maps = {int(r): layer_acts.top_maps[j, k].astype(np.float32)
                for j, r in enumerate(layer_acts.top_index[:, k])}
    vmax = max((float(m.max()) for m in maps.values()), default=0.0) if maps else 0.0
    if hasattr(probe, "views"):  # images in memory (a torch Dataset given to auditor.audit)
        views = probe.views(rows, geometry)
    else:
        views = views_fn([probe.full_path(r) for r in rows], geometry)
    out = []
    for r, view in zip(rows, views):
        present = probe.row_concepts(r)
        thumb = thumb_fn(view) if view is not None else None
        heat = overlay_fn(thumb, maps[r], vmax) if (thumb is not None and maps is not None) else None
        out.append(TopImage(index=r, path=probe.paths[r], activation=vals[r],
                            thumbnail=uri_fn(thumb) if thumb is not None else None,
                            heatmap=uri_fn(heat) if heat is not None else None,
                            concepts=present, artifacts=[c for c in present if c in artifacts]))
    return out


# -- writing ------------------------------------------------------------------------------

def write_outputs(result: AuditResult, out: str | os.PathLike,
                  formats: tuple[str, ...] = ("html", "pdf", "json", "csv", "junit"),
                  log: Log = _stderr) -> dict[str, Path]:
    """Render every format into a fresh run folder inside ``out``, then switch ``out`` to it at once.

    ``out`` then holds exactly this run's outputs (an earlier run's other formats are
    gone); if anything fails, ``out`` is left exactly as it was. See :mod:`auditor.outdir`
    for the steps and what a kill between them leaves.
    """
    from .outdir import publish
    from .report import FORMATS, render

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ReportError(f"unknown report format {unknown[0]!r}{did_you_mean(unknown[0], FORMATS)}; "
                          f"expected some of: {', '.join(FORMATS)}")
    return publish(out, lambda folder: render(result, folder, formats=formats), log=log)
