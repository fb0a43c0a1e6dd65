"""RMSNorm, the q/k/v projection, RoPE and the KV write of a decode step in two kernels (GPU, Pallas Triton).

One backend (`pallas_triton`); its reference is `pallas_kernels.reference.norm_qkv_rope_write`.
"""

from pallas_kernels.fused_layer.pallas_triton import FusedConfig, default_config, norm_qkv_rope_write

__all__ = ["FusedConfig", "default_config", "norm_qkv_rope_write"]
