"""Rematerialization solvers; :func:`memfit.remat.solve` dispatches to them."""
