"""One token's work between the weights, compiled (numba): what the lean decode
loop (:mod:`hhtld.loader.lean`) runs between its products when numba is there.

Each function replaces a dozen numpy calls of a few microseconds each by one
call, on one thread, in float32, with the arithmetic of the Llama modelling
code (RMSNorm, rotary embedding, eager attention with a float32 softmax, SiLU
gated MLP); the results equal the numpy path's up to float32 rounding (the
order of some sums differs). Importing this module imports numba:
:mod:`.runtime` decides whether it may.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, boundscheck=False, error_model="numpy")


@njit(**_JIT)
def rms_norm(h, w, eps, out):
    """out (d,) = w * h / sqrt(mean(h²) + eps) for one row h (d,)."""
    d = h.shape[0]
    s = np.float32(0.0)
    for i in range(d):
        s += h[i] * h[i]
    inv = np.float32(1.0) / np.sqrt(s / np.float32(d) + eps)
    for i in range(d):
        out[i] = w[i] * (h[i] * inv)


@njit(**_JIT)
def add_rms_norm(h, y, w, eps, out):
    """h += y (the residual, in place), then out = :func:`rms_norm` of h."""
    for i in range(h.shape[0]):
        h[i] += y[i]
    rms_norm(h, w, eps, out)


@njit(**_JIT)
def _rope(x, cos, sin, out):
    half = x.shape[0] // 2
    for i in range(half):
        out[i] = x[i] * cos[i] - x[i + half] * sin[i]
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half]


@njit(**_JIT)
def attend(q, k, v, cos, sin, kc, vc, p, scaling, scores, out):
    """One token's attention at position ``p``: rotary on q (heads · hd,) and k (kv heads · hd,),
    k and v written into the caches kc / vc (kv heads, positions, hd) at ``p``, then for every
    head the softmax over positions 0..p of its scores against its key/value head's keys,
    times the values: out (heads · hd,). ``scores`` (p + 1,) scratch."""
    n_kv, _, hd = kc.shape
    n_heads = q.shape[0] // hd
    grp = n_heads // n_kv
    for g in range(n_kv):
        _rope(k[g * hd:(g + 1) * hd], cos, sin, kc[g, p])
        for i in range(hd):
            vc[g, p, i] = v[g * hd + i]
    qr = np.empty(hd, dtype=np.float32)
    for h in range(n_heads):
        g = h // grp
        _rope(q[h * hd:(h + 1) * hd], cos, sin, qr)
        m = np.float32(-np.inf)
        for j in range(p + 1):
            s = np.float32(0.0)
            kj = kc[g, j]
            for i in range(hd):
                s += qr[i] * kj[i]
            s *= scaling
            scores[j] = s
            if s > m:
                m = s
        tot = np.float32(0.0)
        for j in range(p + 1):
            e = np.exp(scores[j] - m)
            scores[j] = e
            tot += e
        o = out[h * hd:(h + 1) * hd]
        for i in range(hd):
            o[i] = np.float32(0.0)
        for j in range(p + 1):
            wj = scores[j] / tot
            vj = vc[g, j]
            for i in range(hd):
                o[i] += wj * vj[i]


@njit(**_JIT)
def silu_mul(g, u, out):
    """out = silu(g) * u = g / (1 + exp(-g)) * u."""
    for i in range(g.shape[0]):
        x = g[i]
        out[i] = x / (np.float32(1.0) + np.exp(-x)) * u[i]


__all__ = ["add_rms_norm", "attend", "rms_norm", "silu_mul"]
