"""Rate allocation for the budget codec hhtl-vq (docs/design.md §2): the ladder of
settings with exact bits per weight, per-group sensitivity on the
calibration set, and the allocator behind ``hhtld encode --target/--bpw``."""

from .allocate import TARGETS, Allocation, Choice, allocate_rows, encode_budget
from .greedy import spend
from .settings import BY_NAME, LADDER, Setting, setting

__all__ = ["Allocation", "BY_NAME", "Choice", "LADDER", "Setting", "TARGETS", "allocate_rows",
           "encode_budget", "setting", "spend"]
