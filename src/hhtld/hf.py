"""``import hhtld.hf``: transformers loads a pack's Hugging Face folder.

Importing this module registers the ``hhtld`` quantisation method with
transformers (:mod:`hhtld.loader.hf_quantizer`); then a folder written by
``hhtld export-hf`` (:func:`export_hf`) loads as any other::

    import hhtld.hf
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained("smollm2-hhtld")
    generate = pipeline("text-generation", model="smollm2-hhtld")

and ``SentenceTransformer(folder)`` for an embedding model. Needs the ``hf`` extra
(``pip install 'hhtld[hf]'``: torch and the transformers versions it is tested with).
"""

from __future__ import annotations

from .loader.deps import require

require("torch", "hhtld.hf", "hf")
require("transformers", "hhtld.hf", "hf")

from .loader.hf_folder import export_hf  # noqa: E402
from .loader.hf_quantizer import HhtldConfig, HhtldQuantizer, register  # noqa: E402

register()

__all__ = ["HhtldConfig", "HhtldQuantizer", "export_hf", "register"]
