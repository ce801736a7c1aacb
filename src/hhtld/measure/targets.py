"""The targets each gate is judged against (docs/design.md §5), overridable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import OptionsError


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail targets of the four gates.

    Row fidelity (gate 1): per regime, the median and the 5th percentile of
    the per-row cosines must reach ``*_median`` and ``*_p5``. Behaviour
    (gate 2): embedding models: top-1 retrieval agreement ≥ ``min_top1``;
    causal LMs: held-out perplexity ratio (decoded / original) ≤
    ``max_ppl_ratio``. Storage (gate 3): original at bf16 / pack ≥ ``min_ratio``. Output agreement (gate 4): mean embedding
    cosine ≥ ``min_cosine`` (embedding models), mean next-token KL ≤
    ``max_kl`` nats (causal models).
    """

    argmax_median: float = 0.95
    argmax_p5: float = 0.90
    index_median: float = 0.98
    index_p5: float = 0.95
    min_top1: float = 0.95
    min_ratio: float = 2.0
    min_cosine: float = 0.995
    max_kl: float = 0.02
    max_ppl_ratio: float = 1.02

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v != v:
                raise OptionsError(f"threshold {f.name} must be a number, got {v!r}")
        for name in ("argmax_median", "argmax_p5", "index_median", "index_p5", "min_cosine"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise OptionsError(f"threshold {name} is a cosine and must lie in [-1, 1], got {getattr(self, name)}")
        if not 0.0 <= self.min_top1 <= 1.0:
            raise OptionsError(f"threshold min_top1 is a fraction and must lie in [0, 1], got {self.min_top1}")
        if self.min_ratio <= 0:
            raise OptionsError(f"threshold min_ratio must be > 0, got {self.min_ratio}")
        if self.max_kl < 0:
            raise OptionsError(f"threshold max_kl must be >= 0, got {self.max_kl}")
        if self.max_ppl_ratio <= 0:
            raise OptionsError(f"threshold max_ppl_ratio must be > 0, got {self.max_ppl_ratio}")

    def row_targets(self, regime: str) -> tuple[float, float]:
        """(median, p5) targets of a regime (``argmax`` or ``index``)."""
        if regime == "index":
            return self.index_median, self.index_p5
        return self.argmax_median, self.argmax_p5

    def to_json(self) -> dict:
        return asdict(self)
