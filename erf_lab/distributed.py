"""Data-parallel helpers for ``torchrun``: process group from the environment, sharding, reductions.

``torchrun --nproc_per_node=K -m cli erf ...`` sets ``WORLD_SIZE``/``RANK``; each rank takes
every K-th selected image (no padding duplicates), and the float64 sums and counts are
all-reduced. gloo on CPU, nccl on GPU.
"""
import os
from typing import Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "is_active", "rank_world", "shard", "all_reduce_sum", "is_main", "barrier"]

T = TypeVar("T")


def init_from_env(device: str = "cpu") -> bool:
    """Joins the process group described by torchrun's environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return True


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_active() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's share: ``items[rank::world]`` (disjoint, no padding)."""
    rank, world = rank_world()
    return items[rank::world]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_active():
        dist.barrier()
