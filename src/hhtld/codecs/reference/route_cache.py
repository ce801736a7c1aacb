"""The HHTL cache: a palette's k x k u16 distance table and k x k route table (docs/design.md §2).

Distances: the palette's own metric between centroids (L1 for Base17). They
are stored exactly when they are integers that fit in u16; otherwise they are
scaled so the largest becomes 65535 (``scale`` says by how much).

Routes, from percentiles of the off-diagonal stored distances
(defaults ``ROUTE_ATTEND_PERCENTILE = 25``, ``ROUTE_SKIP_PERCENTILE = 75``):

* ``Attend``   — ``d <= P25``: a near pair, the table lookup is trusted as is
  (also every diagonal entry);
* ``Skip``     — ``d >= P75``: a far pair, its score is negligible;
* the undecided middle (``P25 < d < P75``) splits in two:
  ``Compose``  — both centroids are in the same HIP family: the pair is
  resolved inside the family (the family-local lookup composed with each
  row's residual ``slot_v``) without leaving codec space;
  ``Escalate`` — different families: the pair needs the exact product (the
  leaf or the real rows).

Attend wins over Skip when both thresholds coincide (heavily tied distances).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import CodecError
from ...format import HHTL_DISTANCE_MAX, ROUTE_ATTEND_PERCENTILE, ROUTE_SKIP_PERCENTILE, RouteAction


def check_percentiles(attend: float, skip: float) -> tuple[float, float]:
    """``0 <= attend <= skip <= 100`` or a CodecError."""
    try:
        a, s = float(attend), float(skip)
    except (TypeError, ValueError):
        raise CodecError(f"route percentiles must be numbers, got {attend!r} and {skip!r}") from None
    if not (0.0 <= a <= s <= 100.0):
        raise CodecError(f"route percentiles must satisfy 0 <= attend ({a}) <= skip ({s}) <= 100")
    return a, s


def quantize_distances(dist: np.ndarray) -> tuple[np.ndarray, float]:
    """(k, k) non-negative distances → ((k, k) uint16, scale): exact for integers <= 65535,
    else ``rint(d * scale)`` with ``scale = 65535 / max``."""
    d = np.asarray(dist)
    peak = float(d.max()) if d.size else 0.0
    if np.issubdtype(d.dtype, np.integer) and peak <= HHTL_DISTANCE_MAX:
        return d.astype(np.uint16), 1.0
    scale = HHTL_DISTANCE_MAX / peak if peak > 0 else 1.0
    return np.clip(np.rint(d.astype(np.float64) * scale), 0, HHTL_DISTANCE_MAX).astype(np.uint16), scale


def route_table(distance: np.ndarray, hip: np.ndarray, attend_max: float, skip_min: float) -> np.ndarray:
    """distance (k, k) u16, hip (k,) u8 → (k, k) uint8 RouteAction codes."""
    d = np.asarray(distance, dtype=np.float64)
    same = hip[:, None] == hip[None, :]  # (k, k)
    route = np.where(same, RouteAction.Compose, RouteAction.Escalate).astype(np.uint8)
    route[d >= skip_min] = RouteAction.Skip
    route[d <= attend_max] = RouteAction.Attend
    np.fill_diagonal(route, RouteAction.Attend)
    return route


@dataclass
class HhtlCache:
    """distance: (k, k) uint16; route: (k, k) uint8 (RouteAction); thresholds on the stored distances."""

    distance: np.ndarray
    route: np.ndarray
    attend_max: float
    skip_min: float
    scale: float = 1.0
    attend_percentile: float = ROUTE_ATTEND_PERCENTILE
    skip_percentile: float = ROUTE_SKIP_PERCENTILE

    @classmethod
    def build(cls, dist: np.ndarray, hip: np.ndarray, attend_percentile: float = ROUTE_ATTEND_PERCENTILE,
              skip_percentile: float = ROUTE_SKIP_PERCENTILE) -> "HhtlCache":
        """dist: (k, k) symmetric distances in the palette's metric; hip: (k,) families."""
        a, s = check_percentiles(attend_percentile, skip_percentile)
        q, scale = quantize_distances(dist)
        k = q.shape[0]
        off = q[~np.eye(k, dtype=bool)].astype(np.float64)
        if off.size:
            attend_max = float(np.percentile(off, a))
            skip_min = float(np.percentile(off, s))
        else:
            attend_max, skip_min = 0.0, float(HHTL_DISTANCE_MAX) + 1.0
        return cls(q, route_table(q, np.asarray(hip), attend_max, skip_min), attend_max, skip_min, scale, a, s)

    @property
    def k(self) -> int:
        return int(self.distance.shape[0])

    def action(self, i, j):
        """RouteAction code(s) of twig pair(s) ``(i, j)``."""
        return self.route[np.asarray(i), np.asarray(j)]

    def table_mix(self) -> dict[str, float]:
        """Share of each action over the off-diagonal pairs."""
        k = self.k
        return action_mix(self.route[~np.eye(k, dtype=bool)])

    def params(self) -> dict:
        return {"attend_percentile": self.attend_percentile, "skip_percentile": self.skip_percentile,
                "attend_max": self.attend_max, "skip_min": self.skip_min, "distance_scale": self.scale,
                "route_mix": {a: round(v, 6) for a, v in self.table_mix().items()}}

    def byte_size(self) -> int:
        return self.distance.nbytes + self.route.nbytes


def action_mix(codes: np.ndarray) -> dict[str, float]:
    """Share of each RouteAction among ``codes`` (any shape), by action name."""
    codes = np.asarray(codes).ravel()
    cnt = np.bincount(codes, minlength=len(RouteAction))[: len(RouteAction)]
    tot = max(1, codes.size)
    return {a.name: float(cnt[int(a)]) / tot for a in RouteAction}


__all__ = ["HhtlCache", "action_mix", "check_percentiles", "quantize_distances", "route_table"]
