"""``hhtld.load_sentence_transformer``: a sentence-transformers model from a pack.

The pack's carried sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``, …) are read by
sentence-transformers itself from a private temporary folder; its
``Transformer`` module gets the model :func:`hhtld.load` built from the pack
instead of loading weights from disk.
"""

from __future__ import annotations

import os
import warnings

from ..errors import LoadError, MissingDependencyError
from ..pack.reader import Pack
from .deps import require
from .model import load
from .sidefiles import has_file, open_pack_arg, read_json, side_files

MIN_VERSION = "6.2"


def _transformer_base():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.models import Transformer
    return Transformer


def load_sentence_transformer(pack: str | os.PathLike | Pack, *, config=None, dtype=None, device=None,
                              keep_compressed: bool = False, cache_layers: int = 0, tables: str = "int16", **kwargs):
    """A ``sentence_transformers.SentenceTransformer`` whose transformer is
    :func:`hhtld.load` of ``pack`` (``config``, ``dtype``, ``keep_compressed``,
    ``cache_layers``, ``tables`` as there); the other modules (pooling, normalisation)
    come from the pack's carried files. ``device`` and ``kwargs`` go to
    ``SentenceTransformer``. ``model.encode(texts)`` then works as usual.

    Needs the ``sentence-transformers`` extra (``pip install
    'hhtld[sentence-transformers]'``); a pack without ``modules.json`` is a
    :class:`LoadError`."""
    st = require("sentence_transformers", "hhtld.load_sentence_transformer")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import import_from_string

    if not hasattr(SentenceTransformer, "_load_with_module_classes"):
        raise MissingDependencyError(
            f"hhtld.load_sentence_transformer needs sentence-transformers >= {MIN_VERSION} (found {st.__version__}); "
            f"install it with pip install 'hhtld[sentence-transformers]'"
        )
    p = open_pack_arg(pack)
    if not has_file(p, "modules.json"):
        raise LoadError(
            f"{p.path}: the pack carries no sentence-transformers modules.json; use hhtld.load (a transformers "
            f"model) or hhtld.embed (mean pooling + L2 normalisation)"
        )
    modules = read_json(p, "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise LoadError(f"{p.path}: the carried modules.json is not a list of sentence-transformers modules")
    base = _transformer_base()
    net = load(p, config=config, family="embedding", dtype=dtype, keep_compressed=keep_compressed,
               cache_layers=cache_layers, tables=tables)

    class PackTransformer(base):
        """sentence-transformers' Transformer module with the model built from the pack."""

        def _load_model(self, *args, **kw):
            return net

    classes = {}
    for m in modules:
        ref = str(m["type"])
        if not ref.startswith("sentence_transformers."):
            continue  # custom code: sentence-transformers resolves it (and gates it) itself
        try:
            cls = import_from_string(ref)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            classes[ref] = PackTransformer
    if not classes:
        raise LoadError(f"{p.path}: the carried modules.json has no sentence-transformers Transformer module "
                        f"to put the pack's weights in")
    with side_files(p) as tmp:
        try:
            return SentenceTransformer._load_with_module_classes(str(tmp), classes, device=device,
                                                                 local_files_only=True, **kwargs)
        except LoadError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise LoadError(f"{p.path}: sentence-transformers cannot build a model from the carried files "
                            f"({type(e).__name__}: {msg})") from None
