"""Former home of :mod:`hhtld.measure.texts`: importing it still works for one release,
with a ``DeprecationWarning``."""

import warnings

from ..measure.texts import *  # noqa: F401,F403

warnings.warn("hhtld.gates.texts is deprecated and will be removed in the next release; use hhtld.measure.texts",
              DeprecationWarning, stacklevel=2)
