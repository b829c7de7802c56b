"""The most-activating images per neuron: a streaming top-k, and merging several top-k's."""

from __future__ import annotations

import numpy as np
import torch

from .reduce import MapSource

_LOW32 = 0xFFFFFFFF


def _top_rows(values: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (k, K) of each column's k best rows: value descending, ties by the lower
    probe index.

    Float32-representable values without NaN: one ``topk`` on a packed int64 key
    (order-preserving value bits high, the complement of the probe index low) -- unique
    per row, so the order is exact and needs no sort of the whole column. Otherwise two
    stable argsorts (index, then value)."""
    fits = values.dtype in (torch.float16, torch.bfloat16, torch.float32) and bool((idx <= _LOW32).all()) \
        and bool((idx >= 0).all()) and not bool(torch.isnan(values).any())
    if not fits:
        order = torch.argsort(idx, dim=0, stable=True)
        order = torch.gather(order, 0, torch.argsort(-torch.gather(values, 0, order), dim=0, stable=True))
        return order[:k]
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64) & _LOW32  # -0.0 -> +0.0 first
    neg = bits >= 0x80000000
    # order-preserving float32 -> [0, 2**32): negative: flip all bits; else set the sign bit
    ordered = torch.where(neg, _LOW32 - bits, bits + 0x80000000)
    key = (ordered - 0x80000000) * (1 << 32) + (_LOW32 - idx)  # fits int64; unique per (value, row)
    return torch.topk(key, k, dim=0, largest=True, sorted=True).indices


class TopK:
    """Streaming top-k rows per neuron (values, probe indices, optional maps).

    Order: highest value first, ties by the lower probe index, so the result does
    not depend on batch or chunk boundaries. :meth:`propose` computes the next state
    without changing this one; :meth:`commit` adopts it (an out-of-memory retry can
    drop a proposal).
    """

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # (k', K)
        self.index: torch.Tensor | None = None  # (k', K) int64
        self.maps: torch.Tensor | None = None  # (k', K, h, w) float32

    def propose(self, values: torch.Tensor, index: torch.Tensor, maps: MapSource | torch.Tensor | None):
        if self.k == 0:
            return None
        # values (B, K); index (B,) probe rows
        idx = index.view(-1, 1).expand_as(values)
        kprev = 0 if self.values is None else self.values.shape[0]
        if kprev:
            values = torch.cat([self.values, values])
            idx = torch.cat([self.index, idx])
        k = min(self.k, values.shape[0])
        sel = _top_rows(values, idx, k)
        new_maps = None
        if maps is not None:
            K = values.shape[1]
            cols = torch.arange(K, device=sel.device).view(1, -1)
            from_batch = (sel - kprev).clamp_min(0)
            if isinstance(maps, torch.Tensor):
                fresh = maps[from_batch, cols].float()
            else:
                fresh = maps.take(from_batch)
            if kprev and self.maps is not None:
                old = self.maps[sel.clamp_max(kprev - 1), cols]
                new_maps = torch.where((sel < kprev).view(*sel.shape, 1, 1), old, fresh)
            else:
                new_maps = fresh
        return torch.gather(values, 0, sel), torch.gather(idx, 0, sel), new_maps

    def commit(self, state) -> None:
        if state is not None:
            self.values, self.index, self.maps = state

    def update(self, values: torch.Tensor, index: torch.Tensor, maps: MapSource | torch.Tensor | None) -> None:
        self.commit(self.propose(values, index, maps))

    def numpy(self) -> dict[str, np.ndarray]:
        if self.values is None:
            return {}
        out = {"top_values": self.values.cpu().numpy().astype(np.float32),
               "top_index": self.index.cpu().numpy().astype(np.int64)}
        if self.maps is not None:
            maps = self.maps.cpu().numpy()
            # float16 halves the cache; activations beyond its range keep float32
            small = maps.size == 0 or float(np.nanmax(np.abs(maps))) < 60000.0
            out["top_maps"] = maps.astype(np.float16) if small else maps.astype(np.float32)
        return out


def merge_top(parts: list[dict[str, np.ndarray]], k: int) -> dict[str, np.ndarray | None]:
    """Top-k of the union of several top-k's (same order as :class:`TopK`)."""
    parts = [p for p in parts if p and p.get("top_values") is not None]
    if k == 0 or not parts:
        return {"top_index": None, "top_values": None, "top_maps": None}
    vals = np.concatenate([p["top_values"] for p in parts])
    idx = np.concatenate([p["top_index"] for p in parts])
    has_maps = all(p.get("top_maps") is not None for p in parts)
    maps = np.concatenate([p["top_maps"] for p in parts]) if has_maps else None
    K = vals.shape[1]
    kk = min(k, vals.shape[0])
    order = np.lexsort((idx, -vals), axis=0)[:kk]  # value desc, then probe index asc
    cols = np.arange(K)[None, :]
    return {"top_index": idx[order, cols], "top_values": vals[order, cols],
            "top_maps": maps[order, cols] if maps is not None else None}
