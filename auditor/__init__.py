"""auditor: neuron-by-neuron audits of PyTorch image models."""

__version__ = "0.1.0"

__all__ = ["__version__", "audit", "compare", "load"]


def __getattr__(name: str):
    # The API pulls in numpy, pydantic and (when auditing) torch: load it on first use.
    if name in ("audit", "load"):
        from . import api

        return getattr(api, name)
    if name == "compare":  # the module auditor.compare is callable: auditor.compare(old, new)
        import importlib

        return importlib.import_module(".compare", __name__)
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")
