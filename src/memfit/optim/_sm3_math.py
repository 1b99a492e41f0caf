"""SM3's equations for one dense tensor: the one home that every execution path calls.

The for-loop and ``foreach`` kernels (:mod:`memfit.optim._sm3_kernels`) and the DTensor step
(:mod:`memfit.distributed._dtensor`) all compute a dense update with the functions here; the fused CPU kernel
(:mod:`memfit.optim._sm3_fused`) writes the same operations in C++, in the same order and with the same
roundings, so that every path gives the same bits.

Notation for a parameter ``w`` of shape ``(n_1, ..., n_p)`` and its gradient ``g``:

- ``p >= 2``: accumulator ``a_k`` has shape ``(1, .., n_k, .., 1)`` (it broadcasts against ``w``), so
  ``min_k a_k`` is a chain of broadcasting ``torch.minimum`` and "max of nu over every axis except k" is
  ``nu.amax(dims != k, keepdim=True)``.
- ``p <= 1``: one accumulator of ``w``'s shape (exact diagonal Adagrad).

Roundings (float32 shown; each line is one IEEE operation unless it says fma):

    nu = fma(g, g, min_k a_k)                      or  fma((1 - beta2) * g, g, beta2 * min_k a_k)
    u  = g / sqrt(nu + eps)  where nu != 0, else 0  (a NaN nu gives a NaN u: nothing is hidden)
    m  = fma(1 - momentum, u, momentum * m)        computed in u's dtype, rounded once into m's dtype
    w  = fma(-lr, m, w * (1 - lr * wd))            the product w * (1 - lr * wd) only when wd != 0

References:
    Anil, Gupta, Koren, Singer. Memory-Efficient Adaptive Optimization. NeurIPS 2019, arXiv:1901.11150,
    Algorithms 2 (SM3-I) and 3 (SM3-II).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

Variant = Literal["I", "II"]

#: Completes per-axis maxima taken over the local tensor (identity in one process; an all-reduce for
#: DTensor shards). ``maxima[k]`` has accumulator ``k``'s shape.
CompleteMaxima = Callable[[list[Tensor]], list[Tensor]]

__all__ = [
    "CompleteMaxima",
    "SM3Batch",
    "SM3Hyper",
    "Variant",
    "accumulator_dtype",
    "apply_update",
    "dense_grad",
    "dense_update",
    "direction",
    "min_of",
    "momentum_average",
    "second_moment",
    "slice_max",
]

_HYPER_KEYS = ("lr", "momentum", "beta2", "eps", "variant", "weight_decay", "maximize")


@dataclass(frozen=True)
class SM3Hyper:
    """The hyperparameters of one SM3 step (one param group's), passed as one value to every kernel.

    Attributes:
        lr: learning rate (float or 1-element tensor).
        momentum: coefficient of the momentum average in [0, 1).
        beta2: 1.0 for sums of squares, < 1 for the exponential moving average (SM3-II only).
        eps: added to nu under the square root.
        variant: ``"I"`` or ``"II"``.
        weight_decay: decoupled weight decay.
        maximize: ascend instead of descend.
    """

    lr: float | Tensor
    momentum: float
    beta2: float
    eps: float
    variant: Variant
    weight_decay: float
    maximize: bool

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> SM3Hyper:
        """The hyperparameters held by an SM3 param group."""
        return cls(**{k: group[k] for k in _HYPER_KEYS})


class SM3Batch(NamedTuple):
    """The tensors of one step, index-aligned: what every SM3 kernel (for-loop, foreach, fused, DTensor) takes.

    A ``NamedTuple`` (not a dataclass) so that ``torch.compile(opt.step)`` traces its construction.

    Attributes:
        params: parameters to update (or DTensor parameters).
        grads: their gradients (dense, or sparse COO with ``sparse_dim() == 1``); never modified.
        accumulators: per parameter, ``rank`` broadcastable accumulators (one full one for rank <= 1).
        momentum_buffers: per parameter, the momentum buffer or ``None`` (``momentum == 0``, sparse).
    """

    params: list[Tensor]
    grads: list[Tensor]
    accumulators: list[list[Tensor]]
    momentum_buffers: list[Tensor | None]

    def rows(self) -> Iterator[tuple[Tensor, Tensor, list[Tensor], Tensor | None]]:
        """``(param, grad, accumulators, momentum_buffer)`` per parameter."""
        return zip(self.params, self.grads, self.accumulators, self.momentum_buffers, strict=True)

    def select(self, indices: Iterable[int]) -> SM3Batch:
        """The sub-batch of the tensors at ``indices``, in that order."""
        idx = list(indices)
        return SM3Batch(
            [self.params[i] for i in idx],
            [self.grads[i] for i in idx],
            [self.accumulators[i] for i in idx],
            [self.momentum_buffers[i] for i in idx],
        )


def accumulator_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Accumulators are float32, or float64 for float64 parameters, whatever the parameter dtype.

    bf16/fp16 squared gradients under- and overflow, and an accumulator that must only grow loses its
    increments to rounding in 8 mantissa bits.
    """
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def min_of(accumulators: list[Tensor]) -> Tensor:
    """``min_k a_k``: (n1,1,..) min (1,n2,..) -> full shape; a single accumulator (rank <= 1) as is."""
    out = accumulators[0]
    for a in accumulators[1:]:
        out = torch.minimum(out, a)
    return out


def slice_max(t: Tensor, k: int) -> Tensor:
    """Max of ``t`` over every axis but ``k`` (keepdim); 0 over an empty slice.

    0 is the identity of max over the values it is taken of (``nu >= 0``, ``g^2 >= 0``), so an empty
    tensor (shape ``(0, 5)``) or an empty DTensor shard leaves accumulators at 0 instead of raising.
    NaN propagates (``amax``), as it does in the fused kernel.
    """
    others = [d for d in range(t.dim()) if d != k]
    if any(t.shape[d] == 0 for d in others):
        shape = [1] * t.dim()
        shape[k] = t.shape[k]
        return torch.zeros(shape, dtype=t.dtype, device=t.device)
    return t.amax(dim=others, keepdim=True)


def _identity(maxima: list[Tensor]) -> list[Tensor]:
    return maxima


def second_moment(
    g: Tensor,
    accumulators: list[Tensor],
    *,
    variant: Variant,
    beta2: float,
    complete: CompleteMaxima = _identity,
) -> tuple[Tensor, list[Tensor]]:
    """nu for one dense gradient and the accumulators' new values (not yet written).

    Args:
        g: the gradient (already in the accumulators' dtype, negated under ``maximize``).
        accumulators: the current accumulators (``rank`` broadcastable ones, or one full one).
        variant: ``"I"`` or ``"II"``.
        beta2: 1.0 for sums of squares, < 1 for the exponential moving average.
        complete: completes the local per-axis maxima (DTensor shards); the identity otherwise.

    Returns:
        ``(nu, new_accumulators)``; ``nu`` has ``g``'s shape.
    """
    rank = g.dim()
    if variant == "I" and rank >= 2:
        # SM3-I: a_k += max over the slice of g^2; nu = min_k a_k.
        gsq = g * g
        maxima = complete([slice_max(gsq, k) for k in range(rank)])
        new = [a + m for a, m in zip(accumulators, maxima, strict=True)]
        return min_of(new).expand_as(g), new
    # SM3-II (and rank <= 1, where both variants are diagonal Adagrad). addcmul is one fma per entry.
    if beta2 == 1.0:
        nu = torch.addcmul(min_of(accumulators), g, g)
    else:
        nu = torch.addcmul(min_of(accumulators) * beta2, g, g, value=1.0 - beta2)
    if rank <= 1:
        return nu, [nu]
    # Assigned, not max(old, new): with beta2 < 1 the accumulators may shrink (that is the EMA's point).
    return nu, complete([slice_max(nu, k) for k in range(rank)])


def direction(g: Tensor, nu: Tensor, eps: float) -> Tensor:
    """u = g / sqrt(nu + eps) where nu != 0, and 0 where nu == 0 (the paper's 0/0 = 0, safe for eps = 0).

    ``nu >= 0`` for finite gradients; a NaN ``nu`` (a non-finite gradient under ``nonfinite="propagate"``)
    gives a NaN direction, so the parameter shows it instead of silently freezing. sqrt and division are
    correctly rounded everywhere (``rsqrt`` is not, and differs between ATen and the fused kernel).
    """
    return torch.where(nu == 0, torch.zeros((), dtype=g.dtype, device=g.device), g / torch.sqrt(nu + eps))


def momentum_average(buf: Tensor, u: Tensor, momentum: float) -> Tensor:
    """m <- momentum * m + (1 - momentum) * u in place; returns m in ``u``'s dtype for the update.

    An average, no bias correction (as in the paper's code). A buffer in a lower precision (bf16) is
    computed in ``u``'s precision and rounded once into ``buf``; the update then uses the stored (rounded)
    value, exactly as the fused kernel does.
    """
    if buf.dtype == u.dtype:
        return buf.mul_(momentum).add_(u, alpha=1.0 - momentum)
    m = buf.to(u.dtype).mul_(momentum).add_(u, alpha=1.0 - momentum)
    buf.copy_(m)
    return m.copy_(buf)


def apply_update(param: Tensor, update: Tensor, *, lr: float | Tensor, weight_decay: float) -> None:
    """w <- fma(-lr, update, w * (1 - lr * wd)), in ``update``'s precision, rounded once into ``param``."""
    w = param if param.dtype == update.dtype else param.to(update.dtype)
    if weight_decay != 0.0:
        w.mul_(1.0 - lr * weight_decay)
    if isinstance(lr, Tensor):
        w.addcmul_(update, lr, value=-1.0)  # one fma, like add_(alpha=-lr) for a float lr
    else:
        w.add_(update, alpha=-lr)
    if w is not param:
        param.copy_(w)


def dense_grad(grad: Tensor, acc_dtype: torch.dtype, maximize: bool) -> Tensor:
    """The gradient in the accumulators' dtype, negated under ``maximize``; never mutates ``grad``."""
    g = grad.to(acc_dtype)  # .to() copies when the dtype changes, neg() always allocates
    return -g if maximize else g


def dense_update(
    param: Tensor,
    grad: Tensor,
    accumulators: list[Tensor],
    momentum_buffer: Tensor | None,
    hp: SM3Hyper,
    *,
    complete: CompleteMaxima = _identity,
) -> None:
    """One SM3 step of one dense tensor, in place: accumulators, momentum buffer and parameter.

    Args:
        param: the parameter (or its local shard).
        grad: its dense gradient (never modified).
        accumulators: its accumulators, written in place.
        momentum_buffer: its momentum buffer, or ``None`` (``momentum == 0``).
        hp: the step's hyperparameters.
        complete: completes the local per-axis maxima (DTensor shards); the identity otherwise.
    """
    g = dense_grad(grad, accumulators[0].dtype, hp.maximize)
    nu, new_accs = second_moment(g, accumulators, variant=hp.variant, beta2=hp.beta2, complete=complete)
    for a, new in zip(accumulators, new_accs, strict=True):
        if new is not a:
            a.copy_(new)
    u = direction(g, nu, hp.eps)
    if momentum_buffer is not None:
        u = momentum_average(momentum_buffer, u, hp.momentum)
    apply_update(param, u, lr=hp.lr, weight_decay=hp.weight_decay)
