"""RMSNorm, the q/k/v projection, RoPE and the KV write of a decode step in two kernels (GPU, Pallas Triton)."""

from pallas_kernels.fused_layer.pallas_triton import FusedConfig, default_config, norm_qkv_rope_write

__all__ = ["FusedConfig", "default_config", "norm_qkv_rope_write"]
