"""Former home of :mod:`hhtld.measure.targets`: importing it still works for one release,
with a ``DeprecationWarning``."""

import warnings

from ..measure.targets import *  # noqa: F401,F403

warnings.warn("hhtld.gates.targets is deprecated and will be removed in the next release; use hhtld.measure.targets",
              DeprecationWarning, stacklevel=2)
