"""Collecting layers' activations over the probe set.

One forward pass per batch, with forward hooks on the audited layers that stop
the pass once every one of them has produced its output. Each layer's output is
reduced on the device inside its hook (before later in-place operations can change
it), so only N×K numbers come back. A layer is a module's call: ``name`` is its first
call in a forward pass, ``name_1`` its second (torchvision's naming). While collecting, a
streaming top-k of the most-activating images per neuron is kept, with their
spatial maps, so the report needs no second pass.

The package, one concern per file:

================  ===================================================================
``run.py``        :func:`collect`: cache hit, resume or compute; distributed ranks
``batches.py``    computing chunks: batches through the model, out-of-memory backoff
``calibrate.py``  before the first batch: calls per module, each output's batch axis
``capture.py``    forward hooks on the audited layers (reducing inside the hook)
``reduce.py``     reductions (registered by name), layer kinds, token layout, maps
``topk.py``       the streaming top-k of most-activating images per neuron
``load.py``       transforms and the datasets that read probe images into tensors
``decode.py``     decoding raw image bytes on the model's device (nvJPEG on CUDA)
``device.py``     device, precision (autocast, TF32) and memory format
``cache.py``      the cache key: what decides the numbers (:func:`cache_manifest`)
``files.py``      atomic files, chunk files, temp and scratch cleanup
``assemble.py``   the committed result: ``values-NNN.npy`` + ``summary.npz``
``result.py``     what comes back: :class:`Collected`, :class:`LayerActivations`
================  ===================================================================

Storage. Work is done in chunks of ``chunk_size`` images; with a cache folder each
chunk is written atomically as it completes (the unit of resume: an interrupted
run continues from the last completed chunk, and a torn write is never read as
data). When every chunk is done, each layer's (N, K) float32 array is assembled
into ``values-NNN.npy`` and a ``summary.npz`` (read/unread images, top-k) is
written last, as the commit marker; the chunk files are then removed. Results
come back as read-only memory maps, so host memory does not grow with N. Without
a cache folder the same happens in a temporary folder that is removed at once
(the open memory maps keep their data on POSIX systems).

Throughput options: ``precision`` (autocast to bfloat16/float16, or TF32),
``channels_last``, pinned memory with non-blocking copies, one DataLoader for the
whole run (workers start once; ``prefetch_factor``), optional ``torch.compile``,
decoding JPEGs on the device (``decode="device"``: nvJPEG on CUDA), and an
out-of-memory backoff that halves the batch and carries on.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) chunks are sharded across
ranks round robin; each rank writes its chunks into the shared cache folder; after
a barrier rank 0 assembles them and returns the result, the other ranks return
``None``. See :mod:`auditor.distributed`.
"""

from .cache import (CACHE_FORMAT, ModelCode, architecture_hash, cache_key, cache_manifest, content_fingerprint,
                    model_code, state_hash)
from .capture import StopForward, capture, forward_until
from .device import PRECISIONS, resolve_device, resolve_precision
from .load import ProbeImages, TensorImages, build_transform
from .reduce import (MAX_MAP_SIDE, MAX_PREFIX_TOKENS, REDUCTION_KINDS, REDUCTIONS, TOKEN_LAYOUTS, batch_axis,
                     layer_kind, patch_grid, reduce_output, register_reduction)
from .result import Collected, LayerActivations
from .run import DECODERS, FINGERPRINTS, clear_cache, collect
from .topk import TopK

__all__ = ["CACHE_FORMAT", "DECODERS", "FINGERPRINTS", "MAX_MAP_SIDE", "MAX_PREFIX_TOKENS", "PRECISIONS",
           "REDUCTIONS", "REDUCTION_KINDS", "TOKEN_LAYOUTS", "Collected", "LayerActivations", "ModelCode",
           "ProbeImages", "StopForward", "TensorImages", "TopK", "architecture_hash", "batch_axis",
           "build_transform", "cache_key", "cache_manifest", "capture", "clear_cache", "collect",
           "content_fingerprint", "forward_until", "layer_kind", "model_code", "patch_grid", "reduce_output",
           "register_reduction", "resolve_device", "resolve_precision", "state_hash"]
