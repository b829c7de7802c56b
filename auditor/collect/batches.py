"""Computing chunks of the probe set: batches through the model, reductions, top-k,
out-of-memory backoff."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError, LayerError, ModelError
from .capture import capture, forward_until
from .decode import decode_on_device
from .device import autocast, is_channels_last, numerics
from .files import atomic_savez
from .load import ProbeImages, collate
from .calibrate import calibrate
from .reduce import reduce_layer_output
from .topk import TopK

class BatchPlan:
    """Batches (lists of probe rows) of the chunks to compute, never crossing a chunk boundary;
    usable as a DataLoader ``batch_sampler``. ``with_chunks()`` yields (chunk, rows)."""

    def __init__(self, chunks: list[tuple[int, int]], todo: list[int], batch_size: int):
        self.chunks, self.todo, self.batch_size = chunks, todo, batch_size

    def with_chunks(self) -> Iterator[tuple[int, list[int]]]:
        for ci in self.todo:
            start, stop = self.chunks[ci]
            for s in range(start, stop, self.batch_size):
                yield ci, list(range(s, min(s + self.batch_size, stop)))

    def __iter__(self) -> Iterator[list[int]]:
        return (rows for _, rows in self.with_chunks())

    def __len__(self) -> int:
        return sum(math.ceil((self.chunks[ci][1] - self.chunks[ci][0]) / self.batch_size) for ci in self.todo)


class Runner:
    """Computes chunks: forward passes, reductions, top-k, out-of-memory backoff."""

    def __init__(self, model, layers, reductions, probe, transform, dev, *, precision, channels_last, compiled,
                 batch_size, workers, pin_memory, prefetch_factor, top_k, decode, preprocessing, normalize,
                 on_bad_image, log, bar, token_layouts=None):
        self.model, self.layers, self.reductions = model, layers, reductions
        self.token_layouts = token_layouts or {name: "auto" for name in layers}
        self.layouts: dict[str, str] | None = None  # per layer, measured once by calibrate()
        self.calls: dict[str, int] = {}  # per layer: how often its module runs in one forward pass
        self.probe, self.transform, self.dev = probe, transform, dev
        self.precision, self.channels_last, self.compiled = precision, channels_last, compiled
        self.batch_size, self.micro = batch_size, batch_size
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor
        self.top_k, self.decode, self.preprocessing, self.normalize = top_k, decode, preprocessing, normalize
        self.on_bad_image, self.log, self.bar = on_bad_image, log, bar
        self.images_done = 0

    def loader(self, plan: BatchPlan) -> DataLoader:
        raw = self.decode == "device"
        ds = ProbeImages(self.probe, None if raw else self.transform, raw=raw)
        # One loader spans every chunk of the run, so its worker processes start once and
        # live until the last batch (what persistent_workers gives across epochs).
        kw: dict[str, Any] = {}
        if self.workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        return DataLoader(ds, batch_sampler=plan, num_workers=self.workers,
                          collate_fn=functools.partial(collate, stack=not raw),
                          pin_memory=self.pin_memory and self.dev.type == "cuda", **kw)

    @torch.inference_mode()
    def run(self, chunks: list[tuple[int, int]], todo: list[int],
            on_chunk: Callable[[int, dict[str, np.ndarray]], None]) -> None:
        if not todo:
            return
        plan = BatchPlan(chunks, todo, self.batch_size)
        forward = self.model
        if self.compiled:
            backend = self.compiled if isinstance(self.compiled, str) else "inductor"
            forward = torch.compile(self.model, backend=backend)
        cur: int | None = None
        state: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(numerics(self.precision, self.dev))
            self.forward = forward
            for (ci, rows_all), (x, rows, failed) in zip(plan.with_chunks(), self.loader(plan)):
                if ci != cur:
                    if cur is not None:
                        on_chunk(cur, self._finish(state))
                    cur = ci
                    state = self._begin(*chunks[ci])
                for i, why in failed:
                    state["bad"].append((i, why))
                    if self.on_bad_image == "error":
                        raise DataError(f"cannot read image {self.probe.root / self.probe.paths[i]}: {why}; fix or "
                                        "remove it, or set on_bad_image: skip to leave unreadable images out")
                if self.decode == "device" and x:
                    # decode_jpeg takes the bytes on the CPU, whatever device decodes them
                    x, rows, more = decode_on_device(x, rows, self.dev, self.preprocessing, self.normalize)
                    for i, why in more:
                        state["bad"].append((i, why))
                        if self.on_bad_image == "error":
                            raise DataError(f"cannot read image {self.probe.root / self.probe.paths[i]}: {why}; "
                                            "fix or remove it, or set on_bad_image: skip")
                elif self.decode == "device":
                    x = None
                if x is not None and len(rows):
                    if self.layouts is None:
                        self.calibrate(x)
                        self.store = stack.enter_context(
                            capture(self.model, self.layers, stop_early=True, process=self._in_hook))
                    self._batch(x, rows, state)
                self.images_done += len(rows)
                self.bar.update(len(rows_all))
            if cur is not None:
                on_chunk(cur, self._finish(state))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dev, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run_model(self, forward, x: torch.Tensor) -> None:
        try:
            with autocast(self.precision, self.dev):
                forward_until(forward, x)
        except (DataError, LayerError, ModelError, torch.OutOfMemoryError):
            raise
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the model's forward pass failed on a batch of shape {tuple(x.shape)}: "
                             f"{msg[:300]} — check --resize/--crop and the model's expected input") from None

    def calibrate(self, x: torch.Tensor) -> None:
        """Once per run, before the first batch: see :func:`.calibrate.calibrate`."""
        self.layouts, self.calls = calibrate(self.model, self.layers, x[:1], self.token_layouts, prepare=self._prepare,
                                             run=lambda xb: self._run_model(self.model, xb), dev=self.dev)

    def _in_hook(self, name: str, out: Any):
        """Runs inside the forward hook: reduce and take the top-k candidates' maps before anything later in the
        forward pass can change ``out`` in place."""
        with torch.autocast(device_type=out.device.type, enabled=False) if isinstance(out, torch.Tensor) \
                else contextlib.nullcontext():
            values, maps, kind, shape = reduce_layer_output(out, name, self.reductions[name], self.layouts[name])
            if values.shape[0] != self.rows.shape[0]:
                raise LayerError(f"layer {name!r} gave {values.shape[0]} rows for a batch of {self.rows.shape[0]} "
                                 f"images (output shape {tuple(out.shape)}); check token_layout for this layer")
            proposal = self.state["tops"][name].propose(values, self.rows, maps)
        return values, proposal, kind, shape

    def _begin(self, start: int, stop: int) -> dict[str, Any]:
        return {"start": start, "n": stop - start, "values": {}, "meta": {},
                "tops": {name: TopK(self.top_k) for name in self.layers},
                "ok": torch.zeros(stop - start, dtype=torch.bool, device=self.dev), "bad": []}

    def _batch(self, x: torch.Tensor, rows: list[int], state: dict[str, Any]) -> None:
        x = self._prepare(x)
        rows_t = torch.as_tensor(rows, dtype=torch.long).to(self.dev, non_blocking=True)
        pos, B = 0, x.shape[0]
        while pos < B:
            bs = min(self.micro, B - pos)
            try:
                proposal = self._forward(x[pos:pos + bs], rows_t[pos:pos + bs], state)
            except torch.OutOfMemoryError:
                self.store.clear()
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                if bs <= 1:
                    raise ModelError(f"out of memory on {self.dev} even with a batch of one image; audit an "
                                     "earlier layer, use a smaller input size or precision bfloat16") from None
                self.micro = max(1, bs // 2)
                self.log(f"out of memory on {self.dev} with a batch of {bs} images; continuing with batches "
                         f"of {self.micro}")
                continue
            self._commit(proposal, rows_t[pos:pos + bs], state)
            pos += bs

    def _forward(self, x: torch.Tensor, rows: torch.Tensor, state: dict[str, Any]):
        self.store.clear()
        self.rows, self.state = rows, state
        try:
            self._run_model(self.forward, x)
            out = {}
            for name in self.layers:
                if name not in self.store:
                    raise LayerError(f"layer {name!r} was not called during the forward pass; pick a layer "
                                     "that the model's forward uses")
                out[name] = self.store[name]
        finally:
            self.store.clear()
            self.rows = self.state = None
        return out

    def _commit(self, proposal, rows: torch.Tensor, state: dict[str, Any]) -> None:
        local = rows - state["start"]
        for name, (values, top, kind, shape) in proposal.items():
            if name not in state["values"]:
                state["values"][name] = torch.full((state["n"], values.shape[1]), float("nan"),
                                                   dtype=torch.float32, device=self.dev)
                state["meta"][name] = (kind, shape)
            elif state["values"][name].shape[1] != values.shape[1]:
                raise LayerError(f"layer {name!r} gave {values.shape[1]} neurons on one batch and "
                                 f"{state['values'][name].shape[1]} on another")
            state["values"][name][local] = values
            state["tops"][name].commit(top)
        state["ok"][local] = True

    def _finish(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        ok = state["ok"].cpu().numpy()
        bad = state["bad"]
        chunk: dict[str, np.ndarray] = {"ok": ok, "bad_index": np.asarray([i for i, _ in bad], dtype=np.int64),
                                        "bad_reason": np.asarray([r for _, r in bad], dtype=str)}
        start, n = state["start"], state["n"]
        for li, name in enumerate(self.layers):
            if name not in state["values"]:  # every image in the chunk was unreadable
                raise DataError(f"no image between rows {start} and {start + n} could be read")
            values = state["values"][name].cpu().numpy()
            if not np.isfinite(values[ok]).all():
                raise ModelError(f"layer {name!r} produced non-finite activations (inf or NaN) on images "
                                 f"{start}–{start + n - 1}" + (f" at precision {self.precision}; use float32 or "
                                                               "bfloat16" if self.precision == "float16" else ""))
            kind, shape = state["meta"][name]
            chunk[f"L{li}/values"] = values
            chunk[f"L{li}/shape"] = np.asarray(shape, dtype=np.int64)
            chunk[f"L{li}/kind"] = np.asarray(kind)
            chunk[f"L{li}/reduction"] = np.asarray(self.reductions[name] if kind != "linear" else "none")
            chunk[f"L{li}/layout"] = np.asarray(self.layouts[name])
            chunk[f"L{li}/calls"] = np.asarray(self.calls[name], dtype=np.int64)
            for key, v in state["tops"][name].numpy().items():
                chunk[f"L{li}/{key}"] = v
        return chunk


def compute(model, layers, reductions, probe, transform, dev, chunks, todo, asm, folder, keep_chunks, *,
             precision, channels_last, compiled, batch_size, workers, pin_memory, prefetch_factor, top_k, decode,
             preprocessing, normalize, on_bad_image, log, progress, chunk_path, n_todo,
             token_layouts=None, stamp: Callable[[int], dict[str, np.ndarray]] | None = None
             ) -> tuple[float, int]:
    """Compute ``todo`` chunks; each goes to its chunk file (cache) and/or the assembler."""
    if not todo:
        return 0.0, batch_size
    from tqdm.auto import tqdm

    t = time.perf_counter()
    model = model.to(dev)
    restore_format = channels_last and not is_channels_last(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    bar = tqdm(total=n_todo, desc="activations", unit="img", disable=not progress, file=sys.stderr, leave=False)
    runner = Runner(model, layers, reductions, probe, transform, dev, precision=precision,
                     channels_last=channels_last, compiled=compiled, batch_size=batch_size, workers=workers,
                     pin_memory=pin_memory, prefetch_factor=prefetch_factor, top_k=top_k, decode=decode,
                     preprocessing=preprocessing, normalize=normalize, on_bad_image=on_bad_image, log=log, bar=bar,
                     token_layouts=token_layouts)

    def on_chunk(ci: int, chunk: dict[str, np.ndarray]) -> None:
        if keep_chunks:  # stamped with the cache key and its rows: a chunk copied elsewhere is not reused
            atomic_savez(chunk_path(ci), **chunk, **(stamp(ci) if stamp else {}))
        if asm is not None:
            asm.add(chunks[ci][0], chunk)

    try:
        runner.run(chunks, todo, on_chunk)
    finally:
        bar.close()
        if restore_format:
            model.to(memory_format=torch.contiguous_format)
    return time.perf_counter() - t, runner.micro
