"""Ragged paged attention in one kernel for TPU: prompt chunks with cached prefixes and decodes in one call.

`ragged_paged_attention` has the signature of `pallas_kernels.reference.ragged_paged_attention` plus
`interpret` and `block_sizes`. One implementation, `pallas_tpu` (Pallas, Mosaic TPU), which also runs in TPU
interpret mode on any platform (the CPU tests); its block sizes come from `tuning`, keyed by TPU generation.
On GPU a mixed batch goes to two kernels instead (`pallas_kernels.mixed_batch`).
"""

from pallas_kernels.ragged_paged.pallas_tpu import check_supported, ragged_paged_attention
from pallas_kernels.ragged_paged.tuning import BlockSizes, Generation

__all__ = ["BlockSizes", "Generation", "check_supported", "ragged_paged_attention"]
