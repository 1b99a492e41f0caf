"""A slow, obviously-correct float64 SM3 written from the paper's equations (tests only, house rule 3).

Written with numpy and explicit loops over the covers, independently of ``memfit.optim``'s kernels.
"""

from __future__ import annotations

import itertools

import numpy as np


class ReferenceSM3:
    """SM3-I / SM3-II (+ EMA, momentum, decoupled weight decay, maximize) on one float64 numpy array."""

    def __init__(
        self, w, *, lr, momentum=0.0, beta2=1.0, eps=1e-30, variant="II", weight_decay=0.0, maximize=False
    ):
        self.w = np.array(w, dtype=np.float64)
        self.lr, self.momentum, self.beta2, self.eps = lr, momentum, beta2, eps
        self.variant, self.wd, self.maximize = variant, weight_decay, maximize
        shape = self.w.shape
        if len(shape) <= 1:
            self.acc = [np.zeros(shape)]
        else:
            self.acc = [np.zeros(n) for n in shape]  # one vector per axis: the codimension-one slices
        self.m = np.zeros(shape)
        self.last_nu = None

    def _nu(self, g):
        shape = g.shape
        if len(shape) <= 1:
            nu = self.beta2 * self.acc[0] + (1 - self.beta2) * g**2 if self.beta2 < 1 else self.acc[0] + g**2
            self.acc[0] = nu.copy()
            return nu
        nu = np.zeros(shape)
        if self.variant == "I":
            for k, n in enumerate(shape):
                for i in range(n):
                    self.acc[k][i] += np.max(np.take(g**2, i, axis=k))
            for idx in itertools.product(*(range(n) for n in shape)):
                nu[idx] = min(self.acc[k][i] for k, i in enumerate(idx))
            return nu
        for idx in itertools.product(*(range(n) for n in shape)):
            mu = min(self.acc[k][i] for k, i in enumerate(idx))
            nu[idx] = self.beta2 * mu + (1 - self.beta2) * g[idx] ** 2 if self.beta2 < 1 else mu + g[idx] ** 2
        for k, n in enumerate(shape):
            self.acc[k] = np.array([np.max(np.take(nu, i, axis=k)) for i in range(n)])
        return nu

    def step(self, g):
        g = -np.asarray(g, np.float64) if self.maximize else np.asarray(g, np.float64)
        nu = self._nu(g)
        self.last_nu = nu
        u = np.zeros_like(g)
        pos = nu > 0
        u[pos] = g[pos] / np.sqrt(nu[pos] + self.eps)
        self.w = self.w * (1 - self.lr * self.wd)
        if self.momentum > 0:
            self.m = self.momentum * self.m + (1 - self.momentum) * u
            self.w = self.w - self.lr * self.m
        else:
            self.w = self.w - self.lr * u
        return self.w

    def accumulators(self):
        """Accumulators flattened per axis (as vectors), for comparison with the optimizer's state."""
        return [a.reshape(-1) for a in self.acc]


def sparse_reference_step(w, row_acc, rows, values, *, lr, eps=1e-30, variant="II", beta2=1.0):
    """The sparse path (TF reference): coalesce, row accumulator only, touched rows only. Returns (w, acc)."""
    w = np.array(w, np.float64)
    acc = np.array(row_acc, np.float64)
    summed = {}
    for r, v in zip(rows, values, strict=True):
        summed[int(r)] = summed.get(int(r), 0) + np.asarray(v, np.float64)
    for r, g in summed.items():
        if variant == "I" and w.ndim >= 2:
            acc[r] = acc[r] + np.max(g**2)
            nu = np.full(g.shape, acc[r])
        else:
            nu = beta2 * acc[r] + (1 - beta2) * g**2 if beta2 < 1 else acc[r] + g**2
            acc[r] = np.max(nu) if w.ndim >= 2 else nu
        u = np.where(nu > 0, g / np.sqrt(np.where(nu > 0, nu, 1) + eps), 0.0)
        w[r] = w[r] - lr * u
    return w, acc
