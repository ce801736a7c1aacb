"""Use a pack directly: a ready transformers / sentence-transformers model,
weights decoded tensor by tensor into the model (or kept compressed), no
dense files.

* :func:`load` — a ``transformers`` model; :func:`load_tokenizer` — its tokenizer;
* :func:`load_sentence_transformer` — a ``SentenceTransformer`` (extra ``sentence-transformers``);
* :func:`embed` / :func:`generate` — what ``hhtld embed`` / ``hhtld generate`` run;
* :func:`weight_memory` — bytes of the weights a loaded model holds.

torch and transformers are imported only when these are called (extra ``load``).
"""

from __future__ import annotations

from .model import LoadInfo, load, load_tokenizer
from .sentence import load_sentence_transformer
from .text import Generation, embed, embedding_pooling, generate


def weight_memory(model) -> dict[str, int]:
    """Bytes of the weights ``model`` holds, each tensor once: ``compressed``
    (stored parts of weights kept compressed), ``dense`` (every other
    parameter and buffer), ``total``, ``decoded_cache`` (decoded weights the
    LRU of ``cache_layers`` holds now)."""
    from .compressed import weight_memory as _wm

    return _wm(model)


__all__ = ["Generation", "LoadInfo", "embed", "embedding_pooling", "generate", "load",
           "load_sentence_transformer", "load_tokenizer", "weight_memory"]
