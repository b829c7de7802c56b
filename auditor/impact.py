"""Shortcut impact: does an artifact change what the model decides, and do the flagged neurons carry it?

For every audited artifact that has a generator (:mod:`auditor.artifacts`: the
built-ins and plugins), the artifact is pasted on ``M`` clean probe images —
images that carry no artifact concept, chosen and drawn exactly as
``auditor synth --count M --seed S`` does (:func:`auditor.synth.pick_clean`,
:func:`auditor.synth.synthesise_image`: same rows, same random draws, same encoded
bytes) — and the whole model runs on the clean and the pasted copy of each image.

Reported per artifact (:class:`auditor.results.ArtifactImpact`):

* class outputs: the **flip rate** (share of the ``M`` images whose top-1 class
  changes; the gated number) with a Wilson 95% interval, the flows between
  classes ("31% of non-star images become star"), and per class the mean change
  of its softmax probability with a t interval and a Wilcoxon signed-rank p;
* other outputs (embeddings, tuple/dict heads): the cosine distance between the
  clean and the pasted output, per head;
* an **occlusion control**: the same images with a neutral patch of the
  artifact's shape and area (the pixels the artifact changed, filled with the
  image's own blurred pixels), so that "any paste flips some predictions" is
  measured;
* **attribution**: when neurons of the audited layers are flagged for the
  artifact, both runs again with those neurons ablated (their mean over the
  clean test images, or zero): share carried = 1 − flip(ablated clean vs ablated
  pasted) / flip(clean vs pasted), beside the same ablation of as many randomly
  drawn unflagged, live neurons (``ablation_draws`` draws), and the clean
  accuracy the ablation costs where the probe labels name a class.

The pure functions at the top take numpy arrays; :func:`run_impact` does the
forward passes (batch size, device and precision of the audit).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from .errors import ConfigError, DataError

Log = Callable[[str], None]

#: A pixel belongs to the artifact's footprint when the paste moved one of its channels
#: by more than this many levels (of 255): the control patch covers those pixels.
MASK_THRESHOLD = 8
LEVEL = 0.95
TOP_FLOWS = 5
MAX_CLASS_ROWS = 12
MAX_EXAMPLE_NEURONS = 12
EXAMPLES_PER_NEURON = 3
EXAMPLE_SIDE = 64
#: Keep the ablated layer's full outputs (clean + pasted) up to this size, so the ablation
#: passes compute only the layers after it (:meth:`_Forward.downstream`).
STORE_MAX_BYTES = 2 << 30


# ============================================================================ pure functions

def flips(clean_top1: np.ndarray, pasted_top1: np.ndarray) -> np.ndarray:
    """Bool per image: the top-1 class differs between the two runs."""
    a, b = np.asarray(clean_top1), np.asarray(pasted_top1)
    if a.shape != b.shape:
        raise ValueError(f"predictions differ in shape: {a.shape} vs {b.shape}")
    return a != b


def proportion_ci(k: int, n: int, level: float = LEVEL) -> list[float] | None:
    """Wilson score interval of k successes in n trials (scipy's ``binomtest``)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def mean_ci(x: np.ndarray, level: float = LEVEL, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high): Student-t interval of the mean along ``axis`` (zero width for n < 2)."""
    from scipy.stats import t as student_t

    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis]
    m = x.mean(axis=axis)
    if n < 2:
        return m, m.copy(), m.copy()
    se = x.std(axis=axis, ddof=1) / np.sqrt(n)
    h = student_t.ppf(0.5 + level / 2, n - 1) * se
    return m, m - h, m + h


def class_flows(clean_top1: np.ndarray, pasted_top1: np.ndarray, names: Sequence[str],
                top: int = TOP_FLOWS) -> list[dict[str, Any]]:
    """The largest class-to-class flows: ``{"from", "to", "n", "share"}`` with share = n / images of ``from``."""
    a, b = np.asarray(clean_top1, dtype=np.int64), np.asarray(pasted_top1, dtype=np.int64)
    moved = a != b
    if not moved.any():
        return []
    pairs, counts = np.unique(np.stack([a[moved], b[moved]], axis=1), axis=0, return_counts=True)
    per_from = np.bincount(a, minlength=len(names))
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], pairs[i][0], pairs[i][1]))[:top]
    return [{"from": _name(names, pairs[i][0]), "to": _name(names, pairs[i][1]), "n": int(counts[i]),
             "share": float(counts[i] / per_from[pairs[i][0]])} for i in order]


def towards(clean_top1: np.ndarray, pasted_top1: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class c (those that gain or lose any image): ``n_other`` (clean top-1 is not c),
    ``n_to`` (of those, pasted top-1 is c), ``share_to`` = n_to / n_other, ``n_own``, ``n_away``,
    ``share_away``. Sorted by ``share_to``, largest first."""
    a, b = np.asarray(clean_top1, dtype=np.int64), np.asarray(pasted_top1, dtype=np.int64)
    out = []
    for c in sorted(set(a.tolist()) | set(b.tolist())):
        other, own = a != c, a == c
        n_other, n_own = int(other.sum()), int(own.sum())
        n_to, n_away = int((other & (b == c)).sum()), int((own & (b != c)).sum())
        if not n_to and not n_away:
            continue
        out.append({"class": _name(names, c), "n_other": n_other, "n_to": n_to,
                    "share_to": n_to / n_other if n_other else 0.0, "n_own": n_own, "n_away": n_away,
                    "share_away": n_away / n_own if n_own else 0.0})
    out.sort(key=lambda r: (-r["share_to"], -r["n_to"], r["class"]))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(scores: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows that already are probabilities (non-negative, summing to 1) stay; logits get a softmax."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) and (s >= 0).all() and np.allclose(s.sum(axis=1), 1.0, atol=1e-3):
        return s, "probability (as output)"
    return softmax(s), "softmax probability"


def score_changes(p_clean: np.ndarray, p_pasted: np.ndarray, names: Sequence[str],
                  top: int = MAX_CLASS_ROWS) -> list[dict[str, Any]]:
    """Per class: mean paired change of its score, t interval, Wilcoxon signed-rank p (two-sided).

    The ``top`` classes with the largest absolute mean change, largest first.
    """
    from .paired import wilcoxon_pvalues

    D = np.asarray(p_pasted, dtype=np.float64) - np.asarray(p_clean, dtype=np.float64)
    m, lo, hi = mean_ci(D)
    order = np.argsort(-np.abs(m), kind="stable")[:top]
    p = wilcoxon_pvalues(D[:, order])
    return [{"class": _name(names, int(c)), "mean": float(m[c]), "ci": [float(lo[c]), float(hi[c])],
             "p_wilcoxon": float(p[j]), "clean_mean": float(np.mean(p_clean[:, c]))}
            for j, c in enumerate(order)]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 − cos(a_i, b_i) per row of (N, D) arrays; 0 where both rows are zero, 1 where one is."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dot / (na * nb), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return 1.0 - np.clip(cos, -1.0, 1.0)


def output_changes(clean: Mapping[str, np.ndarray], pasted: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per output head: mean cosine distance (t interval) and median between clean and pasted outputs."""
    out = {}
    for head, a in clean.items():
        d = cosine_distance(a.reshape(len(a), -1), pasted[head].reshape(len(a), -1))
        m, lo, hi = mean_ci(d)
        out[head] = {"mean_cosine_distance": float(m), "ci": [float(lo), float(hi)], "median": float(np.median(d)),
                     "dim": int(np.prod(a.shape[1:]))}
    return out


def share_carried(base_flip: float, ablated_flip: float) -> float | None:
    """1 − ablated / base: the share of the flips that the ablated neurons carry (None without flips)."""
    if not base_flip:
        return None
    return float(1.0 - ablated_flip / base_flip)


def footprint(clean: Image.Image, pasted: Image.Image, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Bool (H, W): the pixels the artifact changed by more than ``threshold`` levels in some channel."""
    a = np.asarray(clean.convert("RGB"), dtype=np.int16)
    b = np.asarray(pasted.convert("RGB"), dtype=np.int16)
    return (np.abs(a - b) > threshold).any(axis=2)


def occlusion_control(clean: Image.Image, pasted: Image.Image, threshold: int = MASK_THRESHOLD) -> Image.Image:
    """The clean image with the artifact's footprint filled with its own blurred pixels.

    A neutral patch of the artifact's shape and area: the pixels the artifact
    changed (:func:`footprint`) take the value of a Gaussian blur of the clean
    image (radius 4% of the shorter side, at least 2 px), everything else stays.
    """
    rgb = clean.convert("RGB")
    mask = footprint(rgb, pasted, threshold)
    radius = max(2.0, 0.04 * min(rgb.size))
    blurred = np.asarray(rgb.filter(ImageFilter.GaussianBlur(radius)), dtype=np.uint8)
    out = np.asarray(rgb, dtype=np.uint8).copy()
    out[mask] = blurred[mask]
    return Image.fromarray(out, "RGB")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name per line (blank lines skipped), or a JSON list / {index: name} mapping."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"class_names: cannot read {p} ({exc})") from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"class_names: {p} is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            try:
                data = [data[k] for k in sorted(data, key=lambda k: int(k))]
            except ValueError:
                raise ConfigError(f"class_names: {p} maps non-integer keys; expected {{\"0\": name, ...}}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ConfigError(f"class_names: {p} must hold a list of strings")
        return data
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"class_names: {p} lists no class")
    return names


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def summary_sentence(artifact: str, kind: str, flip: float | None, control: float | None,
                     toward: list[dict[str, Any]], ablation: dict | None, change: dict | None = None,
                     control_change: dict | None = None) -> str:
    """One sentence for page 1."""
    if kind == "embedding":
        head, c = next(iter((change or {}).items()), (None, None))
        cc = (control_change or {}).get(head) if head else None
        if c is None:
            return f"{artifact}: no output to compare."
        return (f"{artifact} moves the output by a mean cosine distance of {c['mean_cosine_distance']:.3f}"
                + (f" (occlusion control {cc['mean_cosine_distance']:.3f})" if cc else "") + ".")
    s = f"{artifact} flips {_pct(flip)} of predictions (occlusion control {_pct(control)})"
    if toward and toward[0]["n_to"]:
        t = toward[0]
        s += f"; {_pct(t['share_to'])} of non-{t['class']} images become {t['class']}"
    if ablation and ablation.get("share_carried") is not None:
        n = len(ablation.get("neurons", []))
        s += (f"; ablating the {n} flagged neuron{'s' if n != 1 else ''} removes "
              f"{_pct(ablation['share_carried'])} of the flips")
        r = ablation.get("random") or {}
        if r.get("share_mean") is not None:
            s += f" ({n} random unflagged neurons: {_pct(r['share_mean'])} on average)"
    return s + "."


# ============================================================================ model outputs

def heads_of(output: Any) -> dict[str, Any]:
    """Model output → {head name: tensor}: a tensor is ``output``; tuples/lists by position; dicts,
    namedtuples and Hugging Face ``ModelOutput`` by key (non-tensor entries dropped)."""
    import torch

    if isinstance(output, torch.Tensor):
        return {"output": output}
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items() if isinstance(v, torch.Tensor)}
    if hasattr(output, "_fields"):
        return {f: getattr(output, f) for f in output._fields if isinstance(getattr(output, f), torch.Tensor)}
    if isinstance(output, (tuple, list)):
        return {str(i): v for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
    raise ConfigError(f"the model returned a {type(output).__name__}; expected a tensor, a tuple or a dict of "
                      "tensors (set output: embedding or turn the impact test off with --no-impact)")


def class_head(shapes: Mapping[str, tuple[int, ...]], requested: str) -> str | None:
    """The head holding class scores, or None (embedding). ``auto``: the only head, or a ``logits`` head,
    when it is (N, C) with C ≥ 2."""
    if requested == "embedding" or not shapes:
        return None
    pick = "logits" if "logits" in shapes else next(iter(shapes)) if len(shapes) == 1 else None
    if requested == "classes":
        pick = pick or next(iter(shapes))
        if len(shapes[pick]) != 2 or shapes[pick][1] < 2:
            raise ConfigError(f"output: classes, but the model's output {pick!r} has per-image shape "
                              f"{list(shapes[pick][1:])}; expected one score per class (N, C ≥ 2)")
        return pick
    if pick is not None and len(shapes[pick]) == 2 and shapes[pick][1] >= 2:
        return pick
    return None


# ============================================================================ the runner

class _Ablate:
    """Forward hooks on the audited layers: replace some neurons (mean map or zero), capture values."""

    def __init__(self, model, layers: Sequence[str], reduction: str):
        from .models import resolve_layer

        self.modules = {name: resolve_layer(model, name) for name in layers}
        self.reduction = reduction
        self.ablate: dict[str, np.ndarray] = {}  # layer -> neuron indices
        self.mode = "mean"
        self.capture_values = False
        self.accumulate = False
        self.sums: dict[str, Any] = {}  # layer -> (sum, count) while accumulating the mean
        self.values: dict[str, list[np.ndarray]] = {}
        self.means: dict[str, Any] = {}
        self.store: set[str] = set()  # layers whose full output each batch keeps (downstream-only passes)
        self.stored: dict[str, list[Any]] = {}
        self.replace: dict[str, Any] = {}  # layer -> the output to use instead of the computed one

    @staticmethod
    def axis(ndim: int) -> int:
        return -1 if ndim == 3 else 1

    def hook(self, name):
        import torch

        def fn(_m, _i, out):
            rest = None
            if isinstance(out, (tuple, list)):
                out, rest = out[0], tuple(out[1:])
            if not isinstance(out, torch.Tensor):
                return None
            changed = False
            if name in self.replace:
                out, changed = self.replace[name], True
            if name in self.store:
                self.stored.setdefault(name, []).append(out.detach().to("cpu", copy=True))
            if self.accumulate:
                # Mean over images: per position for (B, C, H, W) and (B, D); for token outputs
                # (B, T, D) or (T, B, D) one value per neuron, whatever the layout.
                x = out.detach().float()
                s, n = (x.reshape(-1, x.shape[-1]).sum(0), x.shape[0] * x.shape[1]) if x.dim() == 3 \
                    else (x.sum(0), x.shape[0])
                s0, n0 = self.sums.get(name, (0.0, 0))
                self.sums[name] = (s + s0, n + n0)
            idx = self.ablate.get(name)
            if idx is not None and len(idx):
                out = out.clone()
                ax = self.axis(out.dim())
                sel = torch.as_tensor(idx, device=out.device, dtype=torch.long)
                if self.mode == "zero":
                    out.index_fill_(ax if ax >= 0 else out.dim() - 1, sel, 0.0)
                else:
                    full = self.means[name].to(out.device, out.dtype).expand_as(out)
                    ax_ = ax if ax >= 0 else out.dim() - 1
                    out.index_copy_(ax_, sel, full.index_select(ax_, sel))
                changed = True
            if self.capture_values:
                from .collect import reduce_output

                vals, _ = reduce_output(out.detach(), name, self.reduction)
                self.values.setdefault(name, []).append(vals.float().cpu().numpy())
            if changed:
                return (out, *rest) if rest is not None else out
            return None
        return fn

    @contextlib.contextmanager
    def attached(self):
        handles = [m.register_forward_hook(self.hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def finish_means(self) -> None:
        self.means = {name: s / max(n, 1) for name, (s, n) in self.sums.items()}
        self.accumulate = False


class _Forward:
    """Whole-model forward passes over uint8 (H, W, 3) images, batched, on the audit's device/precision."""

    def __init__(self, model, dev, precision: str, batch_size: int, mean, std):
        self.model, self.dev, self.precision, self.batch_size = model, dev, precision, int(batch_size)
        self.mean, self.std = mean, std
        self.shapes: dict[str, tuple[int, ...]] = {}

    def _ctx(self):
        """The collection's numerics: TF32 on or off (CUDA) and bf16/fp16 autocast, as ``precision`` says."""
        from .collect.device import autocast, numerics

        stack = contextlib.ExitStack()
        stack.enter_context(numerics(self.precision, self.dev))
        stack.enter_context(autocast(self.precision, self.dev))
        return stack

    def _tensor(self, arrs: Sequence[np.ndarray]):
        import torch
        from torchvision.transforms import functional as F

        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().float().div(255)
        if self.mean is not None and self.std is not None:
            x = F.normalize(x, list(self.mean), list(self.std))
        return x.to(self.dev)

    def _run(self, x) -> dict[str, Any]:
        try:
            return heads_of(self.model(x))
        except RuntimeError as exc:
            raise DataError(f"the model failed on the impact test's images: {str(exc).splitlines()[0]}") from None

    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        parts: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode(), self._ctx():
            for start in range(0, len(images), self.batch_size):
                for k, v in self._run(self._tensor(images[start:start + self.batch_size])).items():
                    parts.setdefault(k, []).append(v.detach().float().cpu().numpy())
        res = {k: np.concatenate(v) for k, v in parts.items()}
        self.shapes = {k: v.shape for k, v in res.items()}
        return res

    def downstream(self, images: Sequence[np.ndarray], stored: list[Any], hooks: _Ablate, layer: str):
        """The outputs when ``layer`` returns the ``stored`` batches (ablated by ``hooks``), computing the
        layers before it on one image per batch only. Valid when nothing after ``layer`` reads an
        earlier tensor: :func:`_downstream_ok` checks that on the unablated outputs first."""
        import torch

        parts: dict[str, list[np.ndarray]] = {}
        try:
            with torch.inference_mode(), self._ctx():
                for b, start in enumerate(range(0, len(images), self.batch_size)):
                    hooks.replace = {layer: stored[b].to(self.dev)}
                    for k, v in self._run(self._tensor(images[start:start + 1])).items():
                        parts.setdefault(k, []).append(v.detach().float().cpu().numpy())
        finally:
            hooks.replace = {}
        return {k: np.concatenate(v) for k, v in parts.items()}


def _prepare(probe, rows: np.ndarray, gen, params: Mapping[str, Any], seed: int, artifact: str, geometry):
    """(clean views, pasted views, control views, pasted bytes) for ``rows``: the bytes `auditor synth` writes."""
    import io

    from .synth import image_rng, synthesise_image

    clean, pasted, control, raw = [], [], [], []
    for i in rows:
        path = probe.full_path(int(i))
        data = synthesise_image(path, gen, image_rng(seed, artifact, probe.paths[int(i)]), params)
        try:
            with Image.open(path) as im:
                c = im.convert("RGB")
            with Image.open(io.BytesIO(data)) as im:
                p = im.convert("RGB")
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        o = occlusion_control(c, p)
        clean.append(geometry(c))
        pasted.append(geometry(p))
        control.append(geometry(o))
        raw.append(data)
    return clean, pasted, control, raw


def _u8(views: list[Image.Image]) -> list[np.ndarray]:
    arrs = [np.asarray(v.convert("RGB"), dtype=np.uint8) for v in views]
    if len({a.shape for a in arrs}) > 1:
        raise DataError("probe images have different sizes after preprocessing; pass --resize and --crop so "
                        "every image reaches the model at the same size")
    return arrs


def _row_classes(probe, rows: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Per row, the class index its labels name (exactly one concept that is a class name), else −1."""
    index = {n: k for k, n in enumerate(names)}
    out = np.full(len(rows), -1, dtype=np.int64)
    if not set(probe.concepts) & index.keys():
        return out
    for j, r in enumerate(rows):
        hits = [index[c] for c in probe.row_concepts(int(r)) if c in index]
        if len(hits) == 1:
            out[j] = hits[0]
    return out


def resolve_class_names(class_names_file: str | None, model, loaded_spec: str | None, kind: str | None,
                        n_classes: int) -> tuple[list[str], str]:
    """Class names and where they came from: --class-names, the model's ``class_names`` attribute,
    torchvision weights metadata, else indices."""
    if class_names_file:
        names = read_class_names(class_names_file)
        if len(names) != n_classes:
            raise ConfigError(f"class_names: {class_names_file} lists {len(names)} names but the model outputs "
                              f"{n_classes} class scores")
        return names, f"file {class_names_file}"
    attr = getattr(model, "class_names", None)
    if isinstance(attr, (list, tuple)) and len(attr) == n_classes and all(isinstance(x, str) for x in attr):
        return list(attr), "the model's class_names attribute"
    if kind == "torchvision" and loaded_spec:
        try:
            import torchvision

            cats = torchvision.models.get_model_weights(loaded_spec).DEFAULT.meta.get("categories")
            if cats and len(cats) == n_classes:
                return list(cats), f"torchvision weights metadata ({loaded_spec})"
        except Exception:  # architectures without registered weights
            pass
    return [str(i) for i in range(n_classes)], "indices"


def _draw_random(layers_flagged: Mapping[str, np.ndarray], pools: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    out = {}
    for name, idx in layers_flagged.items():
        pool = pools[name]
        if len(pool) < len(idx):
            return None
        out[name] = np.sort(rng.choice(pool, size=len(idx), replace=False))
    return out


def run_impact(model, layers, *, probe, artifacts: Sequence[str], count: int, seed: int,
               params: Mapping[str, Mapping[str, Any]], geometry, mean, std, device: str = "cpu",
               precision: str = "float32", batch_size: int = 64, reduction: str = "mean", output: str = "auto",
               class_names: str | None = None, model_spec: str | None = None, model_kind: str | None = None,
               ablation: str = "mean", draws: int = 10, save_pairs: str | None = None, log: Log = lambda m: None,
               warnings: list[str] | None = None, paired: dict[str, dict[str, Any]] | None = None,
               cache_dir: str | os.PathLike | None = None, cache_id: Mapping[str, Any] | None = None):
    """The impact of every artifact with a generator; returns ``list[ArtifactImpact]``.

    ``layers`` are the audit's :class:`~auditor.results.LayerResult` (flags are read from
    ``NeuronResult.flags``). ``probe`` is the clean probe set (the user's images, before
    any synthesis). ``geometry`` resizes/crops a PIL image; ``mean``/``std`` normalise.
    ``paired``, when given, receives ``{layer: {artifact: paired effects}}``: every neuron's
    paired change on the test pairs (:func:`auditor.paired.paired_effects`).

    With ``cache_dir`` and ``cache_id`` (what identifies the model and its preprocessing;
    the pipeline passes the weights' and architecture's hashes), each artifact's result is
    kept in ``cache_dir/impact/<key>.json`` and reused when everything that changes it is
    the same (:func:`_cache_key`); ``save_pairs`` always recomputes.
    """
    import torch

    from .collect import resolve_device, resolve_precision
    from .artifacts import ARTIFACTS
    from .results import ArtifactImpact
    from .synth import clean_mask, pick_clean

    warnings = warnings if warnings is not None else []
    todo = [a for a in artifacts if a in ARTIFACTS]
    skipped = [a for a in artifacts if a not in ARTIFACTS]
    if skipped:
        warnings.append(f"impact test skipped for {', '.join(skipped)}: no artifact generator of that name "
                        "(register one with auditor.artifacts.register_artifact to test it)")
    if not todo:
        return []
    for a, p in params.items():
        if a in ARTIFACTS and not ARTIFACTS[a].accepts_any:
            bad = [k for k in p if k not in ARTIFACTS[a].params]
            if bad:
                from .errors import did_you_mean

                raise ConfigError(f"impact_params: artifact {a!r} has no parameter {bad[0]!r}"
                                  f"{did_you_mean(bad[0], ARTIFACTS[a].params)}; expected one of: "
                                  f"{', '.join(ARTIFACTS[a].params)}")
    extra_params = [a for a in params if a not in artifacts]
    if extra_params:
        from .errors import did_you_mean

        raise ConfigError(f"impact_params given for {extra_params[0]!r}, which is not among the artifacts"
                          f"{did_you_mean(extra_params[0], artifacts)}; artifacts: {', '.join(artifacts)}")
    if save_pairs:
        check_pairs_folder(Path(save_pairs), Path(probe.root))
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    was_training = model.training
    model.eval()
    model.to(dev)
    layer_names = [lyr.name for lyr in layers]
    hooks = _Ablate(model, layer_names, reduction)
    fwd = _Forward(model, dev, prec, batch_size, mean, std)
    results = []
    pairs_out: dict[str, Any] = {}
    try:
        with hooks.attached():
            for a in todo:
                t0 = time.perf_counter()
                rows = pick_clean(probe, a, count, seed)
                if not len(rows):
                    warnings.append(f"impact test of {a!r} skipped: no probe image is free of artifact concepts")
                    continue
                if len(rows) < count:
                    log(f"impact: {a} pasted on all {len(rows)} clean probe images (fewer than {count})")
                p = dict(params.get(a, {}))
                cache_file = None
                if cache_dir is not None and cache_id is not None and not save_pairs:
                    key = _cache_key(cache_id, probe, a, p, seed, count, dev.type, prec, batch_size, reduction,
                                     output, class_names, model, ablation, draws, layers)
                    cache_file = Path(cache_dir) / "impact" / f"{key}.json"
                    hit = _cache_read(cache_file, paired)
                    if hit is not None:
                        results.append(hit)
                        log(f"impact: {a} reused from the cache ({cache_file})")
                        continue
                clean_v, pasted_v, control_v, raw = _prepare(probe, rows, ARTIFACTS[a], p, seed, a, geometry)
                X_clean, X_pasted, X_control = _u8(clean_v), _u8(pasted_v), _u8(control_v)
                res, extra = _one_artifact(a, rows, probe, X_clean, X_pasted, X_control, clean_v, pasted_v, fwd,
                                           hooks, layers, output, class_names, model, model_spec, model_kind,
                                           ablation, draws, seed)
                from .paired import paired_effects

                effects = {}
                for name, (ac, ap) in extra.pop("acts").items():
                    m = len(ac)
                    pairs = np.stack([np.arange(m), np.arange(m, 2 * m)], axis=1)
                    effects[name] = paired_effects(np.concatenate([ac, ap]), pairs)
                    if paired is not None:
                        paired.setdefault(name, {})[a] = effects[name]
                gen_info = {"name": a, "params": _plain(p), "seed": int(seed), "count": int(count),
                            "n_clean_available": int(clean_mask(probe).sum()),
                            "synth_command": _synth_command(a, p, count, seed)}
                results.append(ArtifactImpact(artifact=a, generator=gen_info, n_images=int(len(rows)),
                                              seconds=round(time.perf_counter() - t0, 3), **res))
                pairs_out[a] = (rows, raw, control_v, extra)
                if cache_file is not None:
                    _cache_write(cache_file, results[-1], effects)
                log(f"impact: {a} tested on {len(rows)} image pairs in {results[-1].seconds:.1f}s")
        if save_pairs:
            _save_pairs(Path(save_pairs), probe, pairs_out)
    finally:
        model.train(was_training)
    return results


IMPACT_CACHE_FORMAT = 1


def _cache_key(cache_id, probe, a, p, seed, count, device_type, precision, batch_size, reduction, output,
               class_names, model, ablation, draws, layers) -> str:
    """Everything that changes one artifact's result: the model and preprocessing (``cache_id``), the
    images and labels, the generator (its source code too), its parameters and seed, the numerics, the
    flagged and unflagged neurons, the class names, this module's code and the package versions."""
    import hashlib
    from importlib import metadata

    from .data import sha256_file
    from .synth import _generator_fingerprint, _versions

    src = {
        "format": IMPACT_CACHE_FORMAT, "id": cache_id, "images": probe.image_fingerprint(),
        "labels": probe.labels_fingerprint(), "artifact": a, "params": _plain(p), "seed": int(seed),
        "count": int(count), "generator": _generator_fingerprint([a]), "device": device_type,
        "precision": precision, "batch_size": int(batch_size), "reduction": reduction, "output": output,
        "class_names": sha256_file(class_names) if class_names else getattr(model, "class_names", None),
        "ablation": ablation, "draws": int(draws),
        "layers": [(lyr.name, [(n.index, n.status, sorted({f.artifact for f in n.flags})) for n in lyr.neurons])
                   for lyr in layers],
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "versions": _versions() | {"torch": metadata.version("torch")},
    }
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_read(path: Path, paired: dict | None):
    from .results import ArtifactImpact

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = ArtifactImpact.from_dict(data["impact"])
        effects = {layer: {k: np.asarray(v) for k, v in e.items()} for layer, e in data["paired"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing or unreadable: compute again
    if paired is not None:
        for layer, e in effects.items():
            paired.setdefault(layer, {})[result.artifact] = e
    return result


def _cache_write(path: Path, result, effects: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    from .collect.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"impact": result.to_dict(),
            "paired": {layer: {k: np.asarray(v).tolist() for k, v in e.items()} for layer, e in effects.items()}}
    atomic_write_text(path, json.dumps(data))


def _plain(p: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (os.fspath(v) if isinstance(v, os.PathLike) else v if isinstance(v, (str, int, float, bool, list,
            tuple, dict, type(None))) else repr(v)) for k, v in p.items()}


def _synth_command(a: str, p: Mapping[str, Any], count: int, seed: int) -> str:
    parts = [f"auditor synth --images IMAGES [--labels LABELS] --out OUT --artifacts {a} --count {count} "
             f"--seed {seed}"]
    for k, v in p.items():
        parts.append("--param " + shlex.quote(f"{a}.{k}={json.dumps(_plain({k: v})[k])}"))
    return " ".join(parts)


def _flagged(layers, a) -> dict[str, np.ndarray]:
    out = {lyr.name: np.array(sorted(n.index for n in lyr.neurons if any(fl.artifact == a for fl in n.flags)),
                              dtype=np.int64) for lyr in layers}
    return {k: v for k, v in out.items() if len(v)}


def _one_artifact(a, rows, probe, X_clean, X_pasted, X_control, clean_v, pasted_v, fwd, hooks, layers, output,
                  class_names, model, model_spec, model_kind, ablation_mode, draws, seed):
    hooks.ablate, hooks.mode = {}, ablation_mode
    hooks.sums, hooks.values, hooks.stored = {}, {}, {}
    hooks.accumulate = hooks.capture_values = True
    flagged = _flagged(layers, a)
    hooks.store = set(flagged) if len(flagged) == 1 else set()
    out_clean = fwd(X_clean)
    hooks.finish_means()
    stored_clean = hooks.stored
    if sum(t.numel() * t.element_size() for v in stored_clean.values() for t in v) > STORE_MAX_BYTES // 2:
        hooks.store, stored_clean = set(), {}
    hooks.stored = {}
    acts_clean = {n: np.concatenate(v) for n, v in hooks.values.items()}
    hooks.values = {}
    out_pasted = fwd(X_pasted)
    stored_pasted, hooks.stored, hooks.store = hooks.stored, {}, set()
    acts_pasted = {n: np.concatenate(v) for n, v in hooks.values.items()}
    hooks.values, hooks.capture_values = {}, False
    out_control = fwd(X_control)
    head = class_head(fwd.shapes, output)
    res: dict[str, Any] = {"output_kind": "classes" if head else "embedding", "class_head": head}
    extra: dict[str, Any] = {"acts": {n: (acts_clean[n], acts_pasted[n]) for n in acts_clean if n in acts_pasted}}
    if head is None:
        change = output_changes(out_clean, out_pasted)
        cchange = output_changes(out_clean, out_control)
        res.update(flip_rate=None, control_flip_rate=None, output_change=change, control_output_change=cchange,
                   summary=summary_sentence(a, "embedding", None, None, [], None, change, cchange), ablation=None)
        return res, extra
    n_classes = out_clean[head].shape[1]
    names, names_source = resolve_class_names(class_names, model, model_spec, model_kind, n_classes)
    y_clean, y_pasted = out_clean[head].argmax(1), out_pasted[head].argmax(1)
    y_control = out_control[head].argmax(1)
    f, fc = flips(y_clean, y_pasted), flips(y_clean, y_control)
    M = len(f)
    P_clean, score_kind = as_probabilities(out_clean[head])
    P_pasted, _ = as_probabilities(out_pasted[head])
    truth = _row_classes(probe, rows, names)
    has_truth = truth >= 0
    toward = towards(y_clean, y_pasted, names)
    stored = None
    if stored_clean and stored_pasted:
        (layer, sc), sp = next(iter(stored_clean.items())), stored_pasted[next(iter(stored_clean))]
        if _downstream_ok(fwd.downstream(X_clean, sc, hooks, layer)[head], out_clean[head]):
            stored = (layer, sc, sp)
    abl = _attribution(a, layers, hooks, fwd, head, X_clean, X_pasted, y_clean, float(f.mean()), truth, has_truth,
                       ablation_mode, draws, seed, stored)
    res.update(
        flip_rate=float(f.mean()), control_flip_rate=float(fc.mean()), n_flips=int(f.sum()),
        n_control_flips=int(fc.sum()), flip_ci=proportion_ci(int(f.sum()), M),
        control_ci=proportion_ci(int(fc.sum()), M), flows=class_flows(y_clean, y_pasted, names),
        control_flows=class_flows(y_clean, y_control, names), towards=toward[:MAX_CLASS_ROWS],
        score_kind=score_kind, score_change=score_changes(P_clean, P_pasted, names),
        class_names_source=names_source, n_classes=int(n_classes),
        clean_accuracy=float((y_clean[has_truth] == truth[has_truth]).mean()) if has_truth.any() else None,
        pasted_accuracy=float((y_pasted[has_truth] == truth[has_truth]).mean()) if has_truth.any() else None,
        n_labelled=int(has_truth.sum()), ablation=abl,
        summary=summary_sentence(a, "classes", float(f.mean()), float(fc.mean()), toward, abl),
        examples=_examples(a, layers, acts_clean, acts_pasted, probe, rows, clean_v, pasted_v, y_clean, y_pasted,
                           names))
    extra["pred"] = (y_clean, y_pasted, y_control, names)
    return res, extra


def _downstream_ok(shortcut: np.ndarray, full: np.ndarray) -> bool:
    """The downstream-only pass reproduces the full pass: same top-1 everywhere, same scores to rounding."""
    if shortcut.shape != full.shape or not (shortcut.argmax(1) == full.argmax(1)).all():
        return False
    return bool(np.allclose(shortcut, full, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(full).max()))))


def _attribution(a, layers, hooks, fwd, head, X_clean, X_pasted, y_clean, base_flip, truth, has_truth, mode,
                 draws, seed, stored=None):
    flagged = _flagged(layers, a)
    if not flagged:
        return None
    pools = {lyr.name: np.array(sorted(n.index for n in lyr.neurons if not n.flags and n.status != "dead"),
                                dtype=np.int64) for lyr in layers if lyr.name in flagged}

    def run(ablate):
        hooks.ablate = ablate
        try:
            if stored is not None:  # only the layers after the ablated one are computed (checked equal above)
                layer, sc, sp = stored
                yc = fwd.downstream(X_clean, sc, hooks, layer)[head].argmax(1)
                yp = fwd.downstream(X_pasted, sp, hooks, layer)[head].argmax(1)
            else:
                yc, yp = fwd(X_clean)[head].argmax(1), fwd(X_pasted)[head].argmax(1)
        finally:
            hooks.ablate = {}
        acc = float((yc[has_truth] == truth[has_truth]).mean()) if has_truth.any() else None
        return float(flips(yc, yp).mean()), acc

    acc0 = float((y_clean[has_truth] == truth[has_truth]).mean()) if has_truth.any() else None
    flip_abl, acc_abl = run(flagged)
    rng = np.random.default_rng([int(seed), 12])
    shares, costs, rflips = [], [], []
    for _ in range(int(draws)):
        pick = _draw_random(flagged, pools, rng)
        if pick is None:
            break
        fl, acc = run(pick)
        rflips.append(fl)
        shares.append(share_carried(base_flip, fl))
        if acc is not None:
            costs.append(acc0 - acc)
    shares_ok = [s for s in shares if s is not None]
    neurons = [f"{layer}#{i}" for layer, idx in flagged.items() for i in idx]
    return {
        "mode": mode, "layers": list(flagged), "neurons": neurons, "downstream_only": stored is not None,
        "flip_rate": flip_abl, "share_carried": share_carried(base_flip, flip_abl),
        "clean_accuracy": acc0, "ablated_accuracy": acc_abl,
        "accuracy_cost": None if acc0 is None or acc_abl is None else acc0 - acc_abl,
        "random": {
            "draws": len(rflips), "flip_rates": rflips, "shares": shares,
            "share_mean": float(np.mean(shares_ok)) if shares_ok else None,
            "share_sd": float(np.std(shares_ok, ddof=1)) if len(shares_ok) > 1 else None,
            "share_min": float(np.min(shares_ok)) if shares_ok else None,
            "share_max": float(np.max(shares_ok)) if shares_ok else None,
            "accuracy_cost_mean": float(np.mean(costs)) if costs else None,
            "pool": {k: int(len(v)) for k, v in pools.items()},
        },
    }


def _examples(a, layers, acts_clean, acts_pasted, probe, rows, clean_v, pasted_v, y_clean, y_pasted, names):
    """For neurons flagged for ``a``: the pairs where the paste raised the neuron most, with thumbnails."""
    from .evidence import data_uri, thumbnail

    out = []
    for lyr in layers:
        if lyr.name not in acts_clean:
            continue
        for n in lyr.neurons:
            if not any(fl.artifact == a for fl in n.flags) or len(out) >= MAX_EXAMPLE_NEURONS:
                continue
            d = acts_pasted[lyr.name][:, n.index] - acts_clean[lyr.name][:, n.index]
            pairs = []
            for j in np.argsort(-d, kind="stable")[:EXAMPLES_PER_NEURON]:
                pairs.append({"path": probe.paths[int(rows[j])],
                              "clean": data_uri(thumbnail(clean_v[j], EXAMPLE_SIDE)),
                              "pasted": data_uri(thumbnail(pasted_v[j], EXAMPLE_SIDE)),
                              "act_clean": float(acts_clean[lyr.name][j, n.index]),
                              "act_pasted": float(acts_pasted[lyr.name][j, n.index]),
                              "pred_clean": _name(names, int(y_clean[j])),
                              "pred_pasted": _name(names, int(y_pasted[j]))})
            out.append({"layer": lyr.name, "neuron": int(n.index), "mean_rise": float(d.mean()),
                        "frac_rise": float((d > 0).mean()), "pairs": pairs})
    return out


def check_pairs_folder(folder: Path, images: Path) -> None:
    """--save-pairs may replace an earlier pairs folder, never anything else, and never lies in the images."""
    f, root = folder.resolve(), images.resolve()
    if f == root or root in f.parents or f in root.parents:
        raise ConfigError(f"save_pairs: {folder} overlaps the probe image folder {images}; pick another folder")
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(f"save_pairs: {folder} exists and is not a folder")
        if any(folder.iterdir()) and not (folder / "pairs.csv").is_file():
            raise ConfigError(f"save_pairs: {folder} is not empty and holds no earlier pairs.csv; pick another "
                              "folder")


def _save_pairs(folder: Path, probe, made: Mapping[str, Any]) -> None:
    """Write the pairs in the `auditor synth` layout (+ control images and a CSV), atomically."""
    import csv

    from .synth import replace_folder

    check_pairs_folder(folder, Path(probe.root))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.pairs-", dir=folder.parent))
    try:
        with open(tmp / "pairs.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["artifact", "clean", "pasted", "control", "pred_clean", "pred_pasted", "pred_control"])
            for a, (rows, raw, control_v, extra) in made.items():
                pred = extra.get("pred")
                for j, r in enumerate(rows):
                    rel = probe.paths[int(r)]
                    c = tmp / "images" / "clean" / rel
                    p = tmp / "images" / a / rel
                    o = (tmp / "control" / a / rel).with_suffix(".png")
                    for d in (c, p, o):
                        d.parent.mkdir(parents=True, exist_ok=True)
                    if not c.exists():
                        shutil.copyfile(probe.full_path(int(r)), c)
                    p.write_bytes(raw[j])
                    control_v[j].save(o)
                    preds = ([pred[3][int(pred[k][j])] if int(pred[k][j]) < len(pred[3]) else str(pred[k][j])
                              for k in range(3)] if pred else ["", "", ""])
                    w.writerow([a, f"images/clean/{rel}", f"images/{a}/{rel}",
                                o.relative_to(tmp).as_posix(), *preds])
        replace_folder(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
