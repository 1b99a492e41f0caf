"""Functional SM3 kernels: one parameter at a time (``for``-loop), grouped (``foreach``), and sparse rows.

The :class:`memfit.optim.SM3` class gathers state and calls :func:`sm3`; the equations of a dense update
live in :mod:`memfit.optim._sm3_math` (shared with the DTensor step), the compiled single-pass update in
:mod:`memfit.optim._sm3_fused`. The slow float64 reference that these kernels are checked against lives
only in ``tests/optim``.

Non-finite gradients are not checked here: a NaN or inf gradient entry propagates into the parameter
(``nonfinite="propagate"``); :class:`memfit.optim.SM3` checks them before it calls :func:`sm3`.

References:
    Anil, Gupta, Koren, Singer. Memory-Efficient Adaptive Optimization. NeurIPS 2019, arXiv:1901.11150,
    Algorithms 2 (SM3-I) and 3 (SM3-II); the TensorFlow reference ``sm3/sm3.py`` (google-research) for the
    sparse path (row accumulator only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memfit.optim._sm3_fused import sm3_fused
from memfit.optim._sm3_math import (
    SM3Batch,
    SM3Hyper,
    Variant,
    accumulator_dtype,
    apply_update,
    dense_grad,
    dense_update,
    direction,
    momentum_average,
    second_moment,
)

__all__ = ["Variant", "accumulator_dtype", "run", "sm3"]


def _sm3_sparse(param: Tensor, grad: Tensor, accumulators: list[Tensor], hp: SM3Hyper) -> None:
    """Sparse (COO, hybrid allowed) gradient: only the touched rows move, only the row accumulator is used.

    As in the TensorFlow reference, the other axes' accumulators are left alone (each sparse step would
    raise a column's accumulator with every touched row, overestimating it); no momentum on this path, and
    with ``beta2 < 1`` only the touched rows' accumulators decay.
    Memory: O(nnz x row size); the table is never densified.
    """
    if hp.weight_decay != 0.0:
        raise ValueError(
            f"SM3: weight_decay={hp.weight_decay} is not supported with sparse gradients (it would touch "
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
    g = dense_grad(grad.values(), acc_dtype, hp.maximize)  # (nnz, *row_shape)
    a = accumulators[0]  # (n1,) for rank 1, (n1, 1, .., 1) otherwise
    a_rows = a.index_select(0, rows)
    if param.dim() >= 2 and hp.variant == "I":
        a_rows = a_rows + g.square().amax(dim=list(range(1, g.dim())), keepdim=True)
        nu = a_rows.expand_as(g)
        new_rows = a_rows
    else:
        if hp.beta2 == 1.0:
            nu = torch.addcmul(a_rows, g, g)
        else:
            nu = torch.addcmul(a_rows * hp.beta2, g, g, value=1.0 - hp.beta2)
        new_rows = nu.amax(dim=list(range(1, g.dim())), keepdim=True) if param.dim() >= 2 else nu
    a.index_copy_(0, rows, new_rows)
    u = direction(g, nu, hp.eps)
    w_rows = param.index_select(0, rows).to(acc_dtype)
    apply_update(w_rows, u, lr=hp.lr, weight_decay=0.0)
    param.index_copy_(0, rows, w_rows.to(param.dtype))


def _sm3_single_tensor(batch: SM3Batch, hp: SM3Hyper) -> None:
    for param, grad, accs, buf in batch.rows():
        if grad.is_sparse:
            _sm3_sparse(param, grad, accs, hp)
        else:
            dense_update(param, grad, accs, buf, hp)


def _sm3_multi_tensor(batch: SM3Batch, hp: SM3Hyper) -> None:
    """Same arithmetic as :func:`_sm3_single_tensor`, with the elementwise tail batched by ``torch._foreach``.

    The reductions (one ``amax`` per axis) are per tensor by nature; the momentum average and the parameter
    update, which touch every element of every tensor, are batched per (device, dtype) group.
    """
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype | None], list[int]] = {}
    for i, (param, grad, accs, buf) in enumerate(batch.rows()):
        if grad.is_sparse:
            _sm3_sparse(param, grad, accs, hp)
        else:
            key = (param.device, param.dtype, None if buf is None else buf.dtype)
            groups.setdefault(key, []).append(i)
    lr, wd = hp.lr, hp.weight_decay
    for idx in groups.values():
        group = batch.select(idx)
        ps = group.params
        us: list[Tensor] = []
        for _, grad, accs, _ in group.rows():
            g = dense_grad(grad, accs[0].dtype, hp.maximize)
            nu, new_accs = second_moment(g, accs, variant=hp.variant, beta2=hp.beta2)
            for old, new in zip(accs, new_accs, strict=True):
                old.copy_(new)
            us.append(direction(g, nu, hp.eps))
        ms = [b for b in group.momentum_buffers if b is not None]
        if ms and ms[0].dtype == us[0].dtype:
            torch._foreach_mul_(ms, hp.momentum)
            torch._foreach_add_(ms, us, alpha=1.0 - hp.momentum)
            us = ms
        elif ms:
            # bf16 buffer, fp32 u: per tensor, so the average is formed in fp32 and rounded once.
            us = [momentum_average(m, u, hp.momentum) for m, u in zip(ms, us, strict=True)]
        if ps[0].dtype != us[0].dtype:
            for p, u in zip(ps, us, strict=True):
                apply_update(p, u, lr=lr, weight_decay=wd)
            continue
        if wd != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        if isinstance(lr, Tensor):
            torch._foreach_addcmul_(ps, us, [lr] * len(us), value=-1.0)  # one fma each, as for-loop
        else:
            torch._foreach_add_(ps, us, alpha=-lr)


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

    Non-finite gradient entries are not checked: they propagate into the parameters (the class's
    ``nonfinite="propagate"``). Every path computes the same roundings (see :mod:`memfit.optim._sm3_math`).

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
        fused: one compiled pass per parameter (:mod:`memfit.optim._sm3_fused`) where it applies; the
            other tensors (sparse, rank >= 3, not float32) take the ``foreach`` path.
    """
    run(
        SM3Batch(params, grads, accumulators, momentum_buffers),
        SM3Hyper(lr, momentum, beta2, eps, variant, weight_decay, maximize),
        foreach=foreach,
        fused=fused,
    )


def run(batch: SM3Batch, hp: SM3Hyper, *, foreach: bool, fused: bool) -> None:
    """:func:`sm3` on a batch: the fused kernel where it applies, then foreach or the for-loop."""
    if fused:
        batch = batch.select(sm3_fused(batch, hp))  # what the kernel did not take runs foreach
    elif not foreach:
        _sm3_single_tensor(batch, hp)
        return
    if len(batch.params):
        _sm3_multi_tensor(batch, hp)
