"""The Python API: audit a model from a notebook, a script or a training loop.

    import auditor

    result = auditor.audit(model, layer="features.13", images=dataset,
                           concepts=names, artifacts=["watermark"])
    result                      # in Jupyter: the verdict and the flagged neurons
    result.save("report/")      # report.html, report.pdf, results.json, ... (as `auditor run`)
    auditor.compare(old, result).save("diff/")

``model`` is an in-memory ``torch.nn.Module`` or any spec ``auditor run --model``
takes (``resnet50``, ``timm:resnet50``, ``pkg.module:factory``, a TorchScript file).
``images`` is a folder (with ``labels`` as for the CLI) or a ``torch.utils.data.Dataset``
whose items are ``(image, concept_vector)``: the image a PIL image or an ``(H, W, 3)``
uint8 array (preprocessed like image files: resize, crop, mean/std) or a ``(C, H, W)``
tensor in [0, 1] (or uint8 pixels), which gets only the resize, crop and mean/std you
give (none by default: it goes to the model as it is); the concept vector 0/1 per
name in ``concepts``.

The CLI's ``auditor run`` is :func:`audit_config` plus :meth:`AuditResult.save`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import FIELDS, AuditConfig, make_config
from .data import ProbeSet
from .errors import ConfigError, DataError, did_you_mean
from .results import AuditResult

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .compare import Comparison
    from .models import LoadedModel

__all__ = ["audit", "audit_config", "compare", "load", "in_memory_model", "dataset_probe"]

Log = Callable[[str], None]

#: Preprocessing recorded for a model given as an object: the same words as for a callable spec.
_NO_PREPROCESSING = "none given (model takes [0, 1] RGB unless --mean/--std)"


def _stderr(msg: str) -> None:
    import sys

    print(f"auditor: {msg}", file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------

def in_memory_model(module: nn.Module, spec: str | None = None) -> LoadedModel:
    """Wrap an ``nn.Module`` the caller already holds as a :class:`~auditor.models.LoadedModel`."""
    from torch import nn

    from .models import LoadedModel, Preprocessing

    if not isinstance(module, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module or a model spec string, got {type(module).__name__}")
    n_params = sum(p.numel() for p in module.parameters())
    return LoadedModel(module=module, spec=spec or type(module).__name__, kind="in-memory", weights=None,
                       file_sha256=None, default_preprocessing=Preprocessing(source=_NO_PREPROCESSING),
                       n_parameters=n_params, info={})


# -- probe sets held in memory --------------------------------------------------------------

class _DatasetInput:
    """The model input for one dataset image: the config's transform for a PIL image; for a
    tensor the same steps but the PIL-to-tensor conversion (nothing, unless resize, crop or
    mean/std were given)."""

    def __init__(self, transform: Callable):
        from torchvision import transforms as T

        self.transform = transform
        steps = getattr(transform, "transforms", None)
        self.tensor_steps = [t for t in steps if not isinstance(t, T.ToTensor)] if steps is not None else []

    def __call__(self, x: Any):
        import torch

        if isinstance(x, torch.Tensor):
            x = _tensor_input(x)
            for step in self.tensor_steps:
                x = step(x)
            return x
        return self.transform(x)

    def __repr__(self) -> str:
        return f"DatasetInput({self.transform!r})"


@dataclass(frozen=True)
class DatasetProbeSet(ProbeSet):
    """A probe set whose images come from a ``torch.utils.data.Dataset`` of ``(image, concept vector)``."""

    dataset: Any = None
    images_fingerprint: str = ""
    yields_tensors: bool = False

    def load(self, i: int) -> Any:
        return _image_of(self.dataset[i], i)

    def input_transform(self, transform: Callable) -> Callable:
        return _DatasetInput(transform)

    def image_fingerprint(self) -> str:
        return self.images_fingerprint

    def views(self, rows: Sequence[int], geometry: Callable) -> list[Any]:
        """The top images as the model saw them (PIL images through the resize/crop; tensors as pictures)."""
        return [_view(self.load(int(r)), geometry) for r in rows]

    def provenance(self, images_fingerprint: str | None = None) -> dict[str, Any]:
        out = super().provenance(images_fingerprint)
        out["images"] = str(self.root)
        out["source"] = "torch Dataset"
        return out


def _tensor_input(x: Any):
    """A dataset tensor as model input: uint8 pixels (``read_image``) become [0, 1] floats, as from files."""
    import torch

    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _image_of(item: Any, i: int) -> Any:
    """The item's image as a PIL image or a (C, H, W) tensor (an (H, W, 3) uint8 array becomes a PIL image)."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"dataset item {i} is a {type(item).__name__}; the probe Dataset must yield "
                        "(image, concept_vector) pairs")
    img = item[0]
    if isinstance(img, np.ndarray):
        if img.ndim == 3 and img.shape[2] in (1, 3) and img.dtype == np.uint8:
            from PIL import Image

            return Image.fromarray(img if img.shape[2] == 3 else img[..., 0]).convert("RGB")
        import torch

        return torch.from_numpy(np.ascontiguousarray(img))
    return img


def _view(img: Any, geometry: Callable):
    import torch
    from PIL import Image

    if isinstance(img, Image.Image):
        return geometry(img.convert("RGB"))
    t = _tensor_input(torch.as_tensor(img).detach().cpu())
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        return None
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:  # normalised input: stretch to a visible picture
        t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    arr = (t * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    pic = Image.fromarray(arr if arr.shape[2] == 3 else arr[..., 0], "RGB" if arr.shape[2] == 3 else "L")
    return geometry(pic.convert("RGB"))


def dataset_probe(dataset: Any, concepts: Sequence[str] | None = None) -> DatasetProbeSet:
    """Read every item of ``dataset`` once: the concept matrix, and a hash of the images (the cache key)."""
    import torch
    from PIL import Image

    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError(f"images: a {type(dataset).__name__} has no len(); pass a map-style "
                          "torch.utils.data.Dataset of (image, concept_vector) items") from None
    if n == 0:
        raise DataError("the probe Dataset is empty")
    names = list(concepts) if concepts is not None else list(getattr(dataset, "concepts", None) or [])
    if not names:
        raise ConfigError("a probe Dataset needs concepts=[...]: the name of each entry of its concept vectors "
                          "(or a `concepts` attribute on the dataset)")
    if len(set(names)) != len(names):
        raise ConfigError(f"concepts lists a name twice: {names}")
    Y = np.zeros((n, len(names)), dtype=bool)
    h = hashlib.sha256(b"dataset\n")
    kinds: set[str] = set()
    for i in range(n):
        item = dataset[i]
        img = _image_of(item, i)
        if isinstance(img, torch.Tensor) and (img.dim() != 3 or img.shape[0] not in (1, 3)):
            raise DataError(f"dataset item {i}: image tensor of shape {tuple(img.shape)}; expected (C, H, W) "
                            "with 1 or 3 channels")
        vec = item[1]
        v = np.asarray(vec.detach().cpu().numpy() if isinstance(vec, torch.Tensor) else vec, dtype=np.float64).ravel()
        if v.shape != (len(names),):
            raise DataError(f"dataset item {i}: concept vector of length {v.size}, expected {len(names)} "
                            f"(one per name in concepts)")
        if not np.isin(v, (0.0, 1.0)).all():
            raise DataError(f"dataset item {i}: concept vector values must be 0 or 1, got {sorted(set(v.tolist()))[:5]}")
        Y[i] = v.astype(bool)
        if isinstance(img, Image.Image):
            kinds.add("pil")
            im = img.convert("RGB")
            h.update(f"pil{im.size}\n".encode())
            h.update(im.tobytes())
        elif isinstance(img, torch.Tensor):
            kinds.add("tensor")
            t = img.detach().cpu().contiguous()
            h.update(f"tensor{tuple(t.shape)}{t.dtype}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bfloat16 else
                     t.view(torch.int16).numpy().tobytes())
        else:
            raise DataError(f"dataset item {i}: the image is a {type(img).__name__}; expected a PIL image or a "
                            "(C, H, W) tensor")
    if len(kinds) > 1:
        raise DataError("the probe Dataset mixes PIL images and tensors; yield one kind")
    paths = [f"dataset[{i}]" for i in range(n)]
    return DatasetProbeSet(root=Path(f"<{type(dataset).__name__}>"), paths=paths, labels=Y, concepts=names,
                           labels_format="dataset", dataset=dataset, images_fingerprint="dataset:" + h.hexdigest(),
                           yields_tensors=kinds == {"tensor"})


# -- auditing ------------------------------------------------------------------------------

def audit_config(cfg: AuditConfig, *, model: Any = None, probe: ProbeSet | None = None,
                 log: Log | None = None, progress: bool = True) -> AuditResult | None:
    """Run the audit ``cfg`` describes; ``model`` (an ``nn.Module`` or LoadedModel) and ``probe`` override it.

    The module's train/eval mode and device are restored afterwards. Returns None
    only on the worker ranks of a torchrun launch.
    """
    from .pipeline import run_audit

    log = log or _stderr
    loaded = None
    module = None
    if model is not None:
        from .models import LoadedModel

        loaded = model if isinstance(model, LoadedModel) else in_memory_model(model)
        module = loaded.module
    state = _module_state(module) if module is not None else None
    try:
        return run_audit(cfg, log=log, progress=progress, model=loaded, probe=probe)
    finally:
        if state is not None:
            _restore(module, state)


def _module_state(module: Any) -> tuple[bool, Any]:
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = None
    return module.training, device


def _restore(module: Any, state: tuple[bool, Any]) -> None:
    training, device = state
    if device is not None:
        module.to(device)
    module.train(training)


def audit(model: nn.Module | str, *, layer: str | Sequence[str], images: str | os.PathLike | Any,
          labels: str | os.PathLike | None = None, artifacts: Sequence[str] = (),
          concepts: Sequence[str] | None = None, weights: str | os.PathLike | None = None,
          log: Log | None = None, progress: bool = False, **options: Any) -> AuditResult:
    """Audit one model on one probe set and return the :class:`AuditResult` (nothing is written but the cache).

    Args:
        model: an ``nn.Module`` (audited as it is; its mode and device are restored
            afterwards) or a model spec string as ``auditor run --model`` takes.
        layer: the dotted layer name (``"layer4"``), or several.
        images: a folder of probe images (``labels`` then as for the CLI), or a
            ``torch.utils.data.Dataset`` yielding ``(image, concept_vector)``.
        labels: the concept labels file for a folder of images.
        artifacts: the artifact concept names to flag.
        concepts: the names of the concept vector's entries (Dataset only).
        weights: a weights file (state_dict, checkpoint or ``.safetensors``) for a spec string.
        log: where progress messages go (default: stderr).
        progress: show progress bars.
        **options: any other ``auditor run`` setting by its config name
            (``length=2``, ``min_fraction=0.02``, ``device="cpu"``, ``cache_dir=...``, …).

    Raises:
        auditor.errors.AuditorError: a bad input, with one line naming it.
    """
    unknown = [k for k in options if k not in FIELDS]
    if unknown:
        raise ConfigError(f"unknown audit option {unknown[0]!r}{did_you_mean(unknown[0], FIELDS)}")
    for name in ("model", "images", "labels", "layer", "artifacts", "weights"):
        if name in options:
            raise ConfigError(f"pass {name} as its own argument, not in **options")
    values: dict[str, Any] = dict(options)
    values["layer"] = layer if isinstance(layer, str) else ",".join(layer)
    values["artifacts"] = tuple(artifacts)
    loaded_model = None
    if isinstance(model, (str, os.PathLike)):
        values["model"] = str(model)
        if weights is not None:
            values["weights"] = str(weights)
    else:
        if weights is not None:
            raise ConfigError("weights= is for a model spec string; load them into the module yourself")
        loaded_model = model
    probe = None
    if isinstance(images, (str, os.PathLike)):
        values["images"] = str(images)
        if labels is not None:
            values["labels"] = str(labels)
        if concepts is not None:
            raise ConfigError("concepts= names the entries of a Dataset's concept vectors; with a folder of "
                              "images the names come from the labels file")
    elif images is None:
        raise ConfigError("images= is required: a folder of probe images or a torch Dataset")
    else:
        if labels is not None:
            raise ConfigError("labels= is for a folder of images; a Dataset yields its concept vectors itself")
        if options.get("synth"):
            raise ConfigError("synth works on a folder of images, not on a Dataset")
        probe = dataset_probe(images, concepts)
    cfg = make_config(values, "auditor.audit()")
    result = audit_config(cfg, model=loaded_model, probe=probe, log=log, progress=progress)
    assert result is not None  # only torchrun worker ranks get None
    return result


def load(path: str | os.PathLike) -> AuditResult:
    """A saved audit: a ``results.json`` file or an output folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    return AuditResult.load(p)


def compare(old: AuditResult | str | os.PathLike, new: AuditResult | str | os.PathLike, *,
            match: str = "index") -> Comparison:
    """What changed between two audits (see :mod:`auditor.compare`); ``match`` is ``index`` or ``activations``."""
    from .compare import compare_results

    a = old if isinstance(old, AuditResult) else load(old)
    b = new if isinstance(new, AuditResult) else load(new)
    return compare_results(a, b, match=match)

