"""A decode step's layer after attention in skinny matmuls with their epilogues (GPU, Pallas Triton):
`norm_gate_up_silu` (RMSNorm, gate/up, SiLU product) and `matmul_add` (a projection with its residual add).

One backend (`pallas_triton`); the references are `pallas_kernels.reference.norm_gate_up_silu` and
`pallas_kernels.reference.matmul_add`.
"""

from pallas_kernels.fused_mlp.pallas_triton import SkinnyConfig, matmul_add, norm_gate_up_silu

__all__ = ["SkinnyConfig", "matmul_add", "norm_gate_up_silu"]
