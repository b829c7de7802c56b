"""torchrun support for activation collection: detect, initialise, coordinate.

When ``torchrun`` (``python -m torch.distributed.run``) launches ``auditor run``
it sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`setup` then joins the process group (gloo on CPU; NCCL
plus a gloo group for coordination on CUDA) unless the caller already did.

Coordination here is small and CPU-side only: a barrier and a few Python objects
(cache keys, a hit/miss decision). Activations travel through the shared cache
folder, not through collectives, so the same code works across nodes as long as
every rank sees the same ``--cache-dir``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: How long a rank waits at a barrier for the slowest rank when auditor creates
#: the process group (torchrun's agent stops every rank if one of them fails).
DEFAULT_TIMEOUT_S = float(os.environ.get("AUDITOR_DIST_TIMEOUT_S", 6 * 3600))


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset or unreadable)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_distributed() -> bool:
    return world_size_from_env() > 1


@dataclass
class Dist:
    """This process's place in a distributed run."""

    rank: int
    world: int
    local_rank: int
    created: bool  # auditor initialised the default group (and destroys it in teardown)
    group: Any = None  # the group used for barriers and objects (gloo), None = default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (round robin, so ranks get similar amounts)."""
        return items[self.rank::self.world]

    def teardown(self) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            if self.group is not None:
                dist.destroy_process_group(self.group)
            dist.destroy_process_group()


def setup(device_type: str, timeout_s: float | None = None) -> Dist | None:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1; None for a single process.

    Uses an existing default group when the caller already initialised one.
    """
    if not is_distributed():
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for a distributed run, but this "
                          "PyTorch build has no torch.distributed; run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {', '.join(missing)} "
                              "is not; launch with torchrun (python -m torch.distributed.run) or unset WORLD_SIZE")
        backend = "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        timeout = _dt.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend=backend, timeout=timeout)
        created = True
    group = None
    if dist.get_backend() != "gloo":
        # Objects and long barriers go through gloo: NCCL's watchdog is not meant for
        # one rank waiting minutes for another, and object collectives need no GPU.
        timeout = _dt.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        group = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, created=created,
                group=group)
