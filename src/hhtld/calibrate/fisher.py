"""How much each weight row matters: the Fisher diagonal, block by block.

A small weight error ``ΔW`` changes the model's output by
``½ Σ_ij F_ij ΔW_ij²`` (diagonal Fisher), where ``F_ij = E[(∂s/∂W_ij)²]``
and ``s`` is a per-sequence probe: for causal LMs ``Σ_t log p(ŷ_t)`` with
every ``ŷ_t`` drawn from the model's own next-token distribution (the
cross-position terms vanish in expectation, so this estimates the sum of
the positions' Fisher information: the change is the mean next-token KL),
for embedding models ``vᵀ ê`` for a random direction ``v ⊥ ê`` of the
normalised sentence embedding (the change is ``1 − cos``). The per-sequence
weight gradient ``Σ_t g_t x_tᵀ`` (output gradient times input) is formed
exactly, squared, and only its row sums ``Σ_j F_ij`` are kept: the
encoder's error is spread evenly over a row's columns, so that is what a
row's error costs.

The gradients are computed backwards one block at a time: the forward pass
stores each block's input hidden states (for the few Fisher batches only),
the head gives the gradient at the last block's output, and then block by
block (from the last) the block is materialised, run again with autograd on
its stored input, and back-propagated; hooks on its linear layers collect
the squared output gradients. Memory: one block, its activations for the
Fisher batches, and the stored hidden states.

Tables read by index (embeddings) get the gradient of each row read in a
sequence (the sum over the positions that read it), squared, times the
row's energy per column: ``Σ_v |G_v|² |e_v|²/c`` is their output change per
unit of relative row error.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _head_cotangent(lw, h_last, batch, family: str, gen, want_head: bool = False):
    """Gradient of the probe with respect to the last hidden states (B, T, d); the
    head's Fisher row sums (vocab,) when ``want_head`` (causal); the units counted
    (next-token positions, or sentences)."""
    import torch

    norm = lw.final_norm()
    h = h_last.detach().requires_grad_(True)
    valid = batch.attention_mask.bool()
    if family == "causal":
        head = lw.model.get_output_embeddings()
        x = norm(h) if norm is not None else h
        logits = head(x).float()
        logp = torch.log_softmax(logits, dim=-1)
        pos = valid.clone()
        pos[:, -1] = False  # the last position has no next token in the calibration text
        with torch.no_grad():
            y = torch.multinomial(logp[pos].exp(), 1, generator=gen)[:, 0]
        obj = logp[pos].gather(-1, y[:, None]).sum()
        head_r = None
        if want_head:
            with torch.no_grad():  # per-sequence head gradient Σ_t (onehot(ŷ_t) - p_t) x_tᵀ, one sequence at a time
                head_r = np.zeros(logp.shape[-1])
                k = 0
                for b in range(logp.shape[0]):
                    pb = pos[b]
                    n = int(pb.sum())
                    cot = -logp[b][pb].exp()  # (n, vocab)
                    cot[torch.arange(n), y[k : k + n]] += 1.0
                    k += n
                    gw = cot.T @ x[b][pb].detach().float()  # (vocab, c)
                    head_r += (gw * gw).sum(-1).double().numpy()
                    del cot, gw
        obj.backward()
        return h.grad.detach(), head_r, int(pos.sum())
    m = batch.attention_mask.unsqueeze(-1).to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    eh = torch.nn.functional.normalize(e, dim=-1)
    with torch.no_grad():
        v = torch.randn(eh.shape, generator=gen)
        v = v - (v * eh).sum(-1, keepdim=True) * eh  # orthogonal to the embedding
    (eh * v).sum().backward()
    return h.grad.detach(), None, int(h.shape[0])


def fisher_diagonals(lw, batches, family: str, names: set[str], seed: int = 0) -> dict[str, Any]:
    """Per checkpoint tensor in ``names``: ``rows`` (rows,) float64, the Fisher row sums
    ``Σ_j F_ij`` (linear layers and the output head), and ``table``, the scalar
    ``Σ_v |G_v|² |e_v|²/c`` (tables read by index); both per unit of the output
    change: per next-token position (causal) or per sentence (embedding). Returns
    ``{"rows": {name: r}, "table": {name: value}, "units": n}``."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    lw.capture(batches)
    inputs: list[list[Any]] = []  # inputs[i][b]: block i's input hidden states for batch b
    hidden = [b.hidden for b in batches]
    for i in range(len(lw.blocks)):
        inputs.append(hidden)
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        for b, h in zip(batches, hidden):
            b.hidden = h
        lw.run_block(i, batches)
        hidden = [b.hidden for b in batches]
        lw.release(keys)
    rows: dict[str, np.ndarray] = {}
    table: dict[str, float] = {}
    grads = []
    units = 0
    from .layerwise import head_name

    hn = head_name(lw) if family == "causal" else None
    for b, h in zip(batches, hidden):
        g, head_r, n = _head_cotangent(lw, h, b, family, gen, want_head=hn is not None and hn in names)
        grads.append(g)
        units += n
        if head_r is not None:
            rows[hn] = rows.get(hn, 0) + head_r
    for i in reversed(range(len(lw.blocks))):
        keys = lw.keys_under(lw.block_prefix(i))
        lw.materialise(keys)
        mods = {n: m for n, m in lw.linears(i) if n in names}
        new_grads = []
        for b, x, g in zip(batches, inputs[i], grads):
            handles = []

            def hook(name):
                def fwd(module, args, out):
                    x_in = args[0].detach()
                    vmask = b.attention_mask.to(x_in.dtype).unsqueeze(-1)  # padding carries no gradient

                    def bwd(grad):
                        # per-sequence weight gradient (rows, c) = Σ_t g_t x_tᵀ, squared, summed over columns
                        gw = torch.einsum("btr,btc->brc", (grad.detach() * vmask).float(), x_in.float())
                        r = (gw.double() ** 2).sum(-1).sum(0).numpy()  # (rows,): output features, as stored or not
                        rows[name] = rows.get(name, 0) + r
                    out.register_hook(bwd)
                return fwd

            for n, m in mods.items():
                handles.append(m.register_forward_hook(hook(n)))
            xi = x.detach().requires_grad_(True)
            with torch.enable_grad():
                out = lw.blocks[i](xi, *b.args, **b.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.backward(g)
            for hd in handles:
                hd.remove()
            new_grads.append(xi.grad.detach())
        grads = new_grads
        lw.release(keys)
    # tables read by index: run the embedding with autograd and push the first block's gradient back
    emb = {n: m for n, m in _tables(lw) if n in names}
    if emb:
        lw.materialise(lw.outside_blocks())
        for b, g in zip(batches, grads):
            handles = []

            def hook(name):
                def fwd(module, args, out):
                    idx = args[0]
                    if idx.dim() == 2 and idx.shape[0] != b.input_ids.shape[0]:  # one row per position for all
                        idx = idx.expand(b.input_ids.shape[0], -1)  # sequences: one gradient per sequence
                        out = out.expand(idx.shape[0], *out.shape[1:])
                    weight = module.weight.detach()
                    mask = b.attention_mask.bool()

                    def bwd(grad):
                        total = 0.0
                        for k in range(idx.shape[0]):  # per sequence: the gradient of each row it read
                            ids = idx[k][mask[k]]
                            u, inv = torch.unique(ids, return_inverse=True)
                            gu = torch.zeros(len(u), grad.shape[-1], dtype=torch.float64)
                            gu.index_add_(0, inv, grad[k][mask[k]].double())
                            e = (weight[u].double() ** 2).sum(-1) / weight.shape[-1]
                            total += float(((gu ** 2).sum(-1) * e).sum())
                        table[name] = table.get(name, 0.0) + total
                    leaf = out.detach().requires_grad_(True)  # the table's output, as a leaf of the graph
                    leaf.register_hook(bwd)
                    return leaf
                return fwd

            for n, m in emb.items():
                handles.append(m.register_forward_hook(hook(n)))
            seen = {}

            class Catch(torch.nn.Module):
                def forward(self, hidden, *a, **k):
                    seen["h"] = hidden
                    raise _Stop

            first = lw.blocks[0]
            lw.blocks[0] = Catch()
            try:
                with torch.enable_grad():
                    try:
                        lw.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                    except _Stop:
                        pass
                    seen["h"].backward(g)
            finally:
                lw.blocks[0] = first
                for hd in handles:
                    hd.remove()
        lw.release(lw.outside_blocks())
    n = max(1, units)
    return {"rows": {k: v / n for k, v in rows.items()}, "table": {k: v / n for k, v in table.items()},
            "units": units}


class _Stop(Exception):
    pass


def _tables(lw):
    """(checkpoint name, nn.Embedding) of the tables outside the blocks."""
    import torch

    for mname, mod in lw.model.named_modules():
        if isinstance(mod, torch.nn.Embedding):
            key = f"{mname}.weight"
            for k in lw.ties.get(key, [key]):
                if k in lw.key_to_name:
                    yield lw.key_to_name[k], mod
                    break


__all__ = ["fisher_diagonals"]
