"""Codec-space experiments: does a codec's table lookup stand in for the real product? (docs/design.md §6)"""

from .attention import AttentionProbeResult, probe_attention, verdict_band

__all__ = ["AttentionProbeResult", "probe_attention", "verdict_band"]
