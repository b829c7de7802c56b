"""The activation cache key: everything that decides the numbers, in one manifest.

:func:`cache_manifest` is the one place that says what the key covers: the
weights, the model's code (:func:`model_code`: the source of every class in the
module tree, TorchScript code; torch and torchvision versions), the layers and
their reductions and token layouts, the transform, precision, the images, and the
auditor version. The key is a hash of the manifest, and the manifest is written
next to the cached arrays.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import ProbeSet
from .reduce import MAX_MAP_SIDE, MAX_PREFIX_TOKENS

CACHE_FORMAT = 4  # 3: outputs reduced inside the hook, token layout measured once per layer;
                  # 4: chunks stamped with their key and rows, committed arrays with sha256

def state_hash(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers: :func:`auditor.models.state_dict_sha256` (names
    sorted, dtypes, shapes, bytes) -- the same digest page 1 shows for a model without a weights file."""
    from ..models import state_dict_sha256

    return state_dict_sha256(model)


def architecture_hash(model: nn.Module) -> str:
    """sha256 of what the weights do not show: the module tree with its hyperparameters
    (strides, activations, …), the model's class, and TorchScript code."""
    h = hashlib.sha256()
    cls = type(model)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    h.update(repr(model).encode())
    code = getattr(model, "code", None)
    if isinstance(code, str):
        h.update(code.encode())
    return h.hexdigest()


def cache_key(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:24]


def content_fingerprint(probe: ProbeSet) -> str:
    """sha256 over every image file's bytes (and its relative path): stricter than size + mtime."""
    h = hashlib.sha256(b"content\n")
    for rel in probe.paths:
        f = hashlib.sha256()
        with open(probe.root / rel, "rb") as fh:
            while block := fh.read(1 << 20):
                f.update(block)
        h.update(f"{rel}\0{f.hexdigest()}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelCode:
    """A hash of the code a model runs, and the classes whose source could not be read."""

    sha256: str
    unreadable: list[str] = field(default_factory=list)


#: Packages whose code the versions in the key stand for (their classes are not read one by one).
VERSIONED = ("torch", "torchvision")


def _source_file_hash(cls: type) -> str:
    """sha256 of the file that defines ``cls`` (helpers and constants its forward uses live there too)."""
    try:
        path = inspect.getsourcefile(cls)
        if path:
            with open(path, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()
    except (OSError, TypeError):
        pass
    return ""


def _code_digest(code: types.CodeType) -> str:
    """A deterministic digest of compiled code: bytecode, names and constants (nested code included)."""
    parts = [code.co_code.hex(), repr(code.co_names), repr(code.co_varnames)]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            parts.append(_code_digest(c))
        elif isinstance(c, frozenset):
            parts.append(repr(sorted(repr(v) for v in c)))  # set order follows string hashing: sort
        else:
            parts.append(repr(c))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _functions(namespace: dict) -> list[tuple[str, types.CodeType]]:
    """(name, code) of the functions in a class or instance ``__dict__`` (methods, static/class methods)."""
    out = []
    for name in sorted(namespace):
        f = namespace[name]
        f = getattr(f, "__func__", f)  # staticmethod, classmethod, bound method
        code = getattr(f, "__code__", None)
        if isinstance(code, types.CodeType):
            out.append((name, code))
    return out


def model_code(model: nn.Module) -> ModelCode:
    """What the weights do not show: the code of every module in the tree.

    For an eager module, the source of its class and of every base class outside
    torch/torchvision (whose versions are in the key), and the file that defines
    it; also the compiled code of their methods and of functions set on the
    instance (``module.forward = …``), so a method replaced at run time counts too.
    For a TorchScript module, the code of its methods. A class whose source
    cannot be read (defined in a notebook cell or by ``exec``) is listed in
    ``unreadable``: a change to it could not be seen, so such a model is not cached.
    """
    h = hashlib.sha256()
    unreadable: list[str] = []
    seen: set[Any] = set()
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):
            h.update(f"script {getattr(m, 'original_name', type(m).__name__)}\n".encode())
            try:
                for name in m._c._method_names():
                    h.update(m._c._get_method(name).code.encode())
            except (AttributeError, RuntimeError):
                code = getattr(m, "code", None)
                h.update(str(code).encode())
            continue
        for name, code in _functions(vars(m)):  # e.g. a forward replaced on this instance
            h.update(f"instance {name} {_code_digest(code)}\n".encode())
        for cls in type(m).__mro__:
            if cls in seen or cls is object:
                continue
            seen.add(cls)
            where = f"{cls.__module__}.{cls.__qualname__}"
            if (cls.__module__ or "").split(".")[0] in VERSIONED:
                h.update(f"class {where}\n".encode())
                continue
            try:
                src = inspect.getsource(cls)
            except (OSError, TypeError):
                unreadable.append(where)
                continue
            h.update(f"class {where}\n{src}\n{_source_file_hash(cls)}\n".encode())
            for name, code in _functions(vars(cls)):
                h.update(f"method {name} {_code_digest(code)}\n".encode())
    return ModelCode(h.hexdigest(), unreadable)


def versions() -> dict[str, str]:
    """torch, torchvision and auditor versions: the code that is not the model's."""
    from .. import __version__

    out = {"torch": torch.__version__, "auditor": __version__}
    tv = sys.modules.get("torchvision")
    if tv is None:
        try:
            import torchvision as tv
        except ImportError:  # pragma: no cover
            tv = None
    out["torchvision"] = getattr(tv, "__version__", None)
    return out


def images_fingerprint(probe, fingerprint: str) -> str:
    """The images' part of the key: paths, sizes and mtimes (``stat``) or file hashes (``content``)."""
    if fingerprint == "content" and isinstance(probe, ProbeSet):
        return content_fingerprint(probe)
    return probe.image_fingerprint()


def cache_manifest(model: nn.Module, *, model_hash: str, code: ModelCode, layers: list[str],
                   reductions: dict[str, str], token_layouts: dict[str, str], transform,
                   transform_desc: dict[str, Any], decode: str, normalize: bool, images_fp: str, fingerprint: str,
                   n: int, top_k: int, precision: str, channels_last: bool, compile: bool | str,
                   chunk_size: int) -> dict[str, Any]:
    """Everything that decides the cached numbers; the cache key is :func:`cache_key` of this."""
    return {"format": CACHE_FORMAT, "model": model_hash, "architecture": architecture_hash(model),
            "code": code.sha256, "versions": versions(), "token_layout": token_layouts,
            "layers": list(layers), "reduction": reductions, "transform": transform_desc,
            "transform_repr": repr(transform), "decode": decode, "normalize": normalize if decode == "device"
            else None, "images": images_fp, "fingerprint": fingerprint, "n": n, "top_k": top_k,
            "precision": precision, "channels_last": bool(channels_last), "compile": compile or False,
            "torch": torch.__version__.split("+")[0], "chunk_size": chunk_size, "max_map_side": MAX_MAP_SIDE,
            "max_prefix_tokens": MAX_PREFIX_TOKENS}
