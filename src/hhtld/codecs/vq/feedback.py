"""Error feedback for the budget codec: hhtl-vq palettes, GPTQ/GPTVQ column order.

Given the Hessian ``H = XᵀX`` of a linear layer's inputs (calibration
tokens), the output error of a weight error ``ΔW`` is ``tr(ΔW H ΔWᵀ)``.
Quantising the columns of a row in order and pushing each column's error
into the columns not yet quantised, weighted by the inverse Hessian (the
optimal brain surgeon update, computed from the Cholesky factor ``U`` of
``H⁻¹`` as GPTQ does), lowers that error at the same rate. Here the columns
are those of the rotated row (the randomised Hadamard is orthonormal, so
``H`` turns into ``R H Rᵀ``), a *unit* of columns is quantised at once by
every stage (the least common multiple of the stages' periods, so every
segment of every stage lies inside one unit), and the unit's error is fed
back column by column (GPTVQ). The stored format is the codec's own: twigs
into the group's palettes and a per-row gain, so decoding is unchanged.

Updates are made lazily per block of about 128 columns: inside the block
column by column, to the rest of the row with one matrix product per block.
Rows are independent given ``U``, so row blocks run side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm

import numpy as np
from scipy.linalg import cho_factor, cho_solve, cholesky

from ...errors import CodecError
from ..reference.palette import to_bf16
from .quantiser import Layout, VqBlock, VqModel, assign, rotate

DEFAULT_DAMP = 0.01  # fraction of the mean diagonal added to H (GPTQ's default)
LAZY_COLS = 128  # columns per lazy update block (rounded up to whole units)


def rotated_hessian(h: np.ndarray, model: VqModel, overwrite: bool = False) -> np.ndarray:
    """``R H Rᵀ`` (c, c) float32 for the model's rotation; ``h`` itself (any dtype) without one.

    The rotation runs in float32, in place on one (c, c) float32 array: a copy of ``h``,
    or with ``overwrite`` ``h``'s own memory when it is a writeable float32 array (its
    contents are then lost). The rows are turned, then the rows of the transpose
    (``R H Rᵀ = rotate(rotate(H)ᵀ)``, H symmetric), so the result is that array seen
    transposed: Fortran order, which is the order LAPACK factors in."""
    if model.signs is None:
        return h
    own = overwrite and h.dtype == np.float32 and h.flags.writeable
    a = h if own else np.array(h, dtype=np.float32)
    rotate(a, model.signs, block=model.block, out=a)
    t = a.T
    return rotate(t, model.signs, block=model.block, out=t)


def inverse_cholesky(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper-triangular ``U`` (c, c) float64 with ``UᵀU = (H + damp · mean(diag H) · I)⁻¹``.

    Inputs that never fire (zero diagonal) get a unit diagonal, as in GPTQ. One float64
    copy of ``h`` is made, in LAPACK's (Fortran) order, so that every factorisation runs in
    place: at most two (c, c) float64 arrays at a time besides the caller's (c = 11008:
    969 MB each)."""
    h = np.array(h, dtype=np.float64, order="F")
    c = h.shape[0]
    d = np.diag(h).copy()
    dead = d <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h))) if c else 1.0
    h[np.diag_indices(c)] += damp * (mean if mean > 0 else 1.0)
    try:
        fac = cho_factor(h, lower=True, overwrite_a=True, check_finite=True)
        hinv = cho_solve(fac, np.eye(c, order="F"), overwrite_b=True)
        del fac, h
        sym = np.add(hinv, hinv.T, order="F")  # exactly symmetric; halving is exact
        del hinv
        sym /= 2
        return cholesky(sym, lower=False, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise CodecError("the calibration Hessian is not positive definite even after damping; "
                         "use more calibration tokens or a larger damping") from None


def unit_cols(model: VqModel) -> int:
    """Columns quantised together: every stage's segments tile whole units."""
    u = 1
    for st in model.stages:
        u = lcm(u, st.period)
    return u


@dataclass
class FeedbackPlan:
    """What every row block of one tensor shares: the model, ``U`` and the unit."""

    model: VqModel
    u_chol: np.ndarray  # (c, c) float32, upper triangular
    h_rot: np.ndarray  # (c, c) float64, C order: R H Rᵀ (its float32 values) without damping, for the output error
    unit: int
    lazy: int

    @classmethod
    def build(cls, model: VqModel, hessian: np.ndarray, damp: float = DEFAULT_DAMP,
              overwrite: bool = False) -> "FeedbackPlan":
        """The plan for ``hessian`` (c, c); ``overwrite``: a float32 ``hessian`` may be
        rotated in place (:func:`rotated_hessian`), so that at most one float32 and two
        float64 (c, c) arrays are held while ``U`` is computed. ``h_rot`` is widened once
        here, in C order, not in every row block (a one-row block's product would take
        another summation order from a Fortran-order matrix)."""
        c = model.n_cols
        if hessian.shape != (c, c):
            raise CodecError(f"the Hessian has shape {list(hessian.shape)}, the rows have {c} columns")
        u = unit_cols(model)
        lazy = max(u, -(-LAZY_COLS // u) * u)
        h_rot = rotated_hessian(hessian, model, overwrite)
        chol = inverse_cholesky(h_rot, damp).astype(np.float32)
        h64 = np.asarray(h_rot, dtype=np.float32).astype(np.float64, order="C")
        return cls(model, chol, h64, u, lazy)


def _quantise_unit(resid: np.ndarray, model: VqModel, a: int, unit: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stage on the unit of columns [a, a + unit) of ``resid`` (m, n_pad).

    Returns the twigs of each stage for the unit's segments ([stage] (m, n_seg_in_unit))
    and the quantised unit (m, unit)."""
    m = resid.shape[0]
    v = resid[:, a : a + unit]
    total = np.zeros((m, unit), dtype=np.float32)
    twigs = []
    for st, pals in zip(model.stages, model.palettes):
        r = v - total
        n_per = unit // st.period
        q = np.zeros((m, unit), dtype=np.float32)
        tw = np.zeros((m, n_per, len(st.widths)), dtype=np.int64)
        off = 0
        rv = r.reshape(m, n_per, st.period)
        qv = q.reshape(m, n_per, st.period)
        for j, (w, pal) in enumerate(zip(st.widths, pals)):
            idx = assign(np.ascontiguousarray(rv[:, :, off : off + w]).reshape(-1, w), pal)
            qv[:, :, off : off + w] = pal[idx].reshape(m, n_per, w)
            tw[:, :, j] = idx.reshape(m, n_per)
            off += w
        twigs.append(tw.reshape(m, -1))
        total += q
    return twigs, total


def encode_block_feedback(plan: FeedbackPlan, x: np.ndarray, cosines: bool = False) -> VqBlock:
    """Encode rows x (m, c) float32 with error feedback: twigs per stage and the
    bf16 gain (the row RMS after rotation; the stages quantise the row divided by it)."""
    model = plan.model
    m, c = x.shape
    y = rotate(x, model.signs, block=model.block) if model.signs is not None else np.array(x, dtype=np.float32)
    if model.gain:
        g = np.sqrt(np.einsum("ij,ij->i", y, y) / c).astype(np.float32)
        g = to_bf16(np.where(g > 0, g, 1.0)).astype(np.float32)
        g = np.where(g > 0, g, 1.0).astype(np.float32)  # a bf16 underflow must not divide by zero
        yn = y / g[:, None]
    else:
        g = None
        yn = y
    n_pad = -(-c // plan.unit) * plan.unit
    work = np.zeros((m, n_pad), dtype=np.float32)
    work[:, :c] = yn
    q_all = np.zeros((m, n_pad), dtype=np.float32)
    stage_twigs: list[list[np.ndarray]] = [[] for _ in model.stages]
    u = plan.u_chol
    for b0 in range(0, n_pad, plan.lazy):
        b1 = min(n_pad, b0 + plan.lazy)
        end = min(b1, c)
        err = np.zeros((m, max(0, end - b0)), dtype=np.float32)
        for a in range(b0, b1, plan.unit):
            tw, q = _quantise_unit(work, model, a, plan.unit)
            for s, t in enumerate(tw):
                stage_twigs[s].append(t)
            q_all[:, a : a + plan.unit] = q
            z = min(a + plan.unit, c)
            if z <= a:
                continue
            # the unit's columns fed back one after the other (a small triangular solve):
            # e_j U_jj = (w_j - q_j) - sum_{i<j} e_i U_ij
            r = work[:, a:z] - q[:, : z - a]
            e = err[:, a - b0 : z - b0]
            for j in range(z - a):
                acc = r[:, j] - e[:, :j] @ u[a : a + j, a + j] if j else r[:, j]
                e[:, j] = acc / u[a + j, a + j]
            if z < end:
                work[:, z:end] -= e @ u[a:z, z:end]
        if end < c:
            work[:, end:c] -= err @ u[b0:end, end:c]
    twigs = []
    for st, parts in zip(model.stages, stage_twigs):
        lay = Layout(st, c)
        t = np.concatenate(parts, axis=1)[:, : lay.n_segments]  # segments past the last period are padding
        twigs.append(t.astype(np.uint8 if max(st.ks) <= 256 else np.uint16))
    approx = q_all[:, :c] * (g[:, None] if g is not None else np.float32(1.0))
    d = (y - approx).astype(np.float64)
    out = VqBlock(twigs, g, output_error=float(np.einsum("ij,ij->", d @ plan.h_rot, d)))
    if cosines:
        from ...cosine import row_cosines

        out.cosines = row_cosines(y, approx)
    return out


def output_error(x: np.ndarray, rec: np.ndarray, hessian: np.ndarray) -> float:
    """``tr(ΔW H ΔWᵀ)`` of rows x (m, c) against their reconstruction (float64)."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(rec, dtype=np.float64)
    return float(np.einsum("ij,ij->", d @ np.asarray(hessian, dtype=np.float64), d))


__all__ = ["DEFAULT_DAMP", "FeedbackPlan", "encode_block_feedback", "inverse_cholesky", "output_error",
           "rotated_hessian", "unit_cols"]
