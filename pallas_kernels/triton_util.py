"""Pieces shared by the Pallas Triton kernels (`flash_prefill`, `paged_decode`, `fused_layer`, `fused_mlp`)."""

from __future__ import annotations

from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels.sizes import next_power_of_2

MIN_DOT = 16  # smallest dimension of a Triton dot
MATMUL_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))  # of the fused matmuls


def dot_rows(num_tokens: int, at_most: int) -> int:
  """Rows of a matmul program's tile for `num_tokens` rows: the next power of two, at least `MIN_DOT` (fewer
  rows are padded) and at most `at_most`."""
  return max(MIN_DOT, min(at_most, next_power_of_2(num_tokens)))

# Launch parameters (num_warps, num_stages). NOTE: renamed across JAX versions (TritonCompilerParams ->
# CompilerParams).
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
