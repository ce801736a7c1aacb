"""Optional dependencies of ``hhtld.load``, imported only when a model is built."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

# import name -> (distribution name, the hhtld extra that installs it)
_EXTRAS = {
    "torch": ("torch", "load"),
    "transformers": ("transformers", "load"),
    "accelerate": ("accelerate", "load"),
    "sentence_transformers": ("sentence-transformers", "sentence-transformers"),
}


def require(module: str, what: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra.

    ``what`` says what needed it, e.g. ``"hhtld.load"``; ``extra``: the extra to name
    (default the one that installs ``module``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        dist, default = _EXTRAS.get(module, (module, "load"))
        extra = extra or default
        raise MissingDependencyError(
            f"{what} needs {dist}, which is not installed ({e}); install it with pip install 'hhtld[{extra}]'"
        ) from None


def torch_and_transformers(what: str) -> tuple[ModuleType, ModuleType]:
    return require("torch", what), require("transformers", what)
