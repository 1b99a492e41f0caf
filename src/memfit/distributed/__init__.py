"""memfit on torch.distributed: SM3 under DDP, ZeRO and FSDP2, and remat steps inside data parallelism.

memfit builds no distributed runtime of its own. :class:`memfit.optim.SM3` works as is under
``DistributedDataParallel`` and ``ZeroRedundancyOptimizer(optimizer_class=SM3)``; under FSDP2
(``fully_shard``, DTensor parameters) it keeps its state as DTensors and completes each per-axis maximum
with one ``all_reduce(MAX)`` per parameter (:mod:`memfit.distributed._dtensor`), so the sharded step is
bitwise the single-process one. A :func:`memfit.remat.compile` step writes ``p.grad`` without autograd's
hooks, so DDP's reducer never sees it: average the gradients with :func:`all_reduce_grads` instead.

Usage::

    step = memfit.remat.compile(model, loss_fn, batch, budget=0.5)   # the plain module, not a DDP wrapper
    loss = step(batch)
    memfit.distributed.all_reduce_grads(model)                        # what DDP would have done
    opt.step()
"""

from memfit.distributed._grads import all_reduce_grads

__all__ = ["all_reduce_grads"]
