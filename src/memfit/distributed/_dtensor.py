"""SM3 on DTensor parameters (FSDP2 ``fully_shard``, tensor parallel): local math, one max-all-reduce.

SM3's cover of a tensor of shape ``(n_1, .., n_p)`` is one accumulator ``a_k`` per axis, and every update of
``a_k`` is a *max* over the slices of axis ``k``. When the parameter is sharded on axis ``d`` (placement
``Shard(d)`` on a mesh dimension), each rank holds whole slices of axis ``d``:

- ``a_d`` (shape ``(.., n_d, ..)``) is sharded exactly like the parameter: every entry is a max over one slice
  that lies on one rank, so it is computed locally, with no communication;
- every other ``a_k`` (``k != d``) is a max over slices that cross the shards: each rank takes the max over
  its rows and one ``all_reduce(MAX)`` over that mesh dimension's group combines them. The accumulators of a
  parameter that need it are concatenated, so it is **one all-reduce per parameter** per sharded mesh dim.

Max is exact (no rounding, order-free), and everything else in SM3 (``nu``, the direction, momentum, the
parameter update) is elementwise, so the sharded step is *bitwise* the single-process step on the full
tensor. State is held as DTensors: ``a_d`` and the momentum buffer with the parameter's placements, the
reduced accumulators ``Replicate()`` on the mesh dimensions they were reduced over (house rule 9: never a
rank-local plain tensor, which ``torch.distributed.checkpoint`` would save as if every rank held rank 0's
value). The step counter is a plain 0-d tensor: it is the same on every rank, so saving one copy is right.

An uneven shard (33 rows on 2 ranks: 17 + 16) or an empty one (1 row on 2 ranks) needs no special case but
one: the max over an empty local slice is taken as 0, the identity of max over non-negative values
(``nu >= 0`` and ``g^2 >= 0``).

Communication: per step and parameter of rank >= 2 sharded on one mesh dimension, one all-reduce of
``sum_{k != d} n_k`` accumulator entries (e.g. ``n_2`` floats for a ``(n_1, n_2)`` weight sharded on rows);
nothing for rank <= 1 parameters and for replicated ones.

References:
    Anil, Gupta, Koren, Singer. Memory-Efficient Adaptive Optimization. NeurIPS 2019, arXiv:1901.11150
    (Algorithms 2 and 3; the covers and their max updates).
"""

from __future__ import annotations

import functools
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from memfit.optim._sm3_math import SM3Batch, SM3Hyper, accumulator_dtype, dense_update

__all__ = ["accumulator_placements", "is_dtensor", "new_sm3_state", "sm3_dtensor"]


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (an FSDP2 / TP parameter or state)."""
    return isinstance(t, DTensor)


def _shard_dims(p: DTensor) -> list[int | None]:
    """Per mesh dimension, the tensor axis it shards (``None`` for ``Replicate``).

    Raises:
        ValueError: a placement other than ``Shard`` / ``Replicate`` (``Partial``, strided shards of
            FSDP2 + TP), for which the per-axis maxima are not local.
    """
    dims: list[int | None] = []
    for i, pl in enumerate(p.placements):
        if type(pl) is Shard:
            dims.append(pl.dim % max(p.dim(), 1))
        elif type(pl) is Replicate:
            dims.append(None)
        else:
            raise ValueError(
                f"SM3: DTensor parameter of shape {tuple(p.shape)} has placement {pl!r} on mesh dim {i}; "
                "supported placements are Shard(dim) and Replicate() (FSDP2 fully_shard, DDP-style "
                "replication, row/column tensor parallel)"
            )
    return dims


def accumulator_placements(p: DTensor, k: int) -> list[Placement]:
    """Placements of accumulator ``a_k`` of a rank >= 2 parameter: ``Shard(k)`` where ``p`` shards axis ``k``.

    Every other mesh dimension holds the same (max-reduced) values on all its ranks: ``Replicate()``.
    """
    return [Shard(k) if d == k else Replicate() for d in _shard_dims(p)]


def new_sm3_state(p: DTensor, step: Tensor) -> dict[str, Tensor]:
    """Zero SM3 state for a DTensor parameter, every tensor a DTensor with the placements described above.

    Args:
        p: the parameter.
        step: the (plain, replicated) step counter to store.

    Returns:
        ``{"step", "accumulator"}`` for rank <= 1, ``{"step", "accumulator_0", ..}`` otherwise.

    Raises:
        ValueError: on an unsupported placement (see :func:`_shard_dims`).
    """
    acc_dtype = accumulator_dtype(p.dtype)
    shard_dims = _shard_dims(p)
    state: dict[str, Tensor] = {"step": step}
    if p.dim() <= 1:
        # Exact diagonal accumulator: same shape and placements as the parameter (no communication).
        state["accumulator"] = torch.zeros_like(p, dtype=acc_dtype)
        return state
    local = p.to_local()
    for k, n in enumerate(p.shape):
        global_shape = [1] * p.dim()
        global_shape[k] = n
        local_shape = [1] * p.dim()
        local_shape[k] = local.shape[k] if k in shard_dims else n
        zeros = torch.zeros(local_shape, dtype=acc_dtype, device=local.device)
        state[f"accumulator_{k}"] = DTensor.from_local(
            zeros,
            p.device_mesh,
            accumulator_placements(p, k),
            run_check=False,
            shape=torch.Size(global_shape),
            stride=torch.empty(global_shape, device="meta").stride(),
        )
    return state


def _max_reduce(p: DTensor, partial: list[Tensor]) -> list[Tensor]:
    """Complete the per-axis maxima ``partial[k]`` across shards: one ``all_reduce(MAX)`` per sharded mesh dim.

    ``partial[k]`` misses the rows held by other ranks on each mesh dimension that shards an axis ``d != k``;
    those ``partial[k]`` are flattened into one buffer, reduced, and split back.
    """
    out = list(partial)
    for mesh_dim, d in enumerate(_shard_dims(p)):
        if d is None:
            continue
        ks = [k for k in range(len(out)) if k != d]
        flat = torch.cat([out[k].reshape(-1) for k in ks])
        # Looked up on the module at call time, so a test can count the calls by wrapping it.
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group(mesh_dim))
        offset = 0
        for k in ks:
            n = out[k].numel()
            out[k] = flat[offset : offset + n].view_as(out[k])
            offset += n
    return out


def _local(t: Tensor, p: DTensor) -> Tensor:
    """The local shard of ``t`` laid out like ``p`` (gradients may arrive with other placements)."""
    if isinstance(t, DTensor):
        if tuple(t.placements) != tuple(p.placements):
            t = t.redistribute(p.device_mesh, p.placements)
        return t.to_local()
    raise ValueError(
        f"SM3: the gradient of a DTensor parameter of shape {tuple(p.shape)} must be a DTensor, "
        f"got a {type(t).__name__}; mixing DTensor parameters with plain gradients is not supported"
    )


def sm3_dtensor(batch: SM3Batch, hp: SM3Hyper) -> None:
    """One SM3 step on DTensor parameters, in place on their local shards (same equations as ``sm3``).

    The update is :func:`memfit.optim._sm3_math.dense_update` on the local shards; only the per-axis maxima
    are completed across ranks (:func:`_max_reduce`).

    Args:
        batch: DTensor parameters (placements ``Shard`` / ``Replicate``), their gradients (DTensors,
            redistributed to the parameter's placements if they differ), their DTensor accumulators (see
            :func:`new_sm3_state`) and momentum buffers.
        hp: the step's hyperparameters.

    Raises:
        ValueError: a sparse gradient, a plain-tensor gradient, or an unsupported placement.
    """
    for p, grad, accs, buf in batch.rows():
        assert isinstance(p, DTensor)
        if grad.is_sparse:
            raise ValueError(
                f"SM3: sparse gradients of DTensor parameters are not supported ({tuple(p.shape)})"
            )
        dense_update(
            p.to_local(), _local(grad, p), [cast(DTensor, a).to_local() for a in accs],
            None if buf is None else cast(DTensor, buf).to_local(), hp,
            complete=functools.partial(_max_reduce, p),
        )  # fmt: skip
