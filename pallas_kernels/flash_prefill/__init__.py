"""Flash prefill attention over paged K/V (causal, GQA, ragged batches with cached prefixes).

`flash_prefill` has the signature of `pallas_kernels.reference.ragged_paged_attention` plus keyword-only
tuning arguments; today it is the Triton-lowered Pallas kernel (`pallas_triton`).
"""

from pallas_kernels.flash_prefill.pallas_triton import flash_prefill

__all__ = ["flash_prefill"]
