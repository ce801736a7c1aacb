"""Kernels that run a weight straight from its stored parts (docs/design.md §7).

:func:`vq_kernel` prepares an hhtl-vq weight; :meth:`VqKernel.matmul_t`
computes ``x @ W.T`` without materialising ``W``. :func:`backend` says which
backend runs them (numba, or numpy when numba is unavailable) and
:func:`int16_tables` whether the C extension's table sums can run.
"""

from .runtime import BACKENDS, ENV, backend, int16_tables, sync_threads
from .vq import (MAX_TABLE_ROWS, TABLES, KernelPair, StageArrays, TiledTwig, VqKernel, rows_for_tables, stage_palettes,
                 tile_twigs, vq_kernel)
from .warm import warm_up, warm_up_pairs

__all__ = ["BACKENDS", "ENV", "MAX_TABLE_ROWS", "TABLES", "KernelPair", "StageArrays", "TiledTwig", "VqKernel", "backend",
           "int16_tables", "rows_for_tables", "stage_palettes", "sync_threads", "tile_twigs", "vq_kernel",
           "warm_up", "warm_up_pairs"]
