"""Flash prefill attention over paged K/V (causal, GQA, ragged batches with cached prefixes).

`flash_prefill` has the signature of `pallas_kernels.reference.ragged_paged_attention` plus keyword-only
tuning arguments. Two Pallas implementations:

- "mosaic" (`pallas_mgpu`): Mosaic GPU, wgmma + TMA + warp specialization; Hopper (sm_90) only, bfloat16
  or float16, head_dim 64 or 128, no sliding window.
- "triton" (`pallas_triton`): Triton lowering; every dtype, head dim, page size and sliding window, and the
  Pallas interpreter (CPU tests).

`implementation=None` picks "mosaic" on an sm_90 GPU when it serves the inputs and no Triton tuning
argument was given, "triton" otherwise.
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_prefill import pallas_mgpu
from pallas_kernels.flash_prefill import pallas_triton
from pallas_kernels.gpu_info import on_hopper

_IMPLEMENTATIONS = ("mosaic", "triton")


def flash_prefill(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float,
                  sliding_window: int | None = None, k_scales=None, v_scales=None,
                  implementation: str | None = None, interpret: bool = False,
                  mosaic_config: pallas_mgpu.MosaicConfig | None = None, **triton_tuning) -> jax.Array:
  """Causal attention of ragged prompt chunks against paged K/V; see the module docstring.

  Args:
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale, sliding_window, k_scales,
      v_scales: as in `pallas_kernels.reference.ragged_paged_attention`.
    implementation: "mosaic", "triton" or None (automatic).
    interpret: run the Triton kernel in the Pallas interpreter (implies "triton").
    mosaic_config: launch parameters of the Mosaic kernel.
    **triton_tuning: block_q, block_k, num_warps, num_stages, prefetch_pages of the Triton kernel (None
      values count as not given).

  Returns:
    [T, H, D] in q's dtype; rows of padding tokens are zero.

  Raises:
    ValueError: for an unknown implementation.
    NotImplementedError: for inputs the chosen implementation does not serve.
  """
  if implementation not in (None, *_IMPLEMENTATIONS):
    raise ValueError(f"unknown flash_prefill implementation {implementation!r}; valid: {_IMPLEMENTATIONS}")
  triton_tuning = {name: value for name, value in triton_tuning.items() if value is not None}
  common = dict(sm_scale=sm_scale, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales)
  args = (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
  if implementation is None:
    implementation = "triton"
    if not interpret and not triton_tuning and on_hopper():
      try:
        pallas_mgpu.check_supported(q, k_pages, v_pages, sliding_window=sliding_window, k_scales=k_scales,
                                    v_scales=v_scales, config=mosaic_config or pallas_mgpu.MosaicConfig())
        implementation = "mosaic"
      except NotImplementedError:
        pass
  if implementation == "mosaic":
    if interpret or triton_tuning:
      raise ValueError(f"the mosaic implementation takes no interpret or Triton tuning arguments; got "
                       f"interpret={interpret}, {sorted(triton_tuning)}")
    return pallas_mgpu.flash_prefill(*args, **common, config=mosaic_config)
  return pallas_triton.flash_prefill(*args, **common, interpret=interpret, **triton_tuning)


__all__ = ["flash_prefill"]
