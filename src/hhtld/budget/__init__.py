"""Rate allocation for the budget codec hhtl-vq (docs/design.md §2): the ladder of
settings with exact bits per weight, per-group sensitivity on the
calibration set, and the allocator behind ``hhtld encode --target/--bpw``."""

from .allocate import TARGETS, Allocation, Choice, allocate_rows, check_budget_options, check_pack_output, encode_rows
from .greedy import spend
from .settings import BY_NAME, LADDER, Setting, setting

__all__ = ["Allocation", "BY_NAME", "Choice", "LADDER", "Setting", "TARGETS", "allocate_rows",
           "check_budget_options", "check_pack_output", "encode_rows", "setting", "spend"]
