"""The eager front-end: capture a model's whole training step as a graph and run any schedule of it.

- :mod:`.capture` -- ``make_fx`` over ``torch.func.functional_call`` on fake tensors: a :class:`CapturedStep`
  (the fx graph and the core :class:`~memfit.remat.core.Graph` with measured or estimated costs).
- :mod:`.lower` -- a :class:`~memfit.remat.core.Schedule` back to an fx ``GraphModule`` (a recomputed value is a
  fresh node; fx frees each value after its last use).
- :mod:`.step` -- :func:`memfit.remat.compile`: capture, solve, lower, and the :class:`RematStep` a user calls.
"""
