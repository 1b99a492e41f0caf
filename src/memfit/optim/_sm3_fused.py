"""Fused SM3 update on CPU: one pass over each parameter, compiled by torch.compile's C++ toolchain.

Why a hand-written loop and not ``torch.compile`` of the eager update: inductor splits the SM3-II step
into three sweeps (row maxima, column maxima, elementwise update) and, with momentum, materialises a
temporary as large as the parameter; measured on this 2-core CPU that is 1.1-3x fused Adam. But the
update of SM3-II only needs the *old* accumulators, and the new ones are maxima of the same ``nu`` the
update uses, so everything fits in one row-major sweep:

    for each row i (split across OpenMP threads):
        for each column j:
            nu  = min(r[i], c[j]) + g[i,j]^2            (or the beta2 EMA)
            rmax = max(rmax, nu);  cmax_thread[j] = max(cmax_thread[j], nu)
            u   = nu == 0 ? 0 : g / sqrt(nu + eps)
            m   = mom * m + (1 - mom) * u;  w = w * (1 - lr wd) - lr * m
        r[i] = rmax                                      (row i is read by this thread only)
    c[j] = max over threads of cmax_thread[j]            (after the sweep: every row read the old c)

Bytes per parameter: read g, w, m and write w, m = 20 (fp32 momentum), 16 (bf16 momentum), 12 (no
momentum), against fused Adam's 28. SM3-I needs the new accumulators before the update, so it sweeps g
once for the maxima of g^2 and then once for the update. Rank <= 1 tensors use the elementwise (diagonal
Adagrad) form of the same loop.

Scope: float32 parameters and gradients, contiguous, rank <= 2, on CPU; momentum buffers in float32 or
bfloat16. Anything else (float64/bf16/fp16 parameters, rank >= 3, sparse gradients, CUDA) takes the eager
kernels of :mod:`memfit.optim._sm3_kernels`, which compute the same equations with the same roundings
(:mod:`memfit.optim._sm3_math`): the fused and eager paths agree bit for bit.

The C++ source is compiled once per process through inductor's code cache (cached on disk across
processes); that private API is reached only through :func:`memfit._compat.load_cpp_pybinding` (house rule 8).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from memfit import _compat
from memfit.optim._sm3_math import SM3Batch, SM3Hyper

__all__ = ["fused_supported", "sm3_fused"]

_log = logging.getLogger(__name__)

_SOURCE = r"""
// at::vec (torch's SIMD wrappers) comes with the inductor prefix header that the code cache includes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <omp.h>

using V = at::vec::Vectorized<float>;
using BF = c10::BFloat16;
constexpr int64_t W = V::size();

// Momentum buffers: float, or bfloat16 (computed in float, rounded once on store).
static inline V load_m(const float* m, int64_t k, int64_t n) { return V::loadu(m + k, n); }
static inline V load_m(const BF* m, int64_t k, int64_t n) {
    return at::vec::convert<float>(at::vec::Vectorized<BF>::loadu(m + k, n));
}
static inline V store_m(float* m, int64_t k, int64_t n, V v) { v.store(m + k, n); return v; }
static inline V store_m(BF* m, int64_t k, int64_t n, V v) {
    auto b = at::vec::convert<BF>(v);
    b.store(m + k, n);
    return at::vec::convert<float>(b);  // the update uses the stored (rounded) buffer, as eager does
}

// hp: -lr, mom, 1 - mom, beta2, 1 - beta2, eps, 1 - lr wd, sign; each formed in double (as torch forms a
// Python scalar) and rounded once to float, so that every coefficient equals the eager path's.
struct HP { V neg_lr, mom, one_m_mom, beta2, one_m_b2, eps, decay, sgn, zero; };
static inline HP make_hp(const float* hp) {
    return HP{V(hp[0]), V(hp[1]), V(hp[2]), V(hp[3]), V(hp[4]), V(hp[5]), V(hp[6]), V(hp[7]), V(0.0f)};
}

// The eager path's roundings, operation for operation (memfit.optim._sm3_math):
// u = nu == 0 ? 0 : g / sqrt(nu + eps);  m = fma(1 - mom, u, mom m);  w = fma(-lr, m, w (1 - lr wd))
template <typename MT, bool HAS_M>
static inline void update(float* p, MT* m, int64_t k, int64_t n, V gj, V nu, const HP& h) {
    V u = V::blendv(gj / (nu + h.eps).sqrt(), h.zero, nu == h.zero);
    if (HAS_M) u = store_m(m, k, n, at::vec::fmadd(h.one_m_mom, u, h.mom * load_m(m, k, n)));
    at::vec::fmadd(h.neg_lr, u, V::loadu(p + k, n) * h.decay).store(p + k, n);
}

// nu = fma(g, g, min) or, with the EMA, fma((1 - beta2) g, g, beta2 min): torch.addcmul's rounding.
template <bool EMA>
static inline V second_moment(V mn, V gj, const HP& h) {
    return EMA ? at::vec::fmadd(h.one_m_b2 * gj, gj, h.beta2 * mn) : at::vec::fmadd(gj, gj, mn);
}

// max that propagates NaN, as torch.amax and at::vec::maximum do (std::max would drop it).
static inline float max_nan(float a, float b) { return std::isnan(a) ? a : ((std::isnan(b) || b > a) ? b : a); }
static inline float reduce_max(V v) {
    return at::vec::vec_reduce_all<float>([](V& x, V& y) { return at::vec::maximum(x, y); }, v);
}
static inline void merge_columns(float* c, const float* scratch, int64_t C, int nt, bool add) {
    for (int64_t j = 0; j < C; ++j) {
        float v = 0.0f;
        for (int t = 0; t < nt; ++t) v = max_nan(v, scratch[(int64_t)t * C + j]);
        c[j] = add ? c[j] + v : v;
    }
}

// Rank 2, shape (R, C): r (R), c (C), scratch nt*C per-thread column maxima.
template <typename MT, bool HAS_M, bool EMA, bool SM3_I>
static void sweep(float* __restrict__ p, const float* __restrict__ g, MT* __restrict__ m,
                  float* __restrict__ r, float* __restrict__ c, const float* hp,
                  int64_t R, int64_t C, float* __restrict__ scratch, int nt) {
    const HP h = make_hp(hp);
    std::fill(scratch, scratch + (int64_t)nt * C, 0.0f);
    if (SM3_I) {
        // SM3-I: a_k += max over the slice of g^2 (one sweep over g), then nu = min(r_i, c_j) below.
        #pragma omp parallel num_threads(nt)
        {
            float* cm = scratch + (int64_t)omp_get_thread_num() * C;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < R; ++i) {
                V rm(0.0f);
                for (int64_t j = 0; j < C; j += W) {
                    const int64_t n = std::min(W, C - j);
                    V gj = V::loadu(g + i * C + j, n), s = gj * gj;
                    rm = at::vec::maximum(rm, s);
                    at::vec::maximum(V::loadu(cm + j, n), s).store(cm + j, n);
                }
                r[i] += reduce_max(rm);
            }
        }
        merge_columns(c, scratch, C, nt, true);
    }
    #pragma omp parallel num_threads(nt)
    {
        float* cm = scratch + (int64_t)omp_get_thread_num() * C;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < R; ++i) {
            const V ri(r[i]);
            V rm(0.0f);
            const int64_t o = i * C;
            for (int64_t j = 0; j < C; j += W) {
                const int64_t n = std::min(W, C - j);
                const V gj = h.sgn * V::loadu(g + o + j, n);
                const V mn = at::vec::minimum(ri, V::loadu(c + j, n));
                V nu = mn;
                if (!SM3_I) {
                    nu = second_moment<EMA>(mn, gj, h);
                    rm = at::vec::maximum(rm, nu);
                    at::vec::maximum(V::loadu(cm + j, n), nu).store(cm + j, n);
                }
                update<MT, HAS_M>(p, m, o + j, n, gj, nu, h);
            }
            if (!SM3_I) r[i] = reduce_max(rm);  // row i is read by this thread only, and already read
        }
    }
    if (!SM3_I) merge_columns(c, scratch, C, nt, false);  // every row has read the old c: now it may change
}

// Rank <= 1: one full accumulator a (diagonal Adagrad); both variants coincide.
template <typename MT, bool HAS_M, bool EMA>
static void diag(float* __restrict__ p, const float* __restrict__ g, MT* __restrict__ m,
                 float* __restrict__ a, const float* hp, int64_t N, int nt) {
    const HP h = make_hp(hp);
    #pragma omp parallel for schedule(static) num_threads(nt) if (N > 262144)
    for (int64_t k = 0; k < N; k += W) {
        const int64_t n = std::min(W, N - k);
        const V gk = h.sgn * V::loadu(g + k, n);
        const V ak = V::loadu(a + k, n);
        const V nu = second_moment<EMA>(ak, gk, h);
        nu.store(a + k, n);
        update<MT, HAS_M>(p, m, k, n, gk, nu, h);
    }
}

template <typename MT, bool HAS_M>
static void dispatch(float* p, const float* g, MT* m, float* r, float* c, const float* hp,
                     int64_t R, int64_t C, float* scratch, int64_t mode, int nt) {
    // mode: 0 SM3-II, 1 SM3-II with EMA, 2 SM3-I, 3 diagonal, 4 diagonal with EMA
    switch (mode) {
        case 0: sweep<MT, HAS_M, false, false>(p, g, m, r, c, hp, R, C, scratch, nt); break;
        case 1: sweep<MT, HAS_M, true, false>(p, g, m, r, c, hp, R, C, scratch, nt); break;
        case 2: sweep<MT, HAS_M, false, true>(p, g, m, r, c, hp, R, C, scratch, nt); break;
        case 3: diag<MT, HAS_M, false>(p, g, m, r, hp, R, nt); break;
        default: diag<MT, HAS_M, true>(p, g, m, r, hp, R, nt); break;
    }
}

extern "C" void kernel(float* p, const float* g, float* m, float* r, float* c, const float* hp,
                       int64_t R, int64_t C, float* scratch, int64_t mode, int64_t mkind,
                       int64_t nthreads) {
    // mkind: 0 no momentum (m unused), 1 float32 momentum, 2 bfloat16 momentum
    const int nt = static_cast<int>(nthreads);
    if (mkind == 0) dispatch<float, false>(p, g, m, r, c, hp, R, C, scratch, mode, nt);
    else if (mkind == 1) dispatch<float, true>(p, g, m, r, c, hp, R, C, scratch, mode, nt);
    else dispatch<BF, true>(p, g, reinterpret_cast<BF*>(m), r, c, hp, R, C, scratch, mode, nt);
}
"""

_ARGTYPES = [
    "float*", "const float*", "float*", "float*", "float*", "const float*",
    "int64_t", "int64_t", "float*", "int64_t", "int64_t", "int64_t",
]  # fmt: skip


@functools.cache
def _kernel() -> Callable[..., None] | None:
    try:
        return _compat.load_cpp_pybinding(_ARGTYPES, _SOURCE)
    except Exception as err:  # no compiler, no OpenMP, sandboxed /tmp: fall back, and say why once
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        _log.warning("memfit.optim.SM3: fused CPU kernel unavailable (%s); using the foreach path", first)
        return None


def fused_supported(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` (CPU with a working C++ compiler)."""
    return device.type == "cpu" and _kernel() is not None


def _eligible(p: Tensor, g: Tensor, buf: Tensor | None) -> bool:
    return (
        p.dtype == torch.float32
        and p.dim() <= 2
        and not g.is_sparse
        and g.dtype == torch.float32
        and p.is_contiguous()
        and g.is_contiguous()
        and p.numel() > 0
        and (buf is None or (buf.dtype in (torch.float32, torch.bfloat16) and buf.is_contiguous()))
    )


def _coefficients(hp: SM3Hyper) -> Tensor:
    """The kernel's ``hp`` buffer, each entry rounded to float32 as torch rounds the eager path's scalars."""
    lr = hp.lr
    if isinstance(lr, Tensor):
        # 0-d lr tensors are read here once per step; 1 - lr * wd in lr's dtype, as the eager tensor ops do.
        decay = float(1.0 - lr * hp.weight_decay) if hp.weight_decay != 0.0 else 1.0
        lr = float(lr)
    else:
        decay = 1.0 - lr * hp.weight_decay
    coefficients = [-lr, hp.momentum, 1.0 - hp.momentum, hp.beta2, 1.0 - hp.beta2, hp.eps, decay]
    return torch.tensor([*coefficients, -1.0 if hp.maximize else 1.0], dtype=torch.float32)


def sm3_fused(batch: SM3Batch, hp: SM3Hyper) -> list[int]:
    """One SM3 step of every tensor the kernel takes (:func:`_eligible`).

    Returns:
        The indices of the tensors it did not update (not eligible, or no compiler): the caller runs the
        eager ``foreach`` kernel on them.
    """
    kernel = _kernel()
    if kernel is None:
        return list(range(len(batch.params)))
    rest: list[int] = []
    coefficients = _coefficients(hp)
    nt = max(torch.get_num_threads(), 1)
    scratch: dict[int, Tensor] = {}
    for i, (p, g, accs, buf) in enumerate(batch.rows()):
        if not _eligible(p, g, buf):
            rest.append(i)
            continue
        if p.dim() <= 1:
            rows, cols = p.numel(), 1
            r, c = accs[0], accs[0]
            mode = 3 if hp.beta2 == 1.0 else 4
        else:
            rows, cols = p.shape
            r, c = accs[0], accs[1]
            mode = 2 if hp.variant == "I" else (0 if hp.beta2 == 1.0 else 1)
        if cols not in scratch:
            scratch[cols] = torch.empty(nt * cols + 1, dtype=torch.float32)
        mkind = 0 if buf is None else (1 if buf.dtype == torch.float32 else 2)
        m: Any = p if buf is None else buf  # any pointer: the kernel ignores m when mkind == 0
        kernel(p, g, m, r, c, coefficients, rows, cols, scratch[cols], mode, mkind, nt)
    return rest
