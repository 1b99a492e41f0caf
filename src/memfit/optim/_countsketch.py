"""Count-sketch Adam (Spring, Kyrillidis, Mohan, Shrivastava, ICML 2019): the baseline SM3 is compared with.

Adam keeps two dense moments per parameter. Here the rows of each moment of a parameter of shape
``(n, *row)`` (rank >= 2) are hashed into a sketch of shape ``(hashes, B, *row)`` with
``B = ceil(sketch_ratio * n)``:

- first moment, a signed **count sketch**: ``S_m <- beta1 S_m + (1 - beta1) sum_i s_j(i) g_i`` into bucket
  ``h_j(i)`` of hash row ``j``; query ``m_i = median_j s_j(i) S_m[j, h_j(i)]``;
- second moment, a non-negative **count-min sketch**: ``S_v <- beta2 S_v + (1 - beta2) g_i^2`` into bucket
  ``h_j(i)``; query ``v_i = min_j S_v[j, h_j(i)]`` (never below the true value).

The EMA decays inside each bucket (the sketch is linear, so decaying the sketch is the sketch of the
decayed moment). Then the Adam step with bias correction, exactly as ``torch.optim.Adam``. Rank <= 1
tensors keep dense moments (they are small; the paper sketches embedding and softmax layers).

Hashing is deterministic from ``seed`` and the parameter's position: ``h_j`` is a seeded random
permutation of the rows taken modulo ``B`` (so ``sketch_ratio=1`` has no collisions and equals Adam),
``s_j`` seeded random signs. The hash tables are re-derived from the seed (cached, not optimizer state).

Memory: ``2 * hashes * ceil(sketch_ratio * n) * row_numel * 4`` bytes per float32 tensor of rank >= 2
(``1.2 x`` the parameter at the defaults, against Adam's ``2 x``), ``2 * numel * 4`` for rank <= 1.

References:
    Spring, Kyrillidis, Mohan, Shrivastava. Compressing Gradient Optimizers via Count-Sketches. ICML 2019,
    arXiv:1902.00179. Charikar, Chen, Farach-Colton (count sketch, 2002); Cormode, Muthukrishnan
    (count-min sketch, 2005).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["CountSketchAdam"]


class CountSketchAdam(Optimizer):
    """Adam whose moments of every rank >= 2 parameter live in count / count-min sketches of its rows.

    Args:
        params: iterable of parameters or named parameters, or of param-group dicts.
        lr: learning rate (float, or a 1-element tensor read once per step: this baseline is eager).
        betas: Adam's ``(beta1, beta2)``.
        eps: added to the square root of the second moment.
        weight_decay: L2 penalty added to the gradient (``torch.optim.Adam``'s convention).
        hashes: number of hash rows of each sketch (the median / min is taken over them).
        sketch_ratio: buckets per hash row as a fraction of the parameter's rows, in (0, 1].
        seed: seed of the hash functions.
        maximize: maximize the objective instead of minimizing it.

    Raises:
        ValueError: on a hyperparameter out of range, or on a sparse gradient (unsupported).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        hashes: int = 3,
        sketch_ratio: float = 0.2,
        seed: int = 0,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"CountSketchAdam: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, Tensor)):
            raise TypeError(f"CountSketchAdam: lr must be a float or a 1-element tensor, got {lr!r}")
        if not float(lr) >= 0.0:
            raise ValueError(f"CountSketchAdam: lr must be >= 0, got {float(lr)}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"CountSketchAdam: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"CountSketchAdam: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"CountSketchAdam: weight_decay must be >= 0, got {weight_decay}")
        if not (isinstance(hashes, int) and hashes >= 1):
            raise ValueError(f"CountSketchAdam: hashes must be an int >= 1, got {hashes!r}")
        if not 0.0 < sketch_ratio <= 1.0:
            raise ValueError(f"CountSketchAdam: sketch_ratio must be in (0, 1], got {sketch_ratio}")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "hashes": hashes,
            "sketch_ratio": sketch_ratio, "seed": seed, "maximize": maximize,
        }  # fmt: skip
        super().__init__(params, defaults)
        # (seed, rows, buckets, hashes, device) -> (bucket index (hashes, rows), sign (hashes, rows)).
        self._hash_cache: dict[tuple[int, int, int, int, str], tuple[Tensor, Tensor]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._hash_cache = {}
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("seed", 0)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_hash_cache", None)  # derived from the seed; not worth pickling
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, with every loaded state tensor the optimizer's own.

        torch keeps a given tensor whose dtype and device already fit (always the ``step``), so two
        optimizers loaded from one state dict would share their sketches and count each other's steps.
        The copies are made first among the load-state-dict post-hooks, so what a hook writes stays.
        """

        def own_state(_: Optimizer) -> None:
            for state in self.state.values():
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        state[key] = value.clone()

        handle = self.register_load_state_dict_post_hook(own_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    @staticmethod
    def buckets(rows: int, sketch_ratio: float) -> int:
        """Buckets per hash row for a parameter with ``rows`` rows: ``ceil(sketch_ratio * rows)``."""
        return max(1, math.ceil(sketch_ratio * rows - 1e-9))

    def _hash(
        self, seed: int, rows: int, buckets: int, hashes: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        key = (seed, rows, buckets, hashes, str(device))
        if key not in self._hash_cache:
            gen = torch.Generator().manual_seed(seed)
            # A permutation modulo B: injective when B >= rows, and independent collisions across hash rows.
            index = torch.stack([torch.randperm(rows, generator=gen) % buckets for _ in range(hashes)])
            sign = torch.randint(0, 2, (hashes, rows), generator=gen).mul_(2).sub_(1)
            self._hash_cache[key] = (index.to(device), sign.to(device))
        return self._hash_cache[key]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                position += 1
                if p.grad is not None:
                    self._update(p, group, position)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any], position: int) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad
        assert grad is not None
        state = self.state[p]
        sketched = p.dim() >= 2
        acc_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        buckets = self.buckets(p.shape[0], group["sketch_ratio"]) if sketched else 0
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            shape = (group["hashes"], buckets, *p.shape[1:]) if sketched else p.shape
            suffix = "_sketch" if sketched else ""
            state["exp_avg" + suffix] = torch.zeros(shape, dtype=acc_dtype, device=p.device)
            state["exp_avg_sq" + suffix] = torch.zeros(shape, dtype=acc_dtype, device=p.device)
        state["step"].add_(1)
        step = float(state["step"])
        if p.numel() == 0:  # zero-size parameters (shape (0, 5)) step like torch's optimizers: nothing moves
            return
        rows: Tensor | None = None
        if grad.is_sparse:
            if not sketched or grad.sparse_dim() != 1:
                raise ValueError(
                    "CountSketchAdam: sparse gradients must index the rows of a rank >= 2 parameter "
                    f"(sparse_dim() == 1); got shape {tuple(p.shape)}, sparse_dim()={grad.sparse_dim()}"
                )
            coalesced = grad.coalesce()
            rows, g = coalesced.indices()[0], coalesced.values().to(acc_dtype)
        elif sketched:
            g = grad.to(acc_dtype)
            # Only rows with a gradient move, as in the paper's sparse updates: an untouched row's query
            # holds only its bucket-mates' moments, which must not move it.
            touched = g.reshape(g.shape[0], -1).ne(0).any(dim=1)
            if not bool(touched.all()):  # dense layers touch every row: skip the gather then
                rows = touched.nonzero().reshape(-1)
                g = g.index_select(0, rows)
        else:
            g = grad.to(acc_dtype)
        if group["maximize"]:
            g = -g
        w = p.to(acc_dtype) if rows is None else p.index_select(0, rows).to(acc_dtype)
        if group["weight_decay"] != 0.0:
            g = g.add(w, alpha=group["weight_decay"])
        if sketched:
            m, v = self._sketched_moments(state, rows, g, p.shape[0], beta1, beta2, group, position)
        else:
            state["exp_avg"].lerp_(g, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            m, v = state["exp_avg"], state["exp_avg_sq"]
        # torch.optim.Adam's update, term by term (so sketch_ratio=1 reproduces it).
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        w.addcdiv_(m, denom, value=-float(group["lr"]) / bias_correction1)
        if rows is not None:
            p.index_copy_(0, rows, w.to(p.dtype))
        elif w is not p:
            p.copy_(w)

    def _sketched_moments(
        self,
        state: dict[str, Tensor],
        rows: Tensor | None,
        g: Tensor,
        n_rows: int,
        beta1: float,
        beta2: float,
        group: dict[str, Any],
        position: int,
    ) -> tuple[Tensor, Tensor]:
        """Decay both sketches, add gradient rows ``g`` (shape (r, *row)) at ``rows``, query those rows.

        ``rows=None`` means every row (``g`` is the whole gradient).

        Returns:
            ``(m, v)`` of ``g``'s shape: median of the signed count-sketch estimates, min of the count-min
            estimates.
        """
        s_m, s_v = state["exp_avg_sketch"], state["exp_avg_sq_sketch"]
        hashes, buckets = s_m.shape[0], s_m.shape[1]
        index, sign = self._hash(group["seed"] * 1_000_003 + position, n_rows, buckets, hashes, g.device)
        sign = sign.to(g.dtype)
        if rows is not None:  # (hashes, r): only the rows that have a gradient
            index, sign = index[:, rows], sign[:, rows]
        row_view = (g.shape[0],) + (1,) * (g.dim() - 1)
        s_m.mul_(beta1)
        s_v.mul_(beta2)
        gsq = g * g
        for j in range(hashes):
            s_m[j].index_add_(0, index[j], g * sign[j].view(row_view), alpha=1.0 - beta1)
            s_v[j].index_add_(0, index[j], gsq, alpha=1.0 - beta2)
        est_m = torch.stack(
            [s_m[j].index_select(0, index[j]) * sign[j].view(row_view) for j in range(hashes)]
        )
        est_v = torch.stack([s_v[j].index_select(0, index[j]) for j in range(hashes)])
        if hashes == 3:  # median of three without a sort: max(min(a, b), min(max(a, b), c))
            a, b, c = est_m
            m = torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
        else:
            m = est_m.median(dim=0).values if hashes > 1 else est_m[0]
        return m, est_v.amin(dim=0)
