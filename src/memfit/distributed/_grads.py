"""Data-parallel gradient averaging for steps that bypass autograd's hooks (``memfit.remat.compile``).

DDP averages gradients from hooks on each parameter's gradient accumulator, fired by ``loss.backward()``.
A remat step computes the gradients inside one captured graph and assigns ``p.grad`` directly, so those
hooks never fire and a DDP wrapper would leave the replicas' gradients un-averaged. :func:`all_reduce_grads`
does the reducer's job after the step: gradients are flattened into buckets of at most ``bucket_bytes``
(one ``all_reduce`` per bucket, as DDP's 25 MiB buckets), summed, and divided by the world size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["all_reduce_grads"]


def all_reduce_grads(
    params: nn.Module | Iterable[Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    bucket_bytes: int = 25 * 2**20,
) -> int:
    """Average ``p.grad`` over the ranks of ``group``, in place, like DDP's reducer.

    Gradients are grouped by (device, dtype) and packed into flat buckets of at most ``bucket_bytes``;
    each bucket is summed with one ``all_reduce`` and divided by the world size, then copied back.

    Args:
        params: a module (its parameters) or an iterable of tensors; those with ``grad is None`` are skipped
            (every rank must have the same set of gradients, as under DDP with ``find_unused_parameters=False``).
        group: the process group (default: the world).
        bucket_bytes: largest bucket in bytes (> 0); a single larger gradient gets a bucket of its own.

    Returns:
        The number of ``all_reduce`` calls made (the communication cost in launches).

    Raises:
        ValueError: ``bucket_bytes <= 0``, or a sparse gradient (use DDP for sparse embeddings).
        RuntimeError: the default process group is not initialised.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"all_reduce_grads: bucket_bytes must be > 0, got {bucket_bytes}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "all_reduce_grads: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment for it)"
        )
    tensors = params.parameters() if isinstance(params, nn.Module) else params
    grads = [p.grad for p in tensors if p.grad is not None]
    for g in grads:
        if g.is_sparse:
            raise ValueError(
                f"all_reduce_grads: sparse gradient of shape {tuple(g.shape)} is not supported; "
                "wrap the model in DistributedDataParallel for sparse embeddings"
            )
    world = dist.get_world_size(group)
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    calls = 0
    for kind in by_kind.values():
        bucket: list[Tensor] = []
        size = 0
        pending: list[Tensor | None] = [*kind, None]  # None flushes the last bucket
        for item in pending:
            nbytes = 0 if item is None else item.numel() * item.element_size()
            if bucket and (item is None or size + nbytes > bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                flat.div_(world)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                calls += 1
                bucket, size = [], 0
            if item is not None:
                bucket.append(item)
                size += nbytes
    return calls
