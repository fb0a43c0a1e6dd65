"""Pieces shared by the Pallas Triton kernels (`flash_prefill`, `paged_decode`, `fused_layer`)."""

from __future__ import annotations

from jax.experimental.pallas import triton as plgpu

# Launch parameters (num_warps, num_stages). NOTE: renamed across JAX versions (TritonCompilerParams ->
# CompilerParams).
CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
