"""Small helpers shared by several test files (imported directly, like report_fixtures)."""

from __future__ import annotations

# Prepended to a `python -c` script: any import of torch or torchvision fails, so the script
# proves that what it runs works from saved results alone.
NO_TORCH = ("import sys, importlib.abc\n"
            "class NoTorch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')\n"
            "sys.meta_path.insert(0, NoTorch())\n")


def collect_tensors(model, layers, images, **kw):
    """``auditor.collect`` on in-memory image tensors on the CPU (top_k 3, batch 4 unless given)."""
    from auditor.collect import TensorImages, collect

    kw.setdefault("top_k", 3)
    kw.setdefault("batch_size", 4)
    return collect(model, layers, TensorImages(images), transform=None, transform_desc={}, model_hash="m",
                   device="cpu", progress=False, **kw)
