"""``collect``: the probe set through the model into each layer's (N, K) activations,
cached on disk. Decides what the cache already holds, what to compute, and (under
``torchrun``) which rank computes what."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings as _warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import ProbeSet
from ..errors import AuditorWarning, ConfigError, DataError
from ..models import Preprocessing, resolve_layer
from .assemble import Assembler, load_final
from .batches import compute
from .cache import cache_key, cache_manifest, images_fingerprint, model_code
from .device import resolve_device, resolve_precision
from .files import atomic_write_text, chunk_valid, clean_stale_tmp, load_chunk, remove_scratch
from .capture import check_hookable, reuse_warning
from .load import TensorImages
from .reduce import normalise_layouts, normalise_reductions
from .result import Collected, make_result

DECODERS = ("pil", "device")
FINGERPRINTS = ("stat", "content")


def collect(model: nn.Module, layers: list[str], probe: ProbeSet | TensorImages, *, transform,
            transform_desc: dict[str, Any], model_hash: str, reduction: str | Mapping[str, str] = "mean",
            batch_size: int = 64, workers: int = 0, device: str = "auto", top_k: int = 9,
            cache_dir: Path | None = None, chunk_size: int = 2048, on_bad_image: str = "error",
            log: Callable[[str], None] = lambda m: None, progress: bool = True,
            precision: str = "float32", channels_last: bool = False, compile: bool | str = False,
            pin_memory: bool = True, prefetch_factor: int = 2, decode: str = "pil",
            preprocessing: Preprocessing | None = None, normalize: bool = True, fingerprint: str = "stat",
            distributed: bool | None = None, scratch_dir: Path | None = None,
            token_layout: str | Mapping[str, str] = "auto") -> Collected | None:
    """Run the model over the probe set and return each layer's (N, K) activations.

    Returns None on the ranks other than 0 of a distributed (torchrun) run.

    Keyword arguments beyond the original ones (all optional):

    - ``reduction``: a name for every layer, or ``{layer: name}`` (others: ``mean``).
      ``cls`` takes token 0 of a (B, T, D) output; linear (B, D) outputs need none.
    - ``precision``: ``float32`` (strict: TF32 off on CUDA), ``tf32``, ``bfloat16``,
      ``float16`` (autocast) or ``auto`` (float32 today: reduced precision changed demo flags,
      see :func:`resolve_precision`). Part of the cache key.
    - ``channels_last``: model and inputs in channels-last memory format (faster convs on GPUs).
    - ``compile``: ``torch.compile`` the model (True: inductor; or a backend name).
    - ``pin_memory``, ``prefetch_factor``: DataLoader settings (pinning only on CUDA;
      prefetching only with ``workers`` > 0, whose processes live for the whole run).
    - ``decode``: ``pil`` (in the DataLoader) or ``device`` (raw bytes in the loader,
      decoded and resized on the model's device: nvJPEG on CUDA); ``device`` needs
      ``preprocessing`` (and ``normalize``) instead of ``transform``.
    - ``fingerprint``: ``stat`` (paths, sizes, mtimes) or ``content`` (file hashes).
    - ``distributed``: None = follow torchrun's ``WORLD_SIZE``; False = single process.
      A distributed run needs ``cache_dir`` on storage every rank shares.
    - ``scratch_dir``: where the temporary arrays go when there is no cache folder.
    - ``token_layout``: where (B, T, D) token outputs hold the batch: ``auto`` (measured once
      per layer by a calibration pass at two batch sizes), ``batch_first`` or
      ``sequence_first`` (T, B, D); one for every layer or ``{layer: layout}``.

    A layer name is a module's dotted path (its first call in a forward pass) or
    ``name_N`` for its later calls (torchvision's naming). The model's code is part
    of the cache key; a model whose class source cannot be read is not cached
    (see :func:`~auditor.collect.cache.model_code`). ``Collected.warnings`` says so,
    and names modules that run more than once; each is also issued as an
    :class:`~auditor.errors.AuditorWarning` and passed to ``log``.
    """
    t0 = time.perf_counter()
    reductions = normalise_reductions(reduction, list(layers))
    layouts = normalise_layouts(token_layout, list(layers))
    _check_args(batch_size=batch_size, chunk_size=chunk_size, top_k=top_k, workers=workers,
                prefetch_factor=prefetch_factor, on_bad_image=on_bad_image, decode=decode,
                fingerprint=fingerprint, preprocessing=preprocessing)
    for name in layers:
        resolve_layer(model, name)
    check_hookable(model, list(layers))
    from .. import distributed as _dist

    wants_dist = _dist.is_distributed() if distributed is None else bool(distributed)
    if wants_dist and cache_dir is None:
        raise ConfigError(f"a distributed run (WORLD_SIZE={os.environ.get('WORLD_SIZE', '?')}) needs a cache "
                          "folder that every rank can read and write: pass --cache-dir on shared storage "
                          "(and do not pass --no-cache)")
    dev = resolve_device(device)
    dinfo = _dist.setup(dev.type) if wants_dist else None
    try:
        if dinfo is not None and dev.type == "cuda":
            dev = torch.device("cuda", dinfo.local_rank)
        result = _collect(model, list(layers), probe, reductions, layouts, dev, dinfo, t0, transform=transform,
                        transform_desc=transform_desc, model_hash=model_hash, batch_size=batch_size,
                        workers=workers, top_k=top_k, cache_dir=cache_dir, chunk_size=chunk_size,
                        on_bad_image=on_bad_image, log=log, progress=progress, precision=precision,
                        channels_last=channels_last, compile=compile, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor, decode=decode, preprocessing=preprocessing,
                        normalize=normalize, fingerprint=fingerprint, scratch_dir=scratch_dir)
        for w in result.warnings if result is not None else ():
            _warnings.warn(w, AuditorWarning, stacklevel=2)
        return result
    finally:
        if dinfo is not None:
            dinfo.teardown()


def _check_args(**kw) -> None:
    for name in ("batch_size", "chunk_size", "prefetch_factor"):
        if not isinstance(kw[name], int) or kw[name] < 1:
            raise ConfigError(f"{name} must be a positive integer, got {kw[name]!r}")
    for name in ("top_k", "workers"):
        if not isinstance(kw[name], int) or kw[name] < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {kw[name]!r}")
    choices = {"on_bad_image": ("error", "skip"), "decode": DECODERS, "fingerprint": FINGERPRINTS}
    for name, allowed in choices.items():
        if kw[name] not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {kw[name]!r}")
    if kw["decode"] == "device" and kw["preprocessing"] is None:
        raise ConfigError("decode='device' resizes and normalises on the device: pass preprocessing= "
                          "(the Preprocessing the transform was built from)")


def _collect(model, layers, probe, reductions, layouts, dev, dinfo, t0, *, transform, transform_desc, model_hash, batch_size,
             workers, top_k, cache_dir, chunk_size, on_bad_image, log, progress, precision, channels_last, compile,
             pin_memory, prefetch_factor, decode, preprocessing, normalize, fingerprint, scratch_dir):
    N = len(probe)
    if N == 0:
        raise DataError("the probe set has no images")
    precision = resolve_precision(precision, dev)
    main = dinfo is None or dinfo.is_main
    world = 1 if dinfo is None else dinfo.world
    warnings: list[str] = []
    code = model_code(model)
    if code.unreadable and cache_dir is not None:
        what = ", ".join(code.unreadable[:3]) + (f" and {len(code.unreadable) - 3} more" if len(code.unreadable) > 3
                                                  else "")
        if dinfo is not None:
            raise ConfigError(f"cannot read the source of {what}, so a change to the model's code could not be "
                              "detected in the shared activation cache a distributed run needs; define the model "
                              "in a .py file")
        warnings.append(f"activations not cached: cannot read the source of {what} (defined in a notebook or by "
                        "exec?), so a later change to that code could not be detected; define the model in a .py "
                        "file to cache them")
        log(f"warning: {warnings[-1]}")
        cache_dir = None
    images_fp = images_fingerprint(probe, fingerprint)
    manifest = cache_manifest(model, model_hash=model_hash, code=code, token_layouts=layouts, layers=layers,
                              reductions=reductions,
                              transform=transform, transform_desc=transform_desc, decode=decode, normalize=normalize,
                              images_fp=images_fp, fingerprint=fingerprint, n=N, top_k=top_k, precision=precision,
                              channels_last=channels_last, compile=compile, chunk_size=chunk_size)
    key = cache_key(manifest)
    if dinfo is not None:
        keys = dinfo.gather(key)
        if len(set(keys)) > 1:
            differ = [r for r, k in enumerate(keys) if k != keys[0]]
            raise ConfigError(f"ranks {differ} computed a different activation cache key than rank 0: they see "
                              "different weights, images or settings (a model with random weights differs per "
                              "rank: pass --weights)")

    scratch: Path | None = None
    lock = contextlib.nullcontext()
    if cache_dir is not None:
        folder = Path(cache_dir) / key
        if main:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot write the activation cache in {cache_dir}: {exc}; "
                                  "pass --cache-dir to a writable folder or --no-cache") from None
        if dinfo is None:  # one run at a time per cache entry; a second one waits, then reuses it
            lock = _KeyLock(folder, log)
    else:
        scratch = Path(tempfile.mkdtemp(prefix="auditor-activations-", dir=scratch_dir))
        folder = scratch
    chunks = [(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]

    def chunk_path(ci: int) -> Path:
        return folder / f"chunk-{ci:05d}.npz"

    def stamp(ci: int) -> dict[str, np.ndarray]:
        return {"key": np.asarray(key), "rows": np.asarray(chunks[ci], dtype=np.int64)}

    widths: dict[int, int] = {}

    def chunk_ok(chunk, ci: int) -> bool:
        """A chunk is reused only if it is readable (zip CRC), is this key's, holds chunk ci's
        rows, and its layer widths agree with the other reused chunks'."""
        start, stop = chunks[ci]
        if not chunk_valid(chunk, stop - start, len(layers)):
            return False
        if str(chunk.get("key", "")) != key or [int(v) for v in chunk.get("rows", [])] != [start, stop]:
            return False
        for li in range(len(layers)):
            if widths.setdefault(li, chunk[f"L{li}/values"].shape[1]) != chunk[f"L{li}/values"].shape[1]:
                return False
        return True

    try:
        with lock:
            if main and scratch is None:
                _write_key_manifest(folder, manifest, cache_dir)
                clean_stale_tmp(folder, all_of_them=dinfo is None)  # under the lock: nobody else writes here
            return _collect_locked(
                model, layers, probe, reductions, dev, dinfo, t0, N, main, world, key, manifest, images_fp, folder,
                scratch, chunks, chunk_path, stamp, chunk_ok, warnings, layouts, transform=transform, batch_size=batch_size,
                workers=workers, top_k=top_k, on_bad_image=on_bad_image, log=log, progress=progress,
                precision=precision, channels_last=channels_last, compile=compile, pin_memory=pin_memory,
                prefetch_factor=prefetch_factor, decode=decode, preprocessing=preprocessing, normalize=normalize)
    except OSError as exc:
        if exc.filename is None:  # np.save / pwrite say "No space left on device" without the path
            raise OSError(exc.errno, exc.strerror or str(exc), str(folder)) from exc
        raise
    finally:
        if scratch is not None:
            remove_scratch(scratch)


def _reuse_warnings(model, layers: dict, log) -> list[str]:
    out = [w for name, la in layers.items() if (w := reuse_warning(model, name, la.calls))]
    for w in out:
        log(f"warning: {w}")
    return out


class _KeyLock:
    """``<key>/.lock`` (filelock): held while a run reads or writes one cache entry."""

    def __init__(self, folder: Path, log):
        from filelock import FileLock

        self.lock = FileLock(str(folder / ".lock"))
        self.folder, self.log = folder, log

    def __enter__(self):
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            self.log(f"waiting for another auditor run that is computing the same activations in {self.folder}")
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _write_key_manifest(folder: Path, manifest: dict[str, Any], cache_dir) -> None:
    """Write the key's manifest unless it is there already (keeping the commit's ``final`` record)."""
    path = folder / "manifest.json"
    try:
        old = json.loads(path.read_text())
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "final"} == json.loads(
                json.dumps(manifest, sort_keys=True, default=str)):
            return
    except (OSError, ValueError):
        pass
    try:
        atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    except OSError as exc:
        raise ConfigError(f"cannot write the activation cache in {cache_dir}: {exc}; "
                          "pass --cache-dir to a writable folder or --no-cache") from None


def _collect_locked(model, layers, probe, reductions, dev, dinfo, t0, N, main, world, key, manifest, images_fp,
                    folder, scratch, chunks, chunk_path, stamp, chunk_ok, warnings, layouts, *, transform, batch_size, workers, top_k,
                    on_bad_image, log, progress, precision, channels_last, compile, pin_memory, prefetch_factor,
                    decode, preprocessing, normalize):
    # -- a committed result: reuse it, once it is verified
    problems: list[str] = []
    final = load_final(folder, layers, N, problems=problems) if (main and scratch is None) else None
    if problems:
        log(f"activation cache in {folder} not used: {problems[0]}; recomputing")
        (folder / "summary.npz").unlink(missing_ok=True)  # never served again
    if dinfo is not None:
        hit = dinfo.broadcast(final is not None)
        sees = (folder / "manifest.json").is_file()
        seen = dinfo.gather(sees)
        if not all(seen):
            raise ConfigError(f"ranks {[r for r, s in enumerate(seen) if not s]} cannot see the cache folder "
                              f"{folder} written by rank 0; every rank needs the same shared --cache-dir")
        if hit and not main:
            return None
    if final is not None:
        log(f"activation cache hit: {N} images × {len(layers)} layer(s) reused from {folder} (checksums verified)")
        return make_result(final, probe, on_bad_image, dev, precision, batch_size, world, t0, 0,
                           {"status": "hit", "key": key, "dir": str(folder), "chunks": len(chunks),
                            "reused": len(chunks), "images_fingerprint": images_fp},
                           warnings=warnings + _reuse_warnings(model, final[0], log))

    # -- chunks: reuse the committed ones, compute the rest (this rank's share)
    mine = list(range(len(chunks))) if dinfo is None else dinfo.shard(list(range(len(chunks))))
    reused: list[int] = []
    todo: list[int] = []
    rejected: list[int] = []
    for ci in mine:
        path = chunk_path(ci)
        if scratch is None and path.exists():
            if chunk_ok(load_chunk(path), ci):
                reused.append(ci)
                continue
            rejected.append(ci)
        todo.append(ci)
    if rejected and main:
        log(f"activation cache: {len(rejected)} chunk(s) in {folder} unreadable, from elsewhere or inconsistent "
            f"(chunk {rejected[0]}{' …' if len(rejected) > 1 else ''}); recomputing them")
    n_reused_all = len(reused) if dinfo is None else sum(dinfo.gather(len(reused)))
    if main and scratch is None:
        if n_reused_all:
            log(f"activation cache partial: {n_reused_all}/{len(chunks)} chunk(s) reused from {folder}"
                + (f"; computing the rest across {world} ranks" if dinfo else ""))
        else:
            log(f"activation cache miss: computing {N} images into {folder}"
                + (f" across {world} ranks" if dinfo else ""))

    asm = Assembler(folder, layers, N, top_k, manifest) if dinfo is None else None
    try:
        if asm is not None:
            for ci in list(reused):
                chunk = load_chunk(chunk_path(ci))
                if not chunk_ok(chunk, ci):  # changed or deleted since it was checked: compute it instead
                    log(f"activation cache: chunk {ci} in {folder} changed or vanished while being read; "
                        "recomputing it")
                    reused.remove(ci)
                    todo.append(ci)
                    continue
                asm.add(chunks[ci][0], chunk)
            todo.sort()
        n_todo = sum(chunks[ci][1] - chunks[ci][0] for ci in todo)
        compute_s, batch_used = compute(model, layers, reductions, probe, transform, dev, chunks, todo, asm, folder,
                                        scratch is None, precision=precision, channels_last=channels_last,
                                        compiled=compile, batch_size=batch_size, workers=workers,
                                        pin_memory=pin_memory, prefetch_factor=prefetch_factor, top_k=top_k,
                                        decode=decode, preprocessing=preprocessing, normalize=normalize,
                                        on_bad_image=on_bad_image, log=log, progress=progress and main,
                                        chunk_path=chunk_path, n_todo=n_todo, token_layouts=layouts, stamp=stamp)
        n_reused = len(reused)
        if dinfo is not None:
            counts = dinfo.gather((n_todo, len(reused)))
            n_done, n_reused = sum(c[0] for c in counts), sum(c[1] for c in counts)
            dinfo.barrier()  # every rank's chunks are on disk
            if not main:
                return None
            asm = Assembler(folder, layers, N, top_k, manifest)
            for ci, (start, _stop) in enumerate(chunks):
                chunk = load_chunk(chunk_path(ci))
                if not chunk_ok(chunk, ci):
                    raise DataError(f"chunk {ci} of the activation cache {folder} is missing, unreadable or not "
                                    "this run's after every rank finished: is --cache-dir on storage all ranks "
                                    "share, and no other run writing to it?")
                asm.add(start, chunk)
        else:
            n_done = n_todo
        asm.commit()
    except BaseException:
        if asm is not None:
            asm.abort()
        raise
    for ci in range(len(chunks)):
        chunk_path(ci).unlink(missing_ok=True)
    final = load_final(folder, layers, N, verify=False, problems=problems)  # just written and hashed
    if final is None:
        raise DataError(f"the activation cache {folder} could not be read back after writing it "
                        f"({problems[-1] if problems else 'no committed result'}); is the disk full, or is another "
                        "process changing it?")
    status = "partial" if n_reused else ("miss" if scratch is None else "off")
    return make_result(final, probe, on_bad_image, dev, precision, batch_used, world, t0, n_done,
                       {"status": status, "key": key, "dir": None if scratch else str(folder),
                        "chunks": len(chunks), "reused": n_reused, "images_fingerprint": images_fp},
                       compute_seconds=compute_s if dinfo is None else time.perf_counter() - t0,
                       warnings=warnings + _reuse_warnings(model, final[0], log))


def clear_cache(cache_dir: Path) -> None:
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
