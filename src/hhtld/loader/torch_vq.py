"""The decode of the default codec (hhtl-vq) in torch, for weights kept
compressed on a device other than the CPU (on the CPU the codec's own numpy
decode runs, on zero-copy views of the same buffers).

Same steps as :func:`hhtld.codecs.vq.quantiser.decode_rows` and
``HhtlVqCodec.decode_rows``: per residual stage one gather per pattern
position into the group's bf16 palettes, the stages summed, times the per-row
bf16 gain, the inverse randomised block-Hadamard rotation (``@ H`` per block,
then the ±1 signs), plus the Slot L leaf summed lane by lane. The element-wise
steps run in numpy's order; the product sums in torch's order, so rows differ
from numpy's by the float32 rounding of a ``b``-term dot product (a few ulps
of the largest weight; tested).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..codecs.vq.codec import rotation_block
from ..codecs.vq.quantiser import HADAMARD_CHUNK, hadamard_factors, parse_stages, sylvester


@lru_cache(maxsize=32)
def hadamard(b: int, device: str):
    """Orthonormal Sylvester Hadamard (b, b) float32, as ``codecs.vq`` builds it."""
    import torch

    h = torch.ones((1, 1), dtype=torch.float32)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / torch.sqrt(torch.tensor(float(b), dtype=torch.float32))).to(device)


def gather_stages(params, group, tensor, idx=None):
    """float32 (m, n_cols): the summed palette gathers of rows ``idx`` — the row
    before its gain, rotation and leaf (the row in the rotated, unit-gain space)."""
    import torch
    import torch.nn.functional as F

    n_cols = int(params["n_cols"])
    out = None
    for si, st in enumerate(parse_stages(params["stages"])):
        tw = tensor[f"twig.{si}"]
        if idx is not None:
            tw = tw.index_select(0, idx)
        tw = tw.to(torch.int64)
        m = tw.shape[0]
        widths = st.widths
        period = sum(widths)
        n_periods = -(-n_cols // period)
        t3 = tw.view(m, n_periods, len(widths))
        pals = [group[f"palette.{si}.{j}"].to(torch.float32) for j in range(len(widths))]
        if len(widths) == 1:
            q = F.embedding(t3[:, :, 0], pals[0])  # (m, n_periods, w)
        else:
            q = torch.empty((m, n_periods, period), dtype=torch.float32, device=tw.device)
            off = 0
            for j, (p, w) in enumerate(zip(pals, widths)):
                q[:, :, off:off + w] = F.embedding(t3[:, :, j], p)
                off += w
        q2 = q.reshape(m, n_periods * period)[:, :n_cols]
        if out is None:
            out = q2 if n_periods * period == n_cols else q2.contiguous()
        else:
            out += q2
    if out is None:
        m = tensor["gain"].shape[0] if idx is None else idx.shape[0]
        out = torch.zeros((m, n_cols), dtype=torch.float32)
    return out


def decode_rows_vq(params, group, tensor, idx=None):
    """float32 (m, n_cols) rows ``idx`` (a 1-D int64 tensor; all rows when None).

    ``params``: the group's manifest params (``stages``, ``n_cols``);
    ``group`` / ``tensor``: mappings part name → torch tensor (palettes
    ``palette.<stage>.<pos>`` (k, w) bf16, ``rotation`` (c,) int8, ``basis``
    (lanes, c) bf16; ``twig.<stage>`` (n, segments) uint8/uint16, ``gain``
    (n,) bf16, ``leaf`` (n, lanes) int8, ``leaf_scale`` (1,) float32)."""
    import torch

    out = gather_stages(params, group, tensor, idx)
    if "gain" in tensor:
        g = tensor["gain"] if idx is None else tensor["gain"].index_select(0, idx)
        out *= g.to(torch.float32)[:, None]
    if "rotation" in group:
        out = hadamard_rows(out, rotation_block(params))
        out *= group["rotation"].to(torch.float32)
    if "leaf" in tensor:
        q = tensor["leaf"] if idx is None else tensor["leaf"].index_select(0, idx)
        c = q.to(torch.float32) * tensor["leaf_scale"][0].to(torch.float32)
        basis = group["basis"].to(torch.float32)
        leaf = torch.zeros_like(out)
        for lane in range(basis.shape[0]):  # lane by lane, as combine_lanes sums
            leaf += c[:, lane:lane + 1] * basis[lane]
        out += leaf
    return out


@lru_cache(maxsize=32)
def _sylvester64(b: int, device: str):
    import torch

    return torch.tensor(sylvester(b, np.float64), device=device)  # a copy: numpy's is read-only


def hadamard_rows(x, b: int):
    """Every length-b block of every row of ``x`` (m, c) float32 times H_b / sqrt(b), with
    the sums in float64 rounded once to float32 — the bits of ``codecs.vq``'s numpy
    transform (``quantiser._hadamard_blocks``), whatever the rows, threads or BLAS."""
    import torch

    m, c = x.shape
    p, q = hadamard_factors(b)
    h_p, h_q = _sylvester64(p, str(x.device)), _sylvester64(q, str(x.device))
    y = torch.empty((m, c), dtype=torch.float32, device=x.device)
    step = max(1, HADAMARD_CHUNK // max(c, 1))  # float64 copies of a few MB, as numpy's
    for r in range(0, m, step):
        x64 = x[r:r + step].to(torch.float64)
        k = x64.shape[0]
        y64 = x64.reshape(-1, q) @ h_q
        if p > 1:
            y64 = torch.matmul(h_p, y64.reshape(-1, p, q))
        y[r:r + k] = y64.reshape(k, c)
    y *= float(np.float32(1.0 / np.sqrt(b)))  # a float32 product, as numpy's
    return y


def rotate_inputs(x, signs, block: int):
    """The codec's forward rotation of activations ``x`` (t, n_cols) float32:
    ``(x * signs) @ blockdiag(H)``; ``x @ W.T`` equals ``rotate_inputs(x) @ (W H S).T``
    for the block-Hadamard ``H`` (symmetric, orthonormal, ``block`` wide) and signs ``S``."""
    b = int(block)
    y = (x * signs.to(x.dtype)).reshape(-1, b) @ hadamard(b, str(x.device))
    return y.reshape(x.shape)
