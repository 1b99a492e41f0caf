"""Functional SM3 kernels: one parameter at a time (``for``-loop), grouped (``foreach``), and sparse rows.

The :class:`memfit.optim.SM3` class gathers state and calls :func:`sm3`; everything numerical lives here
(the compiled single-pass update is in :mod:`memfit.optim._sm3_fused`). The slow float64 reference that
these kernels are checked against lives only in ``tests/optim``.

Notation for a parameter ``w`` of shape ``(n_1, ..., n_p)`` and its gradient ``g``:

- ``p >= 2``: accumulator ``a_k`` has shape ``(1, .., n_k, .., 1)`` (it broadcasts against ``w``), so
  ``min_k a_k`` is a chain of broadcasting ``torch.minimum`` and "max of nu over every axis except k" is
  ``nu.amax(dims != k, keepdim=True)``.
- ``p <= 1``: one accumulator of ``w``'s shape (exact diagonal Adagrad).

References:
    Anil, Gupta, Koren, Singer. Memory-Efficient Adaptive Optimization. NeurIPS 2019, arXiv:1901.11150,
    Algorithms 2 (SM3-I) and 3 (SM3-II); the TensorFlow reference ``sm3/sm3.py`` (google-research) for the
    sparse path (row accumulator only).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Variant = Literal["I", "II"]

__all__ = ["Variant", "accumulator_dtype", "sm3"]


def accumulator_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Accumulators are float32, or float64 for float64 parameters, whatever the parameter dtype.

    bf16/fp16 squared gradients under- and overflow, and an accumulator that must only grow loses its
    increments to rounding in 8 mantissa bits.
    """
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _other_dims(rank: int, k: int) -> list[int]:
    return [d for d in range(rank) if d != k]


def _min_of(accumulators: list[Tensor]) -> Tensor:
    # (n1,1,..) min (1,n2,..) -> full shape; a single accumulator (rank <= 1) is returned as is.
    out = accumulators[0]
    for a in accumulators[1:]:
        out = torch.minimum(out, a)
    return out


def _second_moment(
    g: Tensor, accumulators: list[Tensor], *, variant: Variant, beta2: float
) -> tuple[Tensor, list[Tensor]]:
    """nu for one dense gradient and the accumulators' new values (not yet written).

    Returns:
        ``(nu, new_accumulators)``; ``nu`` has ``g``'s shape.
    """
    rank = g.dim()
    if variant == "I" and rank >= 2:
        # SM3-I: a_k += max over the slice of g^2; nu = min_k a_k.
        gsq = g * g
        new = [a + gsq.amax(dim=_other_dims(rank, k), keepdim=True) for k, a in enumerate(accumulators)]
        return _min_of(new).expand_as(g), new
    # SM3-II (and rank <= 1, where both variants are diagonal Adagrad).
    if beta2 == 1.0:
        nu = torch.addcmul(_min_of(accumulators), g, g)
    else:
        nu = torch.addcmul(_min_of(accumulators) * beta2, g, g, value=1.0 - beta2)
    if rank <= 1:
        return nu, [nu]
    # Assigned, not max(old, new): with beta2 < 1 the accumulators may shrink (that is the EMA's point).
    return nu, [nu.amax(dim=_other_dims(rank, k), keepdim=True) for k in range(rank)]


def _direction(g: Tensor, nu: Tensor, eps: float) -> Tensor:
    """u = g / sqrt(nu + eps) where nu > 0, and 0 where nu == 0 (the paper's 0/0 = 0, safe for eps = 0)."""
    return torch.where(nu > 0, g * torch.rsqrt(nu + eps), torch.zeros((), dtype=g.dtype, device=g.device))


def _apply(
    param: Tensor,
    update: Tensor,
    *,
    lr: float | Tensor,
    weight_decay: float,
) -> None:
    """w <- w * (1 - lr * wd) - lr * update, computed in ``update``'s precision and rounded once."""
    if param.dtype == update.dtype:
        if weight_decay != 0.0:
            param.mul_(1.0 - lr * weight_decay)
        if isinstance(lr, Tensor):
            param.sub_(update * lr)
        else:
            param.add_(update, alpha=-lr)
        return
    w = param.to(update.dtype)
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    if isinstance(lr, Tensor):
        w.sub_(update * lr)
    else:
        w.add_(update, alpha=-lr)
    param.copy_(w)


def _dense_grad(grad: Tensor, acc_dtype: torch.dtype, maximize: bool) -> Tensor:
    # Never mutates p.grad: .to() copies when the dtype changes, neg() always allocates.
    g = grad.to(acc_dtype)
    return -g if maximize else g


def _sm3_sparse(
    param: Tensor,
    grad: Tensor,
    accumulators: list[Tensor],
    *,
    lr: float | Tensor,
    beta2: float,
    eps: float,
    variant: Variant,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Sparse (COO, hybrid allowed) gradient: only the touched rows move, only the row accumulator is used.

    As in the TensorFlow reference, the other axes' accumulators are left alone (each sparse step would
    raise a column's accumulator with every touched row, overestimating it); no momentum on this path.
    Memory: O(nnz x row size); the table is never densified.
    """
    if weight_decay != 0.0:
        raise ValueError(
            f"SM3: weight_decay={weight_decay} is not supported with sparse gradients (it would touch "
            "every row); use weight_decay=0.0 for the sparse parameters' param group"
        )
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"SM3: sparse gradients must index the first axis only (sparse_dim() == 1), got "
            f"sparse_dim()={grad.sparse_dim()} for a parameter of shape {tuple(param.shape)}"
        )
    grad = grad.coalesce()  # duplicate indices summed: the true gradient of each row
    rows = grad.indices()[0]
    if rows.numel() == 0:
        return
    acc_dtype = accumulator_dtype(param.dtype)
    g = grad.values().to(acc_dtype)  # (nnz, *row_shape)
    if maximize:
        g = -g
    a = accumulators[0]  # (n1,) for rank 1, (n1, 1, .., 1) otherwise
    a_rows = a.index_select(0, rows)
    if param.dim() >= 2 and variant == "I":
        a_rows = a_rows + g.square().amax(dim=list(range(1, g.dim())), keepdim=True)
        nu = a_rows.expand_as(g)
        new_rows = a_rows
    else:
        if beta2 == 1.0:
            nu = torch.addcmul(a_rows, g, g)
        else:
            nu = torch.addcmul(a_rows * beta2, g, g, value=1.0 - beta2)
        new_rows = nu.amax(dim=list(range(1, g.dim())), keepdim=True) if param.dim() >= 2 else nu
    a.index_copy_(0, rows, new_rows)
    u = _direction(g, nu, eps)
    w_rows = param.index_select(0, rows).to(acc_dtype)
    if isinstance(lr, Tensor):
        w_rows.sub_(u * lr)
    else:
        w_rows.add_(u, alpha=-lr)
    param.index_copy_(0, rows, w_rows.to(param.dtype))


def _sm3_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[list[Tensor]],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    beta2: float,
    eps: float,
    variant: Variant,
    weight_decay: float,
    maximize: bool,
) -> None:
    for param, grad, accs, buf in zip(params, grads, accumulators, momentum_buffers, strict=True):
        if grad.is_sparse:
            _sm3_sparse(
                param, grad, accs, lr=lr, beta2=beta2, eps=eps, variant=variant,
                weight_decay=weight_decay, maximize=maximize,
            )  # fmt: skip
            continue
        g = _dense_grad(grad, accs[0].dtype, maximize)
        nu, new_accs = _second_moment(g, accs, variant=variant, beta2=beta2)
        for a, new in zip(accs, new_accs, strict=True):
            a.copy_(new)
        u = _direction(g, nu, eps)
        if buf is not None:
            # m <- momentum * m + (1 - momentum) * u: an average, no bias correction (as in the paper's code).
            buf.mul_(momentum).add_(u, alpha=1.0 - momentum)
            u = buf if buf.dtype == u.dtype else buf.to(u.dtype)
        _apply(param, u, lr=lr, weight_decay=weight_decay)


def _sm3_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[list[Tensor]],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    beta2: float,
    eps: float,
    variant: Variant,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Same arithmetic as :func:`_sm3_single_tensor`, with the elementwise tail batched by ``torch._foreach``.

    The reductions (one ``amax`` per axis) are per tensor by nature; the momentum average and the parameter
    update, which touch every element of every tensor, are batched per (device, dtype) group.
    """
    dense = [i for i, g in enumerate(grads) if not g.is_sparse]
    if len(dense) < len(grads):
        sparse = [i for i, g in enumerate(grads) if g.is_sparse]
        _sm3_single_tensor(
            [params[i] for i in sparse], [grads[i] for i in sparse], [accumulators[i] for i in sparse],
            [None] * len(sparse), lr=lr, momentum=momentum, beta2=beta2, eps=eps, variant=variant,
            weight_decay=weight_decay, maximize=maximize,
        )  # fmt: skip
    if not dense:
        return
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype | None], list[int]] = {}
    for i in dense:
        buf = momentum_buffers[i]
        key = (params[i].device, params[i].dtype, None if buf is None else buf.dtype)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        ps = [params[i] for i in idx]
        accs = [accumulators[i] for i in idx]
        gs = [_dense_grad(grads[i], accs[j][0].dtype, maximize) for j, i in enumerate(idx)]
        us: list[Tensor] = []
        for g, a in zip(gs, accs, strict=True):
            nu, new_accs = _second_moment(g, a, variant=variant, beta2=beta2)
            for old, new in zip(a, new_accs, strict=True):
                old.copy_(new)
            us.append(_direction(g, nu, eps))
        bufs = [momentum_buffers[i] for i in idx]
        if bufs[0] is not None:
            ms = [b for b in bufs if b is not None]
            if ms[0].dtype == us[0].dtype:
                torch._foreach_mul_(ms, momentum)
                torch._foreach_add_(ms, us, alpha=1.0 - momentum)
                us = ms
            else:
                # Mixed dtypes (bf16 buffer, fp32 u): per tensor, so the sum is formed in fp32 and rounded
                # once, exactly as in the single-tensor path (foreach would round u to bf16 first).
                for m, u in zip(ms, us, strict=True):
                    m.mul_(momentum).add_(u, alpha=1.0 - momentum)
                us = [m.to(us[0].dtype) for m in ms]
        if ps[0].dtype == us[0].dtype:
            if weight_decay != 0.0:
                torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
            if isinstance(lr, Tensor):
                torch._foreach_sub_(ps, torch._foreach_mul(us, lr))
            else:
                torch._foreach_add_(ps, us, alpha=-lr)
        else:
            for p, u in zip(ps, us, strict=True):
                _apply(p, u, lr=lr, weight_decay=weight_decay)


def sm3(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[list[Tensor]],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    beta2: float,
    eps: float,
    variant: Variant,
    weight_decay: float,
    maximize: bool,
    foreach: bool = False,
    fused: bool = False,
) -> None:
    """One SM3 step on lists of parameters, in place (functional API of :class:`memfit.optim.SM3`).

    Args:
        params: parameters to update.
        grads: their gradients (dense, or sparse COO with ``sparse_dim() == 1``); never modified.
        accumulators: per parameter, ``rank`` broadcastable accumulators (one full one for rank <= 1).
        momentum_buffers: per parameter, the momentum buffer or ``None`` (``momentum == 0``, sparse).
        lr: learning rate (float or 0-d tensor).
        momentum: momentum coefficient in [0, 1).
        beta2: 1.0 for sums of squares, < 1 for the exponential moving average (SM3-II only).
        eps: added to nu under the square root.
        variant: ``"I"`` or ``"II"``.
        weight_decay: decoupled weight decay.
        maximize: ascend instead of descend.
        foreach: batch the elementwise work with ``torch._foreach`` ops.
        fused: one compiled pass per parameter (:mod:`memfit.optim._sm3_fused`); dense gradients only,
            sparse ones take the single-tensor path.
    """
    kwargs = {
        "lr": lr, "momentum": momentum, "beta2": beta2, "eps": eps, "variant": variant,
        "weight_decay": weight_decay, "maximize": maximize,
    }  # fmt: skip
    if fused:
        from memfit.optim._sm3_fused import sm3_fused

        sm3_fused(params, grads, accumulators, momentum_buffers, **kwargs)  # type: ignore[arg-type]
    elif foreach:
        _sm3_multi_tensor(params, grads, accumulators, momentum_buffers, **kwargs)  # type: ignore[arg-type]
    else:
        _sm3_single_tensor(params, grads, accumulators, momentum_buffers, **kwargs)  # type: ignore[arg-type]
