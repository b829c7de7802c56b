"""The embedded demo: a small CNN with a planted watermark shortcut and a synthetic probe set.

``auditor demo`` needs nothing else: :func:`make_probe_set` writes the probe images
and their concept labels, :func:`load_demo_model` returns the shipped model, and
``DEMO_LAYER`` / ``DEMO_ARTIFACTS`` say what to audit and which concepts to flag.
See docs/demo.md.
"""

from auditor.demo.data import (
    ARTIFACT_CONCEPTS,
    CONCEPT_GROUPS,
    CONCEPTS,
    DemoSet,
    Shortcut,
    generate,
    make_probe_set,
)
_MODEL_NAMES = (
    "CONTROL_WEIGHTS",
    "DEMO_ARTIFACTS",
    "DEMO_CLASSES",
    "DEMO_IMAGE_SIZE",
    "DEMO_LAYER",
    "DEMO_SHORTCUT_ARTIFACT",
    "DEMO_SHORTCUT_CLASS",
    "DEMO_WATERMARK_CHANNELS",
    "DEMO_WEIGHTS",
    "DemoNet",
    "images_to_tensor",
    "layer_means",
    "load_demo_model",
)


def __getattr__(name: str):
    # The model half imports torch; load it only when one of its names is used.
    if name in _MODEL_NAMES:
        from auditor.demo import model

        return getattr(model, name)
    raise AttributeError(f"module 'auditor.demo' has no attribute {name!r}")


__all__ = ["ARTIFACT_CONCEPTS", "CONCEPTS", "CONCEPT_GROUPS", "DemoSet", "Shortcut", "generate",
           "make_probe_set", *_MODEL_NAMES]
