"""What behaviour means, below everything that measures it: the fixed texts (calibration,
check and held-out, by kind), the thresholds of the gates and of the behaviour target,
and the comparison of two runs. The calibrated encode and the gates both read them."""

from .compare import RunOutputs, compare_embeddings_by_kind, compare_outputs, retrieval_neighbours
from .targets import Thresholds
from .texts import calibration_passages, calibration_texts, heldout_passages, heldout_texts

__all__ = ["RunOutputs", "Thresholds", "calibration_passages", "calibration_texts", "compare_embeddings_by_kind",
           "compare_outputs", "heldout_passages", "heldout_texts", "retrieval_neighbours"]
