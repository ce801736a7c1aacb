"""Run a transformers model one block at a time, only that block's weights in memory.

The model is built from its ``config.json`` with every parameter on the
``meta`` device (``accelerate.init_empty_weights``: buffers such as rotary
frequencies stay real). Calibration batches go through the embedding once;
a stand-in for the first block records what the model hands it (hidden
states and keyword arguments: attention mask, rotary position embeddings).
Then each block is materialised in float32 from a weight source, run on
every batch (hooks on its linear layers see their inputs), and released
again (back to ``meta``), as GPTQ and llm-compressor's sequential pipeline
do. Memory: one block's weights, the hidden states of the calibration
tokens, and the embedding.

Blocks are the model's largest ``ModuleList`` of identical layers (Llama,
Qwen2, Mistral ``model.layers``; GPT-2 ``transformer.h``; BERT
``encoder.layer``). The module between the last block and the output head
(``norm``, ``ln_f``, ``final_layernorm``) is found by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import GateError
from ..names import state_dict_candidates

FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm")


class _Stop(Exception):
    """Raised by the stand-in of the first block once it has recorded its inputs."""


@dataclass
class Batch:
    """One calibration batch: token ids (B, T) int64, attention mask (B, T) and,
    once captured, the first block's hidden states and keyword arguments."""

    input_ids: Any
    attention_mask: Any
    hidden: Any = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self):
        """(B*T,) bool: the positions that are real tokens (not padding)."""
        return self.attention_mask.reshape(-1).bool()


def _largest_module_list(model) -> tuple[str, Any]:
    import torch

    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            kinds = {type(m) for m in mod}
            n = sum(p.numel() for p in mod.parameters())
            if len(kinds) == 1 and n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise GateError(f"{type(model).__name__}: no list of identical blocks found to run layer by layer")
    return best


class LayerwiseModel:
    """A model built empty whose blocks are materialised and run one at a time.

    ``param_of``: checkpoint tensor name → parameter key (the same mapping the
    gate runner uses); ``read(name) -> np.ndarray`` gives a checkpoint tensor
    in its stored shape as float32 (the original, or a replacement).
    """

    def __init__(self, model, param_of: Mapping[str, str], read: Callable[[str], np.ndarray]):
        import torch

        self.model = model.eval()
        self.read = read
        self.param_of = dict(param_of)
        self.key_to_name = {v: k for k, v in self.param_of.items()}
        self.blocks_path, self.blocks = _largest_module_list(model)
        # tied parameters are one Parameter object under several keys (meta or not)
        self.ties: dict[str, list[str]] = {}
        by_id: dict[int, list[str]] = {}
        for key, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(key)
        for keys in by_id.values():
            for k in keys:
                self.ties[k] = keys
        self._torch = torch

    # -- parameters -------------------------------------------------------------------------
    def _set(self, key: str, value) -> None:
        torch = self._torch
        mod_name, _, leaf = key.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)

    def _param(self, key: str):
        mod_name, _, leaf = key.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        return mod._parameters[leaf]

    def numel(self, key: str) -> int:
        """Elements of parameter ``key`` (materialised or not)."""
        return int(self._param(key).numel())

    def block_numel(self, i: int) -> int:
        """Elements of block i's parameters (materialised or not)."""
        return sum(self.numel(k) for k in self.keys_under(self.block_prefix(i)))

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k, _ in self.model.named_parameters(remove_duplicate=False)
                if k == prefix or k.startswith(prefix + ".")]

    def materialise(self, keys, override: Mapping[str, np.ndarray] | None = None) -> None:
        """Load parameters ``keys`` (and every key tied to them) in float32, from
        ``override`` (checkpoint name → array) or the weight source."""
        torch = self._torch
        override = override or {}
        done = set()
        for key in keys:
            if key in done:
                continue
            tied = self.ties.get(key, [key])
            name = next((self.key_to_name[k] for k in tied if k in self.key_to_name), None)
            if name is None:
                raise GateError(f"parameter '{key}' has no tensor in the checkpoint")
            arr = override[name] if name in override else self.read(name)
            shape = tuple(self._param(key).shape)
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
            param = torch.nn.Parameter(t, requires_grad=False)
            for k in tied:
                mod_name, _, leaf = k.rpartition(".")
                (self.model.get_submodule(mod_name) if mod_name else self.model)._parameters[leaf] = param
                done.add(k)

    def release(self, keys) -> None:
        """Put parameters ``keys`` (and their ties) back on ``meta``, and hand the freed
        memory back to the system (blocks come and go; glibc would keep it fragmented)."""
        from ..memory import release_heap

        torch = self._torch
        for key in keys:
            for k in self.ties.get(key, [key]):
                p = self._param(k)
                if p.device.type != "meta":
                    self._set(k, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        release_heap()

    def outside_blocks(self) -> list[str]:
        inside = set(self.keys_under(self.blocks_path))
        return [k for k, _ in self.model.named_parameters(remove_duplicate=False) if k not in inside]

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def names_in_block(self, i: int) -> list[str]:
        """Checkpoint tensors of block i, in the block's parameter order."""
        return [self.key_to_name[k] for k in self.keys_under(self.block_prefix(i)) if k in self.key_to_name]

    # -- running --------------------------------------------------------------------------------
    def capture(self, batches: list[Batch], materialise: bool = True) -> None:
        """Run the embedding on every batch and record the first block's inputs
        (``materialise``: load the parameters outside the blocks first)."""
        torch = self._torch
        first = self.blocks[0]

        class Catcher(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.seen = None

            def forward(self, hidden, *args, **kwargs):
                self.seen = (hidden, args, kwargs)
                raise _Stop

        if materialise:
            self.materialise(self.outside_blocks())
        catcher = Catcher(first)
        self.blocks[0] = catcher
        try:
            with torch.no_grad():
                for b in batches:
                    try:
                        self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
                    except _Stop:
                        pass
                    if catcher.seen is None:
                        raise GateError("the model never reached its first block")
                    hidden, args, kwargs = catcher.seen
                    b.hidden = hidden.detach().float()
                    b.args = tuple(args)
                    b.kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
                    catcher.seen = None
        finally:
            self.blocks[0] = first

    def run_block(self, i: int, batches: list[Batch], update: bool = True) -> None:
        """Run block i (materialised) on every batch; ``update``: its outputs become
        the batches' hidden states."""
        torch = self._torch
        block = self.blocks[i]
        with torch.no_grad():
            for b in batches:
                out = block(b.hidden, *b.args, **b.kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                if update:
                    b.hidden = out.float()

    def final_norm(self):
        """The module between the last block and the output head, or None."""
        base = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None) or self.model
        for name in FINAL_NORMS:
            mod = getattr(base, name, None)
            if mod is not None:
                return mod
        return None

    def linears(self, i: int) -> Iterator[tuple[str, Any]]:
        """(checkpoint name, module) of every linear layer of block i whose weight the checkpoint holds."""
        prefix = self.block_prefix(i)
        for mname, mod in self.blocks[i].named_modules():
            w = getattr(mod, "weight", None)
            if w is None or not isinstance(w, self._torch.nn.Parameter) or w.dim() != 2:
                continue
            if isinstance(mod, self._torch.nn.Embedding):
                continue
            key = f"{prefix}.{mname}.weight" if mname else f"{prefix}.weight"
            name = self.key_to_name.get(key)
            if name is not None:
                yield name, mod


def head_name(lw) -> str | None:
    """The checkpoint tensor of the output head (lm_head, or the embedding it is tied to)."""
    head = lw.model.get_output_embeddings() if hasattr(lw.model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None
    for key, p in lw.model.named_parameters(remove_duplicate=False):
        if p is head.weight:
            for k in lw.ties.get(key, [key]):
                if k in lw.key_to_name:
                    return lw.key_to_name[k]
    return None


__all__ = ["Batch", "LayerwiseModel", "head_name"]


def checkpoint_param_map(model, ckpt) -> dict[str, str]:
    """Checkpoint tensor name → parameter key of ``model``: the name itself, with or
    without the model's ``base_model_prefix``, or with the legacy LayerNorm
    ``gamma``/``beta`` names; tensors the model has no parameter for are left out.
    Raises :class:`GateError` for a parameter no tensor (or tie) fills."""
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, str] = {}
    for name, info in ckpt.tensors.items():
        hit = next((c for c in state_dict_candidates(name, prefix) if c in params), None)
        if hit is None:
            continue
        if int(np.prod(params[hit].shape)) != int(np.prod(info.shape)):
            raise GateError(f"{ckpt.path}: tensor '{name}' has shape {list(info.shape)} but the model expects "
                            f"{list(params[hit].shape)} for '{hit}'")
        out[name] = hit
    filled = {id(params[k]) for k in out.values()}
    for key, p in params.items():
        if id(p) not in filled:
            raise GateError(f"{ckpt.path}: the model built from its config has parameter '{key}' that no "
                            f"checkpoint tensor fills; is this the right config?")
    return out


def build_empty(model_path, config=None, family: str | None = None):
    """(model with parameters on meta, tokenizer, family, config path) for a checkpoint."""
    import transformers
    from accelerate import init_empty_weights

    from ..checkpoint.config import family_of_config, find_config, load_config_json

    cfile = find_config(model_path, config)
    cfg_json = load_config_json(cfile)
    fam = family or family_of_config(cfg_json)
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(cfile.parent))
    except Exception as e:  # transformers raises many types for a config it cannot use
        raise GateError(f"{cfile}: transformers cannot build a model from this config ({type(e).__name__}: {e})") from None
    auto = transformers.AutoModelForCausalLM if fam == "causal" else transformers.AutoModel
    try:
        with init_empty_weights():
            net = auto.from_config(cfg)
    except Exception as e:
        raise GateError(f"{cfile}: transformers cannot build a {fam} model from this config ({type(e).__name__}: {e})") from None
    net = net.float().eval()
    if hasattr(net, "tie_weights"):  # tied parameters become one object (from_config may leave them apart)
        net.tie_weights()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(cfile.parent))
    except Exception as e:
        raise GateError(f"{cfile.parent}: no usable tokenizer next to the config ({type(e).__name__})") from None
    return net, tok, fam, cfile
