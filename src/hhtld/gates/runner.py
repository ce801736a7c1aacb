"""Run a model with its original or with replacement weights (gates 2 and 4).

:class:`ModelRunner` builds the model once from its ``config.json`` with
``transformers`` (CPU, float32, eval mode, ``torch.no_grad``), loads the
checkpoint's tensors through hhtld's own reader (so a single file, a sharded
index and a folder behave the same), and for each :meth:`ModelRunner.run`
copies replacement tensors into the parameters in place — the model is never
rebuilt or re-read from disk per call. Replacements come from a weight
source (:mod:`.sources`: arrays in memory, a pack decoded tensor by tensor,
another checkpoint), read one tensor at a time.

Two families, detected from the config:

* ``embedding`` (BERT-like encoders, e.g. all-MiniLM-L6-v2): sentence
  embedding = mean of the last hidden state over the attention mask, then L2
  normalisation (what sentence-transformers does for these models).
* ``causal`` (``*ForCausalLM`` / ``*LMHeadModel``): next-token
  log-probabilities at every prompt position (teacher forcing) and, when
  asked, greedy continuations.

torch and transformers are imported inside the functions, so ``import hhtld``
stays light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, open_checkpoint
from ..checkpoint.config import FAMILIES, family_of_config, find_config, load_config_json
from ..errors import GateError, HhtldError
from ..measure.compare import RunOutputs
from ..measure.compare import compare_embeddings_by_kind, compare_outputs, retrieval_neighbours  # noqa: F401 (their former home)
from ..memory import release_heap
from ..names import state_dict_candidates

DEFAULT_BATCH = 32
DEFAULT_MAX_TOKENS = 128


class ModelRunner:
    """A model built once and run many times with swapped weights.

    Attributes: ``family`` (``embedding``/``causal``), ``checkpoint`` (the
    hhtld :class:`Checkpoint`), ``param_of`` (checkpoint tensor name → model
    state-dict key), ``unused`` (checkpoint tensors the model has no slot for,
    e.g. a stored ``position_ids`` buffer).
    """

    def __init__(self, ckpt: Checkpoint, config_path: Path, model, tokenizer, family: str,
                 batch_size: int = DEFAULT_BATCH, max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = False):
        self.checkpoint = ckpt
        self.config_path = config_path
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.progress = progress
        self._state = model.state_dict(keep_vars=True)
        self.param_of: dict[str, str] = {}
        self.unused: list[str] = []
        self._map_names()
        self._dirty: set[str] = set()
        self._loaded = None  # the WeightSource the model holds now (None: not known)
        self._load_original(list(self.param_of))
        self._check_covered()

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_model(cls, model, config=None, *, tokenizer=None, family: str | None = None,
                   batch_size: int = DEFAULT_BATCH, max_tokens: int = DEFAULT_MAX_TOKENS,
                   progress: bool = False) -> "ModelRunner":
        """Build the runner for ``model`` (a folder, a ``.safetensors`` file or an
        index). A bare ``.safetensors`` without a ``config.json`` beside it needs
        ``config=`` (a config.json or a folder holding one). The tokenizer is
        loaded from the config's folder unless ``tokenizer`` is given; ``family``
        overrides detection."""
        import torch
        import transformers

        ckpt = open_checkpoint(model)
        cfile = find_config(model, config)
        cfg_json = load_config_json(cfile)
        fam = family or family_of_config(cfg_json)
        if fam not in FAMILIES:
            raise GateError(f"unknown model family {fam!r}; choose one of {', '.join(FAMILIES)}")
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(cfile.parent) if cfile.name == "config.json" else str(cfile))
        except Exception as e:  # transformers raises many types for a config it cannot use
            raise GateError(f"{cfile}: transformers cannot build a model from this config ({type(e).__name__}: {e})") from None
        auto = transformers.AutoModelForCausalLM if fam == "causal" else transformers.AutoModel
        try:
            torch.manual_seed(0)
            net = auto.from_config(cfg)
        except Exception as e:
            raise GateError(f"{cfile}: transformers cannot build a {fam} model from this config ({type(e).__name__}: {e})") from None
        net = net.float().eval()
        if tokenizer is None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(cfile.parent))
            except Exception as e:
                raise GateError(
                    f"{cfile.parent}: no usable tokenizer next to the config ({type(e).__name__}); "
                    f"the model cannot be run on text"
                ) from None
        if fam == "causal":
            tokenizer.padding_side = "right"
            if tokenizer.pad_token_id is None:
                if tokenizer.eos_token is not None:
                    tokenizer.pad_token = tokenizer.eos_token
                else:
                    raise GateError(f"{cfile.parent}: the tokenizer has neither a pad nor an end-of-sequence token")
        return cls(ckpt, cfile, net, tokenizer, fam, batch_size, max_tokens, progress)

    def _map_names(self) -> None:
        """Checkpoint names → state-dict keys: the name itself, with or without
        the model's ``base_model_prefix``, and the legacy LayerNorm ``gamma``/``beta``."""
        keys = self._state
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        for name in self.checkpoint.tensors:
            hit = next((c for c in state_dict_candidates(name, prefix) if c in keys), None)
            if hit is None:
                self.unused.append(name)
                continue
            want = tuple(keys[hit].shape)
            have = tuple(self.checkpoint.tensors[name].shape)
            if int(np.prod(want)) != int(np.prod(have)):
                raise GateError(
                    f"{self.checkpoint.path}: tensor '{name}' has shape {list(have)} but the model built from "
                    f"{self.config_path} expects {list(want)} for '{hit}'"
                )
            self.param_of[name] = hit

    def _check_covered(self) -> None:
        loaded = {id(self._state[k]) for k in self.param_of.values()}
        for pname, p in self.model.named_parameters():
            if id(p) not in loaded:
                raise GateError(
                    f"{self.checkpoint.path}: the model built from {self.config_path} has parameter '{pname}' "
                    f"that no checkpoint tensor fills; is this the right config?"
                )

    def _copy(self, name: str, arr: np.ndarray) -> None:
        import torch

        dst = self._state[self.param_of[name]]
        a = np.asarray(arr)
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        if not (a.flags.c_contiguous and a.flags.writeable):  # e.g. a read-only memory map
            a = np.array(a, order="C")
        src = torch.from_numpy(a.reshape(tuple(dst.shape)))
        with torch.no_grad():
            dst.data.copy_(src.to(dst.dtype))

    def _load_original(self, names) -> None:
        for n in names:
            info = self.checkpoint.tensors[n]
            self._copy(n, self.checkpoint.read_float(n) if info.is_float else np.array(self.checkpoint.read(n)))

    def set_weights(self, weights=None) -> None:
        """Make the model hold the original weights with ``weights`` replacing
        theirs: ``None`` (the original), a mapping (original tensor names →
        arrays in the original shapes) or a :class:`~hhtld.gates.sources.WeightSource`
        (read tensor by tensor, never all at once). Tensors the previous call
        replaced and this one does not are restored from the checkpoint; a
        source object already loaded is not read again."""
        from .sources import DictSource, as_source

        src = as_source(weights)
        if src is self._loaded:
            return
        names = src.names()
        for n in names:
            if n not in self.checkpoint.tensors:
                raise GateError(f"{self.checkpoint.path}: no tensor named '{n}' to replace")
        if isinstance(src, DictSource):  # arrays in memory: shapes checked before anything changes
            for n in names:
                self._check_shape(n, np.shape(src.weights[n]))
        keep = set(names)
        restore = [n for n in self._dirty if n not in keep]
        self._load_original(restore)
        self._dirty -= set(restore)
        self._loaded = None
        for n in names:
            if n in self.param_of:
                a = src.read(n)
                self._check_shape(n, np.shape(a))
                self._copy(n, a)
                self._dirty.add(n)
                del a
        self._loaded = src
        if names or restore:
            release_heap()

    def reload_original(self) -> None:
        """Load every parameter from the checkpoint again (after code changed
        the model's weights in place, e.g. a layer-by-layer calibration)."""
        self._load_original(list(self.param_of))
        self._dirty.clear()
        self._loaded = None

    def _check_shape(self, name: str, shape) -> None:
        want = tuple(self.checkpoint.tensors[name].shape)
        if tuple(shape) != want:
            raise GateError(f"tensor '{name}': replacement has shape {list(shape)}, the checkpoint has {list(want)}")

    # -- running -------------------------------------------------------------------
    def _batches(self, texts: list[str], desc: str):
        from tqdm import tqdm

        starts = range(0, len(texts), self.batch_size)
        return tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False, dynamic_ncols=True)

    def run(self, texts: list[str], weights=None,
            greedy_tokens: int = 0, greedy_texts: int | None = None, desc: str = "run") -> RunOutputs:
        """Run the model on ``texts`` with ``weights`` swapped in (``None`` = the
        original weights; a mapping or a :class:`~hhtld.gates.sources.WeightSource`,
        see :meth:`set_weights`). Causal models also produce greedy continuations of
        ``greedy_tokens`` tokens for the first ``greedy_texts`` texts (all when
        ``None``); 0 skips that slow part."""
        import torch

        if not texts:
            raise GateError("no texts to run the model on")
        self.set_weights(weights)
        torch.manual_seed(0)
        with torch.no_grad():
            if self.family == "embedding":
                return self._run_embedding(list(texts), desc)
            out = self._run_causal(list(texts), desc)
            if greedy_tokens > 0:
                n = len(texts) if greedy_texts is None else min(len(texts), greedy_texts)
                out.greedy = self._greedy(list(texts)[:n], greedy_tokens, desc)
            return out

    def _encode(self, batch: list[str]):
        return self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")

    def _run_embedding(self, texts: list[str], desc: str) -> RunOutputs:
        import torch

        chunks = []
        for s in self._batches(texts, desc):
            enc = self._encode(texts[s:s + self.batch_size])
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        emb = np.concatenate(chunks, axis=0)
        return RunOutputs("embedding", len(texts), embeddings=emb)

    def _run_causal(self, texts: list[str], desc: str) -> RunOutputs:
        import torch

        chunks, lengths = [], []
        for s in self._batches(texts, desc):
            enc = self._encode(texts[s:s + self.batch_size])
            enc.pop("token_type_ids", None)
            logits = self.model(**enc).logits.float()
            lp = torch.log_softmax(logits, dim=-1)
            mask = enc["attention_mask"].bool()
            for i in range(lp.shape[0]):
                rows = lp[i][mask[i]]
                chunks.append(rows.numpy())
                lengths.append(rows.shape[0])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return RunOutputs("causal", len(texts), logprobs=np.concatenate(chunks, axis=0), offsets=offsets)

    def _greedy(self, texts: list[str], n_tokens: int, desc: str) -> np.ndarray:
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        out = np.full((len(texts), n_tokens), -1, dtype=np.int64)
        try:
            for s in self._batches(texts, desc + " greedy"):
                enc = self._encode(texts[s:s + self.batch_size])
                enc.pop("token_type_ids", None)
                gen = self.model.generate(**enc, max_new_tokens=n_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:].numpy()
                out[s:s + new.shape[0], :new.shape[1]] = new
        except HhtldError:
            raise
        except Exception as e:
            raise GateError(f"{self.config_path}: greedy generation failed ({type(e).__name__}: {e})") from None
        finally:
            tok.padding_side = old_side
        return out
