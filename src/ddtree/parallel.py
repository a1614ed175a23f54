"""Data parallelism under torchrun: one process per GPU (gloo on the CPU), each with its own share of
the work. Benchmarks shard prompts, regeneration shards prompts, training averages gradients."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, size) of a torchrun data-parallel run, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    rank, size = world()
    if size == 1:
        return [obj]
    parts: list = [None] * size
    dist.all_gather_object(parts, obj)
    return parts


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one tiny all-reduce)."""
    rank, size = world()
    if size == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def average_gradients(module: torch.nn.Module) -> None:
    """Replaces each gradient by its mean over the ranks, all in one flat all-reduce."""
    rank, size = world()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= size
    for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(piece.view_as(grad))


@contextlib.contextmanager
def data_parallel(device: str | None):
    """Under torchrun (WORLD_SIZE > 1): join the process group, one GPU per rank (gloo on the CPU).

    Yields (rank, device). On the way out every rank waits for the others before leaving the group:
    a rank that exits while rank 0 still writes would tear down gloo's connections under it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, device
        return
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            yield dist.get_rank(), f"cuda:{local}"
        else:
            yield dist.get_rank(), "cpu"
        dist.barrier()
    finally:
        dist.destroy_process_group()
