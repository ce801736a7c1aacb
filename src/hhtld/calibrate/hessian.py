"""Input Hessians ``H = XᵀX`` of a block's linear layers, gathered by forward hooks.

Each linear layer of the block being calibrated gets a pre-forward hook
that adds ``XᵀX`` of its input (real tokens only: padding is masked out)
to its Hessian, in float64. Layers fed the same tensor (q/k/v, gate/up)
share one product per batch. ``H`` predicts the output error of a weight
error ``ΔW`` as ``tr(ΔW H ΔWᵀ)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class HessianHooks:
    """Context manager: hooks on ``modules`` ({checkpoint name: module}) that
    accumulate each input's ``XᵀX``. Set :attr:`valid` (a (B*T,) bool tensor)
    before each batch; read :attr:`hessians` and :attr:`tokens` afterwards."""

    def __init__(self, modules: dict[str, Any]):
        self.modules = modules
        self._sums: dict[str, Any] = {}  # torch float32 (c, c) per distinct input
        self._source: dict[str, str] = {}  # layer → the first layer that saw the same input
        self.tokens = 0
        self.valid = None
        self._handles = []
        self._cache: dict[tuple, tuple[str, Any, Any]] = {}

    @property
    def hessians(self) -> dict[str, np.ndarray]:
        """{checkpoint name: (c, c) float64} summed over every batch so far (layers
        fed the same input share one array)."""
        arrays = {k: v.double().numpy() for k, v in self._sums.items()}
        return {name: arrays[src] for name, src in self._source.items()}

    def shared(self) -> dict[str, str]:
        """{checkpoint name: name of the layer whose Hessian it shares (maybe itself)}."""
        return dict(self._source)

    def new_batch(self, valid) -> None:
        self.valid = None if bool(valid.all()) else valid
        self._cache.clear()
        self.tokens += int(valid.sum())

    def _hook(self, name: str):
        def hook(module, args, kwargs=None):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            key = (x.data_ptr(), tuple(x.shape))
            hit = self._cache.get(key)
            if hit is not None:  # the same input as a layer already seen in this batch
                self._source.setdefault(name, self._source[hit[0]])
                return
            flat = x.detach().reshape(-1, x.shape[-1])
            if self.valid is not None and self.valid.numel() == flat.shape[0]:
                flat = flat[self.valid]
            flat = flat.float()
            xtx = flat.T @ flat
            # hold x for the rest of the batch: a freed input's address could be reused by the
            # next layer's input, which would then pass for the same tensor
            self._cache[key] = (name, xtx, x)
            src = self._source.setdefault(name, name)
            h = self._sums.get(src)
            if h is None:
                self._sums[src] = xtx
            else:
                h += xtx

        return hook

    def __enter__(self) -> "HessianHooks":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()


__all__ = ["HessianHooks"]
