"""Loading models and finding layers.

A model spec is one of
- a torchvision architecture name (``resnet18``), built with random weights;
- ``package.module:callable`` or ``path/to/file.py:callable`` returning an ``nn.Module``;
- a TorchScript file (``torch.jit.save``);
- ``timm:NAME`` (``timm:resnet50``): a timm architecture, built with
  ``pretrained=False`` (nothing is downloaded), with timm's preprocessing config.
``--weights`` then loads a state_dict, or a checkpoint dict holding one, with
``weights_only=True``, or a ``.safetensors`` file (no pickle at all); mismatched
keys are reported by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import sha256_file
from .errors import LayerError, ModelError, did_you_mean

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights", "module")


@dataclass(frozen=True)
class Preprocessing:
    """What the model expects; recorded in the provenance."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    source: str = "default"  # where these values came from
    interpolation: str = "bilinear"  # resize filter: "bilinear" or "bicubic" (timm's configs often ask for it)

    def plain(self) -> dict[str, Any]:
        out = {"resize": self.resize, "crop": self.crop,
               "mean": list(self.mean) if self.mean else None,
               "std": list(self.std) if self.std else None, "source": self.source}
        if self.interpolation != "bilinear":  # only recorded when it differs, so older cache keys stay valid
            out["interpolation"] = self.interpolation
        return out


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module
    spec: str
    kind: str  # "torchvision" | "timm" | "callable" | "torchscript" | "in-memory"
    weights: str | None
    file_sha256: str | None  # hash of the weights (or TorchScript) file
    default_preprocessing: Preprocessing
    n_parameters: int
    info: dict[str, Any] = field(default_factory=dict)

    def provenance(self, state_sha256: str | None = None) -> dict[str, Any]:
        """What identifies the model in the report: ``sha256`` is never empty.

        With a weights (or TorchScript) file it is that file's sha256; for a named
        architecture or a callable without a weights file it is
        :func:`state_dict_sha256` of the module as loaded (``sha256_of`` says which);
        ``state_sha256`` passes that digest when the caller already has it.
        """
        if self.file_sha256:
            digest, of = self.file_sha256, "weights file" if self.weights else "TorchScript file"
        else:
            digest, of = state_sha256 or state_dict_sha256(self.module), "state_dict tensors"
        return {"spec": self.spec, "kind": self.kind, "weights": self.weights,
                "weights_sha256": self.file_sha256, "n_parameters": self.n_parameters,
                "sha256": digest, "sha256_of": of, "parameters": self.n_parameters,
                "class": type(self.module).__name__, **self.info}


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 of a module's state_dict in a canonical order, independent of how it was built.

    Keys sorted by name; for each tensor the UTF-8 line ``name\0dtype\0shape\n`` and
    then its bytes (contiguous, little-endian, on the CPU; bfloat16 as its raw 16-bit
    words). Two modules with equal tensors under equal names give the same digest.
    """
    h = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        arr = t.numpy()
        if arr.dtype.byteorder == ">":
            arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
        h.update(arr.tobytes())
    return h.hexdigest()


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


def _torchvision_preprocessing(name: str) -> Preprocessing:
    """The transforms of the architecture's default weights (no download needed)."""
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(name)
        tf = weights_enum.DEFAULT.transforms()
    except Exception:  # architectures without registered weights
        return Preprocessing(source=f"torchvision:{name} (no weights metadata)")
    resize = getattr(tf, "resize_size", None)
    crop = getattr(tf, "crop_size", None)
    resize = resize[0] if isinstance(resize, (list, tuple)) else resize
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return Preprocessing(resize=resize, crop=crop, mean=tuple(tf.mean), std=tuple(tf.std),
                         source=f"torchvision:{name} default weights transforms")


TIMM_PREFIX = "timm:"


def _timm_preprocessing(module: nn.Module, name: str) -> Preprocessing:
    """timm's data config for the model: input size, crop fraction, mean/std, resize filter."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=module)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    interp = str(cfg.get("interpolation") or "bilinear")
    return Preprocessing(resize=int(size / crop_pct), crop=size, mean=tuple(float(v) for v in cfg["mean"]),
                         std=tuple(float(v) for v in cfg["std"]),
                         interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
                         source=f"timm:{name} data config (crop_pct {crop_pct:g}, {interp})")


def _build_timm(spec: str) -> tuple[nn.Module, Preprocessing]:
    name = spec[len(TIMM_PREFIX):].strip()
    try:
        import timm
    except ImportError:
        raise ModelError(f"--model {spec!r} needs timm, which is not installed (pip install timm)") from None
    if not name:
        raise ModelError("--model timm: needs an architecture name, e.g. timm:resnet50")
    if not timm.is_model(name):
        raise ModelError(f"unknown timm architecture {name!r}{did_you_mean(name, timm.list_models())}; "
                         "list them with python -c 'import timm; print(timm.list_models())'")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise ModelError(f"cannot build timm model {name!r}: {type(exc).__name__}: {exc}") from None
    return module, _timm_preprocessing(module, name)


def _import_callable(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelError(f"model spec {spec!r} must look like package.module:callable or file.py:callable")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ModelError(f"model file not found: {path} (from --model {spec!r})")
        mod_name = f"_auditor_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ModelError(f"cannot import module {target!r} from --model {spec!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            raise ModelError(f"{target} has no attribute {attr!r}{did_you_mean(attr, names)}")
        obj = getattr(obj, part)
    return obj


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _STATE_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ModelError(f"{path} holds a dict without a state_dict (keys: {keys}); "
                         f"expected tensors or one of {list(_STATE_KEYS)}")
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a state_dict")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain_message(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one plain line: no terminal escape codes, no line breaks, cut at a word."""
    text = " ".join(_ANSI.sub("", str(exc)).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def _load_failure(path: Path, exc: BaseException) -> str:
    """One complete line on why ``torch.load(path, weights_only=True)`` failed and what to do."""
    text = _ANSI.sub("", str(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f" (it needs the Python class {found.group(1)})"
        return (f"{path} holds pickled Python objects, not only tensors{what}: likely a whole model saved with "
                "torch.save(model), which auditor does not unpickle because torch.load with weights_only=True "
                "refuses to run code from a file; save the weights instead with "
                "torch.save(model.state_dict(), 'weights.pt') and pass --model (the architecture: a torchvision "
                "name or package.module:factory) with --weights weights.pt")
    return f"cannot load weights {path} with weights_only=True: {plain_message(exc)}"


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (Hugging Face's format: a JSON header and raw bytes, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"cannot read safetensors file {p}: {first[:300]} (is it complete, or still being "
                         "written?)") from None


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a weights file: ``.safetensors`` directly, anything else with
    ``torch.load(weights_only=True)`` (a state_dict, or a checkpoint dict holding one)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        return read_safetensors(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(_load_failure(p, exc)) from None
    return _extract_state_dict(obj, str(p))


def load_weights(module: nn.Module, path: str) -> str:
    """Load a state_dict (strict) into ``module``; return the file's sha256."""
    p = Path(path)
    state = read_state(p)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … (+{len(items) - 5} more)" if len(items) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {show(mismatched)}")
        raise ModelError(f"weights {p} do not fit model {type(module).__name__} — " + "; ".join(parts)
                         + ". Is the checkpoint for another architecture?")
    module.load_state_dict(state, strict=True)
    return sha256_file(p)


def _pickle_globals(path: Path) -> str:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        return str(exc)
    return ""


def _is_pickled_model(path: Path) -> bool:
    """A ``torch.save`` archive whose pickle needs classes (a whole model), not a TorchScript file."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    if any(n.endswith("/code/") or "/code/__torch__" in n for n in names):
        return False  # TorchScript
    return any(n.endswith("/data.pkl") for n in names) and "GLOBAL" in _pickle_globals(path)


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    """Build the model named by ``spec`` (on CPU, eval mode) and load ``weights``."""
    if not spec or not spec.strip():
        raise ModelError("no model given: pass --model (a torchvision name, module:callable or TorchScript file)")
    spec = spec.strip()
    file_hash = None
    info: dict[str, Any] = {}
    tv_names = None
    path_part = spec.split(":", 1)[0] if not spec.startswith(("/", ".")) or ":" in spec else spec
    if spec.startswith(TIMM_PREFIX):
        module, pre = _build_timm(spec)
        kind = "timm"
    elif ":" in spec and not Path(spec).is_file():
        factory = _import_callable(spec)
        if isinstance(factory, nn.Module):
            module = factory
        elif callable(factory):
            try:
                module = factory()
            except Exception as exc:
                raise ModelError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from None
        else:
            raise ModelError(f"{spec} is neither an nn.Module nor a callable returning one")
        if not isinstance(module, nn.Module):
            raise ModelError(f"{spec} returned {type(module).__name__}, expected a torch.nn.Module")
        kind = "callable"
        pre = Preprocessing(source="none given (model takes [0, 1] RGB unless --mean/--std)")
    elif Path(spec).is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated but still common
                module = torch.jit.load(spec, map_location="cpu")
        except Exception as exc:
            if _is_pickled_model(Path(spec)):
                raise ModelError(_load_failure(Path(spec), RuntimeError(_pickle_globals(Path(spec))))) from None
            raise ModelError(f"{spec} is not a TorchScript file ({plain_message(exc, 200)}); for a state_dict "
                             f"use --model ARCH --weights {spec}") from None
        kind = "torchscript"
        file_hash = sha256_file(spec)
        pre = Preprocessing(source="none given (TorchScript)")
    else:
        tv_names = torchvision_names()
        if spec not in tv_names:
            hint = did_you_mean(spec, tv_names)
            if Path(path_part).suffix in (".pt", ".pth", ".ts", ".py"):
                raise ModelError(f"model file not found: {path_part}")
            raise ModelError(f"unknown model {spec!r}{hint}: expected a torchvision architecture name, "
                             "package.module:callable, path/to/file.py:callable or a TorchScript file")
        import torchvision

        try:
            # Seeded, so random-weight audits are reproducible and every torchrun rank builds the same model.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                module = torchvision.models.get_model(spec, weights=None)
        except Exception as exc:
            raise ModelError(f"cannot build torchvision model {spec!r}: {exc}") from None
        kind = "torchvision"
        pre = _torchvision_preprocessing(spec)
    if weights:
        if kind == "torchscript":
            raise ModelError("--weights cannot be combined with a TorchScript model (its weights are inside it)")
        file_hash = load_weights(module, weights)
    elif kind in ("torchvision", "timm"):
        info["warning"] = "no --weights given: auditing randomly initialised weights"
    module.eval()
    n_params = sum(p.numel() for p in module.parameters())
    return LoadedModel(module=module, spec=spec, kind=kind, weights=str(weights) if weights else None,
                       file_sha256=file_hash, default_preprocessing=pre, n_parameters=n_params, info=info)


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


_CALL = re.compile(r"^(.+)_(\d+)$")


def layer_call(model: nn.Module, name: str) -> tuple[str, int]:
    """(module name, call index) of a layer name.

    A module that runs several times in one forward pass (torchvision's
    ``BasicBlock.relu``) is one layer per call, named as torchvision's
    feature_extraction names them: ``layer4.1.relu`` is the first call,
    ``layer4.1.relu_1`` the second, and so on. A module whose own name ends in
    ``_N`` is always that module.
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return name, 0
    m = _CALL.match(name or "")
    if m and m.group(1) in modules and int(m.group(2)) >= 1:
        return m.group(1), int(m.group(2))
    names = [n for n in modules if n]
    hint = did_you_mean(name, names)
    raise LayerError(f"model has no layer {name!r}{hint}; run `auditor layers MODEL` to list the layer names")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module behind a layer name (``name`` or ``name_N`` for its later calls)."""
    module_name, _ = layer_call(model, name)
    return dict(model.named_modules())[module_name]


def script_ancestor(model: nn.Module, module_name: str) -> str | None:
    """The nearest module above ``module_name`` (the model itself included) that is TorchScript, or None."""
    parts = module_name.split(".") if module_name else []
    modules = dict(model.named_modules())
    for i in range(len(parts) - 1, -1, -1):
        up = ".".join(parts[:i])
        if isinstance(modules.get(up), torch.jit.ScriptModule):
            return up
    return None


class _Tap(nn.Module):
    """An eager stand-in for a TorchScript submodule called from eager code, so a forward hook can run on it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not registered: the module tree keeps its names

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@contextlib.contextmanager
def hook_points(model: nn.Module, module_names: list[str], strict: bool = True):
    """{module name: the module to register a forward hook on}, for the duration of the block.

    An eager module is itself. A TorchScript module called from eager code is
    swapped for an eager stand-in that calls it (PyTorch runs no hooks on
    ScriptModules), put back afterwards. A module inside TorchScript code cannot
    be observed at all: with ``strict`` that is a :class:`ModelError` saying to
    pass the eager model; otherwise it is left out.
    """
    modules = dict(model.named_modules())
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    points: dict[str, nn.Module] = {}
    try:
        for name in dict.fromkeys(module_names):
            module = modules[name]
            inside = script_ancestor(model, name)
            if inside is not None:
                if not strict:
                    continue
                where = "the model" if inside == "" else f"module {inside!r}"
                raise ModelError(f"layer {name!r} runs inside TorchScript code ({where} is scripted or traced), "
                                 "where PyTorch allows no forward hooks; pass the eager model instead "
                                 "(--model package.module:factory or file.py:factory, with --weights for its "
                                 "state_dict)")
            if isinstance(module, torch.jit.ScriptModule):
                parent_name, _, child = name.rpartition(".")
                parent = modules[parent_name]
                tap = _Tap(module)
                parent._modules[child] = tap
                swapped.append((parent, child, module))
                points[name] = tap
            else:
                points[name] = module
        yield points
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module


@dataclass(frozen=True)
class LayerRow:
    """One line of ``auditor layers``: a layer name (a module, or a later call of one) and its output."""

    name: str
    type: str
    shape: tuple[int, ...] | None  # per sample; None: not a tensor, not run, or not observable
    calls: int  # how many times the module ran in one forward pass
    note: str = ""


def _shape_of(out) -> tuple[int, ...] | None:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[1:])
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return tuple(out[0].shape[1:])
    return None


@torch.no_grad()
def layer_shapes(model: nn.Module, sample: torch.Tensor) -> list[LayerRow]:
    """Every layer name with its module type, per-sample output shape and call count.

    A module that runs more than once gives one row per call (``name``, ``name_1``, …).
    """
    shapes: dict[str, list[tuple[int, ...] | None]] = {}
    hooks = []

    def make(name: str):
        def hook(_mod, _inp, out):
            shapes.setdefault(name, []).append(_shape_of(out))
        return hook

    names = module_names(model)
    was_training = model.training
    try:
        with hook_points(model, names, strict=False) as points:
            for name, point in points.items():
                hooks.append(point.register_forward_hook(make(name)))
            model.eval()
            try:
                model(sample)
            except Exception as exc:
                raise ModelError(f"a forward pass on a {tuple(sample.shape)} input failed: "
                                 f"{type(exc).__name__}: {plain_message(exc, 200)}") from None
            finally:
                for h in hooks:
                    h.remove()
    finally:
        model.train(was_training)
    rows: list[LayerRow] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        typ = getattr(mod, "original_name", None) if isinstance(mod, torch.jit.ScriptModule) else None
        typ = typ or type(mod).__name__
        if script_ancestor(model, name) is not None:
            rows.append(LayerRow(name, typ, None, 0, "inside TorchScript: not observable"))
            continue
        seen = shapes.get(name, [])
        note = f"runs {len(seen)}×: {name} is its first call" if len(seen) > 1 else ""
        rows.append(LayerRow(name, typ, seen[0] if seen else None, len(seen), note))
        for k in range(1, len(seen)):
            rows.append(LayerRow(f"{name}_{k}", typ, seen[k], len(seen), f"call {k + 1} of {name}"))
    return rows
