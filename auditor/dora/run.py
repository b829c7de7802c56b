"""``run_dora``: s-AMS for every neuron of each layer -> A -> EA distances -> outliers -> DoraResult."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..results import DoraLayer, DoraNeuron, DoraResult
from . import cache as _cache
from .distance import ea_distance, representation_matrix
from .generate import SamsParams, activations_on, generate, normaliser
from .objective import layer_info
from .outliers import embed_2d, outlier_scores

THUMB_SIDE = 96  # s-AMS kept in the results are at most this many pixels per side
THUMB_COLOURS = 128  # ... as palette PNGs (about 2.5x smaller; the exact 8-bit images stay in the cache)


def n_neurons(model: nn.Module, layer: str, reduction: str, size: int, device, mean=None, std=None) -> int:
    """K: the number of neurons the reduction gives for ``layer`` (forward passes on a grey image)."""
    x = torch.full((1, 3, size, size), 0.5, device=device)
    model.to(device)
    return layer_info(model, layer, reduction, normaliser(mean, std)(x))[0]


def sams_for_layer(model: nn.Module, layer: str, reduction: str, params: SamsParams, *, mean=None, std=None,
                   device="cpu", cache_dir: str | Path | None = None, model_hash: str | None = None,
                   neurons: Sequence[int] | None = None, log: Callable[[str], None] = lambda m: None,
                   progress: bool = True) -> tuple[np.ndarray, list[int], dict]:
    """(s-AMS (K, S, 3, H, W) uint8, the neurons, cache info): from the cache when every input matches."""
    from ..collect import architecture_hash, state_hash

    dev = torch.device(device)
    K = n_neurons(model, layer, reduction, params.size, dev, mean, std)
    if neurons is None:
        neurons = list(range(K))
    neurons = [int(k) for k in neurons]
    bad = [k for k in neurons if not 0 <= k < K]
    if bad:
        from ..errors import ConfigError

        raise ConfigError(f"neuron {bad[0]} does not exist: layer {layer!r} has {K} neurons (0–{K - 1})")
    shape = (len(neurons), params.signals, 3, params.size, params.size)
    info: dict = {"status": "off"}
    folder = None
    if cache_dir is not None:
        man = _cache.manifest(model_hash=model_hash or state_hash(model), architecture=architecture_hash(model),
                              layer=layer, reduction=reduction, neurons=neurons, params=params.plain(),
                              mean=mean, std=std, device_type=dev.type, torch_version=torch.__version__.split("+")[0])
        key, folder = _cache.folder_for(cache_dir, man)
        hit = _cache.load(folder, shape)
        if hit is not None:
            log(f"s-AMS cache hit: {len(neurons)} neurons of {layer} reused from {folder}")
            return hit, neurons, {"status": "hit", "key": key, "dir": str(folder)}
        info = {"status": "miss", "key": key, "dir": str(folder)}
        log(f"s-AMS cache miss: generating {len(neurons)} neurons × {params.signals} signals of {layer} "
            f"({params.size}², {params.steps} steps) into {folder}")
    sams = generate(model, layer, reduction, neurons, params, mean=mean, std=std, device=dev, progress=progress)
    if folder is not None:
        _cache.save(folder, man, sams)
    return sams, neurons, info


def png_uri(img_u8: np.ndarray, side: int = THUMB_SIDE) -> str:
    """(3, H, W) uint8 -> a palette PNG data URI, downscaled to at most ``side`` pixels."""
    from PIL import Image

    from ..evidence import data_uri

    im = Image.fromarray(np.ascontiguousarray(img_u8.transpose(1, 2, 0)))
    if max(im.size) > side:
        im = im.resize((side, side), Image.BILINEAR)
    im = im.quantize(colors=THUMB_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return data_uri(im, fmt="PNG")


def run_dora(model: nn.Module, layers: Sequence[str], *, reduction: str | Mapping[str, str] = "mean",
             params: SamsParams = SamsParams(), distance: str = "pairwise", method: str = "lof",
             n_neighbors: int | None = None, contamination: float | None = None, mean=None, std=None,
             device: str = "auto", cache_dir: str | Path | None = None, model_hash: str | None = None,
             keep: Mapping[str, set[int]] | None = None, log: Callable[[str], None] = lambda m: None,
             progress: bool = True) -> DoraResult:
    """DORA on every neuron of ``layers``.

    ``keep`` names, per layer, neurons whose s-AMS images go into the result besides
    the outliers (the audit passes its flagged neurons).
    """
    from ..collect import resolve_device
    from ..errors import ConfigError
    from .distance import FORMS
    from .outliers import METHODS

    if distance not in FORMS:
        raise ConfigError(f"dora distance must be one of {list(FORMS)}, got {distance!r}")
    if method not in METHODS:
        raise ConfigError(f"dora outliers must be one of {list(METHODS)}, got {method!r}")
    dev = resolve_device(device)
    t_all = time.perf_counter()
    out: list[DoraLayer] = []
    for name in layers:
        t = time.perf_counter()
        red = reduction if isinstance(reduction, str) else reduction.get(name, "mean")
        sams, neurons, info = sams_for_layer(model, name, red, params, mean=mean, std=std, device=dev,
                                             cache_dir=cache_dir, model_hash=model_hash, log=log,
                                             progress=progress)
        K, S = sams.shape[:2]
        values = activations_on(model, name, red, sams.reshape(K * S, *sams.shape[2:]), mean=mean, std=std,
                                device=dev, batch_size=params.batch_size)
        A = representation_matrix(values, K, S)
        D = ea_distance(A, distance)
        found = outlier_scores(D, method, n_neighbors, contamination, seed=params.seed)
        xy = embed_2d(D, seed=params.seed)
        wanted = set((keep or {}).get(name, set())) | {int(k) for k in np.flatnonzero(found.outlier)}
        off = A.copy()
        np.fill_diagonal(off, -np.inf)
        max_other = off.max(axis=0)
        recs = []
        for i, k in enumerate(neurons):
            recs.append(DoraNeuron(index=k, score=float(found.scores[i]), rank=int(found.rank[i]),
                                   outlier=bool(found.outlier[i]), x=float(xy[i, 0]), y=float(xy[i, 1]),
                                   self_activation=float(A[i, i]),
                                   max_other=float(max_other[i]) if np.isfinite(max_other[i]) else None,
                                   sams=[png_uri(sams[i, s]) for s in range(S)] if k in wanted else []))
        order = sorted((i for i in range(K) if found.outlier[i]), key=lambda i: found.rank[i])
        out.append(DoraLayer(name=name, reduction=red, n_neurons=K, outliers=[neurons[i] for i in order],
                             neurons=recs, threshold=found.threshold, n_neighbors=found.n_neighbors,
                             inactive=[neurons[i] for i in range(K) if not np.any(A[i])],
                             cache=info, seconds=round(time.perf_counter() - t, 3)))
        log(f"DORA {name}: {len(order)} outlier neuron(s) of {K}"
            + (f" ({', '.join(str(neurons[i]) for i in order[:10])}{' …' if len(order) > 10 else ''})"
               if order else ""))
    return DoraResult(distance=distance, method=method, params=params.plain(), layers=out,
                      contamination=contamination, device=str(dev), seconds=round(time.perf_counter() - t_all, 3))
