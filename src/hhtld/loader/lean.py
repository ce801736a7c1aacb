"""A lean greedy decode loop for Llama-family models (``engine="lean"`` of
:func:`hhtld.generate`).

transformers' ``generate`` spends tens of milliseconds a token on its own
machinery (module calls, cache objects, masks, logits processors) before any
weight is touched; on a 135 M model that is more than the weights cost once
they run through the lookup-table kernels. This loop runs the same model —
the modules :func:`hhtld.load` made, compressed or dense — with none of it:

* the weights are applied by the kernels of :mod:`hhtld.kernels` (a
  compressed linear) or by torch's BLAS (a dense one), on numpy arrays,
  float32 (every matrix product in torch, whose threads the kernels' own
  GEMMs use: one pool of BLAS threads, not two);
* one static key/value cache ``(layers, kv heads, positions, head dim)``
  sized for the prompt and the new tokens, allocated once;
* rotary cos/sin for every position computed once by the model's own rotary
  module (any rope scaling the config sets), norms and attention as the
  Llama code computes them (eager attention, float32 softmax);
* the prompt runs as one forward of the model itself (one call, so none of
  ``generate``'s per-token overhead; the kernels decode-then-GEMM for many
  rows), its keys and values copied into the static cache; then one token at
  a time.

It gives transformers' greedy tokens with logits equal up to float32
rounding (the order of additions differs; the test pins the bound). It
applies to float32 models whose decoder layers are Llama's (RMSNorm, rotary
attention with grouped key/value heads, SiLU gated MLP, optional biases);
:func:`lean_support` says why another model does not qualify, and
``engine="auto"`` then uses transformers.
"""

from __future__ import annotations

import numpy as np

from ..kernels.runtime import numpy_blas_on_one_thread

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


def lean_support(model) -> str | None:
    """None when :class:`LeanDecoder` can run ``model``, else why not (one phrase)."""
    import torch

    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in LEAN_MODEL_TYPES:
        return f"model type {mt!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no Llama-style decoder stack"
    if getattr(model, "dtype", torch.float32) != torch.float32:
        return f"dtype {str(model.dtype).removeprefix('torch.')} (float32 only)"
    for layer in inner.layers:
        at = layer.self_attn
        if any(hasattr(at, n) for n in ("q_norm", "k_norm")):
            return "normalised queries and keys"
        if not all(hasattr(at, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP without gate/up/down projections"
    return None


class _Linear:
    """``x @ W.T + b`` for one projection: the kernels for a compressed weight
    applied in the codec's space, BLAS on the float32 weight otherwise."""

    def __init__(self, module, tables: str):
        import torch

        from .compressed import CompressedLinear

        b = getattr(module, "bias", None)
        self.bias = None if b is None else b.detach().float().numpy()
        self.kernel = None
        src = getattr(module, "source", None)
        # the module's own choice for a float32 input on the CPU (CompressedLinear.forward)
        if isinstance(module, CompressedLinear) and src.cache.max_layers == 0 and src.device.type == "cpu" \
                and src.codec_space_ok(torch.empty(1, src.n_cols, dtype=torch.float32)):
            self.kernel = src.kernel()
            self.tables = tables
            self.w = None
        else:
            self.w = module.weight.detach().to(torch.float32).t()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.kernel.matmul_t(x, self.tables) if self.kernel is not None else _mm(x, self.w)
        if self.bias is not None:
            y += self.bias
        return y


def _mm(a, b) -> np.ndarray:
    """a @ b (numpy arrays, or b a torch tensor) by torch's BLAS: the threads the kernels' GEMMs
    use too (numpy's BLAS would bring a third pool of spinning threads onto the same cores)."""
    import torch

    b = torch.from_numpy(b) if isinstance(b, np.ndarray) else b
    return torch.matmul(torch.from_numpy(a), b).numpy()


def _mm_small(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for one token's attention: numpy (a few microseconds where a torch call costs tens;
    the loop holds numpy's BLAS to one thread)."""
    return np.matmul(a, b)


class _Pair:
    """Two projections of one input: ``(x @ A.T + a, x @ B.T + b)``, one lookup table built
    for both when their compressed weights share palettes and rotation
    (:class:`hhtld.kernels.KernelPair`; a pack encoded with ``--group-by input``)."""

    def __init__(self, a: _Linear, b: _Linear):
        from ..kernels import KernelPair

        self.a, self.b = a, b
        self.pair = None  # a KernelPair whose weights share a table, else None
        if a.kernel is not None and b.kernel is not None and a.tables == b.tables:
            pair = KernelPair(a.kernel, b.kernel)
            self.pair = pair if pair.shared else None

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pair is None:
            return self.a(x), self.b(x)
        ya, yb = self.pair.matmul_t(x, self.a.tables)
        if self.a.bias is not None:
            ya += self.a.bias
        if self.b.bias is not None:
            yb += self.b.bias
        return ya, yb


class _Layer:
    def __init__(self, layer, tables: str):
        at, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_Linear(getattr(at, n), tables) for n in ("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"))
        self.gate, self.up, self.down = (_Linear(getattr(mlp, n), tables) for n in ("gate_proj", "up_proj",
                                                                                   "down_proj"))
        self.kv = _Pair(self.k, self.v)  # the pairs that read one input
        self.gate_up = _Pair(self.gate, self.up)
        self.norm_in = _Norm(layer.input_layernorm)
        self.norm_post = _Norm(layer.post_attention_layernorm)


class _Norm:
    """Llama's RMSNorm in float32: ``w * x / sqrt(mean(x²) + eps)``."""

    def __init__(self, norm):
        self.w = norm.weight.detach().float().numpy()
        self.eps = np.float32(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        var = np.add.reduce(x * x, axis=-1, keepdims=True) * np.float32(1.0 / x.shape[-1])
        return self.w * (x / np.sqrt(var + self.eps))


class LeanDecoder:
    """Greedy decoding of a Llama-family model loaded by :func:`hhtld.load`
    (see the module). ``tables``: the kernels' lookup tables (``int16`` or
    ``float32``) for compressed weights."""

    def __init__(self, model, tables: str = "int16"):
        why = lean_support(model)
        if why is not None:
            from ..errors import LoadError

            raise LoadError(f"the lean decode loop does not apply: {why}")
        cfg = model.config
        inner = model.model
        self.model = model
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.scaling = np.float32(self.head_dim ** -0.5)
        self.layers = [_Layer(layer, tables) for layer in inner.layers]
        if any(p.pair is not None for L in self.layers for p in (L.kv, L.gate_up)):
            from ..kernels import warm_up_pairs

            warm_up_pairs()
        self.norm = _Norm(inner.norm)
        self.lm_head = _Linear(model.lm_head, tables)
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.vocab = int(cfg.vocab_size)
        self._cos = self._sin = None
        self.k_cache = self.v_cache = None
        self._x = self._a = self._scores = None  # one token's buffers for the compiled ops

    # --- pieces ------------------------------------------------------------------------
    def _positions(self, n: int) -> None:
        """cos/sin (n, head_dim) float32 by the model's rotary module (made once per length)."""
        import torch

        if self._cos is not None and self._cos.shape[0] >= n:
            return
        with torch.no_grad():
            pos = torch.arange(n).unsqueeze(0)
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), pos)
        self._cos = cos[0].float().numpy().copy()
        self._sin = sin[0].float().numpy().copy()

    def _rope(self, x: np.ndarray, p0: int) -> np.ndarray:
        """x (heads, t, head_dim) rotated for positions p0 .. p0 + t."""
        t = x.shape[1]
        cos, sin = self._cos[p0:p0 + t], self._sin[p0:p0 + t]
        h = self.head_dim // 2
        rot = np.concatenate((-x[..., h:], x[..., :h]), axis=-1)
        return x * cos + rot * sin

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.embed(torch.from_numpy(ids.astype(np.int64))).float().numpy()

    def _step(self, token: int, p: int, ops) -> np.ndarray:
        """Logits (1, vocab) of one token at position p through the cache, the work between
        the products in the compiled ops (one call each where numpy would take a dozen)."""
        h = self._embed(np.asarray([token]))[0]
        xb = self._x
        scores = self._scores[:p + 1]
        cos, sin = self._cos[p], self._sin[p]
        y = None
        for li, L in enumerate(self.layers):
            if y is None:
                ops.rms_norm(h, L.norm_in.w, L.norm_in.eps, xb)
            else:  # the previous layer's MLP output joins the residual here
                ops.add_rms_norm(h, y, L.norm_in.w, L.norm_in.eps, xb)
            x = xb.reshape(1, -1)
            q = L.q(x)[0]
            k, v = L.kv(x)
            k, v = k[0], v[0]
            ops.attend(q, k, v, cos, sin, self.k_cache[li], self.v_cache[li], p, self.scaling, scores, self._a)
            ops.add_rms_norm(h, L.o(self._a.reshape(1, -1))[0], L.norm_post.w, L.norm_post.eps, xb)
            g, u = L.gate_up(x)
            g, u = g[0], u[0]
            ops.silu_mul(g, u, g)
            y = L.down(g.reshape(1, -1))[0]
        h += y
        ops.rms_norm(h, self.norm.w, self.norm.eps, xb)
        return self.lm_head(xb.reshape(1, -1))

    def forward(self, ids: np.ndarray, p0: int, last_only: bool = False) -> np.ndarray:
        """Logits (t, vocab) float32 for token ids (t,) at positions p0 .. p0 + t, the cache
        holding positions < p0 (and filled with these); (1, vocab), the last position's only,
        with ``last_only`` (what generation needs from a prompt)."""
        t = ids.shape[0]
        h = self._embed(ids)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        grp = nh // nkv
        p1 = p0 + t
        mask = None
        if t > 1:
            mask = np.triu(np.full((t, p1), -np.inf, dtype=np.float32), k=p0 + 1)
        for li, L in enumerate(self.layers):
            x = L.norm_in(h)
            q = L.q(x).reshape(t, nh, hd).transpose(1, 0, 2)
            k = L.k(x).reshape(t, nkv, hd).transpose(1, 0, 2)
            v = L.v(x).reshape(t, nkv, hd).transpose(1, 0, 2)
            q = self._rope(q, p0)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc[:, p0:p1] = self._rope(k, p0)
            vc[:, p0:p1] = v
            # (nkv, grp * t, hd) @ (nkv, hd, p1) → scores per key/value head
            qg = q.reshape(nkv, grp * t, hd)
            mm = _mm if t > 1 else _mm_small
            s = mm(qg, kc[:, :p1].transpose(0, 2, 1)) * self.scaling
            if mask is not None:
                s = s.reshape(nkv, grp, t, p1) + mask
                s = s.reshape(nkv, grp * t, p1)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            a = mm(s, vc[:, :p1])  # (nkv, grp * t, hd)
            a = a.reshape(nh, t, hd).transpose(1, 0, 2).reshape(t, nh * hd)
            h = h + L.o(a)
            x = L.norm_post(h)
            g = L.gate(x)
            u = L.up(x)
            h = h + L.down(g / (1.0 + np.exp(-g)) * u)
        if last_only:
            h = h[-1:]
        return self.lm_head(self.norm(h))

    def prompt(self, ids: np.ndarray) -> np.ndarray:
        """The next token's logits (vocab,) after the prompt ``ids`` (t,), its keys and values
        written into the cache. A prompt of several tokens is one forward of the model itself
        (one call: transformers' per-token overhead does not arise, and its attention over a
        block is faster than this loop's numpy); its cache is copied into the static one."""
        if ids.shape[0] == 1:
            return self._next(int(ids[0]), 0)[0]
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(ids[None]), use_cache=True, logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.layers):  # a cache this loop cannot read: its own block
            return self.forward(ids, 0, last_only=True)[0]
        t = ids.shape[0]
        for li, layer in enumerate(layers):
            self.k_cache[li, :, :t] = layer.keys[0].float().numpy()
            self.v_cache[li, :, :t] = layer.values[0].float().numpy()
        return out["logits"][0, -1].float().numpy()

    def _next(self, token: int, p: int) -> np.ndarray:
        """Logits (1, vocab) of one token at position p through the cache: the compiled ops
        when numba is there, else :meth:`forward`."""
        from ..kernels.runtime import decode_ops

        ops = decode_ops()
        if ops is None:
            return self.forward(np.asarray([token]), p)
        if self._x is None:
            d = self.layers[0].norm_in.w.shape[0]
            self._x = np.empty(d, dtype=np.float32)
            self._a = np.empty(self.n_heads * self.head_dim, dtype=np.float32)
        if self._scores is None or self._scores.shape[0] < self.k_cache.shape[2]:
            self._scores = np.empty(self.k_cache.shape[2], dtype=np.float32)
        return self._step(token, p, ops)

    # --- the loop -----------------------------------------------------------------------
    def generate(self, prompt_ids, max_new_tokens: int, eos_ids=(), put=None, seen=None) -> list[int]:
        """Greedy continuation of ``prompt_ids`` (a sequence of ints): up to
        ``max_new_tokens`` ids, stopping after the first in ``eos_ids``.
        ``put(id)`` is called with each new id as it is chosen, ``seen(logits)``
        with the (vocab,) float32 logits each id was chosen from."""
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        self._start(ids.shape[0] + max_new_tokens)
        eos = set(int(e) for e in eos_ids)
        out: list[int] = []
        try:
            with numpy_blas_on_one_thread():
                logits = self.prompt(ids)
                p = ids.shape[0]
                while True:
                    if seen is not None:
                        seen(logits)
                    nxt = int(np.argmax(logits))
                    out.append(nxt)
                    if put is not None:
                        put(nxt)
                    if nxt in eos or len(out) >= max_new_tokens:
                        break
                    logits = self._next(nxt, p)[0]
                    p += 1
        finally:
            self.k_cache = self.v_cache = None
        return out

    def logits(self, prompt_ids, stepwise: bool = True, last_only: bool = False) -> np.ndarray:
        """Logits (t, vocab) float32 of every position of ``prompt_ids``: one token at a time
        through the cache (``stepwise``, the path generation takes after the prompt) or the
        whole sequence as one block by this loop's numpy forward; ``last_only`` with a block:
        (1, vocab), the last position's, by :meth:`prompt` (the path generation takes)."""
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        n = ids.shape[0]
        self._start(n)
        try:
            with numpy_blas_on_one_thread():
                if not stepwise and last_only:
                    return self.prompt(ids)[None]
                if not stepwise:
                    return self.forward(ids, 0, last_only)
                return np.stack([self._next(int(ids[i]), i)[0] for i in range(n)])
        finally:
            self.k_cache = self.v_cache = None

    def _start(self, n: int) -> None:
        """Rotary tables and an empty key/value cache for n positions."""
        self._positions(n)
        shape = (len(self.layers), self.n_kv, n, self.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float32)
        self.v_cache = np.zeros(shape, dtype=np.float32)


__all__ = ["LEAN_MODEL_TYPES", "LeanDecoder", "lean_support"]
