"""What ``hhtld embed`` and ``hhtld generate`` run: sentence embeddings and
greedy generation straight from a pack."""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ArchitectureError, LoadError, first_line
from ..memory import peak_resident_bytes, resident_bytes
from ..pack.reader import Pack
from .deps import require
from .model import family_of, load, load_tokenizer
from .sidefiles import carried_config, has_file, open_pack_arg


def _check_family(p: Pack, config, want: str, command: str) -> None:
    fam = family_of(p, config)
    if fam != want:
        cfg = carried_config(p) if config is None else {}
        arch = ", ".join(cfg.get("architectures") or []) or cfg.get("model_type", "")
        what = {"causal": "a causal LM", "embedding": "an embedding model"}
        other = "hhtld generate / hhtld.generate" if fam == "causal" else "hhtld embed / hhtld.embed"
        raise ArchitectureError(f"{p.path}: {what[fam]}{f' ({arch})' if arch else ''}, not {what[want]}; "
                                f"{command} does not apply, use {other}")


def embedding_pooling(pack: str | os.PathLike | Pack) -> str:
    """How :func:`embed` pools a pack: ``sentence-transformers`` when it carries
    ``modules.json``, else ``mean+l2`` (mean over the attention mask, then L2 norm)."""
    return "sentence-transformers" if has_file(open_pack_arg(pack), "modules.json") else "mean+l2"


def embed(pack: str | os.PathLike | Pack, texts: list[str], *, batch_size: int = 32, config=None, dtype=None,
          keep_compressed: bool = False, cache_layers: int = 0, tables: str = "int16") -> np.ndarray:
    """Sentence embeddings float32 ``(len(texts), dim)`` of an embedding-model pack.

    With the pack's sentence-transformers files: exactly what its
    ``SentenceTransformer.encode`` computes (its pooling and normalisation);
    otherwise mean pooling over the attention mask and L2 normalisation.
    A causal-LM pack is an :class:`ArchitectureError`."""
    torch = require("torch", "hhtld.embed")
    texts = [str(t) for t in texts]
    if not texts:
        raise LoadError("no texts to embed")
    p = open_pack_arg(pack)
    _check_family(p, config, "embedding", "embed")
    if embedding_pooling(p) == "sentence-transformers":
        from .sentence import load_sentence_transformer

        st = load_sentence_transformer(p, config=config, dtype=dtype, keep_compressed=keep_compressed,
                                       cache_layers=cache_layers, tables=tables, device="cpu")
        with torch.no_grad():
            out = st.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
    model = load(p, config=config, family="embedding", dtype=dtype, keep_compressed=keep_compressed,
                 cache_layers=cache_layers, tables=tables)
    tok = load_tokenizer(p)
    chunks = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
    return np.concatenate(chunks, axis=0)


@dataclass
class Generation:
    """A greedy continuation: ``text`` is the new text only (special tokens
    skipped), ``tokens`` its token ids, ``prompt_tokens`` the prompt's length in
    tokens (after the chat template when ``chat``), ``seconds`` the time
    ``generate`` took (model loading not included)."""

    prompt: str
    text: str
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    chat: bool = False
    seconds: float = 0.0
    base_memory: int = 0  # resident bytes before the model was loaded (after the imports)
    peak_memory: int = 0  # the process's peak resident bytes at the end
    engine: str = "transformers"  # what ran the model: "lean" (hhtld's decode loop) or "transformers"

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """One line: tokens, time, tok/s and peak memory (what ``hhtld generate`` prints on stderr)."""
        from ..memory import format_bytes

        mem = ""
        if self.peak_memory:
            mem = (f"; peak memory {format_bytes(self.peak_memory)} "
                   f"({format_bytes(max(0, self.peak_memory - self.base_memory))} above the process before loading)")
        return (f"{len(self.tokens)} tokens in {self.seconds:.2f} s ({self.tokens_per_second:.1f} tok/s, "
                f"{self.engine}){mem}")


def generate(pack: str | os.PathLike | Pack, prompt: str, *, max_new_tokens: int = 32, chat: bool = False,
             config=None, dtype=None, keep_compressed: bool = False, cache_layers: int = 0, tables: str = "int16",
             stream=None, engine: str = "auto") -> Generation:
    """Greedy continuation of ``prompt`` by a causal-LM pack (up to
    ``max_new_tokens`` tokens; stops early at an end-of-sequence token).

    ``stream``: a callable that gets each new piece of text as it is
    generated (``print`` with ``end=""`` and ``flush=True`` shows it live).
    ``keep_compressed`` / ``cache_layers`` / ``tables``: as :func:`hhtld.load`.

    ``engine``: ``"lean"`` runs hhtld's own decode loop
    (:mod:`hhtld.loader.lean`: transformers' greedy tokens without its
    per-token overhead; float32 Llama-family models), ``"transformers"``
    its ``generate``, ``"auto"`` (default) the lean loop where it applies.

    ``chat=True`` wraps the prompt as one user message in the tokenizer's chat
    template (with the generation prompt); a tokenizer without one is a
    :class:`LoadError`. An embedding-model pack is an :class:`ArchitectureError`."""
    torch = require("torch", "hhtld.generate")
    if engine not in ENGINES:
        raise LoadError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise LoadError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    p = open_pack_arg(pack)
    _check_family(p, config, "causal", "generate")
    tok = load_tokenizer(p)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise LoadError(f"{p.path}: the carried tokenizer has no chat template; drop --chat (chat=True)")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt, return_tensors="pt")
    enc.pop("token_type_ids", None)
    if enc["input_ids"].shape[1] == 0:
        raise LoadError("the prompt is empty after tokenisation; give some text")
    if keep_compressed:
        from ..kernels import warm_up

        warm_up()  # the kernels' own code in memory before the baseline is read
    base = resident_bytes()
    model = load(p, config=config, family="causal", dtype=dtype, keep_compressed=keep_compressed,
                 cache_layers=cache_layers, tables=tables)
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample = False
    gc.temperature = gc.top_p = gc.top_k = None
    gc.num_beams = 1
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    if gc.pad_token_id is None:
        gc.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    streamer = None if stream is None else _Streamer(tok, stream)
    lean = None
    if engine != "transformers":
        from .lean import LeanDecoder, lean_support

        why = lean_support(model)
        if why is None:
            lean = LeanDecoder(model, tables)
        elif engine == "lean":
            raise LoadError(f"{p.path}: the lean decode loop does not apply ({why}); use engine "
                            f"'transformers' (--engine transformers)")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            if lean is not None:
                eos = gc.eos_token_id
                eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
                prompt_ids = enc["input_ids"][0].tolist()
                new = lean.generate(prompt_ids, max_new_tokens, eos,
                                    None if streamer is None else streamer.add)
                if streamer is not None:
                    streamer.end()
            else:
                out = model.generate(**enc, generation_config=gc, streamer=streamer)
                new = out[0, enc["input_ids"].shape[1]:].tolist()
    except Exception as e:
        raise LoadError(f"{p.path}: generation failed ({type(e).__name__}: {first_line(e)})") from None
    seconds = time.perf_counter() - t0
    return Generation(prompt, tok.decode(new, skip_special_tokens=True), new, int(enc["input_ids"].shape[1]),
                      chat, seconds, base, peak_resident_bytes(), "transformers" if lean is None else "lean")


ENGINES = ("auto", "lean", "transformers")


class _Streamer:
    """transformers' streamer protocol (``put`` token ids, ``end``): decodes the new
    tokens so far and hands ``emit`` the text not yet given (the prompt skipped)."""

    def __init__(self, tok, emit):
        self.tok = tok
        self.emit = emit
        self.ids: list[int] = []
        self.said = 0
        self.prompt = True

    def put(self, value) -> None:
        if self.prompt:  # the first call carries the prompt
            self.prompt = False
            return
        self.add(*value.reshape(-1).tolist())

    def add(self, *ids: int) -> None:
        """New token ids (the lean loop calls this directly)."""
        self.ids.extend(int(v) for v in ids)
        self._emit_new(complete=False)

    def end(self) -> None:
        self._emit_new(complete=True)

    def _emit_new(self, complete: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not complete and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.said:
            self.emit(text[self.said:])
            self.said = len(text)
